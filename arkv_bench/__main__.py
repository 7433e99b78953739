"""`python -m arkv_bench ...` (what torchrun starts on each rank) is the `arkv-bench` command."""

from arkv_bench.cli import main

main()
