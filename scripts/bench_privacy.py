"""Membership inference against what a device publishes (docs/privacy.md, "Measured"): a threshold attack on
device 0's discriminator's logits. Members are device 0's shard; non-members are images of the same
vendored MNIST split that no device ever saw. The attack AUC is P(logit(member) > logit(non-member)), ties
half: 0.5 is chance, 1.0 tells every member apart. The same attack on the global discriminator the server
publishes (what every device and the broker see) is the `global AUC` column: the one central DP protects.
One line per (setting, round) and a markdown table.

    .venv/bin/python scripts/bench_privacy.py --rounds 300 --at 50,100,300 --per-device 256
    .venv/bin/python scripts/bench_privacy.py --settings "none;central:clip=0.02,noise=1"
"""

from __future__ import annotations

import argparse
import time

import torch

from edgegan.algorithms.privacy import epsilon_after, sampling_rate
from edgegan.config import resolve_run, resolve_train
from edgegan.data import load_dataset
from edgegan.inprocess import build_runner


def attack_auc(discriminator: torch.nn.Module, members: torch.Tensor, others: torch.Tensor) -> float:
    """The threshold attack's AUC: how often a member's logit is above a non-member's (Mann-Whitney)."""
    with torch.no_grad():
        inside, outside = discriminator(members).flatten(), discriminator(others).flatten()
    above = (inside[:, None] > outside[None, :]).float().mean()
    ties = (inside[:, None] == outside[None, :]).float().mean()
    return float(above + ties / 2)


def run_setting(name: str, recipe: dict, args) -> list[dict]:
    data = load_dataset("mnist").x
    shards = [data[index * args.per_device : (index + 1) * args.per_device] for index in range(args.devices)]
    others = data[args.devices * args.per_device :][: args.non_members]
    train = resolve_train("mnist", recipe)
    spec = train.model_spec((1, 28, 28), resolve_run("mnist", "latent_dim", None), args.width)
    torch.manual_seed(args.seed)
    runner = build_runner("serial", spec, train, shards, args.seed, "fp32")
    checkpoints, rows, started = set(args.at), [], time.perf_counter()
    for round_index in range(args.rounds):
        runner.run_round(round_index)
        done = round_index + 1
        if done in checkpoints:
            device = runner.devices[0]  # its discriminator is what it published this round
            members = shards[0][: args.non_members]
            epsilon = float("nan")
            if train.centrally_private:
                epsilon = runner.server.central.epsilon
            elif train.private:
                rate = sampling_rate(batch_size=train.batch_size, samples=args.per_device)
                epsilon = epsilon_after(noise=train.dp_noise, rate=rate, steps=done * train.local_steps,
                                        delta=train.dp_delta)  # fmt: skip
            row = {"setting": name, "round": done, "auc": attack_auc(device.discriminator, members, others),
                   "global_auc": attack_auc(runner.server.discriminator, members, others),
                   "epsilon": epsilon, "wall_s": time.perf_counter() - started}  # fmt: skip
            print(f"{name:>24}  round {done:>5}  attack AUC {row['auc']:.3f}  global AUC "
                  f"{row['global_auc']:.3f}  epsilon {epsilon:.3g}  ({row['wall_s']:.0f} s)",
                  flush=True)  # fmt: skip
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--at", default="50,100,300", help="Rounds after which to attack.")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--per-device", type=int, default=256, help="Images in each device's shard.")
    parser.add_argument("--non-members", type=int, default=256)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settings", default="none;clip=1,noise=0.6;clip=1,noise=1.0",
        help="';'-separated DP settings: none, clip=C,noise=SIGMA (DP-SGD on the devices), or "
        "central:clip=C,noise=SIGMA (central DP at the server's fold)",
    )  # fmt: skip
    args = parser.parse_args()
    args.at = [int(value) for value in args.at.split(",")]
    torch.set_num_threads(1)
    rows = []
    for setting in args.settings.split(";"):
        recipe = {}
        if setting != "none":
            central, _, values_text = setting.rpartition(":")
            values = dict(part.split("=") for part in values_text.split(","))
            prefix = "central_dp_" if central == "central" else "dp_"
            recipe = {prefix + "clip": float(values["clip"]), prefix + "noise": float(values["noise"])}
        rows += run_setting(setting, recipe, args)
    print("\n| DP setting | round | attack AUC (device D) | attack AUC (global D) | epsilon (delta 1e-5) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        epsilon = "—" if row["epsilon"] != row["epsilon"] else f"{row['epsilon']:.2f}"
        aucs = f"{row['auc']:.3f} | {row['global_auc']:.3f}"
        print(f"| {row['setting']} | {row['round']} | {aucs} | {epsilon} |")


if __name__ == "__main__":
    main()
