"""Robust aggregation against a poisoned device: the rules, the poisons, and a short training run."""

import math

import pytest
import torch

from edgegan.algorithms.aggregation import aggregate, clipped, parse_aggregate, update_norm
from edgegan.algorithms.attacks import parse_poison, poison_state
from edgegan.config import resolve_train
from edgegan.simulate import SimConfig, simulate


def test_clip_parses_and_rejects_bad_norms():
    assert str(parse_aggregate("clip:2.5")) == "clip:2.5"
    assert parse_aggregate("clip:2.5").streams and not parse_aggregate("median").streams
    for bad in ("clip", "clip:", "clip:0", "clip:-1", "clip:inf", "clip:x"):
        with pytest.raises(ValueError, match="clip"):
            parse_aggregate(bad)


def test_clipping_shortens_only_changes_longer_than_the_norm():
    reference = {"w": torch.zeros(4), "n": torch.tensor(3)}
    long = {"w": torch.tensor([3.0, 4.0, 0.0, 0.0]), "n": torch.tensor(3)}
    short = {"w": torch.tensor([0.3, 0.4, 0.0, 0.0]), "n": torch.tensor(3)}
    assert update_norm(long, reference) == pytest.approx(5.0)
    assert torch.allclose(clipped(long, reference, 1.0)["w"], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert torch.equal(clipped(short, reference, 1.0)["w"], short["w"])
    assert update_norm({"w": torch.tensor([math.nan, 0, 0, 0])}, reference) == math.inf


def test_a_boosted_update_counts_no_more_than_the_norm_under_clip():
    reference = {"w": torch.zeros(3)}
    honest = [{"w": torch.full((3,), 0.1)} for _ in range(3)]
    boosted = {"w": torch.full((3,), 1000.0)}
    merged = aggregate(parse_aggregate("clip:1"), [*honest, boosted], [1.0] * 4, reference)
    assert float(merged["w"].norm()) < 0.5
    with pytest.raises(ValueError, match="reference"):
        aggregate(parse_aggregate("clip:1"), honest, [1.0] * 3)


def test_poisons_parse_and_change_only_floating_tensors():
    state = {"w": torch.ones(2, 2), "count": torch.tensor(5)}
    rng = torch.Generator().manual_seed(0)
    scaled = poison_state(state, parse_poison("scale:100"), rng)
    assert torch.equal(scaled["w"], torch.full((2, 2), 100.0)) and scaled["count"].item() == 5
    noisy = poison_state(state, parse_poison("noise:1"), rng)
    assert not torch.equal(noisy["w"], state["w"]) and noisy["count"].item() == 5
    for bad in ("scale", "scale:x", "noise:0", "flip:1", "scale:nan"):
        with pytest.raises(ValueError):
            parse_poison(bad)


def test_poisoning_is_refused_where_it_is_not_simulated(tmp_path):
    common = dict(dataset="ring8", devices=4, partition="iid", rounds=1, seed=0, out=tmp_path,
                  train=resolve_train("ring8", {}), width=8, latent_dim=4)  # fmt: skip
    with pytest.raises(ValueError, match="serial and parallel"):
        SimConfig(algo="mdgan", poison="scale:100", **common)
    with pytest.raises(ValueError, match="--poisoned"):
        SimConfig(algo="serial", poison="scale:100", poisoned=4, **common)


def final_dist(
    tmp_path, name: str, aggregate_rule: str, poison: str = "", max_update_norm: float | str = 0
) -> tuple[float, int | None]:
    """Mean distance of the generator's samples to the nearest ring8 mode after 200 rounds, 8 devices;
    without the update bound unless told (the aggregation rule alone faces the poison)."""
    summary = simulate(
        SimConfig(
            algo="serial", dataset="ring8", devices=8, partition="iid", rounds=200, seed=0,
            out=tmp_path / name,
            train=resolve_train("ring8", {"aggregate": aggregate_rule}), width=128, latent_dim=16,
            eval_every=200, eval_samples=1000, poison=poison, max_update_norm=max_update_norm,
        )
    )  # fmt: skip
    return summary["final"]["dist"], summary["diverged_at_round"]


def test_median_and_trimmed_mean_survive_a_device_scaled_by_100_and_the_mean_does_not(tmp_path):
    clean, _ = final_dist(tmp_path, "clean", "mean")
    assert clean < 1.5  # the generator has moved from the origin (1.89) towards the ring
    poisoned_mean, diverged_at = final_dist(tmp_path, "mean", "mean", "scale:100")
    assert diverged_at is not None or not poisoned_mean < 1.15 * clean
    for rule in ("median", "trimmed:0.2"):
        robust, diverged_at = final_dist(tmp_path, rule, rule, "scale:100")
        assert diverged_at is None
        assert robust <= 1.15 * clean, rule
    # The default bound (auto) rejects the x100 device's every update: the mean is then as good as clean.
    bounded, diverged_at = final_dist(tmp_path, "mean-auto", "mean", "scale:100", max_update_norm="auto")
    assert diverged_at is None and bounded <= 1.15 * clean
