"""Running a server to the end of its run: the set-up, resuming from the run directory's checkpoint, the
run configuration it publishes, stopping on SIGTERM/SIGINT, and the summary. The coordinator it drives,
round by round, is runtime/server.py."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from edgegan import signing
from edgegan.algorithms.proposed import GlobalGan
from edgegan.runsetup import RunRecorder, RunSetup, prepare
from edgegan.runtime.brokerbytes import BrokerByteCounter, compare_with_payload
from edgegan.runtime.featurestats import StatisticsCollector
from edgegan.runtime.offload import run_with_torch_workers
from edgegan.runtime.runconfig import RunConfig
from edgegan.runtime.server import CHECKPOINT, ServerCoordinator
from edgegan.runtime.server_settings import ServerCounters, ServerSettings
from edgegan.runtime.stopsignals import signal_name, stop_on_signals
from edgegan.runtime.trust import DeviceKeys
from edgegan.torchdevice import resolve_torch_device

log = logging.getLogger("edgegan.server")
CENTRAL_DP_PURPOSE = "central-dp-noise"


def load_checkpoint(out: Path, resume: bool) -> dict | None:
    """The run directory's checkpoint when resuming (None when there is none yet: start afresh)."""
    path = out / CHECKPOINT
    if not resume:
        return None
    if not path.is_file():
        log.warning("--resume: no %s yet, starting the run from round 0", path)
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # resumable on any torch device
    except Exception as error:  # a torn or foreign file: torch raises several kinds
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({error})") from None


def server_signer(settings: ServerSettings, out: Path) -> signing.Signer:
    """The key that signs the run's models: --signing-key, else the run directory's, made on first start
    and reused on resume (devices that pinned it keep trusting the resumed server)."""
    path = settings.signing_key or out / signing.KEY_FILE
    try:
        key, created = signing.load_or_create(path)
    except OSError as error:
        raise ValueError(f"--signing-key {path}: {error.strerror or error}") from None
    signer = signing.Signer(key)
    log.info("%s signing key %s (public key %s)", "created" if created else "using", path,
             signer.public_key.hex())  # fmt: skip
    return signer


