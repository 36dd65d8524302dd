"""Model poisoning, for measuring what the robust aggregation rules buy (docs/reliability.md).

A poisoned device sends a discriminator that is not what its data taught it: its weights scaled by a
factor (a crude boosting attack) or replaced by random noise. Transport-free, so the simulator and a real
device poison the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

POISONS = ("scale", "noise")


@dataclass(frozen=True)
class Poison:
    kind: str  # "scale": weights x value; "noise": weights ~ N(0, value^2)
    value: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


def parse_poison(spec: str) -> Poison:
    kind, _, argument = spec.partition(":")
    if kind not in POISONS:
        raise ValueError(f"unknown poison {spec!r}; use scale:FACTOR or noise:STD")
    try:
        value = float(argument)
    except ValueError:
        raise ValueError(f"{kind} needs a number: {kind}:NUMBER, got {spec!r}") from None
    if not math.isfinite(value) or (kind == "noise" and value <= 0):
        raise ValueError(f"{spec!r}: the number must be finite (and > 0 for noise)")
    return Poison(kind, value)


def poison_state(
    state: Mapping[str, torch.Tensor], poison: Poison, rng: torch.Generator
) -> dict[str, torch.Tensor]:
    """The state a poisoned device sends instead of `state`; integer buffers are left alone."""
    poisoned = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            poisoned[name] = tensor.clone()
        elif poison.kind == "scale":
            poisoned[name] = tensor * poison.value
        else:
            noise = torch.randn(tensor.shape, generator=rng, dtype=torch.float32) * poison.value
            poisoned[name] = noise.to(tensor.dtype)
    return poisoned
