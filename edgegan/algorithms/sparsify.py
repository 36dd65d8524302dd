"""Top-k sparsification of a device's uplink with error feedback (the `topk+int8+zstd` codec).

A device sends, of each floating tensor of its discriminator's change, only the `density` share of entries
largest in magnitude; what it left out, and what int8 rounding took from what it sent, is kept on the
device and added to its next change (error feedback: Seide et al. 2014, Stich et al. 2018), so no part of
a change is lost, only delayed. Over rounds the server receives the sum of the device's changes minus the
one residual the device still holds. Transport-free: the simulator and the device runtime both hold one
`UplinkResidual` per device and call `select` then `sent` around the same encoding.
"""

from __future__ import annotations

import math

import torch

State = dict[str, torch.Tensor]
TOPK_DENSITY = 0.1  # the share of each tensor's entries an update carries


def top_k(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its ceil(density * n) largest-magnitude entries set to zero (ties broken as
    torch's topk breaks them: the same for the same values and build, as the simulator-runtime identity
    needs)."""
    flat = tensor.flatten()
    count = min(flat.numel(), max(1, math.ceil(density * flat.numel())))
    kept = torch.zeros_like(flat)
    if flat.numel():
        chosen = flat.abs().topk(count, sorted=False).indices
        kept[chosen] = flat[chosen]
    return kept.view_as(tensor)


class UplinkResidual:
    """One device's error feedback. `select(change)` is what to send (change + residual, top-k of each
    floating tensor); `sent(received)`, with the tensors as the server decodes them, keeps the rest."""

    def __init__(self, density: float = TOPK_DENSITY) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"a top-k density must be in (0, 1], got {density}")
        self.density = density
        self.residual: State = {}
        self.target: State = {}

    def select(self, change: State) -> State:
        self.target = {
            name: tensor + self.residual[name] if name in self.residual else tensor.clone()
            for name, tensor in change.items()
        }
        return {
            name: top_k(tensor, self.density) if tensor.is_floating_point() else tensor
            for name, tensor in self.target.items()
        }

    def sent(self, received: State) -> None:
        self.residual = {
            name: tensor - received[name]
            for name, tensor in self.target.items()
            if tensor.is_floating_point()
        }

    def reset(self) -> None:
        """A new run or a new model: nothing owed to it."""
        self.residual, self.target = {}, {}
