"""Convergence study: every algorithm on one simulated clock, quality against time and against bytes.

Each (data set, partition, N, seed, algorithm) is trained once with `edgegan.simulate`; its per-round cost
trace is then re-costed under each link profile (`costmodel.recost`), so that `lan` and `edge` cost one
training run. Writes runs/convergence/report.md (tables) and PNG plots next to it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from edgegan.config import resolve_run, resolve_train
from edgegan.costmodel import LinkProfile, load_trace, recost
from edgegan.plots import plot_curves

ALGOS = ("serial", "parallel", "parallel-q", "mdgan", "fedgan", "central")
# Transports and settings of the same algorithms, each a name in --algos: (algorithm, simulate's settings,
# training overrides). `serial-sf8`: the proposed method with the server drawing each device's fakes and
# every message int8 + zstd (docs/algorithms.md), `serial-sk8` the same with top-k updates (10 % of each
# change, error feedback: edgegan/algorithms/sparsify.py); `mdgan-8`: MD-GAN's batches and feedback through
# the same codec; `fedgan-k20`: FedGAN at its paper's K = 20 local steps a round.
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "serial-sf8": ("serial", {"fakes": "server", "codec": "int8+zstd"}, {}),
    "serial-sk8": ("serial", {"fakes": "server", "codec": "topk+int8+zstd"}, {}),
    "serial-8": ("serial", {"codec": "int8+zstd"}, {}),
    "mdgan-8": ("mdgan", {"codec": "int8+zstd"}, {}),
    "fedgan-k20": ("fedgan", {}, {"local_steps": 20}),
    # The parallel schedule with the serial image recipe's G Adam 1e-3 (it diverged at round ~85 on MNIST;
    # the parallel schedule's own default is 5e-4, edgegan/config.py).
    "parallel-g1e-3": ("parallel", {}, {"g_lr": 1e-3}),
}
# `parallel-q`: the parallel schedule as deployed with a quorum (`edgegan server --schedule parallel
# --quorum Q --tau 2`): rounds close without the slowest quarter of the fleet (edgegan/quorum.py). Which
# updates it folds depends on the devices' speeds and the link, so it is played under `edge` only.
QUORUM_TAU = 2
# MD-GAN's round costs less simulated time under `edge` than the proposed method's (it ships generated
# batches, not models: about half of serial's time a round on ring8, a third on MNIST), so at equal rounds
# its clock would stop at half of the others'. It runs twice the rounds, so that no algorithm is cut off
# long before another's clock runs out; the table gives each algorithm's rounds and the time they took.
# FedGAN with K = 20 computes 20 GAN steps a round on every device: a twentieth of the rounds (times 2, so
# that its clock is not the first to stop) gives it about the others' compute.
ROUND_FACTOR = {"mdgan": 2, "mdgan-8": 2, "fedgan-k20": 0.1}


def base_algo(algo: str) -> str:
    return VARIANTS[algo][0] if algo in VARIANTS else "parallel" if algo == "parallel-q" else algo


def quorum_for(devices: int) -> int:
    return max(1, math.ceil(3 * devices / 4)) if devices > 1 else 1


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


def reached(dataset: str, quality: dict, target: dict) -> bool:
    """MNIST: fid and classifier-IS both near the centralized GAN's; 2-D data: enough modes found."""
    if dataset == "mnist":
        return (quality.get("fid") is not None and quality["fid"] <= target["fid"]
                and quality.get("is") is not None and quality["is"] >= target["is"])  # fmt: skip
    return quality.get("modes") is not None and quality["modes"] >= target["modes"]


def train_one(job: dict) -> str:
    import torch

    from edgegan.simulate import SimConfig, simulate

    torch.set_num_threads(1)
    out = Path(job["out"])
    if (out / "summary.json").is_file():
        return str(out)
    dataset, devices, quorum = job["dataset"], job["devices"], job["algo"] == "parallel-q"
    link, _ = PROFILES["edge"]
    _, settings, overrides = VARIANTS.get(job["algo"], (None, {}, {}))
    algo = base_algo(job["algo"])
    simulate(
        SimConfig(
            algo=algo, dataset=dataset, devices=devices, **settings,
            partition=job["partition"], rounds=job["rounds"], seed=job["seed"], out=out,
            train=resolve_train(dataset, overrides, schedule="parallel" if algo == "parallel" else "sync"),
            width=resolve_run(dataset, "width", None),
            latent_dim=resolve_run(dataset, "latent_dim", None), eval_every=job["eval_every"],
            **({"quorum": quorum_for(devices), "tau": QUORUM_TAU, "link": link,
                "device_speeds": tuple(speeds_for("edge", devices, "parallel"))} if quorum else {}),
        )
    )  # fmt: skip
    return str(out)


def curve(run_dir: Path, profile: str, devices: int, algo: str) -> list[dict]:
    """Quality points with the simulated time (under `profile`) and cumulative bytes at each."""
    traces = [load_trace(json.loads(line)) for line in open(run_dir / "trace.jsonl")]
    times = [0.0, *recost(traces, speeds_for(profile, devices, algo), PROFILES[profile][0])]
    points = []
    for row in csv.DictReader(open(run_dir / "metrics.csv")):
        keys = ("fid", "classes", "is") if "fid" in row else ("modes", "hq")
        if row[keys[0]] == "":
            continue
        round_index = int(row["round"])
        points.append({
            "round": round_index, "time": times[round_index],
            "bytes": int(row["bytes_up"]) + int(row["bytes_down"]),
            # A diverged run's last row scores none.
            **{key: float(row[key]) if row[key] != "" else None for key in keys},
        })  # fmt: skip
    return points


