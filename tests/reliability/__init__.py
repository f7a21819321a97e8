"""Reliability tests: faults, hostile inputs, secrets, limits and load against real servers."""
