"""Membership inference against what a device publishes (docs/privacy.md, "Measured"): a threshold attack on
device 0's discriminator's logits. Members are device 0's shard; non-members are images of the same
vendored MNIST split that no device ever saw. The attack AUC is P(logit(member) > logit(non-member)), ties
half: 0.5 is chance, 1.0 tells every member apart. The same attack on the global discriminator the server
publishes (what every device and the broker see) is the `global AUC` column: the one central DP protects.
After the last round each setting's generator (its moving average, as a run evaluates it) is scored
(fid and IS on the classifier's features, 2,500 samples against the whole vendored split): the quality
each privacy level costs. A setting `epsilon=E` is device DP-SGD whose noise is calibrated by the
accountant (`noise_for_epsilon`) to spend E at delta over --rounds. One line per (setting, round), a
markdown table per round and one per setting, and with --plot a figure of AUC and fid against epsilon.

    .venv/bin/python scripts/bench_privacy.py --rounds 300 --at 50,100,300 --per-device 256
    .venv/bin/python scripts/bench_privacy.py --settings "none;central:clip=0.02,noise=1"
    .venv/bin/python scripts/bench_privacy.py --settings "none;epsilon=1;epsilon=4;epsilon=10" --plot f.png
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

from edgegan.algorithms.privacy import epsilon_after, noise_for_epsilon, sampling_rate
from edgegan.config import resolve_run, resolve_train
from edgegan.data import load_dataset
from edgegan.inprocess import build_runner
from edgegan.runsetup import GeneratorAverage, QualityProbe

EVAL_SAMPLES = 2500  # as a run's default --eval-samples


def attack_auc(discriminator: torch.nn.Module, members: torch.Tensor, others: torch.Tensor) -> float:
    """The threshold attack's AUC: how often a member's logit is above a non-member's (Mann-Whitney)."""
    with torch.no_grad():
        inside, outside = discriminator(members).flatten(), discriminator(others).flatten()
    above = (inside[:, None] > outside[None, :]).float().mean()
    ties = (inside[:, None] == outside[None, :]).float().mean()
    return float(above + ties / 2)


def run_setting(name: str, recipe: dict, args) -> tuple[list[dict], dict]:
    """The attack's rows at each of --at, and the setting's final row with the generator's quality."""
    dataset = load_dataset("mnist")
    # One seeded permutation before the split: the vendored test split's first 5,000 images come from NIST's
    # training set (cleaner writers) and its last 5,000 from NIST's test set, so members and non-members
    # taken in order would differ in distribution, and the attack would measure that, not membership.
    data = dataset.x[torch.randperm(len(dataset.x), generator=torch.Generator().manual_seed(args.seed))]
    shards = [data[index * args.per_device : (index + 1) * args.per_device] for index in range(args.devices)]
    others = data[args.devices * args.per_device :][: args.non_members]
    train = resolve_train("mnist", recipe)
    spec = train.model_spec((1, 28, 28), resolve_run("mnist", "latent_dim", None), args.width)
    torch.manual_seed(args.seed)
    runner = build_runner("serial", spec, train, shards, args.seed, "fp32")
    average = GeneratorAverage(train.g_ema, spec.latent_dim)
    checkpoints, rows, started = set(args.at), [], time.perf_counter()
    for round_index in range(args.rounds):
        runner.run_round(round_index)
        average.update(runner.generator)
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
    probe = QualityProbe(dataset=dataset, latent_dim=spec.latent_dim, samples=EVAL_SAMPLES, seed=args.seed,
                         data_dir=None, real_images=dataset.x)  # fmt: skip
    quality, _ = probe.measure(average.of(runner.generator))
    final = {**rows[-1], "noise": train.dp_noise or train.central_dp_noise, "fid": quality["fid"],
             "is": quality.get("is", math.nan), "classes": quality.get("classes", 0)}  # fmt: skip
    print(f"{name:>24}  final fid {final['fid']:.1f}  IS {final['is']:.2f}", flush=True)
    return rows, final


