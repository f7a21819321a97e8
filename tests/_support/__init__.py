"""Test support shared by every test directory (and bench/): apps, PostgreSQL, servers, ports, bodies."""
