"""`python -m sdb ...`, as torchrun starts it: `torchrun --standalone --nproc-per-node N -m sdb box ...`."""

from sdb.cli import main

main()
