"""The in-process simulator: every algorithm on one simulated clock, with the outputs every run writes.

Outputs in the run directory: metrics.csv (a row per round, quality on evaluation rounds), samples/
(an image grid or a scatter over the true modes per evaluation), generator.pt and summary.json.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from edgegan.algorithms.attacks import parse_poison
from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.steps import EVAL_STREAM, rng_for
from edgegan.costmodel import LinkProfile, RoundTrace, round_time_s
from edgegan.data import Dataset, load_dataset, parse_partition, partition_indices
from edgegan.data.partition import class_counts, unheld_classes
from edgegan.inprocess import ALGORITHMS, build_runner
from edgegan.models import ModelSpec, build_discriminator, build_generator, parameter_count, state_bytes
from edgegan.samples import save_samples
from edgegan.wire import check_codec, finite_or_null


@dataclass(frozen=True)
class SimConfig:
    algo: str
    dataset: str
    devices: int
    partition: str
    rounds: int
    seed: int
    out: Path
    train: TrainConfig
    width: int
    latent_dim: int
    data_dir: Path | None = None
    eval_every: int = 100
    eval_samples: int = 2500
    device_speeds: tuple[float, ...] = ()
    link: LinkProfile = field(default_factory=LinkProfile)
    codec: str = "fp32"
    poison: str = ""  # e.g. "scale:100": the last `poisoned` devices send poisoned discriminators
    poisoned: int = 1
    max_update_norm: float = 0.0  # serial/parallel: leave out updates that change D by more (L2)
    quorum: int = 0  # parallel: 1 .. devices - 1 closes rounds without stragglers (edgegan/quorum.py)
    tau: int = 1  # with a quorum: the stalest base round folded in is round - tau

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ValueError(f"--algo must be one of {', '.join(ALGORITHMS)}, got {self.algo!r}")
        if self.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {self.devices}")
        if self.rounds < 0:
            raise ValueError(f"--rounds must be >= 0, got {self.rounds}")
        if self.eval_every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {self.eval_every}")
        if self.eval_samples < 100:
            raise ValueError(f"--eval-samples must be >= 100, got {self.eval_samples}")
        if self.width < 1 or self.latent_dim < 1:
            raise ValueError("--width and --latent-dim must be >= 1")
        if not 0 <= self.quorum <= self.devices:
            raise ValueError(f"--quorum must be between 1 and --devices ({self.devices}), got {self.quorum}")
        if 0 < self.quorum < self.devices and self.algo != "parallel":
            raise ValueError(
                f"--quorum below --devices is simulated for --algo parallel only, not {self.algo}"
            )
        if self.tau < 1:
            raise ValueError(f"--tau must be >= 1, got {self.tau}")
        if self.device_speeds and len(self.device_speeds) != self.devices:
            raise ValueError(
                f"--device-speeds has {len(self.device_speeds)} factors for {self.devices} devices; "
                "give one per device"
            )
        if any(not math.isfinite(speed) or speed <= 0 for speed in self.device_speeds):
            raise ValueError("--device-speeds factors must be > 0")
        parse_partition(self.partition)
        check_codec(self.codec)
        if not math.isfinite(self.max_update_norm) or self.max_update_norm < 0:
            raise ValueError(f"--max-update-norm must be >= 0 (0: no limit), got {self.max_update_norm}")
        if self.max_update_norm and self.algo not in ("serial", "parallel"):
            raise ValueError(f"--max-update-norm applies to serial and parallel only, not {self.algo}")
        if self.poison:
            parse_poison(self.poison)
            if self.algo not in ("serial", "parallel"):
                raise ValueError(f"--poison is simulated for serial and parallel only, not {self.algo}")
            if not 1 <= self.poisoned < self.devices:
                raise ValueError(f"--poisoned must be between 1 and {self.devices - 1}, got {self.poisoned}")

    @property
    def speeds(self) -> tuple[float, ...]:
        return self.device_speeds or (1.0,) * self.devices


@dataclass
class Progress:
    """What the simulator reports after each round (for a progress bar or a log)."""

    round: int
    rounds: int
    sim_time_s: float
    quality: dict | None


class QualityProbe:
    """Quality of a generator on fixed evaluation noise: modes/hq for 2-D data, fid/classes for images."""

    def __init__(self, dataset: Dataset, latent_dim: int, samples: int, seed: int, data_dir: Path | None):
        self.dataset = dataset
        self.noise = torch.randn(samples, latent_dim, generator=rng_for(seed, EVAL_STREAM))
        if dataset.is_image:
            from edgegan.metrics import ImageQuality, load_classifier

            classifier = load_classifier(dataset.name, data_dir)
            self.image_quality = ImageQuality(classifier, dataset.x, seed=seed)

    def samples(self, generator: torch.nn.Module) -> torch.Tensor:
        was_training = generator.training
        generator.eval()
        with torch.no_grad():
            fakes = torch.cat([generator(chunk) for chunk in self.noise.split(500)])
        generator.train(was_training)
        return fakes

    def measure(self, generator: torch.nn.Module) -> tuple[dict, torch.Tensor]:
        fakes = self.samples(generator)
        if self.dataset.is_image:
            return self.image_quality(fakes), fakes
        from edgegan.metrics import point_quality

        return point_quality(fakes, self.dataset.modes, self.dataset.mode_std), fakes


def describe_setup(
    config: SimConfig, dataset: Dataset, parts: list[torch.Tensor], spec: ModelSpec
) -> list[str]:
    """Human-readable lines: partition sizes and class counts, model sizes."""
    lines = [
        f"{config.dataset}: {len(dataset)} examples, partition {config.partition} "
        f"over {config.devices} devices"
    ]
    for device, counts in enumerate(class_counts(dataset.y, parts, dataset.num_classes)):
        lines.append(f"  device {device}: {len(parts[device])} examples, per class {counts}")
    missing = unheld_classes(dataset.y, parts, dataset.num_classes)
    if missing:
        lines.append(f"  warning: classes {missing} are held by no device")
    for role, model in (("generator", build_generator(spec)), ("discriminator", build_discriminator(spec))):
        lines.append(f"  {role}: {parameter_count(model):,} parameters, {state_bytes(model):,} bytes (fp32)")
    return lines


@dataclass
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


def prepare(config: SimConfig, with_probe: bool = True) -> Prepared:
    """Loads and splits the data, builds the model spec and (for whoever evaluates) the quality probe."""
    check_writable(config.out)
    dataset = load_dataset(config.dataset, config.data_dir)
    parts = partition_indices(dataset.y, config.devices, parse_partition(config.partition), config.seed)
    spec = ModelSpec(dataset.sample_shape, config.latent_dim, config.width)
    probe = None
    if with_probe:
        probe = QualityProbe(dataset, config.latent_dim, config.eval_samples, config.seed, config.data_dir)
    return Prepared(dataset, parts, spec, probe, describe_setup(config, dataset, parts, spec))


class RunRecorder:
    """Writes a run directory the same way for the simulator and the MQTT server: a metrics.csv row per
    round, samples per evaluation, generator.pt and summary.json."""

    def __init__(
        self,
        out: Path,
        prepared: Prepared,
        eval_every: int,
        rounds: int,
        resume_from: int | None = None,
        totals: dict | None = None,
    ):
        """`resume_from` rounds: keep the files' rows up to that round and go on after them, from
        `totals` (what `totals()` returned when that round was checkpointed)."""
        self.out = out
        self.prepared = prepared
        self.eval_every = eval_every
        self.rounds = rounds
        self.started = time.perf_counter()
        dataset = prepared.dataset
        quality_keys = ["fid", "classes"] if dataset.is_image else ["modes", "hq", "dist"]
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
        self.trace_handle.writelines(kept_traces)
        self.bytes_up = self.bytes_down = 0
        self.rounds_done = resume_from or 0
        self.initial: dict = {}
        self.final: dict = {}
        if totals:
            self.bytes_up, self.bytes_down = totals["bytes_up"], totals["bytes_down"]
            self.initial, self.final = totals["initial"], totals["final"]
            self.started -= totals["wall_time_s"]

    def totals(self) -> dict:
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "initial": self.initial,
                "final": self.final, "wall_time_s": self.wall_time_s()}  # fmt: skip

    def start(self, generator: torch.nn.Module) -> dict:
        self.initial = self.final = self.evaluate(generator, 0)
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
        quality = None
        if done % self.eval_every == 0 or done == self.rounds or force_eval:
            quality = self.final = self.evaluate(generator, done)
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
            "state_dict": generator.state_dict(),
        }
        torch.save(checkpoint, self.out / "generator.pt")
        full = {
            **summary,
            "rounds": self.rounds_done,
            "wall_time_s": self.wall_time_s(),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "initial": self.initial,
            "final": self.final,
            "model": {
                "sample_shape": list(spec.sample_shape),
                "latent_dim": spec.latent_dim,
                "width": spec.width,
            },
            "partition_sizes": [len(part) for part in self.prepared.parts],
        }
        (self.out / "summary.json").write_text(json.dumps(finite_or_null(full), indent=2) + "\n")
        return full


def simulate(
    config: SimConfig,
    prepared: Prepared | None = None,
    on_setup: Callable[[list[str]], None] | None = None,
    on_round: Callable[[Progress], None] | None = None,
) -> dict:
    """Runs `config.rounds` rounds of one algorithm and writes the run directory; returns the summary."""
    prepared = prepared or prepare(config)
    if on_setup:
        on_setup(prepared.setup_lines)
    recorder = RunRecorder(config.out, prepared, config.eval_every, config.rounds)
    torch.manual_seed(config.seed)
    shards = [prepared.dataset.x[part] for part in prepared.parts]
    poison = parse_poison(config.poison) if config.poison else None
    runner = build_runner(
        config.algo, prepared.spec, config.train, shards, config.seed, config.codec, poison, config.poisoned,
        config.max_update_norm, config.quorum, config.tau, config.speeds, config.link,
    )  # fmt: skip
    speeds = (1.0,) if config.algo == "central" else config.speeds
    recorder.start(runner.generator)
    sim_time = 0.0
    diverged_at = None
    for round_index in range(config.rounds):
        trace = runner.run_round(round_index)
        sim_time += round_time_s(trace, speeds, config.link)
        done = round_index + 1
        # A diverged GAN never recovers; stop and say so instead of burning the remaining rounds.
        if not math.isfinite(trace.d_loss) or not parameters_finite(runner.generator):
            diverged_at = done
        quality = recorder.record(done, sim_time, trace, runner.generator, force_eval=diverged_at is not None)
        if on_round:
            on_round(Progress(done, config.rounds, sim_time, quality))
        if diverged_at:
            break
    return recorder.finish(
        runner.generator,
        {
            "algo": config.algo,
            "dataset": config.dataset,
            "devices": config.devices,
            "partition": config.partition,
            "seed": config.seed,
            "diverged_at_round": diverged_at,
            "sim_time_s": sim_time,
            "codec": config.codec,
            "poison": config.poison or None,
            "poisoned_devices": config.poisoned if config.poison else 0,
            "max_update_norm": config.max_update_norm,
            "updates_rejected_norm": getattr(runner, "rejected", 0),
            "quorum": config.quorum or config.devices,
            "tau": config.tau,
            "updates_stale": getattr(runner, "stale", 0),
            "updates_duplicate": getattr(runner, "duplicates", 0),
            "device_speeds": list(speeds),
            "link": asdict(config.link),
            "train": asdict(config.train),
        },
    )


def read_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        return []


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
        values[key] = f"{value:.6f}" if isinstance(value, float) else value
    return values
