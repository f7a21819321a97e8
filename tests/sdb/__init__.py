"""Tests of the sdb command line and client."""
