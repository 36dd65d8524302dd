"""Runtime performance (docs/benchmarks.md): scripts/bench-runtime runs this. The benchmark itself is the
package edgegan/benchmarks/runtime/ (one module per section); this file only starts its command line."""

from edgegan.benchmarks.runtime.cli import main

if __name__ == "__main__":
    main()
