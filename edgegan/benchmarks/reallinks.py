"""scripts/bench-real-links: one short MNIST run through the lab of real links (edgegan/devtools/netlab.py)
at several link profiles and loss rates, its measured round times against what the cost model predicts
for those rates (edgegan/costmodel.py, re-costing the trace of `edgegan simulate` of the same run).

Why the simulator's trace: the MQTT server cannot see a device's compute time (its trace has zeros there),
while the simulator measures it per device; the bytes of both traces are the same messages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgegan.costmodel import load_trace, recost
from edgegan.devtools import netlab
from edgegan.runsetup import read_rows

DEFAULT_SETTINGS = "edge:0,edge:1,edge:5"


@dataclass(frozen=True, kw_only=True)
class Setting:
    profile: str
    loss_percent: int

    @property
    def label(self) -> str:
        return f"{self.profile}-loss{self.loss_percent}"


def parse_settings(text: str) -> list[Setting]:
    """`edge:0,lte:5` as settings; an unknown profile is a ValueError naming the known ones."""
    settings = []
    for item in text.split(","):
        profile, _, loss = item.partition(":")
        if profile not in netlab.PROFILES:
            raise ValueError(
                f"--settings: unknown profile {profile!r}; known: {', '.join(sorted(netlab.PROFILES))}"
            )
        settings.append(Setting(profile=profile, loss_percent=int(loss or 0)))
    return settings


def round_times(cumulative: Sequence[float]) -> list[float]:
    """Seconds of each round from the clock after each round (cumulative[0]: after round 1's start)."""
    return [after - before for before, after in zip(cumulative, cumulative[1:], strict=False)]


def steady_mean(per_round: Sequence[float]) -> float:
    """The mean round time without the first round (connections and TCP windows still opening) and the
    last (the final evaluation and the outputs)."""
    kept = list(per_round[1:-1]) or list(per_round)
    return statistics.fmean(kept)


def measured_round_s(run: Path) -> list[float]:
    """Each round's wall seconds from the server's metrics.csv (row 0 is the start)."""
    return round_times([float(row["wall_time_s"]) for row in read_rows(run / "metrics.csv")])


def predicted_round_s(sim: Path, devices: int, profile: str) -> list[float]:
    """Each round's seconds when the simulator's trace is re-costed at the lab's link for `profile`."""
    traces = [load_trace(json.loads(line)) for line in (sim / "trace.jsonl").read_text().splitlines() if line]
    return round_times([0.0, *recost(traces, [1.0] * devices, netlab.lab_link(netlab.PROFILES[profile]))])


def kernel_count(summary: dict, counter: str) -> tuple[int, int]:
    """A TCP counter of the server's namespace (mostly downlink traffic) and summed over the devices'."""
    kernel = summary.get("netlab", {}).get("kernel", {})
    server = sum(value.get(counter, 0) for name, value in kernel.items() if name.endswith("-server"))
    devices = sum(value.get(counter, 0) for name, value in kernel.items() if not name.endswith("-server"))
    return server, devices


# What a full TCP segment costs on the wire that tbf meters (the veth's frames): MSS 1448 bytes of payload
# (1500 MTU less 20 IP, 32 TCP with timestamps) in 1514 bytes (plus 14 Ethernet).
MSS_BYTES = 1448
FRAME_OVERHEAD_BYTES = 66


def framed_bytes(payload_bytes: int) -> int:
    """`payload_bytes` as the link meters them: each full segment carries 66 bytes of headers."""
    return payload_bytes + -(-payload_bytes // MSS_BYTES) * FRAME_OVERHEAD_BYTES


def device_compute_lab_s(run: Path, devices: int, rounds: int) -> list[float]:
    """Each device's mean compute seconds per round in the lab, from the counters its log ends with
    (`compute_s=` is its total; the server's trace cannot see it)."""
    means = []
    for index in range(devices):
        totals = re.findall(r"[ (]compute_s=([0-9.]+)", (run / "netlab" / f"device-{index}.log").read_text())
        means.append(float(totals[-1]) / rounds if totals else 0.0)
    return means


def lab_trace_round_s(run: Path, devices: int, profile: str) -> list[float]:
    """Each round re-costed from the lab run's own trace (its bytes, the server's times as measured in
    the lab), the devices' compute as measured in the lab and every byte framed: the cost model fed what
    the lab showed, so that what is left is TCP's and MQTT's own dynamics."""
    rows = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines() if line]
    compute = device_compute_lab_s(run, devices, len(rows))
    traces = []
    for row in rows:
        trace = load_trace(row)
        trace.device_compute_s = list(compute)
        trace.bytes_down = [framed_bytes(size) for size in trace.bytes_down]
        trace.bytes_up = [framed_bytes(size) for size in trace.bytes_up]
        traces.append(trace)
    return round_times([0.0, *recost(traces, [1.0] * devices, netlab.lab_link(netlab.PROFILES[profile]))])


def server_work_s(trace_path: Path) -> float:
    """The server's mean seconds per round of its own work (before + after the devices), steady rounds."""
    rows = [json.loads(line) for line in trace_path.read_text().splitlines() if line]
    return steady_mean([row["server_before_s"] + row["server_after_s"] for row in rows])


def report(out: Path, settings: Sequence[Setting], devices: int) -> list[dict]:
    """One row per setting from the outputs under `out` (the runs of `main`)."""
    sim = out / "simulate"
    rows = []
    for setting in settings:
        run = out / setting.label
        summary = json.loads((run / "summary.json").read_text())
        measured = steady_mean(measured_round_s(run))
        predicted = steady_mean(predicted_round_s(sim, devices, setting.profile))
        corrected = steady_mean(lab_trace_round_s(run, devices, setting.profile))
        sim_rows = [json.loads(line) for line in (sim / "trace.jsonl").read_text().splitlines() if line]
        sim_compute = statistics.fmean(max(row["device_compute_s"]) for row in sim_rows)
        server_retx, device_retx = kernel_count(summary, "RetransSegs")
        server_rto, device_rto = kernel_count(summary, "TCPTimeouts")
        profile = netlab.PROFILES[setting.profile]
        rows.append({
            "setting": setting.label, "profile": setting.profile, "loss_percent": setting.loss_percent,
            "uplink_mbps": profile.uplink_mbps, "downlink_mbps": profile.downlink_mbps,
            "measured_round_s": measured, "predicted_round_s": predicted, "ratio": measured / predicted,
            "corrected_round_s": corrected, "corrected_ratio": measured / corrected,
            "server_work_lab_s": server_work_s(run / "trace.jsonl"),
            "server_work_sim_s": server_work_s(sim / "trace.jsonl"),
            "device_compute_lab_s": max(device_compute_lab_s(run, devices, len(sim_rows))),
            "device_compute_sim_s": sim_compute,
            "first_round_s": measured_round_s(run)[0],
            "retrans_server": server_retx, "retrans_devices": device_retx,
            "timeouts_server": server_rto, "timeouts_devices": device_rto,
        })  # fmt: skip
    return rows


def table(rows: Sequence[dict]) -> list[str]:
    lines = [
        "| profile | up / down Mbit/s | loss | measured s/round | predicted s/round | measured / predicted "
        "| predicted from the lab's trace, framing, lab compute | measured / that | server work lab / sim s "
        "| device compute lab / sim s "
        "| round 1 s | TCP retransmits (timeouts) server / devices |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['profile']} | {row['uplink_mbps']:g} / {row['downlink_mbps']:g} "
            f"| {row['loss_percent']}% "
            f"| {row['measured_round_s']:.3f} | {row['predicted_round_s']:.3f} | {row['ratio']:.2f} "
            f"| {row['corrected_round_s']:.3f} | {row['corrected_ratio']:.2f} "
            f"| {row['server_work_lab_s']:.3f} / {row['server_work_sim_s']:.3f} "
            f"| {row['device_compute_lab_s']:.3f} / {row['device_compute_sim_s']:.3f} "
            f"| {row['first_round_s']:.2f} | {row['retrans_server']} ({row['timeouts_server']}) "
            f"/ {row['retrans_devices']} ({row['timeouts_devices']}) |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-real-links", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"PROFILE:LOSS,... ({DEFAULT_SETTINGS})")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-real-links"))
    parser.add_argument(
        "--report-only", action="store_true", help="re-read the runs under --out; run nothing"
    )
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)
    if not args.report_only:
        if os.geteuid() != 0:
            print("bench-real-links: needs root (the lab's namespaces)", file=sys.stderr)
            return 2
        common = ["--dataset", "mnist", "--rounds", str(args.rounds), "--eval-every", "100000", "--seed", "0"]
        subprocess.run(
            [sys.executable, "-m", "edgegan", "simulate", "--algo", "serial", "--devices", str(args.devices),
             "--out", str(args.out / "simulate"), *common],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for setting in settings:
            spec = netlab.LabSpec(
                name="benchlinks", devices=args.devices, profile=netlab.PROFILES[setting.profile],
                loss_percent=setting.loss_percent,
            )  # fmt: skip
            netlab.run_in_lab(
                spec, [*common, "--run", "benchlinks"], args.out / setting.label, timeout_s=1800
            )
    rows = report(args.out, settings, args.devices)
    (args.out / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = table(rows)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
