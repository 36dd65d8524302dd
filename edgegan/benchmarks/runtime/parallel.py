"""Section 2: the parallel schedule's round time against its bound, from the server's trace, the devices'
status messages and a loopback transfer probe through the same broker."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from edgegan.benchmarks.runtime.harness import (
    Broker,
    Sizes,
    StatusWatcher,
    edgegan_command,
    median,
    read_metrics,
    read_trace,
    round_durations,
    run_measured,
    transfer_probe,
)
from edgegan.benchmarks.runtime.report import matplotlib_pyplot, table, verdict


def section_parallel(sizes: Sizes, work: Path, broker: Broker) -> tuple[list[str], dict]:
    rounds = sizes.parallel_rounds
    out = work / "parallel"
    shutil.rmtree(out, ignore_errors=True)
    run_name = f"bench-parallel-{os.getpid()}"
    command = edgegan_command(
        "run",
        "--dataset",
        "mnist",
        "--devices",
        str(sizes.parallel_devices),
        "--rounds",
        str(rounds),
        "--eval-every",
        str(rounds),
        "--schedule",
        "parallel",
        "--tau",
        "1",
        "--status-interval",  # the bound needs every round's device compute, which status messages carry
        "0",
        "--broker",
        broker.url,
        "--run",
        run_name,
        "--out",
        str(out),
    )
    watcher = StatusWatcher(broker.port, run_name)
    try:
        print(f"  parallel: {rounds} rounds, {sizes.parallel_devices} device(s)", file=sys.stderr, flush=True)
        measured = run_measured(command, work / "parallel.log", 30 * 60)
    finally:
        watcher.close()
    if measured.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {work}/parallel.log")
    traces = {row["round"]: row for row in read_trace(out)}  # keyed by rounds done (1-based)
    durations = round_durations(read_metrics(out))
    compute = watcher.compute_by_round()  # keyed by 0-based round index
    sample = traces[max(traces)]
    transfer = transfer_probe(broker.port, {"down": sample["bytes_down"][0], "up": sample["bytes_up"][0]})
    per_round = []
    for done, measured_s in sorted(durations.items()):
        trace, devices = traces.get(done), compute.get(done - 1)
        if trace is None or not devices or len(devices) < sizes.parallel_devices:
            continue
        device_phase = max(devices.values()) + transfer["down"] + transfer["up"]
        overlap = trace["server_overlap_s"]
        bound = trace["server_before_s"] + max(device_phase, overlap) + trace["server_after_s"]
        per_round.append(
            {
                "round": done,
                "measured_s": measured_s,
                "bound_s": bound,
                "device_s": max(devices.values()),
                "overlap_s": overlap,
                "before_s": trace["server_before_s"],
                "after_s": trace["server_after_s"],
            }
        )
    if not per_round:
        raise RuntimeError("no round had both the server's trace and every device's compute")
    ratio = median([item["measured_s"] / item["bound_s"] for item in per_round])
    total_ratio = sum(item["measured_s"] for item in per_round) / sum(item["bound_s"] for item in per_round)
    keys = ("measured_s", "bound_s", "device_s", "overlap_s", "before_s", "after_s")
    medians = {key: median([item[key] for item in per_round]) for key in keys}
    rows = [
        [
            sizes.parallel_devices,
            len(per_round),
            medians["measured_s"] * 1000,
            medians["bound_s"] * 1000,
            f"{ratio:.3f}",
            f"{total_ratio:.3f}",
            medians["device_s"] * 1000,
            (transfer["down"] + transfer["up"]) * 1000,
            medians["overlap_s"] * 1000,
            medians["before_s"] * 1000,
            medians["after_s"] * 1000,
        ]
    ]
    plot_parallel(per_round, work.parent.parent / "parallel-rounds.png")
    lines = [
        f"`edgegan run --dataset mnist --devices {sizes.parallel_devices} --rounds {rounds} "
        f"--schedule parallel --tau 1` over {broker.name}. Per round r the bound is server_before + "
        "max(device compute + transfer, server_overlap) + server_after, from what the run records: "
        "the server's trace.jsonl "
        "(`server_before_s`: snapshot and encoding of the global model; `server_overlap_s`: the generator "
        "step that overlaps the devices; `server_after_s`: folding the updates in), each device's "
        "`round_compute_s` from its status messages (decoding the global model, training, encoding the "
        "update; the slowest device counts), and the loopback transfer of one global model and one update "
        f"through the same broker (a QoS 1 round trip of a message of each size: "
        f"{transfer['down'] * 1000:.1f} + {transfer['up'] * 1000:.1f} ms). *Measured* is the round's wall "
        "time at the server (metrics.csv), leaving out round 1 and evaluation rounds. The bound assumes "
        "every party has a core of its own, which on this machine holds only for one device.",
        "",
        *table(
            [
                "devices",
                "rounds",
                "measured ms",
                "bound ms",
                "measured / bound (median)",
                "sum measured / sum bound",
                "device compute ms",
                "transfer ms",
                "G step (overlap) ms",
                "before ms",
                "after ms",
            ],
            rows,
        ),
        "",
        f"Target: within 10% of the bound — {verdict(ratio <= 1.10)}. Per-round plot: "
        "[parallel-rounds.png](parallel-rounds.png).",
    ]
    return lines, {"per_round": per_round, "transfer_s": transfer, "ratio": ratio, "total_ratio": total_ratio}


def plot_parallel(per_round: list[dict], path: Path) -> None:
    pyplot = matplotlib_pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 3.5), dpi=100)
    rounds = [item["round"] for item in per_round]
    axes.plot(rounds, [item["measured_s"] * 1000 for item in per_round], label="measured", marker=".")
    axes.plot(rounds, [item["bound_s"] * 1000 for item in per_round], label="bound", marker=".")
    axes.set_xlabel("round")
    axes.set_ylabel("ms")
    axes.set_title("parallel schedule: round time against its bound")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
