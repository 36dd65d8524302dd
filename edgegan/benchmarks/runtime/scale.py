"""Section 4a: one server and many `edgegan device` processes started at once over one broker."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from edgegan.benchmarks.runtime.harness import (
    Broker,
    Sizes,
    edgegan_command,
    median,
    read_metrics,
    reap,
    round_durations,
    start,
)
from edgegan.benchmarks.runtime.report import table, verdict


def section_scale(sizes: Sizes, work: Path, broker: Broker) -> tuple[list[str], dict]:
    devices, rounds = sizes.scale_devices, sizes.scale_rounds
    out = work / "scale"
    shutil.rmtree(out, ignore_errors=True)
    run_name = f"bench-scale-{os.getpid()}"
    shared = ["--broker", broker.url, "--run", run_name, "--dataset", "ring8"]
    processes = {
        "server": start(
            edgegan_command(
                "server",
                *shared,
                "--devices",
                str(devices),
                "--rounds",
                str(rounds),
                "--eval-every",
                str(rounds),
                "--deadline-s",
                "300",
                "--out",
                str(out),
                "--log-level",
                "warning",
            ),
            work / "scale-server.log",
        )
    }
    for index in range(devices):
        processes[f"device-{index}"] = start(
            edgegan_command(
                "device",
                *shared,
                "--id",
                f"device-{index}",
                "--index",
                str(index),
                "--of",
                str(devices),
                "--log-level",
                "warning",
            ),
            work / f"scale-device-{index}.log",
        )
    print(f"  scale: {devices} device processes, {rounds} rounds", file=sys.stderr, flush=True)
    measured = reap(processes, 40 * 60)
    failed = [name for name, item in measured.items() if item.returncode != 0]
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    durations = list(round_durations(read_metrics(out)).values()) if summary else []
    rows_metrics = read_metrics(out) if summary else []
    first_round_s = (
        float(rows_metrics[1]["wall_time_s"]) - float(rows_metrics[0]["wall_time_s"])
        if len(rows_metrics) > 1
        else None
    )
    device_rss = [item.max_rss_mb for name, item in measured.items() if name != "server"]
    device_cpu = [item.cpu_s for name, item in measured.items() if name != "server"]
    result = {
        "devices": devices,
        "rounds": rounds,
        "rounds_done": summary.get("rounds"),
        "accepted": summary.get("updates_accepted"),
        "server_wall_s": measured["server"].wall_s,
        "training_s": summary.get("wall_time_s"),
        "round_median_s": median(durations),
        "first_round_s": first_round_s,
        "failed": failed,
        "server_rss_mb": measured["server"].max_rss_mb,
        "device_rss_mb_median": median(device_rss),
        "device_rss_mb_max": max(device_rss),
        "device_cpu_s_median": median(device_cpu),
    }
    complete = (
        not failed and summary.get("rounds") == rounds and summary.get("updates_accepted") == devices * rounds
    )
    rows = [
        [
            devices,
            f"{summary.get('rounds')} of {rounds}",
            f"{summary.get('updates_accepted')} of {devices * rounds}",
            measured["server"].wall_s,
            summary.get("wall_time_s", float("nan")),
            first_round_s or float("nan"),
            result["round_median_s"] * 1000,
            measured["server"].max_rss_mb,
            result["device_rss_mb_median"],
            result["device_cpu_s_median"],
        ]
    ]
    lines = [
        f"`edgegan server --dataset ring8 --devices {devices} --rounds {rounds}` and {devices} `edgegan "
        f"device` processes, all started at once, over {broker.name}. *Server wall* is the server process "
        "from start to exit; *first round* includes the devices' start-up (each imports torch on a shared "
        f"{os.cpu_count()}-core machine); *per round* is the median of the later rounds (metrics.csv).",
        "",
        *table(
            [
                "devices",
                "rounds done",
                "updates accepted",
                "server wall s",
                "training wall s",
                "first round s",
                "per round ms (median)",
                "server peak RSS MB",
                "device peak RSS MB (median)",
                "device CPU s (median)",
            ],
            rows,
        ),
        "",
        f"Target: {devices} device processes complete {rounds} rounds — {verdict(complete)}"
        + (f" (failed: {', '.join(failed)})" if failed else "")
        + ".",
    ]
    return lines, result
