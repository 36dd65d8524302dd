"""A run's set-up and its run directory, shared by the simulator and the MQTT runtime: what every party
agrees on before round 0 (data, split, model, recipe, evaluation), the data and model it prepares, the quality
probe, and the recorder that writes metrics.csv, trace.jsonl, samples/, generator.pt and summary.json.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.steps import EVAL_STREAM, cpu_state, device_of, rng_for
from edgegan.config import check_preset, resolve_run, resolve_train
from edgegan.costmodel import RoundTrace
from edgegan.data import (
    DATASETS,
    Dataset,
    load_dataset,
    load_local,
    parse_partition,
    partition_indices,
    sample_shape,
)
from edgegan.data.partition import class_counts, unheld_classes
from edgegan.models import ModelSpec, build_discriminator, build_generator, parameter_count, state_bytes
from edgegan.samples import save_samples
from edgegan.wire import finite_or_null

if TYPE_CHECKING:
    from edgegan.metrics import FeatureStatistics


@dataclass(frozen=True, kw_only=True)
class RunSetup:
    """What the simulator, the server and every device of one run must agree on: the data and its split,
    the model, the training recipe, the run directory and how quality is measured. Validated here, once."""

    dataset: str
    devices: int
    partition: str
    seed: int
    out: Path
    train: TrainConfig
    width: int
    latent_dim: int
    data_dir: Path | None = None
    eval_every: int = 100
    eval_samples: int = 2500
    # The feature extractor fid is measured in (edgegan/metrics/extractors.py), checked when it is loaded.
    features: str = "classifier"

    def __post_init__(self) -> None:
        check_dataset(self.dataset)
        if self.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {self.devices}")
        if self.eval_every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {self.eval_every}")
        if self.eval_samples < 100:
            raise ValueError(f"--eval-samples must be >= 100, got {self.eval_samples}")
        if self.width < 1 or self.latent_dim < 1:
            raise ValueError("--width and --latent-dim must be >= 1")
        parse_partition(self.partition)


def check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {name!r}")


class QualityProbe:
    """Quality of a generator on fixed evaluation noise: modes/hq for 2-D data, fid/classes for images."""

    def __init__(
        self, *, dataset: Dataset, latent_dim: int, samples: int, seed: int, data_dir: Path | None,
        real_images: torch.Tensor | None = None, features: str = "classifier",
    ):  # fmt: skip
        """Images are scored against `real_images` (the data set's own, or a public reference set), or,
        when there are none, against statistics the devices send (`use_statistics`). `features` names the
        extractor (edgegan/metrics/extractors.py)."""
        self.dataset = dataset
        self.noise = torch.randn(samples, latent_dim, generator=rng_for(seed, EVAL_STREAM))
        self.image_quality = None
        self.extractor = None
        if dataset.is_image:
            from edgegan.metrics import ImageQuality, load_extractor

            self.extractor = load_extractor(
                features, dataset=dataset.name, data_dir=data_dir, sample_shape=tuple(dataset.sample_shape)
            )
            if real_images is not None:
                self.image_quality = ImageQuality(self.extractor, real_images, seed=seed)

    @property
    def needs_statistics(self) -> bool:
        """An image probe still waiting for the devices' feature statistics."""
        return self.extractor is not None and self.image_quality is None

    def use_statistics(self, statistics: FeatureStatistics) -> None:
        """Scores from now on against `statistics` (the sum of the devices' feature statistics)."""
        from edgegan.metrics import ImageQuality

        self.image_quality = ImageQuality.from_statistics(self.extractor, statistics)

    def samples(self, generator: torch.nn.Module) -> torch.Tensor:
        was_training = generator.training
        generator.eval()
        device = device_of(generator)  # the noise is drawn on CPU, and the samples are scored there
        with torch.no_grad():
            fakes = torch.cat([generator(chunk.to(device)).cpu() for chunk in self.noise.split(500)])
        generator.train(was_training)
        return fakes

    def measure(self, generator: torch.nn.Module) -> tuple[dict, torch.Tensor]:
        fakes = self.samples(generator)
        if self.dataset.is_image:
            if self.image_quality is None:
                raise RuntimeError("no real statistics to score against yet (quality from devices)")
            return self.image_quality(fakes), fakes
        from edgegan.metrics import point_quality

        return point_quality(fakes, self.dataset.modes, self.dataset.mode_std), fakes


def describe_setup(
    setup: RunSetup, dataset: Dataset, parts: list[torch.Tensor], spec: ModelSpec
) -> list[str]:
    """Human-readable lines: partition sizes and class counts, model sizes."""
    if not parts:
        lines = [f"{setup.dataset}: this process holds none of the data; {setup.devices} devices bring "
                 "their own"]  # fmt: skip
    else:
        lines = [f"{setup.dataset}: {len(dataset)} examples, partition {setup.partition} over "
                 f"{setup.devices} devices"]  # fmt: skip
    for device, counts in enumerate(class_counts(dataset.y, parts, dataset.num_classes)):
        lines.append(f"  device {device}: {len(parts[device])} examples, per class {counts}")
    missing = unheld_classes(dataset.y, parts, dataset.num_classes)
    if missing:
        lines.append(f"  warning: classes {missing} are held by no device")
    for role, model in (("generator", build_generator(spec)), ("discriminator", build_discriminator(spec))):
        lines.append(f"  {role}: {parameter_count(model):,} parameters, {state_bytes(model):,} bytes (fp32)")
    return lines


def resolve_setup(
    *, dataset: str, devices: int, partition: str, seed: int, out: Path, data_dir: Path | None = None,
    width: int | None = None, latent_dim: int | None = None, eval_every: int | None = None,
    aggregate: str = "mean", recipe: Mapping[str, object] | None = None, features: str = "classifier",
    schedule: str = "sync", preset: str | None = None,
) -> RunSetup:  # fmt: skip
    """The set-up of a run over MQTT with the data shape's defaults for what is unset (None), built as the
    simulator builds it, so that server, devices and simulator agree on data and model. `preset` (its values
    are already the flags' defaults) is only checked against the data set."""
    check_preset(preset, dataset)
    return RunSetup(
        dataset=dataset, devices=devices, partition=partition, seed=seed, out=out,
        train=resolve_train(dataset, {**(recipe or {}), "aggregate": aggregate}, schedule=schedule),
        width=resolve_run(dataset, "width", width), latent_dim=resolve_run(dataset, "latent_dim", latent_dim),
        data_dir=data_dir, eval_every=resolve_run(dataset, "eval_every", eval_every), features=features,
    )  # fmt: skip


@dataclass(kw_only=True)
class Prepared:
    """Everything a run needs before its first round; building it surfaces data and setup errors early."""

    dataset: Dataset
    parts: list[torch.Tensor]
    spec: ModelSpec
    probe: QualityProbe | None
    setup_lines: list[str]


MIN_FREE_BYTES = 100 * 1024 * 1024  # a run writes metrics, samples and checkpoints: tens of MB at most


def check_writable(out: Path) -> None:
    """Fails at start, with the reason, when the run directory cannot be written or its disk is nearly
    full: a run that dies at its first checkpoint an hour in has wasted the hour."""
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        probe = out / f".edgegan-write-test-{os.getpid()}"  # processes sharing --out must not collide
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
        free = shutil.disk_usage(out).free
    except OSError as error:
        raise ValueError(f"cannot write the run directory --out {out}: {error.strerror}") from None
    if free < MIN_FREE_BYTES:
        raise ValueError(
            f"only {free / 2**20:.0f} MB free on the disk of --out {out}; a run needs at least "
            f"{MIN_FREE_BYTES / 2**20:.0f} MB"
        )


def prepare(
    setup: RunSetup, with_probe: bool = True, quality_from: str = "data", reference: Path | None = None
) -> Prepared:
    """Loads and splits the data, builds the model spec and (for whoever evaluates) the quality probe,
    which scores against the data set's images, the `reference` images (`quality_from` "reference") or the
    devices' statistics ("devices"). With the last two the data set is never read: only its shape is known."""
    check_writable(setup.out)
    if quality_from == "data":
        dataset = load_dataset(setup.dataset, setup.data_dir)
        parts = partition_indices(dataset.y, setup.devices, parse_partition(setup.partition), setup.seed)
        real_images = dataset.x
    else:
        dataset, parts = Dataset.shape_only(setup.dataset, sample_shape(setup.dataset)), []
        real_images = None
        if quality_from == "reference":
            reference_set = load_local(reference, sample_shape=dataset.sample_shape, flag="--reference-set")
            real_images = reference_set.x
    spec = setup.train.model_spec(dataset.sample_shape, setup.latent_dim, setup.width)
    probe = None
    if with_probe:
        probe = QualityProbe(
            dataset=dataset, latent_dim=setup.latent_dim, samples=setup.eval_samples, seed=setup.seed,
            data_dir=setup.data_dir, real_images=real_images, features=setup.features,
        )  # fmt: skip
    lines = describe_setup(setup, dataset, parts, spec)
    if quality_from == "reference":
        lines.insert(1, f"  quality against the reference set {reference_set.describe()}")
    return Prepared(dataset=dataset, parts=parts, spec=spec, probe=probe, setup_lines=lines)


# Noise for the average's batch-norm statistics: fixed, so they depend on its weights alone.
NORM_STATISTICS_SEED = 20260
NORM_STATISTICS_SAMPLES = 2048


class GeneratorAverage:
    """An exponential moving average of the generator's parameters, one step per round: with `decay` > 0
    it is what a run evaluates and saves, a cheap gain in sample quality for GANs. The average starts at the
    generator it first sees (round 0, or the round a resumed run goes on from). Batch-norm statistics are
    not averaged: the generator's running statistics belong to its own weights, so before the average is
    used they are measured again on the average itself (`NORM_STATISTICS_SAMPLES` fixed noise vectors)."""

    def __init__(self, decay: float, latent_dim: int, state: Mapping[str, torch.Tensor] | None = None):
        self.decay = decay
        self.latent_dim = latent_dim
        self.state = state  # a resumed run's average, until the first generator gives it a module
        self.average: torch.nn.Module | None = None
        self.measured = False  # its batch-norm statistics belong to its current weights

    def module(self, generator: torch.nn.Module) -> torch.nn.Module:
        if self.average is None:
            self.average = copy.deepcopy(generator)
            self.average.requires_grad_(False)
            if self.state is not None:
                self.average.load_state_dict(self.state)
        return self.average

    def of(self, generator: torch.nn.Module) -> torch.nn.Module:
        """The module to evaluate or save: the generator itself when off, else the average with its own
        batch-norm statistics."""
        if not self.decay:
            return generator
        average = self.module(generator)
        if self.measured:
            return average
        self.measured = True
        norms = [
            layer for layer in average.modules() if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
        ]
        if norms:
            noise = torch.randn(
                NORM_STATISTICS_SAMPLES,
                self.latent_dim,
                generator=torch.Generator().manual_seed(NORM_STATISTICS_SEED),
            )
            momenta = [layer.momentum for layer in norms]
            for layer in norms:
                layer.reset_running_stats()
                layer.momentum = None  # a plain mean over the batches below
            average.train()
            where = next(average.parameters()).device  # --torch-device: the noise stays a CPU draw
            with torch.no_grad():
                for chunk in noise.split(256):
                    average(chunk.to(where))
            for layer, momentum in zip(norms, momenta, strict=True):
                layer.momentum = momentum
        return average

    def update(self, generator: torch.nn.Module) -> None:
        if not self.decay:
            return
        average = self.module(generator)
        self.measured = False
        with torch.no_grad():
            for mean, current in zip(average.parameters(), generator.parameters(), strict=True):
                mean.lerp_(current, 1.0 - self.decay)
            for mean, current in zip(average.buffers(), generator.buffers(), strict=True):
                mean.copy_(current)

    def state_dict(self) -> dict | None:
        if self.average is None:
            return None if self.state is None else dict(self.state)
        return {name: tensor.clone() for name, tensor in self.average.state_dict().items()}

    def describe(self) -> str:
        return f"ema {self.decay}" if self.decay else "last"


class RunRecorder:
    """Writes a run directory the same way for the simulator and the MQTT server: a metrics.csv row per
    round, samples per evaluation, generator.pt and summary.json. With `g_ema` > 0 it keeps the generator's
    moving average, and evaluates and saves that instead of the generator (every algorithm, both runtimes).
    """

    def __init__(
        self,
        *,
        out: Path,
        prepared: Prepared,
        eval_every: int,
        rounds: int,
        resume_from: int | None = None,
        totals: dict | None = None,
        g_ema: float = 0.0,
    ):
        """`resume_from` rounds: keep the files' rows up to that round and go on after them, from
        `totals` (what `totals()` returned when that round was checkpointed, the moving average's too)."""
        self.out = out
        self.prepared = prepared
        self.eval_every = eval_every
        self.rounds = rounds
        self.started = time.perf_counter()
        dataset = prepared.dataset
        quality_keys = (
            ["fid", "classes", "is", "class_shares"] if dataset.is_image else ["modes", "hq", "dist"]
        )
        columns = ["round", "sim_time_s", "wall_time_s", "bytes_up", "bytes_down", "round_bytes_up",
                   "round_bytes_down", "d_loss", "g_loss", *quality_keys]  # fmt: skip
        kept_rows, kept_traces = [], []
        if resume_from is not None:
            kept_rows = [row for row in read_rows(out / "metrics.csv") if int(row["round"]) <= resume_from]
            kept_traces = [line for line in read_lines(out / "trace.jsonl")
                           if json.loads(line)["round"] <= resume_from]  # fmt: skip
        self.handle = open(out / "metrics.csv", "w", newline="")
        # What each round cost (compute per party, bytes per device): lets any link profile or device
        # speeds be re-costed later without training again (costmodel.recost).
        self.trace_handle = open(out / "trace.jsonl", "w")
        self.writer = csv.DictWriter(self.handle, fieldnames=columns)
        self.writer.writeheader()
        self.writer.writerows(kept_rows)
        self.handle.flush()  # readers of a live run see the header at once, not an empty file
        self.trace_handle.writelines(kept_traces)
        self.bytes_up = self.bytes_down = 0
        self.rounds_done = resume_from or 0
        self.initial: dict = {}
        self.final: dict = {}
        self.average = GeneratorAverage(
            g_ema, prepared.spec.latent_dim, totals.get("generator_average") if totals else None
        )
        if totals:
            self.bytes_up, self.bytes_down = totals["bytes_up"], totals["bytes_down"]
            self.initial, self.final = totals["initial"], totals["final"]
            self.started -= totals["wall_time_s"]

    def totals(self) -> dict:
        totals = {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "initial": self.initial,
                  "final": self.final, "wall_time_s": self.wall_time_s()}  # fmt: skip
        average = self.average.state_dict()
        if average is not None:
            totals["generator_average"] = average
        return totals

    def start(self, generator: torch.nn.Module) -> dict:
        self.initial = self.final = self.evaluate(self.average.of(generator), 0)
        self.writer.writerow(row(0, 0.0, self.wall_time_s(), 0, 0, RoundTrace(), self.initial))
        self.handle.flush()
        return self.initial

    def record(
        self,
        done: int,
        sim_time: float,
        trace: RoundTrace,
        generator: torch.nn.Module,
        force_eval: bool = False,
    ) -> dict | None:
        """Books one finished round; evaluates on evaluation rounds, the last round, or when forced."""
        self.rounds_done = done
        self.bytes_up += sum(trace.bytes_up)
        self.bytes_down += sum(trace.bytes_down)
        self.average.update(generator)
        quality = None
        if done % self.eval_every == 0 or done == self.rounds or force_eval:
            quality = self.final = self.evaluate(self.average.of(generator), done)
        self.writer.writerow(
            row(done, sim_time, self.wall_time_s(), self.bytes_up, self.bytes_down, trace, quality)
        )
        self.handle.flush()
        self.trace_handle.write(json.dumps(finite_or_null({"round": done, **asdict(trace)})) + "\n")
        return quality

    def evaluate(self, generator: torch.nn.Module, round_index: int) -> dict:
        quality, fakes = self.prepared.probe.measure(generator)
        path = self.out / "samples" / f"round_{round_index:06d}.png"
        save_samples(fakes, self.prepared.dataset, path, title=f"round {round_index}")
        return quality

    def wall_time_s(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, generator: torch.nn.Module, summary: dict) -> dict:
        """Saves G and summary.json; `summary` adds its own keys to the common ones."""
        self.handle.close()
        self.trace_handle.close()
        spec = self.prepared.spec
        checkpoint = {
            "spec": asdict(spec),
            "dataset": self.prepared.dataset.name,
            "state_dict": cpu_state(self.average.of(generator)),
        }
        torch.save(checkpoint, self.out / "generator.pt")
        full = {
            **summary,
            "rounds": self.rounds_done,
            "generator": self.average.describe(),
            "wall_time_s": self.wall_time_s(),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "initial": self.initial,
            "final": self.final,
            "model": {
                "sample_shape": list(spec.sample_shape),
                "latent_dim": spec.latent_dim,
                "width": spec.width,
                "d_width": spec.discriminator_width,
                "d_norm": spec.d_norm,
            },
            "partition_sizes": [len(part) for part in self.prepared.parts],
        }
        (self.out / "summary.json").write_text(json.dumps(finite_or_null(full), indent=2) + "\n")
        return full


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a metrics.csv, also while a run is writing it: a reader can catch the file
    between the bytes of one write, so a last line without its line end (the header, or a row, still being
    written) is left out instead of being parsed as a short header or row."""
    try:
        with open(path, newline="") as handle:
            text = handle.read()
    except FileNotFoundError:
        return []
    complete = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(complete.splitlines(keepends=True)))


def read_lines(path: Path) -> list[str]:
    try:
        return [line if line.endswith("\n") else line + "\n" for line in open(path) if line.strip()]
    except FileNotFoundError:
        return []


def parameters_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(parameter).all()) for parameter in module.parameters())


def row(
    round_index, sim_time, wall_time, bytes_up, bytes_down, trace: RoundTrace, quality: dict | None
) -> dict:
    values = {
        "round": round_index,
        "sim_time_s": f"{sim_time:.6f}",
        "wall_time_s": f"{wall_time:.3f}",
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "round_bytes_up": sum(trace.bytes_up),
        "round_bytes_down": sum(trace.bytes_down),
        "d_loss": "" if math.isnan(trace.d_loss) else f"{trace.d_loss:.6f}",
        "g_loss": "" if math.isnan(trace.g_loss) else f"{trace.g_loss:.6f}",
    }
    for key, value in (quality or {}).items():
        if isinstance(value, list):  # class_shares: one share per class, space-separated
            values[key] = " ".join(f"{share:.4f}" for share in value)
        else:
            values[key] = f"{value:.6f}" if isinstance(value, float) else value
    return values
