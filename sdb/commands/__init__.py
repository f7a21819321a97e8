"""The sub-commands of the `sdb` command line, one module per group."""
