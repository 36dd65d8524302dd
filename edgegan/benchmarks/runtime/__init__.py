"""The runtime benchmark (scripts/bench-runtime, docs/benchmarks.md): a harness shared by every section
(harness.py: processes, brokers, status watcher, run outputs; report.py: report.md and tables), one module
per section, and the command line (cli.py). It runs the `edgegan` command as subprocesses, never imports
edgegan.cli, and nothing else in edgegan imports it."""
