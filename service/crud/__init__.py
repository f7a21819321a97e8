"""The data layer: one module per domain; no HTTP statuses, only reasons that the routes map."""
