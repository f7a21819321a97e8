"""Benchmarks: serve_bench (server vs raw model), loadgen (its load generator), soak."""
