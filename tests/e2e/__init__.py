"""End-to-end tests: real servers over loopback HTTP."""
