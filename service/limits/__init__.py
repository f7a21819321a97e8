"""Limits on anonymous and licensed traffic: client identity, rate limits, the extraction watch, Redis."""
