"""Admin API (administrator tokens only), under /admin: `accounts` (users, API keys, the model catalog) and
`reports` (audits and their CSV export, security events, usage, the extraction watch, the timeline)."""
