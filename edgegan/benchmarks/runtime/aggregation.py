"""Section 4c: the aggregation rules called directly on N MNIST discriminator states: time and the
peak memory each call adds."""

from __future__ import annotations

import os
import time
from pathlib import Path

from edgegan.benchmarks.runtime.harness import Sizes, median
from edgegan.benchmarks.runtime.report import matplotlib_pyplot, table
from edgegan.devtools.procfs import proc_status


def rss_kb() -> int:
    return proc_status(os.getpid()).get("VmRSS", 0)


def reset_peak_rss() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def section_aggregation(sizes: Sizes, plots: Path) -> tuple[list[str], dict]:
    import torch

    from edgegan.algorithms.aggregation import aggregate, parse_aggregate
    from edgegan.config import resolve_run
    from edgegan.models import ModelSpec, build_discriminator

    torch.set_num_threads(1)
    spec = ModelSpec(
        (1, 28, 28), resolve_run("mnist", "latent_dim", None), resolve_run("mnist", "width", None)
    )
    base = build_discriminator(spec).state_dict()
    state_mb = sum(tensor.numel() * tensor.element_size() for tensor in base.values()) / 2**20
    rules = ("mean", "median", "trimmed:0.1")
    results = []
    generator = torch.Generator().manual_seed(0)
    for clients in sizes.aggregate_clients:
        states = [
            {
                name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
                for name, tensor in base.items()
            }
            for _ in range(clients)
        ]
        weights = [1.0 + index % 7 for index in range(clients)]
        for rule_text in rules:
            rule = parse_aggregate(rule_text)
            before = rss_kb()
            peaks, times = [], []
            for _ in range(sizes.aggregate_repeats):
                reset = reset_peak_rss()
                started = time.perf_counter()
                aggregate(rule, states, weights, base)
                times.append(time.perf_counter() - started)
                peaks.append(proc_status(os.getpid()).get("VmHWM", 0) - before if reset else float("nan"))
            results.append(
                {
                    "clients": clients,
                    "rule": rule_text,
                    "time_s": median(times),
                    "extra_peak_mb": max(peaks) / 1024,
                    "inputs_mb": clients * state_mb,
                }
            )
        del states
    rows = [
        [item["clients"], item["rule"], item["time_s"] * 1000, item["extra_peak_mb"], item["inputs_mb"]]
        for item in results
    ]
    plot_aggregation(results, plots / "aggregation.png")
    lines = [
        "`edgegan.algorithms.aggregation.aggregate` called directly on N MNIST discriminator states "
        f"({state_mb * 1024:.0f} kB each, fp32) with one torch thread: median time of "
        f"{sizes.aggregate_repeats} call(s) and the peak RSS the call adds above what the N input states "
        "already hold (VmHWM reset before each call). `mean` folds one state at a time into a float64 "
        "running sum (`RunningWeightedMean`); `median` and `trimmed` stack all N states per tensor "
        "(`torch.stack`, then `median` / `sort`), so they need every update of the round at once and their "
        "extra memory grows with N.",
        "",
        *table(["N", "rule", "time ms", "extra peak MB", "inputs MB (N states)"], rows),
        "",
        "Plot: [aggregation.png](aggregation.png).",
    ]
    return lines, {"state_mb": state_mb, "runs": results}


def plot_aggregation(results: list[dict], path: Path) -> None:
    pyplot = matplotlib_pyplot()
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for rule in sorted({item["rule"] for item in results}):
        points = [item for item in results if item["rule"] == rule]
        clients = [item["clients"] for item in points]
        left.plot(clients, [item["time_s"] * 1000 for item in points], marker="o", label=rule)
        right.plot(clients, [item["extra_peak_mb"] for item in points], marker="o", label=rule)
    left.set_ylabel("time per round (ms)")
    right.set_ylabel("extra peak memory (MB)")
    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_xlabel("updates N")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("aggregation rules on MNIST discriminator states")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
