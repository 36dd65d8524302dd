"""The image-recipe search (docs/algorithms.md, "The image recipe") as one command: each named candidate
(overrides of the first MNIST defaults) on each split of a stage, for each seed, one run directory per
(candidate, split, seed) under --out, 2 runs at a time, each in its own process on one thread; prints a
markdown table of the median fid over the seeds (and each seed's), the classes and the wall time per run.

  scripts/search-recipes --stage central --rounds 500 --only "probe: G 1e-3, D 0.1;G 2e-3, D 0.1"
  scripts/search-recipes --stage serial --seeds 0,1,2 --only "first default;G beta1 0, ema 0.99"

A run whose directory already holds its result (search.json, same settings) is not run again, so a search
can be stopped and started again, and a table printed with --table-only from what is there.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATASET = "mnist"
RUN_FIELDS = ("width", "latent_dim")  # run-level settings a candidate may change; the rest is TrainConfig

# The image defaults the search started from (edgegan/config.py before it), where they differ from the
# ones it chose: every candidate is spelled out over them, so the search reads the same after the change.
FIRST_RECIPE = {"device_lr": 0.02, "g_lr": 2e-4, "g_beta1": 0.5, "g_ema": 0.0}
# name -> overrides of FIRST_RECIPE. The central probe's rates, then one or two factors at a time from there.
PROBE = {"g_lr": 1e-3, "device_lr": 0.1}
CHOSEN = PROBE | {"g_beta1": 0.0, "g_ema": 0.99}  # the recipe the second screen chose
CANDIDATES: dict[str, dict] = {
    "first default": {},
    "probe: G 1e-3, D 0.1": PROBE,
    "G 5e-4, D 0.1": PROBE | {"g_lr": 5e-4},
    "G 2e-3, D 0.1": PROBE | {"g_lr": 2e-3},
    "G 1e-3, D 0.05": PROBE | {"device_lr": 0.05},
    "G 1e-3, D 0.2": PROBE | {"device_lr": 0.2},
    "probe, hinge": PROBE | {"loss": "hinge"},
    "probe, ema 0.99": PROBE | {"g_ema": 0.99},
    "probe, ema 0.999": PROBE | {"g_ema": 0.999},
    "probe, batch 64": PROBE | {"batch_size": 64},
    "probe, G batch 128": PROBE | {"g_batch_size": 128},
    "probe, 2 G steps": PROBE | {"g_steps": 2},
    "probe, 2 D rounds per G step": PROBE | {"critic_ratio": 2},
    "probe, z 100": PROBE | {"latent_dim": 100},
    "probe, width 48": PROBE | {"width": 48},
    "probe, G beta1 0": PROBE | {"g_beta1": 0.0},
    # Second screen: the first screen's gains together.
    "hinge, G beta1 0": PROBE | {"loss": "hinge", "g_beta1": 0.0},
    "G beta1 0, ema 0.99": PROBE | {"g_beta1": 0.0, "g_ema": 0.99},
    "hinge, G beta1 0, ema 0.99": PROBE | {"loss": "hinge", "g_beta1": 0.0, "g_ema": 0.99},
    "G beta1 0, D 0.05": PROBE | {"g_beta1": 0.0, "device_lr": 0.05},
    "G beta1 0, G 5e-4": PROBE | {"g_beta1": 0.0, "g_lr": 5e-4},
    "hinge, ema 0.99": PROBE | {"loss": "hinge", "g_ema": 0.99},
    # The probe with ema 0.99 diverged at round 1476 of serial iid seed 0: a slower discriminator.
    "D 0.05, ema 0.99": PROBE | {"device_lr": 0.05, "g_ema": 0.99},
    # Third screen, from the chosen recipe: what it costs per round against what it buys in IS.
    "chosen": CHOSEN,
    "chosen, batch 64": CHOSEN | {"batch_size": 64},
    "chosen, G batch 128": CHOSEN | {"g_batch_size": 128},
    "chosen, 2 G steps": CHOSEN | {"g_steps": 2},
    "chosen, G beta1 0.5, D 0.07": CHOSEN | {"g_beta1": 0.5, "device_lr": 0.07},
    "chosen, width 48": CHOSEN | {"width": 48},
    "chosen, z 100": CHOSEN | {"latent_dim": 100},
    "chosen, ema 0.995": CHOSEN | {"g_ema": 0.995},
}
CANDIDATES = {name: FIRST_RECIPE | overrides for name, overrides in CANDIDATES.items()}

# stage -> the (algorithm, split) pairs it runs every candidate on
STAGES = {
    "central": [("central", "iid")],
    "serial": [("serial", "iid"), ("serial", "shards:2")],
    "serial-iid": [("serial", "iid")],
    "serial-shards": [("serial", "shards:2")],
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_dir(out: Path, name: str, algo: str, split: str, rounds: int, seed: int) -> Path:
    return out / f"{algo}-{slug(split)}-{slug(name)}-r{rounds}-s{seed}"


def job(name: str, algo: str, split: str, rounds: int, seed: int, eval_every: int, out: Path) -> dict:
    return {
        "candidate": name, "overrides": CANDIDATES[name], "algo": algo, "split": split, "rounds": rounds,
        "seed": seed, "eval_every": eval_every, "out": str(run_dir(out, name, algo, split, rounds, seed)),
    }  # fmt: skip


def run_one(spec: dict) -> dict:
    """One run in this process (the worker side): simulate, then the share of each class in the samples."""
    import torch

    from edgegan.config import resolve_run, resolve_train
    from edgegan.models import build_generator
    from edgegan.runsetup import prepare
    from edgegan.simulate import SimConfig, simulate

    torch.set_num_threads(1)
    overrides = dict(spec["overrides"])
    run_level = {name: overrides.pop(name, None) for name in RUN_FIELDS}
    config = SimConfig(
        algo=spec["algo"], dataset=DATASET, devices=4, partition=spec["split"], rounds=spec["rounds"],
        seed=spec["seed"], out=Path(spec["out"]), train=resolve_train(DATASET, overrides),
        width=resolve_run(DATASET, "width", run_level["width"]),
        latent_dim=resolve_run(DATASET, "latent_dim", run_level["latent_dim"]), eval_every=spec["eval_every"],
    )  # fmt: skip
    prepared = prepare(config.setup)
    started = time.perf_counter()
    summary = simulate(config, prepared=prepared)
    wall_s = time.perf_counter() - started
    generator = build_generator(prepared.spec)
    generator.load_state_dict(torch.load(config.out / "generator.pt", weights_only=True)["state_dict"])
    probe = prepared.probe
    with torch.no_grad():
        fakes = probe.samples(generator)
        predicted = torch.cat([probe.extractor.logits(chunk * 2.0 - 1.0).argmax(dim=1)
                               for chunk in fakes.split(500)])  # fmt: skip
    shares = torch.bincount(predicted, minlength=probe.extractor.num_classes).float() / len(predicted)
    result = {
        **spec,
        "final": summary["final"],
        "curve": curve(config.out / "metrics.csv"),
        "diverged_at_round": summary.get("diverged_at_round"),
        "wall_s": wall_s,
        "class_shares": [round(float(share), 4) for share in shares],
    }
    (config.out / "search.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def curve(metrics: Path) -> dict:
    import csv

    return {row["round"]: float(row["fid"]) for row in csv.DictReader(open(metrics)) if row.get("fid")}


def launch(spec: dict) -> dict | None:
    """Runs `spec` in a worker process unless its directory already holds that result."""
    done = Path(spec["out"]) / "search.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if all(result.get(key) == value for key, value in spec.items()):
            return result
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        print(f"failed: {spec['candidate']} {spec['algo']} {spec['split']} s{spec['seed']}: "
              f"{finished.stderr[-500:]}", file=sys.stderr)  # fmt: skip
        return None
    result = json.loads(done.read_text())
    fid = result["final"].get("fid", float("nan"))
    print(f"done: {spec['candidate']} {spec['algo']} {spec['split']} s{spec['seed']} fid {fid:.1f} in "
          f"{result['wall_s']:.0f} s", file=sys.stderr)  # fmt: skip
    return result


def table(results: list[dict]) -> list[str]:
    lines = [
        "| candidate | algo | split | rounds | seeds | median fid (each seed) | median IS | classes | "
        "class share min-max | wall s per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        key = (result["candidate"], result["algo"], result["split"], result["rounds"])
        groups.setdefault(key, []).append(result)
    for (name, algo, split, rounds), runs in groups.items():
        runs.sort(key=lambda result: result["seed"])
        # A diverged seed counts as the worst: the median says whether most seeds got there.
        fids = [math.inf if result["diverged_at_round"] else result["final"]["fid"] for result in runs]
        each = ", ".join(
            f"diverged at {result['diverged_at_round']}" if result["diverged_at_round"] else f"{fid:.1f}"
            for result, fid in zip(runs, fids, strict=True)
        )
        middle = statistics.median(fids)
        median = f"{middle:.1f}" if math.isfinite(middle) else "diverged"
        classes = ", ".join(str(result["final"].get("classes")) for result in runs)
        scores = [result["final"]["is"] for result in runs if "is" in result["final"]]
        inception = f"{statistics.median(scores):.2f}" if scores else "-"  # runs before IS was measured
        healthy = [result for result in runs if not result["diverged_at_round"]] or runs
        low = min(min(result["class_shares"]) for result in healthy)
        high = max(max(result["class_shares"]) for result in healthy)
        wall = statistics.median(result["wall_s"] for result in runs)
        seeds = ",".join(str(result["seed"]) for result in runs)
        lines.append(f"| {name} | {algo} | {split} | {rounds} | {seeds} | {median} ({each}) | {inception} | "
                     f"{classes} | "
                     f"{100 * low:.1f}-{100 * high:.1f} % | {wall:.0f} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=list(STAGES), default="central")
    parser.add_argument("--only", default="", help="candidate names separated by ; (default: all)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--rounds", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--out", type=Path, default=Path("runs/search-recipes"))
    parser.add_argument("--table-only", action="store_true", help="print the table of the finished runs")
    args = parser.parse_args()
    if args.worker:
        run_one(json.loads(args.worker))
        return
    names = [name.strip() for name in args.only.split(";") if name.strip()] or list(CANDIDATES)
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates: {unknown}; known: {list(CANDIDATES)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    specs = [job(name, algo, split, args.rounds, seed, args.eval_every, args.out)
             for name in names for algo, split in STAGES[args.stage] for seed in seeds]  # fmt: skip
    if args.table_only:
        found = [Path(spec["out"]) / "search.json" for spec in specs]
        results = [json.loads(path.read_text()) for path in found if path.is_file()]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = [result for result in pool.map(launch, specs) if result is not None]
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
