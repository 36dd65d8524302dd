"""Commands on a run's outputs: `plot`, `sample`, `evaluate` and `export`; and `train-classifier`, the fid
metric's."""

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
    checkpoint: Path | None = typer.Argument(
        None, help="A run's generator.pt, or its checkpoint.pt mid-run.", show_default=False
    ),
    reference: bool = typer.Option(
        False,
        "--reference",
        help="Print what the figures mean: the scores of real held-out images (the floor of fid, the ceiling "
        "of IS), of the same made grainy or blurred, of one and three classes only and of noise, measured "
        "as a run measures its generator (a markdown table).",
    ),  # fmt: skip
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help="With --reference: the data set. [default: the checkpoint's, else mnist]",
        show_default=False,
    ),  # fmt: skip
    data_dir: Path | None = opt.DATA_DIR,
    samples: int = typer.Option(2500, help="Generated samples to score."),
    seed: int = typer.Option(0, help="Seed of the evaluation noise."),
    features: str = opt.FEATURES,
) -> None:
    """Score a trained generator: fid, classes, IS and class shares for images, modes and hq for 2-D data
    (JSON on stdout); with --reference, first what those figures mean on real data.

    Example: edgegan evaluate runs/demo-mnist/generator.pt (or checkpoint.pt mid-run)
    Example: edgegan evaluate --reference
    """
    import json

    from edgegan.data import DatasetError, load_dataset
    from edgegan.metrics import ClassifierMissingError
    from edgegan.runsetup import QualityProbe

    if checkpoint is None and not reference:
        fail("give a CHECKPOINT to score, or --reference for what the scores mean")
    generator, spec, dataset_name = load_checkpoint(checkpoint) if checkpoint else (None, None, None)
    if dataset is not None and dataset_name is not None and dataset != dataset_name:
        fail(f"--dataset {dataset} disagrees with the checkpoint's data set {dataset_name}")
    dataset_name = dataset_name or dataset or "mnist"
    try:
        data = load_dataset(dataset_name, data_dir)
        if reference:
            from edgegan.metrics import load_extractor
            from edgegan.metrics.calibration import calibrate, calibration_table

            if not data.is_image:
                fail(f"--reference: {dataset_name} is 2-D data, scored against its known modes")
            extractor = load_extractor(features, dataset=dataset_name, data_dir=data_dir,
                                       sample_shape=tuple(data.sample_shape))  # fmt: skip
            print(f"{dataset_name}, {samples} images a row, seed {seed}, features {features}:")
            print(calibration_table(calibrate(data, extractor, samples=samples, seed=seed)))
            if generator is None:
                return
        probe = QualityProbe(
            dataset=data, latent_dim=spec.latent_dim, samples=samples, seed=seed, data_dir=data_dir,
            real_images=data.x, features=features,
        )  # fmt: skip
    except (DatasetError, ClassifierMissingError, ValueError) as error:
        fail(str(error))
    quality, _ = probe.measure(generator)
    print(json.dumps({"dataset": dataset_name, "samples": samples, **quality}))


def export(
    config_file: Path | None = opt.CONFIG,
    run: Path = typer.Argument(
        ..., help="A run directory (its generator.pt, else its checkpoint.pt mid-run), or one of those files."
    ),
    format: str = typer.Option("torchscript", "--format", help="torchscript | onnx (needs edgegan[export])."),
    out: Path | None = typer.Option(
        None, help="File to write. [default: RUN/generator.ts or RUN/generator.onnx]", show_default=False
    ),
) -> None:
    """Write the run's generator as one file that runs without edgegan (torch.jit.load, or any ONNX
    runtime), its noise size, output shape and range, data set and source recorded inside.

    Example: edgegan export runs/demo-mnist --format onnx
    """
    from edgegan.export import FORMATS, SUFFIXES, ExportError, GeneratorCard, export_generator, require_onnx

    if format not in FORMATS:
        fail(f"--format must be one of {' | '.join(FORMATS)}, got {format!r}")
    try:
        if format == "onnx":
            require_onnx()  # before the slow part, so a missing package is the first thing said
    except ExportError as error:
        fail(str(error))
    checkpoint = generator_file(run)
    generator, spec, dataset_name = load_checkpoint(checkpoint)
    card = GeneratorCard.of(spec=spec, dataset=dataset_name, source=str(checkpoint))
    target = out or checkpoint.parent / f"generator{SUFFIXES[format]}"
    try:
        checked = export_generator(generator, card=card, format=format, out=target)
    except (ExportError, OSError) as error:
        fail(str(error))
    print(f"wrote {target}: {card.line()}; {checked}")  # one line on stdout, never wrapped: scripts read it


def generator_file(run: Path) -> Path:
    """The file in `run` that holds its generator: generator.pt once finished, checkpoint.pt mid-run."""
    if run.is_file():
        return run
    if not run.is_dir():
        fail(f"no such run: {run}")
    for name in ("generator.pt", "checkpoint.pt"):
        if (run / name).is_file():
            return run / name
    fail(f"{run} holds no generator.pt or checkpoint.pt: is it a run directory?")