def serve(settings: ServerSettings, setup: RunSetup, resume: bool = False) -> dict:
    """Runs the server to the end of the run and writes the same outputs as `edgegan simulate`; with
    `resume`, goes on from the run directory's checkpoint."""
    settings.check_setup(setup)
    # --quality-from devices or reference: the server never reads the training data, only its shape.
    prepared = prepare(setup, quality_from=settings.quality_from, reference=settings.reference)
    for line in prepared.setup_lines:
        log.info("%s", line.strip())
    checkpoint = load_checkpoint(setup.out, resume)
    recorder = RunRecorder(
        out=setup.out, prepared=prepared, eval_every=setup.eval_every, rounds=settings.rounds,
        resume_from=checkpoint["rounds_done"] if checkpoint else None,
        totals=checkpoint.get("recorder") if checkpoint else None, g_ema=setup.train.g_ema,
    )  # fmt: skip
    signer = server_signer(settings, setup.out)
    gan = GlobalGan(
        prepared.spec, setup.train, setup.seed, torch_device=resolve_torch_device(settings.torch_device),
        expected_updates=settings.quorum, noise_secret=signer.secret(CENTRAL_DP_PURPOSE),
    )  # fmt: skip
    run_config = RunConfig(
        dataset=setup.dataset, partition=setup.partition, devices=setup.devices, seed=setup.seed,
        sample_shape=tuple(prepared.spec.sample_shape), width=prepared.spec.width,
        latent_dim=prepared.spec.latent_dim, codec=settings.codec, schedule=settings.schedule,
        train=setup.train, quality_from=settings.quality_from,
        features=prepared.probe.extractor.name if prepared.probe.extractor else "classifier",
        fakes=settings.fakes,
    )  # fmt: skip
    # No device holds more examples than the whole data set; a server without the data cannot tell.
    max_samples = len(prepared.dataset)
    statistics = None
    if settings.quality_from == "devices":
        statistics = StatisticsCollector(
            run=settings.run, devices=setup.devices, dimension=prepared.probe.extractor.num_features,
            deadline_s=settings.deadline_s, allowed_devices=frozenset(settings.allowed_devices),
            max_samples=max_samples,
        )  # fmt: skip
    device_keys = DeviceKeys.load(settings.device_keys) if settings.device_keys else None
    if device_keys is not None:
        log.info("updates count only when signed by their device's key: %d keys from %s",
                 len(device_keys.keys), settings.device_keys)  # fmt: skip
    coordinator = ServerCoordinator(
        settings, gan, recorder, max_samples=max_samples, run_config=run_config,
        statistics=statistics, signer=signer, devices=setup.devices, device_keys=device_keys,
    )  # fmt: skip
    if checkpoint:
        coordinator.restore(checkpoint)
        log.info("resumed run %s after round %d", settings.run, coordinator.next_round)

    byte_counter = BrokerByteCounter(settings.broker, settings.run)
    counted: dict | None = None

    async def run_until_done_or_stopped() -> ServerCounters:
        nonlocal counted
        # The broker's own byte counts for the run, beside the payload bytes (runtime/brokerbytes.py).
        async with byte_counter:
            with stop_on_signals(coordinator.request_stop):
                counters = await coordinator.run()
            if coordinator.stopped_early:  # a signal: stop now, not one sys_interval later
                byte_counter.unavailable = "the run was stopped before its last round"
            else:
                counted = await byte_counter.finish()
        return counters

    counters = run_with_torch_workers(run_until_done_or_stopped)
    if counted is None:
        log.info("broker bytes: not counted: %s", byte_counter.unavailable)
    return recorder.finish(
        gan.generator,
        {
            "algo": "serial" if settings.schedule == "sync" else "parallel",
            "schedule": settings.schedule,
            "tau": settings.tau if settings.schedule == "parallel" else 0,
            "staleness_weight": settings.staleness_weight,
            "staleness_histogram": {str(key): value for key, value in sorted(counters.staleness.items())},
            "updates_stale": counters.stale,
            "updates_by_device": {
                device: dict(outcomes) for device, outcomes in sorted(counters.by_device.items())
            },
            "dataset": setup.dataset,
            "devices": setup.devices,
            "partition": setup.partition,
            "seed": setup.seed,
            "run": settings.run,
            "broker": str(settings.broker),
            "broker_bytes": compare_with_payload(counted, recorder.bytes_up, recorder.bytes_down),
            **({"broker_bytes_unavailable": byte_counter.unavailable} if counted is None else {}),
            "quorum": settings.quorum,
            "sim_time_s": recorder.wall_time_s(),
            "codec": settings.codec,
            "fakes": settings.fakes,
            "server_key": coordinator.signer.public_key.hex(),  # what devices pin (--server-key)
            # Lossy codecs: whole models sent on request to devices that missed a delta (docs/protocol.md).
            "keyframe_every": settings.keyframe_every,
            "keyframes_on_request": coordinator.keyframes.sent,
            "keyframe_bytes_on_request": coordinator.keyframes.bytes,
            "resumed_from_round": checkpoint["rounds_done"] if checkpoint else None,
            "diverged_at_round": coordinator.diverged_at,
            # Set when the run-health policy stopped the run (edgegan/algorithms/health.py): the exit code 3.
            "failure": coordinator.failure.as_dict() if coordinator.failure else None,
            "max_update_norm": coordinator.rules.update_bound.describe(),
            "max_rejected_fraction": settings.max_rejected_fraction,
            # Set when SIGTERM or SIGINT ended the run before its last round: checkpoint.pt holds this round.
            "stopped_at_round": coordinator.next_round if coordinator.stopped_early else None,
            "stopped_by": signal_name(coordinator.stopped_by) if coordinator.stopped_early else None,
            "updates_accepted": counters.accepted,
            "updates_late": counters.late,
            "updates_duplicate": counters.duplicates,
            "updates_dropped_on_link": counters.dropped,
            "updates_rejected": dict(counters.rejected),
            "aggregators": settings.aggregators,
            # Devices that said they cannot use the run's global model, and the field each named last.
            "devices_incompatible": dict(sorted(coordinator.reports.ever_incompatible.items())),
            # DP-SGD: each device's epsilon at train.dp_delta as its status last said (docs/privacy.md).
            "privacy": dict(sorted(coordinator.reports.epsilons.items())) or None,
            "privacy_budget_spent": sorted(coordinator.reports.budget_spent),
            # Central DP: the run's epsilon at train.dp_delta over the rounds the server released.
            "central_privacy": gan.central.report() if gan.central else None,
            "updates_by_aggregator": {
                name: dict(tally) for name, tally in sorted(counters.by_aggregator.items())
            },
            "train": asdict(setup.train),
            "quality_from": settings.quality_from,
            "features": run_config.features,
            **({"reference": str(settings.reference)} if settings.reference is not None else {}),
            **(
                {
                    "quality_devices": len(statistics.received),
                    "quality_images": sum(part.count for part in statistics.received.values()),
                    "stats_rejected": dict(statistics.rejected),
                }
                if statistics is not None
                else {}
            ),
        },
    )
