"""The runtime benchmark's report: the machine it ran on, markdown tables, report.md and results.json
(rewritten after every section, so an interrupted run keeps what it measured), and the plots' backend."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from edgegan.benchmarks.runtime.harness import Sizes


def machine_description() -> dict:
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or "unknown",
    )
    memory_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(memory_kb / 2**20, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return lines


class Report:
    """report.md and results.json, rewritten after every section."""

    def __init__(self, out: Path, command: str, machine: dict, sizes: Sizes):
        self.out = out
        self.command = command
        self.machine = machine
        self.sizes = sizes
        self.sections: list[tuple[str, list[str]]] = []
        self.results: dict[str, object] = {"machine": machine, "sizes": asdict(sizes)}

    def machine_line(self) -> str:
        m = self.machine
        load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
        return (
            f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, torch {m['torch']}, "
            f"Python {m['python']}; load average at the start {m['load_average_at_start']}, "
            f"after this section {load}."
        )

    def add(self, title: str, lines: list[str], results: object) -> None:
        self.sections.append((title, [f"Command: `{self.command}`. " + self.machine_line(), "", *lines]))
        self.results[title] = results
        self.write()

    def write(self) -> None:
        text = ["# Runtime performance", "", f"Command: `{self.command}`", ""]
        for title, lines in self.sections:
            text += [f"## {title}", "", *lines, ""]
        (self.out / "report.md").write_text("\n".join(text))
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def matplotlib_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot
