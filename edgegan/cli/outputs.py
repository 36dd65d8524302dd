"""Commands on a run's outputs: `plot`, `sample` and `evaluate`; and `train-classifier`, the fid metric's."""

from __future__ import annotations

from pathlib import Path

import typer

from edgegan.cli import options as opt
from edgegan.cli.common import console, fail


def train_classifier(
    config_file: Path | None = opt.CONFIG,
    dataset: str = typer.Option("mnist", help="mnist | fashion-mnist | cifar10."),
    data_dir: Path | None = typer.Option(
        None, help="Where the data set lives. [default: shipped MNIST]", show_default=False
    ),
    epochs: int = typer.Option(8, help="Training epochs."),
    seed: int = typer.Option(0, help="Seed of the split and the initial weights."),
    out: Path | None = typer.Option(
        None,
        help="Weights file. [default: DATA_DIR/edgegan-classifiers/DATASET.pt, or the package's own for "
        "the shipped MNIST]",
        show_default=False,
    ),
) -> None:
    """Train the small classifier whose features the `fid` metric uses, and save its weights.

    Example: edgegan train-classifier --dataset fashion-mnist --data-dir ~/data
    """
    from edgegan.data import IMAGE_DATASETS, DatasetError, load_dataset
    from edgegan.metrics.classifier import ClassifierMissingError, default_weights_path, train_and_save

    if dataset not in IMAGE_DATASETS:
        fail(f"--dataset must be one of {', '.join(IMAGE_DATASETS)}, got {dataset!r}")
    if epochs < 1:
        fail(f"--epochs must be >= 1, got {epochs}")
    try:
        target = out or default_weights_path(dataset, data_dir)
        data = load_dataset(dataset, data_dir)
    except (DatasetError, ClassifierMissingError) as error:
        fail(str(error))
    accuracy = train_and_save(data, data_dir, target, epochs, seed)
    console.print(f"held-out accuracy {accuracy:.4f}; weights in {target}", highlight=False)


def plot(
    config_file: Path | None = opt.CONFIG,
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (each with metrics.csv)."),
    out: Path = typer.Option(Path("runs/plot.png"), help="PNG file to write."),
) -> None:
    """Plot quality against time and against bytes for several runs, one legend line per run.

    Example: edgegan plot runs/sync runs/parallel --out compare.png
    """
    from edgegan.plots import plot_runs

    try:
        plot_runs(run_dirs, out)
    except (ValueError, OSError) as error:
        fail(str(error))
    console.print(f"wrote {out}", highlight=False)


def load_checkpoint(checkpoint: Path):
    """The generator, its model spec and its data set name from a run's generator.pt, or from the server's
    checkpoint.pt (which holds the generator as of its last completed round, beside the rest; its moving
    average when the run keeps one, as generator.pt would)."""
    import torch

    from edgegan.models import ModelSpec, build_generator

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many unrelated types on a wrong or damaged file
        fail(f"{checkpoint} is not an edgegan generator checkpoint ({str(error)[:120]})")
    server_checkpoint = isinstance(saved, dict) and "rounds_done" in saved and "state_dict" not in saved
    if server_checkpoint and "spec" not in saved:
        fail(
            f"{checkpoint} is a server checkpoint written by an older edgegan, without the model's spec: use "
            "the run's generator.pt (the checkpoints a server writes now record it)"
        )
    try:
        spec = ModelSpec(
            tuple(saved["spec"]["sample_shape"]), saved["spec"]["latent_dim"], saved["spec"]["width"]
        )
        generator = build_generator(spec)
        if server_checkpoint:
            state = saved.get("recorder", {}).get("generator_average") or saved["generator"]
        else:
            state = saved["state_dict"]
        generator.load_state_dict(state)
    except Exception as error:  # a foreign or damaged file: missing keys, wrong shapes, wrong types
        fail(f"{checkpoint} is not an edgegan generator checkpoint ({str(error)[:120]})")
    if not isinstance(saved.get("dataset"), str):
        fail(f"{checkpoint} does not say which data set it was trained on (written by an older edgegan)")
    return generator.eval(), spec, saved["dataset"]


def sample(
    config_file: Path | None = opt.CONFIG,
    checkpoint: Path = typer.Argument(..., help="A run's generator.pt, or its checkpoint.pt mid-run."),
    n: int = typer.Option(64, "--n", help="Number of samples."),
    out: Path = typer.Option(Path("samples.png"), help="PNG file to write."),
    seed: int = typer.Option(0, help="Seed of the noise."),
) -> None:
    """Draw samples from a trained generator into an image grid (or a scatter for 2-D data).

    Example: edgegan sample runs/demo-mnist/generator.pt --n 64 --out grid.png (or checkpoint.pt mid-run)
    """
    import torch

    from edgegan.data import DatasetError, load_dataset
    from edgegan.samples import save_samples

    if n < 1:
        fail(f"--n must be >= 1, got {n}")
    generator, spec, dataset_name = load_checkpoint(checkpoint)
    try:
        dataset = load_dataset(dataset_name) if not spec.is_image else None
    except DatasetError as error:
        fail(str(error))
    with torch.no_grad():
        fakes = generator(torch.randn(n, spec.latent_dim, generator=torch.Generator().manual_seed(seed)))
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.is_image:
        from torchvision.utils import save_image

        save_image(fakes.add(1).div(2).clamp(0, 1), out, nrow=max(1, int(n**0.5)))
    else:
        save_samples(fakes, dataset, out, title=f"{n} samples")
    console.print(f"wrote {out}", highlight=False)


def evaluate(
    config_file: Path | None = opt.CONFIG,
    checkpoint: Path = typer.Argument(..., help="A run's generator.pt, or its checkpoint.pt mid-run."),
    data_dir: Path | None = opt.DATA_DIR,
    samples: int = typer.Option(2500, help="Generated samples to score."),
    seed: int = typer.Option(0, help="Seed of the evaluation noise."),
    features: str = opt.FEATURES,
) -> None:
    """Score a trained generator: fid and classes for images, modes and hq for 2-D data (JSON on stdout).

    Example: edgegan evaluate runs/demo-mnist/generator.pt (or checkpoint.pt mid-run)
    """
    import json

    from edgegan.data import DatasetError, load_dataset
    from edgegan.metrics import ClassifierMissingError
    from edgegan.runsetup import QualityProbe

    generator, spec, dataset_name = load_checkpoint(checkpoint)
    try:
        dataset = load_dataset(dataset_name, data_dir)
        probe = QualityProbe(
            dataset=dataset, latent_dim=spec.latent_dim, samples=samples, seed=seed, data_dir=data_dir,
            real_images=dataset.x, features=features,
        )  # fmt: skip
    except (DatasetError, ClassifierMissingError, ValueError) as error:
        fail(str(error))
    quality, _ = probe.measure(generator)
    print(json.dumps({"dataset": dataset_name, "samples": samples, **quality}))
