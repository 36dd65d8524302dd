"""Convergence study: every algorithm on one simulated clock, quality against time and against bytes.

Each (data set, partition, N, seed, algorithm) is trained once with `edgegan.simulate`; its per-round cost
trace is then re-costed under each link profile (`costmodel.recost`), so that `lan` and `edge` cost one
training run. Writes runs/convergence/report.md (tables) and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from edgegan.config import resolve_run, resolve_train
from edgegan.costmodel import LinkProfile, load_trace, recost
from edgegan.plots import plot_curves

ALGOS = ("serial", "parallel", "mdgan", "fedgan", "central")
PROFILES = {
    "lan": (LinkProfile(100.0, 100.0, 1.0), None),
    # Mixed Raspberry Pi / Jetson fleet: speeds spread evenly from 0.25 to 1.0.
    "edge": (LinkProfile(10.0, 20.0, 50.0), "spread"),
}


def speeds_for(profile: str, devices: int, algo: str) -> list[float]:
    if algo == "central":
        return [1.0]
    if PROFILES[profile][1] == "spread" and devices > 1:
        return [0.25 + 0.75 * index / (devices - 1) for index in range(devices)]
    return [1.0] * devices


def reached(dataset: str, quality: dict, target: float) -> bool:
    if dataset == "mnist":
        return quality.get("fid") is not None and quality["fid"] <= target
    return quality.get("modes") is not None and quality["modes"] >= target


def train_one(job: dict) -> str:
    import torch

    from edgegan.simulate import SimConfig, simulate

    torch.set_num_threads(1)
    out = Path(job["out"])
    if (out / "summary.json").is_file():
        return str(out)
    dataset = job["dataset"]
    simulate(
        SimConfig(
            algo=job["algo"], dataset=dataset, devices=job["devices"], partition=job["partition"],
            rounds=job["rounds"], seed=job["seed"], out=out, train=resolve_train(dataset, {}),
            width=resolve_run(dataset, "width", None), latent_dim=resolve_run(dataset, "latent_dim", None),
            eval_every=job["eval_every"],
        )
    )  # fmt: skip
    return str(out)


def curve(run_dir: Path, profile: str, devices: int, algo: str) -> list[dict]:
    """Quality points with the simulated time (under `profile`) and cumulative bytes at each."""
    traces = [load_trace(json.loads(line)) for line in open(run_dir / "trace.jsonl")]
    times = [0.0, *recost(traces, speeds_for(profile, devices, algo), PROFILES[profile][0])]
    points = []
    for row in csv.DictReader(open(run_dir / "metrics.csv")):
        keys = ("fid", "classes") if "fid" in row else ("modes", "hq")
        if row[keys[0]] == "":
            continue
        round_index = int(row["round"])
        points.append({
            "round": round_index, "time": times[round_index],
            "bytes": int(row["bytes_up"]) + int(row["bytes_down"]),
            **{key: float(row[key]) for key in keys},
        })  # fmt: skip
    return points


def first_reaching(points: list[dict], dataset: str, target: float) -> dict | None:
    return next((point for point in points if reached(dataset, point, target)), None)


def median_or_none(values: list[float | None]) -> float | None:
    """Median over seeds; None (not reached) counts as infinitely late."""
    ordered = sorted(values, key=lambda value: float("inf") if value is None else value)
    middle = ordered[len(ordered) // 2]
    return middle


def plot(setting: str, curves: dict, metric: str, out: Path) -> str:
    name = f"convergence-{setting.replace(' ', '-').replace(':', '')}.png"
    as_values = {
        algo: [{"time": p["time"], "bytes": p["bytes"], "value": p[metric]} for p in points]
        for algo, points in curves.items()
        if points
    }
    plot_curves(
        as_values, metric, "simulated time, edge profile (s)", out / name, f"{setting} (seed 0)", True
    )
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="ring8 only, N=4, 1 seed, 3,000 rounds (CI smoke)"
    )
    parser.add_argument("--datasets", default="ring8,grid25,mnist")
    parser.add_argument("--partitions", default="iid,shards:2")
    parser.add_argument("--devices", default="4,8")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument(
        "--rounds-scale", type=float, default=0.5, help="fraction of each data set's default rounds"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"))
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.devices, args.seeds, args.rounds_scale = "ring8", "4", 1, 0.15
    datasets, partitions = args.datasets.split(","), args.partitions.split(",")
    device_counts, algos = [int(n) for n in args.devices.split(",")], args.algos.split(",")
    jobs = []
    for dataset in datasets:
        rounds = max(10, round(resolve_run(dataset, "rounds", None) * args.rounds_scale))
        for partition in partitions:
            for devices in device_counts:
                for seed in range(args.seeds):
                    for algo in algos:
                        key = f"{dataset}-{partition.replace(':', '')}-n{devices}-s{seed}-{algo}"
                        jobs.append({
                            "dataset": dataset, "partition": partition, "devices": devices, "seed": seed,
                            "algo": algo, "rounds": rounds, "eval_every": max(1, rounds // 20),
                            "out": str(args.out / key),
                        })  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for done in pool.map(train_one, jobs):
            print(f"trained {done}", file=sys.stderr, flush=True)

    lines = ["# Convergence study", "", f"Command: `scripts/bench-convergence {' '.join(sys.argv[1:])}`", ""]
    for dataset in datasets:
        metric = "fid" if dataset == "mnist" else "modes"
        for partition in partitions:
            for devices in device_counts:
                setting = f"{dataset} {partition} N={devices}"
                here = (dataset, partition, devices)
                runs = {(job["algo"], job["seed"]): Path(job["out"]) for job in jobs
                        if (job["dataset"], job["partition"], job["devices"]) == here}  # fmt: skip
                if dataset == "mnist":
                    finals = [json.loads((runs[("central", s)] / "summary.json").read_text())["final"]["fid"]
                              for s in range(args.seeds) if ("central", s) in runs]  # fmt: skip
                    target = 2 * statistics.median(finals) if finals else float("nan")
                    target_text = f"fid <= {target:.0f} (2x central's median final fid)"
                else:
                    target = 7 if dataset == "ring8" else 20
                    target_text = f"modes >= {target}"
                lines += [f"## {setting}", "", f"Target: {target_text}. Medians over {args.seeds} seed(s); "
                          "'—' = not reached by the median seed.", "",
                          "| algo | lan: time to target (s) | edge: time to target (s) | "
                          f"bytes to target (MB) | final {metric} (median) |",
                          "| --- | --- | --- | --- | --- |"]  # fmt: skip
                for algo in algos:
                    per_seed = {"lan": [], "edge": [], "bytes": [], "final": []}
                    for seed in range(args.seeds):
                        run_dir = runs[(algo, seed)]
                        for profile in PROFILES:
                            hit = first_reaching(curve(run_dir, profile, devices, algo), dataset, target)
                            per_seed[profile].append(hit["time"] if hit else None)
                            if profile == "lan":
                                per_seed["bytes"].append(hit["bytes"] / 1e6 if hit else None)
                        per_seed["final"].append(
                            json.loads((run_dir / "summary.json").read_text())["final"][metric]
                        )
                    cells = []
                    for key in ("lan", "edge", "bytes"):
                        value = median_or_none(per_seed[key])
                        cells.append("—" if value is None else f"{value:.1f}")
                    lines.append(
                        f"| {algo} | {' | '.join(cells)} | {statistics.median(per_seed['final']):.3g} |"
                    )
                curves = {algo: curve(runs[(algo, 0)], "edge", devices, algo) for algo in algos}
                # hq moves long before whole modes are won, so 2-D plots show it.
                image = plot(setting, curves, "fid" if dataset == "mnist" else "hq", args.out)
                lines += ["", f"![{setting}]({image})", ""]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
