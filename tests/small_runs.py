"""Small models and data shards that several test modules train on (kept out of any one test module, so
that none imports another)."""

import subprocess

import torch

from edgegan.data import load_dataset, parse_partition, partition_indices
from edgegan.models import ModelSpec

POINTS = ModelSpec((2,), latent_dim=8, width=32)
IMAGES = ModelSpec((1, 28, 28), latent_dim=16, width=8)


def ring8_shards(devices: int = 4, partition: str = "shards:2") -> list[torch.Tensor]:
    data = load_dataset("ring8")
    return [data.x[part] for part in partition_indices(data.y, devices, parse_partition(partition), seed=0)]


def mnist_shards(devices: int = 2, per_device: int = 64) -> list[torch.Tensor]:
    data = load_dataset("mnist")
    return [data.x[index * per_device : (index + 1) * per_device] for index in range(devices)]


def finish(process: subprocess.Popen, timeout_s: float = 240, code: int = 0) -> str:
    """The output of a process the test started, once it exits with `code` within `timeout_s` (else the
    failure with the output's tail)."""
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"process did not finish in {timeout_s} s:\n{output[-3000:]}") from None
    assert process.returncode == code, output[-3000:]
    return output
