"""Runs each optimiser recipe on the same split and seeds, and prints one markdown table row per run."""

from __future__ import annotations

import argparse
import platform
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from edgegan.config import DATASET_TRAIN_DEFAULTS, resolve_run, resolve_train
from edgegan.simulate import SimConfig, simulate

# grid25 has its own defaults (edgegan/config.py); its search starts from the 2-D recipe, so every grid25
# entry sets the 2-D values of the settings in which the two differ.
TWO_D = {
    name: value
    for name, value in asdict(resolve_train("ring8", {})).items()
    if name in DATASET_TRAIN_DEFAULTS["grid25"]
}

# The image defaults these MNIST entries were measured over (docs/algorithms.md), before "The image recipe"
# replaced them: every MNIST entry sets them, so the table reads as documented.
FIRST_IMAGES = {"device_lr": 0.02, "g_lr": 2e-4, "g_beta1": 0.5, "g_ema": 0.0}

# name -> overrides of the data set's defaults
RECIPES = {
    "ring8": {
        "device SGD 0.1, plain mean (default)": {},
        "device Adam 1e-4, plain mean": {"device_opt": "adam", "device_lr": 1e-4},
        "device Adam 1e-3, plain mean": {"device_opt": "adam", "device_lr": 1e-3},
        "device SGD 1e-3, server Adam 1e-4": {"device_lr": 1e-3, "server_opt": "adam", "server_lr": 1e-4},
        "device SGD 1e-3, server Adam 1e-4, 5 D rounds per G step": {
            "device_lr": 1e-3,
            "server_opt": "adam",
            "server_lr": 1e-4,
            "critic_ratio": 5,
        },
    },
    "mnist": {
        name: FIRST_IMAGES | overrides
        for name, overrides in {
            "device SGD 0.02, plain mean (first default)": {},
            "device Adam 2e-4, plain mean": {"device_opt": "adam", "device_lr": 2e-4},
            "device SGD 0.02, server Adam 2e-4": {"server_opt": "adam", "server_lr": 2e-4},
        }.items()
    },
    # The 2-D default finds no grid25 mode in 10,000 rounds, even centralized (docs/benchmarks.md): a
    # search for a grid25 recipe, run with `--algo central` first (the cheapest; any recipe it fails
    # with would fail the distributed methods too).
    "grid25": {
        name: TWO_D | overrides
        for name, overrides in {
            "2-D default (wgan-gp 0.1, device SGD 0.1, G Adam 1e-4)": {},
            "G Adam 1e-3": {"g_lr": 1e-3},
            "G Adam 1e-3, gp 1": {"g_lr": 1e-3, "gp_weight": 1.0},
            "G Adam 1e-3, gp 1, device SGD 0.3": {"g_lr": 1e-3, "gp_weight": 1.0, "device_lr": 0.3},
            "G Adam 1e-3, 5 D rounds per G step": {"g_lr": 1e-3, "critic_ratio": 5},
            "ns loss, G Adam 1e-3": {"loss": "ns", "g_lr": 1e-3},
            "ns loss, G Adam 3e-3": {"loss": "ns", "g_lr": 3e-3},
            "ns loss, G Adam 1e-3, device SGD 0.2": {"loss": "ns", "g_lr": 1e-3, "device_lr": 0.2},
            "ns loss, G Adam 1e-3, batch 128": {"loss": "ns", "g_lr": 1e-3, "batch_size": 128},
            "G Adam 1e-3, gp 1, batch 128": {"g_lr": 1e-3, "gp_weight": 1.0, "batch_size": 128},
            "G Adam 1e-3, gp 1, batch 128, device SGD 0.05": {
                "g_lr": 1e-3,
                "gp_weight": 1.0,
                "batch_size": 128,
                "device_lr": 0.05,
            },
            "G Adam 1e-3, gp 1, batch 128, G batch 512 (grid25 default)": {
                "g_lr": 1e-3,
                "gp_weight": 1.0,
                "batch_size": 128,
                "g_batch_size": 512,
            },
        }.items()
    },
}

SPLITS = {"ring8": ["shards:2"], "mnist": ["shards:3"], "grid25": ["shards:2"]}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tenth of the rounds, one seed")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--datasets", default="ring8,mnist")
    parser.add_argument("--only", default="", help="run only recipes whose name contains this text")
    parser.add_argument("--algo", default="serial", help="serial (default) or any other algorithm")
    parser.add_argument("--rounds", type=int, help="rounds for every run (default: the data set's)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare-recipes"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print("| data | algo | split | recipe | seed | rounds | wall s | final quality |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dataset in args.datasets.split(","):
        rounds = args.rounds or resolve_run(dataset, "rounds", None) // (10 if args.quick else 1)
        for split in SPLITS[dataset]:
            for name, overrides in RECIPES[dataset].items():
                if args.only not in name:
                    continue
                for seed in range(1 if args.quick else args.seeds):
                    config = SimConfig(
                        algo=args.algo,
                        dataset=dataset,
                        devices=4,
                        partition="iid" if args.algo == "central" else split,
                        rounds=rounds,
                        seed=seed,
                        out=args.out / f"{dataset}-{args.algo}-{slug(split)}-{slug(name)}-r{rounds}-s{seed}",
                        train=resolve_train(dataset, overrides),
                        width=resolve_run(dataset, "width", None),
                        latent_dim=resolve_run(dataset, "latent_dim", None),
                        eval_every=rounds,
                    )
                    summary = simulate(config)
                    quality = ", ".join(f"{k} {v:.3g}" for k, v in summary["final"].items() if v is not None)
                    if summary.get("diverged_at_round") is not None:
                        quality = f"diverged at round {summary['diverged_at_round']}"
                    shown_split = "all" if args.algo == "central" else split
                    print(
                        f"| {dataset} | {args.algo} | {shown_split} | {name} | {seed} | {rounds} | "
                        f"{summary['wall_time_s']:.0f} | {quality} |",
                        flush=True,
                    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
