"""Benchmarks run from a checkout (scripts/bench-*): measurements of the package from outside, through the
`edgegan` command and the package's own functions. Nothing else in edgegan imports this package."""
