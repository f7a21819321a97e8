"""Configuration, security, service state, request dependencies and error handlers."""
