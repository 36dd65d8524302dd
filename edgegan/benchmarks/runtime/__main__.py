"""`python -m edgegan.benchmarks.runtime [--quick] [--sections ...]`: what scripts/bench-runtime runs."""

from edgegan.benchmarks.runtime.cli import main

main()
