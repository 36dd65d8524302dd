"""Data sets (vendored MNIST, user data dirs, 2-D mixtures) and their partitioning across devices."""

from __future__ import annotations

from pathlib import Path

from edgegan.data.datasets import Dataset, DatasetError
from edgegan.data.images import load_cifar10, load_idx_dataset, load_vendored_mnist
from edgegan.data.local import LocalData, load_local, native_shape
from edgegan.data.mixtures import make_mixture
from edgegan.data.partition import PartitionSpec, PartitionSpecError, parse_partition, partition_indices

IMAGE_DATASETS = ("mnist", "fashion-mnist", "cifar10")
POINT_DATASETS = ("ring8", "grid25")
DATASETS = IMAGE_DATASETS + POINT_DATASETS
MIXTURE_SAMPLES_PER_MODE = {"ring8": 2500, "grid25": 1000}
# What one sample of each data set looks like, known without loading it (a device with its own data).
SAMPLE_SHAPES = {
    "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32), "ring8": (2,), "grid25": (2,),
}  # fmt: skip

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetError",
    "LocalData",
    "PartitionSpec",
    "PartitionSpecError",
    "load_dataset",
    "load_local",
    "native_shape",
    "parse_partition",
    "partition_indices",
    "sample_shape",
]


def sample_shape(name: str) -> tuple[int, ...]:
    """The shape of one sample of data set `name`, (C, H, W) or (2,), without reading it."""
    if name not in SAMPLE_SHAPES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return SAMPLE_SHAPES[name]


def load_dataset(name: str, data_dir: Path | None = None, seed: int = 0) -> Dataset:
    """Loads a data set by name. Without `data_dir`, MNIST is the vendored 10,000-image split."""
    if name in POINT_DATASETS:
        # The mixture itself is fixed (seed 0) so that runs with different seeds see the same data.
        return make_mixture(name, MIXTURE_SAMPLES_PER_MODE[name], seed=0)
    if name == "mnist" and data_dir is None:
        return load_vendored_mnist()
    if name not in IMAGE_DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        raise DatasetError(f"{name} is not shipped with edgegan; pass --data-dir DIR holding it")
    if not data_dir.is_dir():
        raise DatasetError(f"--data-dir {data_dir} is not a directory")
    if name == "cifar10":
        return load_cifar10(data_dir)
    return load_idx_dataset(data_dir, name)
