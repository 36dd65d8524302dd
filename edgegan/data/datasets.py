"""The one in-memory shape every data set takes, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DatasetError(ValueError):
    """A data set is missing, corrupt or unknown; the message says which files are expected where."""


@dataclass(kw_only=True, frozen=True)
class Dataset:
    """Training examples with labels (classes for images, mode indices for 2-D mixtures).

    Images are float32 in [-1, 1] with shape (n, C, H, W); points are float32 with shape (n, 2).
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    modes: torch.Tensor | None = None  # (K, 2) centres of a 2-D mixture
    mode_std: float | None = None

    @property
    def is_image(self) -> bool:
        return self.x.dim() == 4

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    @classmethod
    def shape_only(cls, name: str, sample_shape: tuple[int, ...]) -> Dataset:
        """The data set `name` as a party that holds none of it knows it: zero examples of its shape (a
        server that scores against devices' statistics or a public reference set)."""
        return cls(name=name, x=torch.empty(0, *sample_shape), y=torch.empty(0, dtype=torch.long),
                   num_classes=0)  # fmt: skip

    def subset(self, indices: torch.Tensor) -> Dataset:
        return Dataset(
            name=self.name,
            x=self.x[indices],
            y=self.y[indices],
            num_classes=self.num_classes,
            modes=self.modes,
            mode_std=self.mode_std,
        )
