"""Feature statistics for a server that holds no training data (`edgegan server --quality-from devices`):
each device sends, once, the count, sum and sum of outer products of the run's feature extractor's
features (the shipped classifier's unless the run names another) over its own images; the server adds
them up and scores its generator against the sum, as it would against the union of the devices' images
(docs/protocol.md, "Feature statistics").

Devices: `features_for_run` (when joining: which extractor, or RunIncompatible) and `measure_statistics`
(in a worker thread, after joining). Server: `StatisticsCollector`, which waits, bounded, for every
device's statistics before the first evaluation.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
import torch

from edgegan import topics, wire
from edgegan.runtime.runconfig import RunConfig, RunIncompatible

if TYPE_CHECKING:
    from edgegan.algorithms.proposed import LocalDiscriminator
    from edgegan.metrics import FeatureStatistics

log = logging.getLogger("edgegan.featurestats")

MIN_WAIT_S = 60.0  # devices load their data and run the classifier over it before they can send
WAIT_DEADLINES = 10  # ... or this many round deadlines, whichever is longer


def features_for_run(config: RunConfig, given: str) -> str:
    """The extractor spec (edgegan/metrics/extractors.py) this device measures the run's statistics with,
    or RunIncompatible("features"). `given` is the device's `--features`: left at "classifier" it takes the
    run's kind, but for a TorchScript file, whose copy (`torchscript:PATH`, or a bare PATH) it must be
    given; a file whose sha256 is not the run's is refused, as any other kind than the run's."""
    kind, _, digest = config.features.partition(":")
    given_kind, _, path = given.partition(":")
    if not (given in ("classifier", "inception") or (given_kind == "torchscript" and path)):
        given_kind, path = "torchscript", given  # a bare PATH: the device's copy of the run's file
    if given_kind == "classifier" and kind != "torchscript":
        return config.features
    if given_kind != kind:
        wanted = "torchscript:PATH, this device's copy of the run's file" if kind == "torchscript" else kind
        raise RunIncompatible(
            "features", f"the run measures fid in {kind} features, this device was given --features "
            f"{given!r}; give it --features {wanted}",
        )  # fmt: skip
    if kind != "torchscript":
        return config.features
    from edgegan.metrics import file_digest

    try:
        ours = file_digest(Path(path))
    except OSError as error:
        raise RunIncompatible("features", f"--features {path}: {error.strerror}") from None
    if ours != digest:
        raise RunIncompatible(
            "features", f"--features {path} has sha256 {ours[:12]}…, the run's extractor {digest[:12]}…"
        )
    return f"torchscript:{path}"


def checked_join(
    join: Callable[[RunConfig], LocalDiscriminator], *, features: str
) -> Callable[[RunConfig], LocalDiscriminator]:
    """`join`, refusing first (RunIncompatible) a run whose feature extractor this device cannot build
    when it will have to measure statistics, or when it was given one (`features` not "classifier")."""

    def join_checked(config: RunConfig) -> LocalDiscriminator:
        if config.quality_from == "devices" or features != "classifier":
            features_for_run(config, features)
        return join(config)

    return join_checked


def measure_statistics(
    config: RunConfig, data: torch.Tensor, *, run: str, device: str, data_dir: Path | None,
    features: str = "classifier",
) -> bytes | None:  # fmt: skip
    """This device's feature statistics as a `stats` message, or None: point data have none, and a data
    set without the run's extractor here is logged and skipped (the server then waits for it in vain).
    `features` is the device's `--features` (`features_for_run`)."""
    if len(config.sample_shape) != 3:
        return None
    from edgegan.metrics import feature_statistics, load_extractor

    try:
        spec = features_for_run(config, features)
        extractor = load_extractor(
            spec, dataset=config.dataset, data_dir=data_dir, sample_shape=tuple(config.sample_shape)
        )
    except ValueError as error:  # ClassifierMissingError and RunIncompatible too
        log.warning("device %s sends no feature statistics: %s", device, error)
        return None
    statistics = feature_statistics(extractor, data)
    envelope = wire.stats_envelope(
        run=run, device=device, samples=statistics.count,
        feature_sum=statistics.feature_sum, outer_sum=statistics.outer_sum,
    )  # fmt: skip
    return wire.encode(envelope)


class StatisticsCollector:
    """The server's side: collects one valid `stats` message from each of `devices` devices (the newest
    per device counts), rejecting and counting the rest by reason."""

    def __init__(
        self, *, run: str, devices: int, dimension: int, deadline_s: float,
        allowed_devices: frozenset[str] = frozenset(), max_samples: int = 0,
    ):  # fmt: skip
        self.run = run
        self.devices = devices
        self.allowed_devices = allowed_devices
        self.max_samples = max_samples  # > 0: no device holds more images than the whole data set
        self.expected = {wire.STATS_SUM: (dimension,), wire.STATS_OUTER: (dimension, dimension)}
        self.wait_s = max(MIN_WAIT_S, WAIT_DEADLINES * deadline_s)
        self.received: dict[str, FeatureStatistics] = {}
        self.rejected: Counter = Counter()  # reason -> count
        self.logged: set[tuple[str | None, str]] = set()

    async def gather(self, client: aiomqtt.Client) -> FeatureStatistics:
        """Waits until every device's statistics arrived (retained: at once for those already sent) and
        returns their sum; TimeoutError naming who is missing after `wait_s`."""
        from edgegan.metrics import combined_statistics

        await client.subscribe(topics.all_stats(self.run), qos=1)
        log.info("waiting up to %.0f s for feature statistics from %d devices on %s",
                 self.wait_s, self.devices, topics.all_stats(self.run))  # fmt: skip
        try:
            async with asyncio.timeout(self.wait_s):
                async for message in client.messages:
                    if message.topic.matches(topics.all_stats(self.run)):
                        self.receive(message.topic.value, bytes(message.payload))
                    if len(self.received) >= self.devices:
                        break
        except TimeoutError:
            raise TimeoutError(
                f"--quality-from devices: feature statistics from {len(self.received)} of {self.devices} "
                f"devices ({', '.join(sorted(self.received)) or 'none'}) after {self.wait_s:.0f} s; "
                f"rejected {dict(self.rejected) or 'none'}"
            ) from None
        await client.unsubscribe(topics.all_stats(self.run))
        total = combined_statistics(self.received[name] for name in sorted(self.received))
        log.info("feature statistics of %d images from %d devices", total.count, len(self.received))
        return total

    def receive(self, topic: str, payload: bytes) -> None:
        from edgegan.metrics import FeatureStatistics

        if not payload:
            return  # a cleared retained message
        device = topics.device_of(topic)
        try:
            if self.allowed_devices and device not in self.allowed_devices:
                raise wire.WireError("unknown-device", f"{device} is not one of --allow-devices")
            envelope = wire.decode(payload, self.expected)
            if envelope.kind != "stats":
                raise wire.WireError("bad-kind", f"a {envelope.kind} message on a stats topic")
            if envelope.run != self.run or envelope.device != device:
                raise wire.WireError("wrong-sender", f"run {envelope.run}, device {envelope.device}")
            if self.max_samples and envelope.samples > self.max_samples:
                raise wire.WireError("too-many-samples", f"{envelope.samples} images")
        except wire.WireError as error:
            self.rejected[error.reason] += 1
            if (device, error.reason) not in self.logged:
                self.logged.add((device, error.reason))
                log.warning("rejected feature statistics from %s (%s): %s", device, error.reason, error)
            return
        feature_sum, outer_sum = wire.stats_tensors(envelope)
        self.received[device] = FeatureStatistics(envelope.samples, feature_sum, outer_sum)
