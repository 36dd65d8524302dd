"""Splitting a data set across devices, deterministically in the seed.

Specs: `iid`, `dirichlet:ALPHA` (label skew, Hsu et al. 2019) and `shards:K` (each device holds K classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class PartitionSpecError(ValueError):
    """A partition spec that cannot be parsed or cannot be met."""


@dataclass(frozen=True)
class PartitionSpec:
    kind: str  # "iid" | "dirichlet" | "shards"
    alpha: float = 0.0
    classes_per_device: int = 0

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.classes_per_device}"
        return "iid"


def parse_partition(spec: str) -> PartitionSpec:
    """Parses `iid`, `dirichlet:ALPHA` (ALPHA > 0) or `shards:K` (K >= 1); anything else is refused."""
    kind, separator, argument = spec.strip().partition(":")
    if kind == "iid":
        if separator:
            raise PartitionSpecError(
                f"iid takes no argument, got {spec!r}; use iid, dirichlet:ALPHA or shards:K"
            )
        return PartitionSpec("iid")
    if kind == "dirichlet":
        try:
            alpha = float(argument)
        except ValueError:
            raise PartitionSpecError(f"dirichlet needs a number: dirichlet:ALPHA, got {spec!r}") from None
        if not np.isfinite(alpha) or alpha <= 0:
            raise PartitionSpecError(f"dirichlet:ALPHA needs ALPHA > 0, got {spec!r}")
        return PartitionSpec("dirichlet", alpha=alpha)
    if kind == "shards":
        try:
            count = int(argument)
        except ValueError:
            raise PartitionSpecError(f"shards needs a whole number: shards:K, got {spec!r}") from None
        if count < 1:
            raise PartitionSpecError(f"shards:K needs K >= 1, got {spec!r}")
        return PartitionSpec("shards", classes_per_device=count)
    raise PartitionSpecError(f"unknown partition {spec!r}; use iid, dirichlet:ALPHA or shards:K")


def partition_indices(
    labels: torch.Tensor, num_devices: int, spec: PartitionSpec, seed: int
) -> list[torch.Tensor]:
    """Example indices held by each device; every example goes to at most one device."""
    if num_devices < 1:
        raise PartitionSpecError(f"need at least one device, got {num_devices}")
    rng = np.random.default_rng([seed, 0x9A57])
    label_array = labels.cpu().numpy()
    if spec.kind == "iid":
        parts = np.array_split(rng.permutation(len(label_array)), num_devices)
    elif spec.kind == "dirichlet":
        parts = dirichlet_split(label_array, num_devices, spec.alpha, rng)
    elif spec.kind == "shards":
        parts = shard_split(label_array, num_devices, spec.classes_per_device, rng)
    else:
        raise PartitionSpecError(f"unknown partition kind {spec.kind!r}; use iid, dirichlet or shards")
    for device, part in enumerate(parts):
        if len(part) == 0:
            raise PartitionSpecError(
                f"partition {spec} leaves device {device} with no data; use fewer devices or a larger ALPHA/K"
            )
    return [torch.from_numpy(np.sort(part)).long() for part in parts]


def dirichlet_split(
    labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator, attempts: int = 100
) -> list[np.ndarray]:
    """Each class is split over devices in Dirichlet(alpha) proportions; redrawn until no device is empty."""
    classes = np.unique(labels)
    for _ in range(attempts):
        parts: list[list[int]] = [[] for _ in range(num_devices)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for device, chunk in enumerate(np.split(members, cuts)):
                parts[device].extend(chunk.tolist())
        if all(parts):
            return [np.array(part, dtype=np.int64) for part in parts]
    return [np.array(part, dtype=np.int64) for part in parts]


def shard_split(labels: np.ndarray, num_devices: int, classes_per_device: int, rng: np.random.Generator):
    """Device d holds classes d*K .. d*K+K-1 (mod the number of classes), so the classes are spread
    round-robin; a class held by several devices has its examples divided evenly among them."""
    classes = np.unique(labels)
    if classes_per_device > len(classes):
        raise PartitionSpecError(
            f"shards:{classes_per_device} asks for more classes per device than the {len(classes)} there are"
        )
    holders: dict[int, list[int]] = {int(label): [] for label in classes}
    for device in range(num_devices):
        for slot in range(classes_per_device):
            holders[int(classes[(device * classes_per_device + slot) % len(classes)])].append(device)
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for label, devices in holders.items():
        if not devices:
            continue
        members = rng.permutation(np.flatnonzero(labels == label))
        for device, chunk in zip(devices, np.array_split(members, len(devices)), strict=True):
            parts[device].extend(chunk.tolist())
    return [np.array(part, dtype=np.int64) for part in parts]


def class_counts(labels: torch.Tensor, parts: list[torch.Tensor], num_classes: int) -> list[list[int]]:
    return [torch.bincount(labels[part], minlength=num_classes).tolist() for part in parts]


def unheld_classes(labels: torch.Tensor, parts: list[torch.Tensor], num_classes: int) -> list[int]:
    totals = np.sum(class_counts(labels, parts, num_classes), axis=0)
    return [label for label in range(num_classes) if totals[label] == 0]
