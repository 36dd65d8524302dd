"""Which torch device a process trains on: `--torch-device auto | cpu | cuda`, resolved once at start.

CPU is the tested default. Random draws stay on CPU generators and every state that leaves a model (the
wire, aggregation, checkpoints) is a CPU tensor, so a CPU run is the same bit for bit as before this
option; a CUDA run trains the same recipe but its kernels do not give CPU's numbers bit for bit.
"""

from __future__ import annotations

import torch

TORCH_DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TORCH_DEVICE = "cpu"
CPU = torch.device("cpu")


def resolve_torch_device(name: str) -> torch.device:
    """`auto` is cuda where torch sees a CUDA device, else cpu; `cuda` without one is a ValueError."""
    if name not in TORCH_DEVICES:
        raise ValueError(f"--torch-device must be one of {' | '.join(TORCH_DEVICES)}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return CPU
    if not torch.cuda.is_available():
        raise ValueError("--torch-device cuda: torch sees no CUDA device here (use cpu or auto)")
    return torch.device("cuda")
