"""sdb: the command line (`sdb ...`) and the HTTP client for licensed users."""
