"""Runs each optimiser recipe on the same split and seeds, and prints one markdown table row per run."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from edgegan.config import resolve_run, resolve_train
from edgegan.simulate import SimConfig, simulate

# name -> overrides of the data shape's defaults
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
        "device SGD 0.02, plain mean (default)": {},
        "device Adam 2e-4, plain mean": {"device_opt": "adam", "device_lr": 2e-4},
        "device SGD 0.02, server Adam 2e-4": {"server_opt": "adam", "server_lr": 2e-4},
    },
}
SPLITS = {"ring8": ["shards:2"], "mnist": ["shards:3"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tenth of the rounds, one seed")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--datasets", default="ring8,mnist")
    parser.add_argument("--only", default="", help="run only recipes whose name contains this text")
    parser.add_argument("--out", type=Path, default=Path("runs/compare-recipes"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print("| data | split | recipe | seed | rounds | wall s | final quality |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dataset in args.datasets.split(","):
        rounds = resolve_run(dataset, "rounds", None) // (10 if args.quick else 1)
        for split in SPLITS[dataset]:
            for name, overrides in RECIPES[dataset].items():
                if args.only not in name:
                    continue
                for seed in range(1 if args.quick else args.seeds):
                    config = SimConfig(
                        algo="serial",
                        dataset=dataset,
                        devices=4,
                        partition=split,
                        rounds=rounds,
                        seed=seed,
                        out=args.out / f"{dataset}-{split.replace(':', '')}-{len(name)}-{seed}",
                        train=resolve_train(dataset, overrides),
                        width=resolve_run(dataset, "width", None),
                        latent_dim=resolve_run(dataset, "latent_dim", None),
                        eval_every=rounds,
                    )
                    summary = simulate(config)
                    quality = ", ".join(f"{k} {v:.3g}" for k, v in summary["final"].items())
                    print(
                        f"| {dataset} | {split} | {name} | {seed} | {rounds} | "
                        f"{summary['wall_time_s']:.0f} | {quality} |",
                        flush=True,
                    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
