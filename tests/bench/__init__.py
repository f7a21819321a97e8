"""Tests of the benchmarks' own code (bench/): what they report, not how fast anything is."""