def final_median(values: list[float | None], metric: str) -> str:
    """Median final quality over seeds; a run that diverged has none and counts as the worst."""
    worst = float("inf") if metric == "fid" else float("-inf")
    ordered = sorted(worst if value is None else value for value in values)
    middle = ordered[len(ordered) // 2]
    return "none (diverged)" if math.isinf(middle) else f"{middle:.3g}"


def diverged_text(rounds: list[int], seeds: int) -> str:
    return f"{len(rounds)}/{seeds}" + (f" ({', '.join(str(r) for r in sorted(rounds))})" if rounds else "")


def first_reaching(points: list[dict], dataset: str, target: float) -> dict | None:
    return next((point for point in points if reached(dataset, point, target)), None)


def median_or_none(values: list[float | None]) -> float | None:
    """Median over seeds; None (not reached) counts as infinitely late."""
    ordered = sorted(values, key=lambda value: float("inf") if value is None else value)
    middle = ordered[len(ordered) // 2]
    return middle


def plot(setting: str, curves: dict, metric: str, out: Path) -> str:
    name = f"convergence-{setting.replace(' ', '-').replace(':', '').replace('=', '')}.png"
    as_values = {
        algo: [{"time": p["time"], "bytes": p["bytes"], "value": p[metric]} for p in points]
        for algo, points in curves.items()
        if points
    }
    plot_curves(
        as_values, metric, "simulated time, edge profile (s)", out / name, f"{setting} (seed 0)", True
    )
    return name


# The whole grid: 3 data sets x 2 splits x 2 fleet sizes x 3 seeds x 5 algorithms at each data set's
# documented rounds is 180 runs, about 20 hours on 2 cores. The default is the part of it that fits in an hour
# there: the headline data set (MNIST) in both splits and ring8's label-skewed split, N = 4, 3 seeds, with
# enough rounds for the proposed method to reach each target (MNIST: the image recipe's 1,500 rounds, at which
# the centralized GAN's final quality sets the target; ring8 shards:2 finds its 8 modes in about 10,000).
# MNIST's target with the image recipe of docs/algorithms.md: near the centralized GAN's final quality.
FID_FACTOR, IS_MARGIN = 1.5, 1.0
DEFAULT_SETTINGS = (("mnist", "iid", 4), ("mnist", "shards:2", 4), ("ring8", "shards:2", 4))
DEFAULT_ROUNDS = {"mnist": 1500, "ring8": 10000, "grid25": 10000}


def parse_settings(text: str) -> list[tuple[str, str, int]]:
    """`ring8/iid/8,grid25/shards:2/4` -> [("ring8", "iid", 8), ("grid25", "shards:2", 4)]."""
    settings = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) != 3 or parts[0] not in DEFAULT_ROUNDS or not parts[2].isdigit() or int(parts[2]) < 1:
            raise argparse.ArgumentTypeError(
                f"bad setting {item!r}: expected DATASET/PARTITION/DEVICES, DATASET one of "
                f"{', '.join(DEFAULT_ROUNDS)}, e.g. ring8/iid/8"
            )
        settings.append((parts[0], parts[1], int(parts[2])))
    return settings


def settings_for(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    if args.settings:
        return args.settings
    if args.quick:
        return [("ring8", "shards:2", 4)]
    if args.full:
        return [(dataset, partition, devices) for dataset in ("ring8", "grid25", "mnist")
                for partition in ("iid", "shards:2") for devices in (4, 8)]  # fmt: skip
    return list(DEFAULT_SETTINGS)


def rounds_for(args: argparse.Namespace, dataset: str) -> int:
    if args.rounds is not None:
        return args.rounds
    if args.quick:
        return 3000
    if args.full:
        return resolve_run(dataset, "rounds", None)
    return DEFAULT_ROUNDS[dataset]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="ring8 shards:2, N=4, 1 seed, 3,000 rounds (CI smoke)"
    )
    mode.add_argument(
        "--full", action="store_true",
        help="the whole grid (ring8, grid25, mnist x iid, shards:2 x N=4, 8) at each data set's documented "
        "rounds: 180 runs, about 20 hours on 2 cores",
    )  # fmt: skip
    parser.add_argument(
        "--settings", type=parse_settings,
        help="only these cells of the grid, e.g. ring8/iid/8,grid25/shards:2/4 (DATASET/PARTITION/DEVICES)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, help="rounds for every data set (default: per data set)")
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"))
    args = parser.parse_args()
    if args.quick:
        args.seeds = 1
    settings, algos = settings_for(args), args.algos.split(",")
    jobs = []
    for dataset, partition, devices in settings:
        rounds = rounds_for(args, dataset)
        for seed in range(args.seeds):
            for algo in algos:
                # The centralized GAN trains on the union of the shards (batch = N x a device's), so one
                # run serves every partition of a data set and fleet size.
                split = "all" if algo == "central" else partition.replace(":", "")
                algo_rounds = max(1, round(rounds * ROUND_FACTOR.get(algo, 1)))
                key = f"{dataset}-{split}-n{devices}-s{seed}-{algo}-r{algo_rounds}"
                jobs.append({
                    "dataset": dataset, "partition": "iid" if algo == "central" else partition,
                    "devices": devices, "seed": seed, "algo": algo, "rounds": algo_rounds,
                    "eval_every": max(1, algo_rounds // 20), "out": str(args.out / key),
                    "setting_partition": partition,
                })  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        unique = list({job["out"]: job for job in jobs}.values())
        for done in pool.map(train_one, unique):
            print(f"trained {done}", file=sys.stderr, flush=True)

    lines = ["# Convergence study", "", f"Command: `scripts/bench-convergence {' '.join(sys.argv[1:])}`", ""]
    for dataset, partition, devices in settings:
        metric = "fid" if dataset == "mnist" else "modes"
        setting = f"{dataset} {partition} N={devices}"
        here = (dataset, partition, devices)
        cell = [job for job in jobs if (job["dataset"], job["setting_partition"], job["devices"]) == here]
        runs = {(job["algo"], job["seed"]): Path(job["out"]) for job in cell}
        rounds_of = {job["algo"]: job["rounds"] for job in cell}
        if dataset == "mnist":
            finals = [json.loads((runs[("central", s)] / "summary.json").read_text())["final"]
                      for s in range(args.seeds) if ("central", s) in runs]  # fmt: skip
            fid = FID_FACTOR * statistics.median(final["fid"] for final in finals) if finals else math.nan
            score = statistics.median(final["is"] for final in finals) - IS_MARGIN if finals else math.nan
            target = {"fid": fid, "is": score}
            target_text = (f"fid <= {fid:.1f} ({FID_FACTOR}x central's median final fid) and IS >= "
                           f"{score:.2f} (central's median final IS - {IS_MARGIN})")  # fmt: skip
        else:
            target = {"modes": 7 if dataset == "ring8" else 20}
            target_text = f"modes >= {target['modes']}"
        lines += [f"## {setting}", "", f"Target: {target_text}. Medians over {args.seeds} seed(s); "
                  "'—' = not reached by the median seed within its rounds; a run whose weights turn "
                  "non-finite stops there (*diverged*).", "",
                  "| algo | seeds reaching | lan: time to target (s) | edge: time to target (s) | "
                  "bytes to target (MB) | bytes a round (kB) | rounds | edge: time for its rounds (s) | "
                  f"final {metric} (median) | final IS (median) | diverged (seeds, at round) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for algo in algos:
            per_seed = {"lan": [], "edge": [], "bytes": [], "final": [], "total": [], "diverged": [],
                        "per_round": [], "is": []}  # fmt: skip
            for seed in range(args.seeds):
                run_dir = runs[(algo, seed)]
                for profile in PROFILES:
                    if algo == "parallel-q" and profile != "edge":
                        continue  # played under edge only
                    hit = first_reaching(curve(run_dir, profile, devices, algo), dataset, target)
                    per_seed[profile].append(hit["time"] if hit else None)
                    if profile == "edge":  # (the same round, and so the same bytes, under any profile)
                        per_seed["bytes"].append(hit["bytes"] / 1e6 if hit else None)
                per_seed["total"].append(curve(run_dir, "edge", devices, algo)[-1]["time"])
                summary = json.loads((run_dir / "summary.json").read_text())
                per_seed["final"].append(summary["final"][metric])
                per_seed["is"].append(summary["final"].get("is"))
                moved = summary["bytes_up"] + summary["bytes_down"]
                per_seed["per_round"].append(moved / summary["rounds"])
                if summary.get("diverged_at_round") is not None:  # the run stopped there (non-finite weights)
                    per_seed["diverged"].append(summary["diverged_at_round"])
            cells = []
            for key in ("lan", "edge", "bytes"):
                if not per_seed[key]:
                    cells.append("n/a")
                    continue
                value = median_or_none(per_seed[key])
                cells.append("—" if value is None else f"{value:.1f}")
            reaching = sum(value is not None for value in per_seed["edge"])
            label = (
                f"parallel-q (quorum {quorum_for(devices)}/{devices}, tau {QUORUM_TAU})"
                if algo == "parallel-q"
                else algo
            )
            scores = [score for score in per_seed["is"] if score is not None]
            lines.append(
                f"| {label} | {reaching}/{args.seeds} | {' | '.join(cells)} | "
                f"{statistics.median(per_seed['per_round']) / 1e3:.0f} | {rounds_of[algo]} | "
                f"{statistics.median(per_seed['total']):.0f} | {final_median(per_seed['final'], metric)} | "
                f"{f'{statistics.median(scores):.2f}' if scores else '-'} | "
                f"{diverged_text(per_seed['diverged'], args.seeds)} |"
            )
        curves = {algo: curve(runs[(algo, 0)], "edge", devices, algo) for algo in algos}
        # hq moves long before whole modes are won, so 2-D plots show it.
        image = plot(setting, curves, "fid" if dataset == "mnist" else "hq", args.out)
        lines += ["", f"![{setting}]({image})", ""]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