def parse_setting(setting: str, args) -> dict:
    """A setting's recipe: none, clip=C,noise=SIGMA, epsilon=E[,clip=C], or central:clip=C,noise=SIGMA."""
    if setting == "none":
        return {}
    central, _, values_text = setting.rpartition(":")
    values = {key: float(value) for key, value in (part.split("=") for part in values_text.split(","))}
    prefix = "central_dp_" if central == "central" else "dp_"
    if "epsilon" in values:  # device DP calibrated to spend epsilon over the whole run
        train = resolve_train("mnist", {})
        rate = sampling_rate(batch_size=train.batch_size, samples=args.per_device)
        steps = args.rounds * train.local_steps
        values["noise"] = noise_for_epsilon(epsilon=values.pop("epsilon"), rate=rate, steps=steps,
                                            delta=train.dp_delta)  # fmt: skip
        values.setdefault("clip", 1.0)
    return {prefix + "clip": values["clip"], prefix + "noise": values["noise"]}


def plot(finals: list[dict], path: Path) -> None:
    """Attack AUC (device and global D) and fid against epsilon; the non-private run as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    def of(central: bool) -> list[dict]:
        chosen = [row for row in finals if math.isfinite(row["epsilon"])
                  and row["setting"].startswith("central") == central]  # fmt: skip
        return sorted(chosen, key=lambda row: row["epsilon"])

    plain = [row for row in finals if not math.isfinite(row["epsilon"])]
    figure, (attack, quality) = pyplot.subplots(1, 2, figsize=(10, 4))
    for rows, kind, marker in ((of(False), "device DP", "o-"), (of(True), "central DP", "x--")):
        if not rows:
            continue
        epsilons = [row["epsilon"] for row in rows]
        attack.plot(epsilons, [row["auc"] for row in rows], marker, label=f"{kind}: device D (published)")
        released = [row["global_auc"] for row in rows]
        attack.plot(epsilons, released, marker, label=f"{kind}: global D (released)")
        quality.plot(epsilons, [row["fid"] for row in rows], marker, label=kind)
    for row in plain[:1]:
        attack.axhline(row["auc"], linestyle="--", color="C0", label="device D, no DP")
        quality.axhline(row["fid"], linestyle="--", color="gray", label="no DP")
        quality.axhline(2 * row["fid"], linestyle=":", color="gray", label="2x no DP")
    attack.axhline(0.5, color="black", linewidth=0.5)
    attack.axhline(0.55, linestyle=":", color="red", label="target 0.55")
    for axes, label in ((attack, "membership-inference AUC"), (quality, "fid (classifier features)")):
        axes.set_xscale("log")
        axes.set_xlabel("epsilon at delta 1e-5 (per device, whole run)")
        axes.set_ylabel(label)
        axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


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
        help="';'-separated DP settings: none, clip=C,noise=SIGMA (DP-SGD on the devices), epsilon=E "
        "(DP-SGD, clip 1 unless clip=C, noise calibrated to spend E over --rounds), or "
        "central:clip=C,noise=SIGMA (central DP at the server's fold)",
    )  # fmt: skip
    parser.add_argument("--plot", type=Path, help="Write AUC and fid against epsilon to this image.")
    args = parser.parse_args()
    args.at = sorted({*(int(value) for value in args.at.split(",")), args.rounds})
    torch.set_num_threads(1)
    logging.getLogger("absl").setLevel(logging.ERROR)  # its per-order convergence notes (docs/privacy.md)
    rows, finals = [], []
    for setting in args.settings.split(";"):
        setting_rows, final = run_setting(setting, parse_setting(setting, args), args)
        rows += setting_rows
        finals.append(final)
    print("\n| DP setting | round | attack AUC (device D) | attack AUC (global D) | epsilon (delta 1e-5) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        aucs = f"{row['auc']:.3f} | {row['global_auc']:.3f}"
        print(f"| {row['setting']} | {row['round']} | {aucs} | {shown(row['epsilon'])} |")
    print(f"\nAfter {args.rounds} rounds:\n")
    print("| DP setting | noise | epsilon (delta 1e-5) | attack AUC (device D) | attack AUC (global D) | fid "
          "| IS |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in finals:
        noise = f"{row['noise']:.3g}" if row["noise"] else "—"
        print(f"| {row['setting']} | {noise} | {shown(row['epsilon'])} | {row['auc']:.3f} | "
              f"{row['global_auc']:.3f} | {row['fid']:.1f} | {row['is']:.2f} |")  # fmt: skip
    if args.plot:
        plot(finals, args.plot)
        print(f"\nplot: {args.plot}")


def shown(epsilon: float) -> str:
    return "—" if math.isnan(epsilon) else f"{epsilon:.2f}"


if __name__ == "__main__":
    main()
