"""Pictures of generated samples: an image grid (torchvision) or a scatter over the true modes."""

from __future__ import annotations

from pathlib import Path

import torch

from edgegan.data import Dataset


def save_samples(fakes: torch.Tensor, dataset: Dataset, path: Path, title: str = "") -> None:
    if dataset.is_image:
        from torchvision.utils import save_image  # here, not above: device processes never draw samples

        # Generators emit [-1, 1]; save_image wants [0, 1].
        save_image(fakes[:64].add(1).div(2).clamp(0, 1), path, nrow=8)
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(4, 4), dpi=100)
    points = fakes.cpu().numpy()
    axes.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, label="generated")
    modes = dataset.modes.numpy()
    axes.scatter(modes[:, 0], modes[:, 1], s=30, marker="x", color="red", label="true modes")
    limit = float(abs(modes).max()) * 1.5
    axes.set_xlim(-limit, limit)
    axes.set_ylim(-limit, limit)
    axes.set_aspect("equal")
    axes.set_title(title)
    axes.legend(loc="upper right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
