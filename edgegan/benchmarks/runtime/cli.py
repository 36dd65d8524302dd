"""Runtime performance (issue 5): what the MQTT runtime costs over the in-process simulator, how close the
parallel schedule comes to its round-time bound, what each codec costs and saves, how the server scales
with real and light clients, what the aggregation rules cost against N, what a device process weighs, and
where a server and a device spend their time.

Every run goes through the `edgegan` command (or, for micro-benchmarks, the package's own functions) and
is measured from outside: whole-command wall time, the run's own summary.json / metrics.csv / trace.jsonl,
and each process's peak RSS and CPU seconds from wait4(2) and /proc. Writes runs/bench-runtime/report.md
(section by section, so an interrupted run keeps what it measured), results.json and PNG plots.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from edgegan.benchmarks.runtime.aggregation import section_aggregation
from edgegan.benchmarks.runtime.footprint import section_footprint
from edgegan.benchmarks.runtime.harness import QUICK, Broker, Sizes
from edgegan.benchmarks.runtime.load import section_load
from edgegan.benchmarks.runtime.overhead import section_overhead
from edgegan.benchmarks.runtime.parallel import section_parallel
from edgegan.benchmarks.runtime.profiles import profile_child, section_profile
from edgegan.benchmarks.runtime.report import Report, machine_description
from edgegan.benchmarks.runtime.scale import section_scale
from edgegan.benchmarks.runtime.wire_codecs import section_codecs

SECTIONS = ("overhead", "parallel", "codecs", "scale", "load", "aggregation", "footprint", "profile")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--profile-child":
        profile_child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every section at tiny sizes (CI smoke test)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-runtime"))
    parser.add_argument("--repeats", type=int, help="overhead runs per variant")
    parser.add_argument("--scale-devices", type=int, help="device processes in the scale section")
    parser.add_argument("--load-clients", help="comma-separated N for the load generator, e.g. 10,100,1000")
    parser.add_argument("--parallel-devices", type=int, help="devices in the parallel-bound run")
    parser.add_argument(
        "--device-python",
        help="also measure the device footprint with this interpreter (e.g. a venv with a CPU-only torch); "
        "it runs this checkout's edgegan through PYTHONPATH",
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats)
    if args.scale_devices:
        sizes = replace(sizes, scale_devices=args.scale_devices)
    if args.load_clients:
        sizes = replace(sizes, load_clients=tuple(int(n) for n in args.load_clients.split(",")))
    if args.parallel_devices:
        sizes = replace(sizes, parallel_devices=args.parallel_devices)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    command = "scripts/bench-runtime" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    report = Report(out, command, machine_description(), sizes)
    started = time.perf_counter()
    titles = {
        "overhead": "1. MQTT runtime against the in-process simulator",
        "parallel": "2. Parallel schedule against its round-time bound",
        "codecs": "3. Codecs: bytes, encode and decode time, final quality",
        "scale": "4a. Many device processes",
        "load": "4b. Server against N light clients (load generator)",
        "aggregation": "4c. Aggregation rules against N",
        "footprint": "5. Device agent footprint",
        "profile": "6. Profiles of a server and a device",
    }
    with Broker(work / "broker") as broker:
        for name in sections:
            section_started = time.perf_counter()
            print(f"{titles[name]} ...", file=sys.stderr, flush=True)
            section_work = work / name
            section_work.mkdir(parents=True, exist_ok=True)
            if name == "overhead":
                lines, results = section_overhead(sizes, section_work, broker)
            elif name == "parallel":
                lines, results = section_parallel(sizes, section_work, broker)
            elif name == "codecs":
                lines, results = section_codecs(sizes, section_work)
            elif name == "scale":
                lines, results = section_scale(sizes, section_work, broker)
            elif name == "load":
                lines, results = section_load(sizes, section_work, broker)
            elif name == "aggregation":
                lines, results = section_aggregation(sizes, out)
            elif name == "footprint":
                lines, results = section_footprint(sizes, section_work, broker, args.device_python)
            else:
                lines, results = section_profile(sizes, section_work, broker)
            elapsed = time.perf_counter() - section_started
            report.add(titles[name], [*lines, "", f"(This section took {elapsed:.0f} s.)"], results)
            print(f"  done in {elapsed:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    report.results["total_s"] = total
    report.write()
    print(f"report: {out / 'report.md'} ({total:.0f} s)", file=sys.stderr)
