"""The in-process simulator: every algorithm on one simulated clock, with the outputs every run writes.

Outputs in the run directory: metrics.csv (a row per round, quality on evaluation rounds), samples/
(an image grid or a scatter over the true modes per evaluation), generator.pt and summary.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from edgegan.algorithms.admission import AUTO, parse_update_bound
from edgegan.algorithms.attacks import parse_poison
from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.health import DEFAULT_MAX_REJECTED_FRACTION, RunHealth
from edgegan.costmodel import LinkProfile, round_time_s
from edgegan.downlink import DEFAULT_KEYFRAME_EVERY, check_keyframe_every
from edgegan.inprocess import build_runner, check_schedule
from edgegan.runsetup import Prepared, RunRecorder, RunSetup, parameters_finite, prepare
from edgegan.torchdevice import DEFAULT_TORCH_DEVICE, resolve_torch_device
from edgegan.wire import check_codec


@dataclass(kw_only=True, frozen=True)
class SimConfig:
    """A simulated run: its set-up (`setup`, the fields every run shares) and how the simulator plays it."""

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
    features: str = "classifier"  # the feature extractor of fid (edgegan/metrics/extractors.py)
    device_speeds: tuple[float, ...] = ()
    link: LinkProfile = field(default_factory=LinkProfile)
    codec: str = "fp32"
    poison: str = ""  # e.g. "scale:100": the last `poisoned` devices send poisoned discriminators
    poisoned: int = 1
    # serial/parallel: leave out updates that change D by more (L2): auto, a length, or 0 (no limit)
    max_update_norm: float | str = AUTO
    max_rejected_fraction: float = DEFAULT_MAX_REJECTED_FRACTION  # more rejected than this: the run stops
    quorum: int = 0  # parallel: 1 .. devices - 1 closes rounds without stragglers (edgegan/quorum.py)
    tau: int = 1  # with a quorum: the stalest base round folded in is round - tau
    torch_device: str = DEFAULT_TORCH_DEVICE  # auto | cpu | cuda: where the networks train
    fakes: str = "device"  # device | server: who draws a device's fake batches (docs/algorithms.md)
    keyframe_every: int = DEFAULT_KEYFRAME_EVERY  # lossy codecs: rounds between whole-model downlinks
    # Central DP: what seeds the server's noise (None: the run's seed); a test gives a server's secret here
    # to replay its run (edgegan/algorithms/proposed.py, GlobalGan).
    noise_secret: int | None = None

    def __post_init__(self) -> None:
        self.setup  # noqa: B018 - validates the shared fields, in the one place that owns them
        check_schedule(
            self.algo, devices=self.devices, quorum=self.quorum, tau=self.tau, poison=bool(self.poison),
            max_update_norm=self.max_update_norm, fakes=self.fakes, private=self.train.private,
            centrally_private=self.train.centrally_private, codec=self.codec,
        )  # fmt: skip
        if self.rounds < 0:
            raise ValueError(f"--rounds must be >= 0, got {self.rounds}")
        if self.device_speeds and len(self.device_speeds) != self.devices:
            raise ValueError(
                f"--device-speeds has {len(self.device_speeds)} factors for {self.devices} devices; "
                "give one per device"
            )
        if any(not math.isfinite(speed) or speed <= 0 for speed in self.device_speeds):
            raise ValueError("--device-speeds factors must be > 0")
        check_codec(self.codec)
        check_keyframe_every(self.keyframe_every)
        resolve_torch_device(self.torch_device)
        self.health  # noqa: B018 - validates --max-rejected-fraction
        if self.poison:
            parse_poison(self.poison)
            if not 1 <= self.poisoned < self.devices:
                raise ValueError(f"--poisoned must be between 1 and {self.devices - 1}, got {self.poisoned}")

    @property
    def setup(self) -> RunSetup:
        return RunSetup(
            dataset=self.dataset, devices=self.devices, partition=self.partition, seed=self.seed,
            out=self.out, train=self.train, width=self.width, latent_dim=self.latent_dim,
            data_dir=self.data_dir, eval_every=self.eval_every, eval_samples=self.eval_samples,
            features=self.features,
        )  # fmt: skip

    @property
    def health(self) -> RunHealth:
        return RunHealth(devices=self.devices, max_rejected_fraction=self.max_rejected_fraction)

    @property
    def speeds(self) -> tuple[float, ...]:
        return self.device_speeds or (1.0,) * self.devices


def weights_finite(runner) -> bool:
    """The global generator's weights, and the global discriminator's where the algorithm has one."""
    discriminator = getattr(runner, "discriminator", None)
    finite = discriminator is None or parameters_finite(discriminator)
    return finite and parameters_finite(runner.generator)


@dataclass
class Progress:
    """What the simulator reports after each round (for a progress bar or a log)."""

    round: int
    rounds: int
    sim_time_s: float
    quality: dict | None


def simulate(
    config: SimConfig,
    prepared: Prepared | None = None,
    on_setup: Callable[[list[str]], None] | None = None,
    on_round: Callable[[Progress], None] | None = None,
) -> dict:
    """Runs `config.rounds` rounds of one algorithm and writes the run directory; returns the summary."""
    prepared = prepared or prepare(config.setup)
    if on_setup:
        on_setup(prepared.setup_lines)
    recorder = RunRecorder(
        out=config.out,
        prepared=prepared,
        eval_every=config.eval_every,
        rounds=config.rounds,
        g_ema=config.train.g_ema,
    )
    torch.manual_seed(config.seed)
    shards = [prepared.dataset.x[part] for part in prepared.parts]
    poison = parse_poison(config.poison) if config.poison else None
    runner = build_runner(
        config.algo, prepared.spec, config.train, shards, config.seed, config.codec, poison=poison,
        poisoned=config.poisoned, max_update_norm=config.max_update_norm, quorum=config.quorum,
        tau=config.tau, speeds=config.speeds, link=config.link,
        torch_device=resolve_torch_device(config.torch_device), fakes=config.fakes,
        keyframe_every=config.keyframe_every, noise_secret=config.noise_secret,
    )  # fmt: skip
    speeds = (1.0,) if config.algo == "central" else config.speeds
    recorder.start(runner.generator)
    sim_time = 0.0
    diverged_at = failure = exhausted_at = None
    health = config.health
    for round_index in range(config.rounds):
        trace = runner.run_round(round_index)
        sim_time += round_time_s(trace, speeds, config.link)
        done = round_index + 1
        if getattr(runner, "exhausted", False):
            # Every device has spent its privacy budget: nothing more can be learnt from their data.
            exhausted_at = done
            recorder.record(done, sim_time, trace, runner.generator, force_eval=True)
            break
        # A diverged GAN never recovers, and a run rejecting a large share of its updates is under attack:
        # stop and say so instead of burning the remaining rounds. (A round whose every update was
        # rejected has no d_loss, and its model is as it was: that alone is not a divergence.)
        finite = weights_finite(runner)
        failure = health.judge(
            done=done, accepted=getattr(runner, "accepted", 0), rejected=getattr(runner, "rejected", 0),
            finite=finite,
        )  # fmt: skip
        diverged_at = None if finite else done
        quality = recorder.record(done, sim_time, trace, runner.generator, force_eval=failure is not None)
        if on_round:
            on_round(Progress(done, config.rounds, sim_time, quality))
        if failure:
            break
    probe = prepared.probe
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
            "fakes": config.fakes,
            "poison": config.poison or None,
            "poisoned_devices": config.poisoned if config.poison else 0,
            "max_update_norm": parse_update_bound(config.max_update_norm).describe(),
            "max_rejected_fraction": config.max_rejected_fraction,
            "failure": failure.as_dict() if failure else None,
            "updates_rejected_norm": getattr(runner, "rejected", 0),
            "quorum": config.quorum or config.devices,
            "tau": config.tau,
            "updates_stale": getattr(runner, "stale", 0),
            "updates_duplicate": getattr(runner, "duplicates", 0),
            "device_speeds": list(speeds),
            "link": asdict(config.link),
            "train": asdict(config.train),
            "features": probe.extractor.name if probe and probe.extractor else None,
            # DP-SGD: each device's epsilon at train.dp_delta over the rounds it took part in.
            "privacy": {str(index): epsilon for index, epsilon in runner.epsilons().items()}
            if getattr(runner, "privacy", None) else None,
            "privacy_exhausted_at_round": exhausted_at,
            # Central DP: the run's epsilon at train.dp_delta over the rounds the server released.
            "central_privacy": runner.server.central.report() if config.train.centrally_private else None,
        },
    )
