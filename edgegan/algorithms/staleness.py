"""Folding in discriminators computed from an older global model (the parallel schedule's staleness).

A device that trained from D_b returns D_k; by the time it arrives the global discriminator is D_t
(t >= b). Its contribution is its own change, replayed on the current model: D_t + (D_k - D_b). For a
fresh update (b = t) that is D_k itself, so the synchronous schedule is the special case tau = 0. Each
update is weighted by its sample count times a discount that falls with staleness s = t - b.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from edgegan.algorithms.aggregation import State


@dataclass(frozen=True)
class StalenessWeight:
    kind: str  # "constant" | "inverse" | "exp"
    decay: float = 0.0

    def __call__(self, staleness: int) -> float:
        if self.kind == "inverse":
            return 1.0 / (1.0 + staleness)
        if self.kind == "exp":
            return math.exp(-self.decay * staleness)
        return 1.0

    def __str__(self) -> str:
        return f"exp:{self.decay:g}" if self.kind == "exp" else self.kind


def parse_staleness_weight(spec: str) -> StalenessWeight:
    kind, _, argument = spec.partition(":")
    if kind in ("constant", "inverse") and not argument:
        return StalenessWeight(kind)
    if kind == "exp":
        try:
            decay = float(argument)
        except ValueError:
            raise ValueError(f"exp needs a rate: exp:LAMBDA, got {spec!r}") from None
        if not math.isfinite(decay) or decay < 0:
            raise ValueError(f"exp:LAMBDA needs LAMBDA >= 0, got {spec!r}")
        return StalenessWeight("exp", decay)
    raise ValueError(f"unknown staleness weight {spec!r}; use constant, inverse or exp:LAMBDA")


def rebase(
    update: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]
) -> State:
    """current + (update - base) for floating tensors; counters are taken from the update. Callers skip it
    for fresh updates, since a + (b - a) need not equal b in floating point."""
    rebased: State = {}
    for name, tensor in update.items():
        if tensor.is_floating_point():
            rebased[name] = current[name] + (tensor - base[name])
        else:
            rebased[name] = tensor
    return rebased


def difference(update: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> State:
    """update - base for floating tensors (counters as they are): what a device changed. Lossy codecs
    carry this rather than the parameters: a training step is far smaller than a weight, so quantising the
    weights would bury the step in rounding error while quantising the step keeps it."""
    return {
        name: tensor - base[name] if tensor.is_floating_point() else tensor for name, tensor in update.items()
    }


def apply_difference(current: Mapping[str, torch.Tensor], change: Mapping[str, torch.Tensor]) -> State:
    """current + change for floating tensors; counters are taken from the change."""
    return {
        name: current[name] + tensor if tensor.is_floating_point() else tensor
        for name, tensor in change.items()
    }


def onto_current(
    received: Mapping[str, torch.Tensor],
    is_change: bool,
    base: Mapping[str, torch.Tensor] | None,
    current: Mapping[str, torch.Tensor],
) -> State:
    """An arrived update as a state on top of the current model: a change (lossy codecs) is applied to
    it, which also rebases a stale one; a stale full state is rebased from its `base`; a fresh full state
    is taken as it is. The one rule for the MQTT server and the simulator's quorum schedule."""
    if is_change:
        return apply_difference(current, received)
    if base is not None:
        return rebase(received, base, current)
    return dict(received)
