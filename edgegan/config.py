"""Documented defaults per data shape, and resolution of user overrides against them.

The defaults are measured recipes (docs/algorithms.md says how they were chosen). A flag left unset takes
the value for the data set's shape: 2-D mixtures ("points") or images.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from edgegan.algorithms.config import TrainConfig
from edgegan.data import POINT_DATASETS

# Run-level defaults that depend on the data shape. `fakes` (who draws a device's fake batches, the proposed
# method's only): for images the server, so a round sends each device D and its fakes (246 kB for the MNIST
# DCGAN in fp32) instead of G + D (2.3 MB), with the same numbers (docs/benchmarks.md, "Convergence study
# with the image recipe"); for 2-D data G is 5.6 kB and a device draws its own.
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "points": {"rounds": 20000, "width": 128, "latent_dim": 16, "eval_every": 2000, "threads": 1,
               "fakes": "device"},
    "images": {"rounds": 1500, "width": 32, "latent_dim": 64, "eval_every": 250, "threads": 1,
               "fakes": "server"},
}  # fmt: skip

# Recipe defaults that differ from TrainConfig's own (which are the 2-D recipe).
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "points": {},
    # Measured on MNIST (docs/algorithms.md, "The image recipe"): faster rates than the first recipe (G 2e-4,
    # D 0.02, whose discriminator sat at chance), no momentum in the generator's Adam, and the evaluated
    # generator is its moving average.
    "images": {
        "loss": "ns",
        "batch_size": 32,
        "device_lr": 0.1,
        "g_lr": 1e-3,
        "g_beta1": 0.0,
        "g_batch_size": 64,
        "g_ema": 0.99,
    },
}


# Recipe defaults for one data set, over its shape's. grid25 (25 modes, std 0.05) finds no mode with the
# ring8-chosen 2-D recipe even centralized; this one, measured on the centralized GAN
# (docs/algorithms.md, "A grid25 recipe"), finds 22 of 25 in 10,000 rounds.
DATASET_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "grid25": {"g_lr": 1e-3, "gp_weight": 1.0, "batch_size": 128, "g_batch_size": 512},
}


# Recipe defaults for a schedule, over the data set's. The parallel schedule steps G against the discriminator
# of the round before (it overlaps the devices' work): with the image recipe's G Adam 1e-3 it diverged at
# round ~85 on MNIST; at 5e-4 it ran its 1,500 rounds (docs/algorithms.md, "The parallel schedule").
SCHEDULE_TRAIN_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("images", "parallel"): {"g_lr": 5e-4},
}


# Named bundles of flag values for images, applied as the command's defaults under the config file and the
# flags (`--preset NAME`). "quality": a wider, spectrally normalised discriminator, which did not diverge in
# 3,500 rounds where the default recipe blows up near round 3,000 (docs/algorithms.md, "A quality preset").
PRESETS: dict[str, dict[str, Any]] = {
    "quality": {"rounds": 3500, "d_width": 64, "d_norm": "spectral"},
}


def preset_values(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def check_preset(name: str | None, dataset: str) -> None:
    """A preset's name (already checked where it set the flags' defaults) against the data set's shape."""
    if name is not None and data_shape(dataset) != "images":
        raise ValueError(f"--preset {name} is an image recipe; --dataset {dataset} is 2-D data")


def data_shape(dataset: str) -> str:
    return "points" if dataset in POINT_DATASETS else "images"


def resolve_run(dataset: str, name: str, value: Any) -> Any:
    return RUN_DEFAULTS[data_shape(dataset)][name] if value is None else value


def resolve_fakes(dataset: str, algo: str, value: str | None) -> str:
    """--fakes as given, else the data shape's default for the proposed method (serial, parallel; the
    schedules `sync` and `parallel` of `edgegan server`) and `device` for the baselines, which have no
    choice."""
    if value is not None:
        return value
    return resolve_run(dataset, "fakes", None) if algo in ("serial", "parallel", "sync") else "device"


def resolve_train(dataset: str, overrides: dict[str, Any], *, schedule: str = "sync") -> TrainConfig:
    """TrainConfig from the shape's, data set's and schedule's (`sync` or `parallel`) defaults with every
    non-None override applied (validated there)."""
    known = {field.name for field in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
    values = dict(TRAIN_DEFAULTS[data_shape(dataset)]) | DATASET_TRAIN_DEFAULTS.get(dataset, {})
    values |= SCHEDULE_TRAIN_DEFAULTS.get((data_shape(dataset), schedule), {})
    values.update({name: value for name, value in overrides.items() if value is not None})
    return TrainConfig(**values)


def default_help(name: str, train: bool = False) -> str:
    """'[default: X for 2-D data, Y for images]' for a flag's help text."""
    if train:
        base = {field.name: field.default for field in fields(TrainConfig)}
        points = TRAIN_DEFAULTS["points"].get(name, base[name])
        images = TRAIN_DEFAULTS["images"].get(name, base[name])
    else:
        points, images = RUN_DEFAULTS["points"][name], RUN_DEFAULTS["images"][name]
    own = "".join(
        f", {value} for {dataset}"
        for dataset, recipe in DATASET_TRAIN_DEFAULTS.items()
        if train and (value := recipe.get(name)) is not None
    )
    scheduled = "".join(
        f", {value} for {shape} on the {schedule} schedule"
        for (shape, schedule), recipe in SCHEDULE_TRAIN_DEFAULTS.items()
        if train and (value := recipe.get(name)) is not None
    )
    if points == images and not own and not scheduled:
        return f"[default: {points}]"
    return f"[default: {points} for 2-D data{own}, {images} for images{scheduled}]"
