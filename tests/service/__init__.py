"""Tests of the service package, in process."""
