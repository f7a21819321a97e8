"""Tests of the sdb_core ML library."""
