"""The server coordinator: publish the global GAN, collect a quorum of local discriminators before a
deadline, fold them in, update the generator, repeat. Sync steps the generator after the fold; parallel
steps it against the published discriminator while the devices train, and folds in updates up to `tau`
rounds stale (docs/protocol.md, "Rounds").

The arithmetic is `edgegan.algorithms.proposed.GlobalGan`, the same object the simulator drives, and
whether an arrival counts is `edgegan.algorithms.admission`'s; this module moves bytes between them.
Encoding, decoding and training run in a worker thread so the event loop keeps serving the connection.
Running a whole run (set-up, resume, signals, summary) is runtime/serving.py.

Why over 500 lines in one file: it is one class, `ServerCoordinator`, whose round loop, arrival
transport, stop handling and checkpoint share one round's state (the open fold, the published history, the
last counted base per device); split across modules, each part would reach into the others' attributes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import aiomqtt

from edgegan import signing, topics, wire
from edgegan.algorithms import admission
from edgegan.algorithms.admission import Outcome, Verdict
from edgegan.algorithms.health import Failure, RunHealth
from edgegan.algorithms.proposed import DiscriminatorFold, DiscriminatorUpdate, GlobalGan
from edgegan.algorithms.staleness import onto_current, parse_staleness_weight
from edgegan.algorithms.steps import cpu_state
from edgegan.checkpoints import save_atomic
from edgegan.costmodel import RoundTrace
from edgegan.downlink import Downlink, DownlinkSender, to_envelope
from edgegan.figures import quality_text
from edgegan.models import state_bytes
from edgegan.runsetup import RunRecorder, parameters_finite
from edgegan.runtime.connection import run_connected
from edgegan.runtime.devicereports import DeviceReports
from edgegan.runtime.featurestats import StatisticsCollector
from edgegan.runtime.impairment import ImpairedLink
from edgegan.runtime.keyframes import KeyframeServer
from edgegan.runtime.offload import off_loop
from edgegan.runtime.runconfig import RunConfig
from edgegan.runtime.server_settings import ServerCounters, ServerSettings, admission_rules
from edgegan.runtime.sharded import ShardedCollector
from edgegan.runtime.stopsignals import signal_name
from edgegan.runtime.trust import BINDING_REASONS, SIGNATURE_FAILURES, DeviceKeys, PublishedDigests

# Rejections after which a device will still send this round's update (see receive).

log = logging.getLogger("edgegan.server")

MAX_DEADLINE_EXTENSIONS = 20
METRICS_BY_DEVICE_MAX = 500  # devices whose tally the metrics message carries (about 60 bytes each)
CHECKPOINT = "checkpoint.pt"
MAX_LOGGED_REJECTIONS = 1000  # distinct (device, reason) pairs logged; all are counted
# Seconds between metrics messages; every evaluation and the last round are published whatever the time.
# Watchers need no more, and at dozens of rounds a second one per round would cost more than the round.
METRICS_INTERVAL_S = 1.0
REPUBLISH_INTERVAL_S = 1.0  # at most one republish of the global model per second after forgery reports


def timed(function, *args) -> tuple:
    """(what `function(*args)` returns, the seconds it took)."""
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def natural_key(name: str) -> tuple:
    """device-2 before device-10: arrivals are folded in a fixed order, whatever order they came in."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


@dataclass
class RoundWork:
    """--fakes server: the round's published G (the server draws fakes from it, whatever a parallel
    generator step does meanwhile) and D, and the bytes sent to each device so far."""

    round_index: int
    generator_state: dict
    message: Downlink  # the round's D, as a delta with a lossy codec (edgegan/downlink.py)
    sent: dict[str, int] = field(default_factory=dict)


class ServerCoordinator:
    def __init__(
        self,
        settings: ServerSettings,
        global_gan: GlobalGan,
        recorder: RunRecorder,
        *,
        max_samples: int = 0,
        run_config: RunConfig | None = None,
        statistics: StatisticsCollector | None = None,
        signer: signing.Signer | None = None,
        devices: int = 0,
        device_keys: DeviceKeys | None = None,
    ):
        self.settings = settings
        # The devices that may report (round_closes): the allowed names, else the fleet, else the quorum.
        self.fleet = len(settings.allowed_devices) or devices or settings.quorum
        self.statistics = statistics  # --quality-from devices: collects the devices' feature statistics
        self.signer = signer or signing.Signer(signing.generate_key())  # signs every model it publishes
        self.device_keys = device_keys  # --device-keys: an update counts only when its device signed it
        # Published for the devices to join (None: publish none), with the key they may trust on first use.
        self.run_config = replace(run_config, server_key=self.signer.public_key.hex()) if run_config else None
        fleet = max(settings.quorum, len(settings.allowed_devices), run_config.devices if run_config else 0)
        self.published = PublishedDigests(capacity=PublishedDigests.capacity_for(tau=settings.tau,
                                                                                 devices=fleet))  # fmt: skip
        self.global_sent: bytes | None = None  # the last global model published, to republish it
        self.republished_at = -math.inf
        self.gan = global_gan
        self.recorder = recorder
        self.counters = ServerCounters()
        self.reports = DeviceReports()  # the devices' statuses and answer times
        self.link = ImpairedLink(settings.impairment, seed=settings.seed * 1000 + 999)
        self.discount = parse_staleness_weight(settings.staleness_weight)
        self.history: dict[int, dict] = {}  # base round -> the D it published, for rebasing stale updates
        self.fold: DiscriminatorFold | None = None  # this round's aggregation, fed as updates arrive
        self.work: RoundWork | None = None  # --fakes server: what this round sends each device
        self.downlink = DownlinkSender(codec=settings.codec, keyframe_every=settings.keyframe_every)
        self.keyframes = KeyframeServer(run=settings.run, sender=self.downlink, sign=self.sign)
        self.last_counted: dict[str, int] = {}  # device -> base round of its last update folded in
        self.next_round = 0
        self.generator_stepped = -1  # parallel: the last round whose overlapped G step ran
        self.control_cleared = False
        self.quality: dict = {}
        self.quality_round: int | None = None  # the round `quality` was measured at (for watchers)
        self.logged_rejections: set[tuple[str | None, str]] = set()
        self.drops_since_evaluation: Counter = Counter()  # device -> late or stale drops, for the log
        self.expected = wire.tensor_shapes(discriminator=global_gan.discriminator.state_dict())
        # fp32 is the largest codec: an honest update is the state's bytes plus a small envelope.
        self.discriminator_bytes = state_bytes(global_gan.discriminator)
        self.model_bytes = self.discriminator_bytes + state_bytes(global_gan.generator)
        self.rules = admission_rules(
            settings,
            max_payload_bytes=2 * self.discriminator_bytes + 64 * 1024,
            max_samples=max_samples,  # > 0: no device can hold more examples than the whole data set
        )
        self.metrics_sent_at = -math.inf  # time.monotonic() of the last metrics message
        self.diverged_at: int | None = None  # the round after which the global GAN held non-finite weights
        self.health = RunHealth(devices=settings.quorum, max_rejected_fraction=settings.max_rejected_fraction)
        self.failure: Failure | None = None  # why the run stopped before its last round, if it did
        self.refused: set[str] = set()  # devices with an update rejected while the round was open
        self.reporters = admission.Reporters(
            fleet=self.fleet, allowed=settings.allowed_devices,
            sends_again=BINDING_REASONS | SIGNATURE_FAILURES,
        )  # whose rejected updates count as reports (round_closes)
        self.checkpointed = 0  # the last round a checkpoint holds
        self.resumed = False
        self.stop_requested = asyncio.Event()  # SIGTERM or SIGINT: end after the last completed round
        self.stopped_by: int | None = None  # the signal's number
        self.shards = (
            ShardedCollector(
                settings=settings,
                rules=self.rules,
                counters=self.counters,
                expected=self.expected,
                gan=global_gan,
                note=self.note,
            )  # fmt: skip
            if settings.aggregators > 1
            else None
        )

    async def run(self) -> ServerCounters:
        """Plays rounds until the last; a lost broker is reconnected with backoff (a persistent session, so
        updates published meanwhile are delivered) and the interrupted round is played again."""
        if self.next_round == 0 and not self.resumed and not self.recorder.prepared.probe.needs_statistics:
            await asyncio.to_thread(self.recorder.start, self.gan.generator)
        if not self.stop_requested.is_set():
            await run_connected(
                self.settings.broker,
                self.settings.broker.client_id(f"edgegan-server-{self.settings.run}"),
                self.session,
                self.stop_requested,
            )
        if self.stopped_early:
            await asyncio.to_thread(self.save_checkpoint, self.next_round)
        return self.counters

    def request_stop(self, signum: int) -> None:
        """Stop collecting: a round still waiting for updates is abandoned (not counted), one being folded
        or evaluated completes; `run` then checkpoints the last completed round (`--resume` goes on)."""
        self.stopped_by = signum
        self.stop_requested.set()
        log.warning("%s: stopping after round %d of %d", signal_name(signum), self.next_round,
                    self.settings.rounds)  # fmt: skip

    @property
    def stopped_early(self) -> bool:
        """A signal ended the run before its last round (a diverged run stops on its own and keeps its last
        finite checkpoint)."""
        stopped = self.stopped_by is not None and self.diverged_at is None
        return stopped and self.next_round < self.settings.rounds

    async def session(self, client: aiomqtt.Client) -> None:
        settings = self.settings
        if not self.control_cleared:
            # A retained "stop" from an earlier run of the same name would stop our devices at once.
            await client.publish(topics.control(settings.run), b"", qos=1, retain=True)
            self.control_cleared = True
        if self.run_config is not None:
            # Retained: a device that starts later, or reconnects, joins the run from it.
            config = self.run_config.encode()
            await client.publish(topics.run_config(settings.run), config, qos=1, retain=True)
        probe = self.recorder.prepared.probe
        if self.statistics is not None and probe.needs_statistics:
            # Devices join from the configuration just published, then send their statistics: the first
            # evaluation (round 0) needs them.
            probe.use_statistics(await self.statistics.gather(client))
            if self.next_round == 0 and not self.resumed:
                await asyncio.to_thread(self.recorder.start, self.gan.generator)
        if self.shards is None:
            await client.subscribe(topics.all_updates(settings.run), qos=1)
        else:
            await self.shards.start(client)
        # After the aggregators' wait, which reads no status: the retained ones (with each device's stream,
        # which --fakes server serves by) arrive now.
        await client.subscribe(topics.all_statuses(settings.run), qos=1)
        while self.next_round < settings.rounds and not self.stop_requested.is_set():
            round_index = self.next_round
            trace = await self.play_round(client, round_index)
            if trace is None:  # stopped while collecting
                break
            done = round_index + 1
            # Evaluation runs a classifier over thousands of samples: off the event loop.
            diverged, measured = await asyncio.to_thread(self.record_round, done, trace)
            self.quality = measured or self.quality
            if measured is not None:
                self.log_evaluation(done, measured)
            self.quality_round = done if measured is not None else self.quality_round
            self.next_round = done
            if self.judge_health(done, diverged):
                if not diverged:  # a finite model is saved as on any stop; a diverged one is not
                    await asyncio.to_thread(self.save_checkpoint, done)
                await self.publish_metrics(client, done, self.quality, len(trace.bytes_up))
                break
            if measured is not None or done % settings.checkpoint_every == 0:
                await asyncio.to_thread(self.save_checkpoint, done)
            due = time.monotonic() - self.metrics_sent_at >= METRICS_INTERVAL_S
            if due or measured is not None or done == settings.rounds:
                await self.publish_metrics(client, done, self.quality, len(trace.bytes_up))
        await client.publish(topics.control(settings.run), b"stop", qos=1, retain=True)

    def record_round(self, done: int, trace: RoundTrace) -> tuple[bool, dict | None]:
        """Books a finished round (evaluating when due) and says whether the global GAN diverged: one
        that did never recovers (as in the simulator), so the run stops and keeps the last finite checkpoint
        instead of burning the remaining rounds."""
        gan = self.gan
        diverged = not (parameters_finite(gan.generator) and parameters_finite(gan.discriminator))
        wall_s = self.recorder.wall_time_s()
        return diverged, self.recorder.record(done, wall_s, trace, gan.generator, force_eval=diverged)

    def judge_health(self, done: int, diverged: bool) -> Failure | None:
        """The run-health policy's verdict after round `done` (edgegan/algorithms/health.py), logged."""
        counters = self.counters
        # Updates failing --device-keys are not their device's (anyone on its topic could send them): like
        # late ones, they say nothing of the fleet's health, and the model never saw them.
        rejected = sum(
            count for reason, count in counters.rejected.items() if reason not in SIGNATURE_FAILURES
        )
        self.failure = self.health.judge(
            done=done, accepted=counters.accepted, rejected=rejected, finite=not diverged
        )
        if diverged:
            self.diverged_at = done
            log.error(
                "the global GAN diverged in round %d (non-finite weights): the run stops here; the last "
                "checkpoint (round %d) holds the last model saved before it",
                done,
                self.checkpointed,
            )
        elif self.failure:
            log.error("%s; checkpoint.pt holds round %d", self.failure.line(), done)
        return self.failure

    def save_checkpoint(self, rounds_done: int) -> None:
        """Everything a restarted server needs to go on from `rounds_done` (`--resume`): networks,
        optimisers, which update each device had counted, the counters and the recorder's totals. Written
        atomically (temporary file, fsync, rename): a crash leaves the previous checkpoint or this one."""
        counters = self.counters
        payload = {
            "rounds_done": rounds_done,
            "run": self.settings.run,
            # What `edgegan sample` and `evaluate` need to rebuild the generator from a checkpoint.
            "spec": asdict(self.gan.spec),
            "dataset": self.recorder.prepared.dataset.name,
            **self.gan.checkpoint(),
            "last_counted": dict(self.last_counted),
            "counters": {
                "accepted": counters.accepted, "late": counters.late, "stale": counters.stale,
                "duplicates": counters.duplicates, "dropped": counters.dropped,
                "rejected": dict(counters.rejected), "staleness": dict(counters.staleness),
                "by_device": {device: dict(tally) for device, tally in counters.by_device.items()},
            },
            "recorder": self.recorder.totals(),
            "quality": self.quality,
            "published": self.published.hex(),  # what updates in flight may still be bound to
        }  # fmt: skip
        save_atomic(payload, self.recorder.out / CHECKPOINT)
        self.checkpointed = rounds_done

    def restore(self, checkpoint: dict) -> None:
        """The inverse of `save_checkpoint` (the recorder restores its own part)."""
        if checkpoint.get("run") != self.settings.run:
            raise ValueError(
                f"the checkpoint is of run {checkpoint.get('run')!r}, not --run {self.settings.run!r}"
            )
        self.gan.restore(checkpoint)
        self.resumed = True
        self.next_round = int(checkpoint["rounds_done"])
        self.checkpointed = self.next_round
        self.last_counted = dict(checkpoint.get("last_counted", {}))
        saved = checkpoint.get("counters", {})
        counters = self.counters
        for name in ("accepted", "late", "stale", "duplicates", "dropped"):
            setattr(counters, name, int(saved.get(name, 0)))
        counters.rejected = Counter(saved.get("rejected", {}))
        counters.staleness = Counter({int(key): value for key, value in saved.get("staleness", {}).items()})
        counters.by_device = {device: Counter(tally) for device, tally in saved.get("by_device", {}).items()}
        for device, tally in counters.by_device.items():
            if tally["accepted"]:
                self.reporters.folded(device)
        self.quality = checkpoint.get("quality") or {}
        for digest in checkpoint.get("published", []):
            self.published.add(bytes.fromhex(digest))

    async def publish_metrics(self, client: aiomqtt.Client, done: int, quality: dict, reported: int) -> None:
        self.metrics_sent_at = time.monotonic()
        payload = wire.encode_json(
            {
                "round": done,
                "rounds": self.settings.rounds,
                "quality": quality,
                "devices_reported": reported,
                "bytes_up": self.recorder.bytes_up,
                "bytes_down": self.recorder.bytes_down,
                "accepted": self.counters.accepted,
                "late": self.counters.late,
                "stale": self.counters.stale,
                "rejected": dict(self.counters.rejected),
                "quality_round": self.quality_round,
                # What became of each device's updates (accepted, late, rejected...), for `edgegan status`;
                # left out for fleets whose tally would outgrow a metrics message (wire.MAX_JSON_BYTES).
                "by_device": {device: dict(tally) for device, tally in self.counters.by_device.items()}
                if len(self.counters.by_device) <= METRICS_BY_DEVICE_MAX
                else None,
                "wall_time_s": round(self.recorder.wall_time_s(), 3),
                "diverged_at_round": self.diverged_at,
                # DP-SGD: each device's epsilon as its status last said (null: infinite), bounded like
                # by_device; central DP: the run's epsilon so far. For `edgegan status` and the live view.
                "privacy": dict(sorted(self.reports.epsilons.items()))
                if self.reports.epsilons and len(self.reports.epsilons) <= METRICS_BY_DEVICE_MAX
                else None,
                "central_privacy": self.gan.central.report() if self.gan.central else None,
            }
        )
        await client.publish(topics.metrics(self.settings.run), payload, qos=1, retain=True)

    async def play_round(self, client: aiomqtt.Client, round_index: int) -> RoundTrace | None:
        """Sync: collect, fold, then step G against the new D. Parallel: step G against the published D
        while the devices train, then fold whatever arrived within the staleness window. None: a stop was
        requested before the round's updates were in; the global GAN is as it was before the round."""
        started = time.perf_counter()
        generator_state, discriminator_state = self.gan.snapshot()
        self.fold = self.gan.begin_fold(round_index)
        self.history[round_index] = discriminator_state
        self.history.pop(round_index - self.rules.window - 1, None)
        if self.settings.fakes == "server":
            # Each device's message is drawn and sent once its "online" status names its stream (collect).
            message = await off_loop(self.model_bytes, self.downlink.publish, round_index,
                                     wire.discriminator_tensors(discriminator_state))  # fmt: skip
            self.work = RoundWork(round_index, generator_state, message)
            payload = b""
        else:
            payload = await off_loop(self.model_bytes, self.global_payload, round_index,
                                     wire.global_tensors(generator_state, discriminator_state))  # fmt: skip
        before_s = time.perf_counter() - started  # server compute before any device can start
        parallel = self.settings.schedule == "parallel"
        generator_step = None
        before_step = None
        # A round played again after a lost broker must not step G twice (D_t has not changed meanwhile).
        if parallel and self.gan.generator_due(round_index) and self.generator_stepped < round_index:
            self.generator_stepped = round_index
            # What a stop mid-round puts back: the checkpoint must hold G as of the last completed round.
            before_step = copy.deepcopy(self.gan.generator_optimizer.state_dict())
            # The global model is already encoded, so G may change from here: the step overlaps the
            # model's transfer (a QoS 1 publish of 2.3 MB for MNIST) as well as the devices' training.
            generator_step = asyncio.create_task(
                asyncio.to_thread(timed, self.gan.update_generator, round_index)
            )
        try:
            arrivals = await self.unless_stopped(self.publish_and_collect(client, round_index, payload))
        finally:
            g_loss, overlap_s = await generator_step if generator_step else (float("nan"), 0.0)
        if arrivals is None:
            if before_step is not None:
                self.gan.generator.load_state_dict(generator_state)
                self.gan.generator_optimizer.load_state_dict(before_step)
                self.generator_stepped = round_index - 1
            return None
        after_started = time.perf_counter()
        names = sorted(arrivals, key=natural_key)
        updates = [arrivals[name][0] for name in names]
        if self.shards is None:  # every accepted update is already in self.fold
            if arrivals:  # none when every update of the round was rejected: D stays as it is
                await off_loop(self.discriminator_bytes, self.gan.apply_fold, self.fold)
            self.commit(round_index, arrivals)
        else:  # the updates stayed with the aggregators: fold the merged partial sums instead
            await self.shards.fold(client, round_index, arrivals, discriminator_state)
        if not parallel and self.gan.generator_due(round_index):
            g_loss = await asyncio.to_thread(self.gan.update_generator, round_index)
        # Server compute per phase, as the simulator records it; devices report their own compute in their
        # status messages (the server cannot see it), so device_compute_s stays 0 here.
        self.reports.round_took(time.perf_counter() - started)
        return RoundTrace(
            device_compute_s=[0.0] * len(names),
            bytes_down=[self.work.sent.get(name, 0) if self.work else len(payload) for name in names],
            bytes_up=[arrivals[name][1] for name in names],
            server_before_s=before_s,
            server_overlap_s=overlap_s,
            server_after_s=time.perf_counter() - after_started,
            # No update folded (every one rejected): D is as it was and the round has no d_loss.
            d_loss=sum(update.d_loss for update in updates) / len(updates) if updates else math.nan,
            g_loss=g_loss,
        )

    async def publish_and_collect(self, client: aiomqtt.Client, round_index: int, payload: bytes) -> dict:
        if self.work is None:
            await self.link.carry(len(payload), can_drop=False)
            await client.publish(topics.global_model(self.settings.run), payload, qos=1, retain=True)
            self.global_sent = payload
        else:
            await self.serve_work(client)
        self.reports.published(round_index)
        return await self.collect(client, round_index)

    async def serve_work(self, client: aiomqtt.Client) -> None:
        """--fakes server: every online device not yet served this round gets the global D and the fake
        batches drawn for its stream, on its own topic (retained: a reconnecting device finds it)."""
        work = self.work
        for device, stream in sorted(self.reports.streams.items()):
            if device in work.sent:
                continue
            payload = await asyncio.to_thread(self.work_payload, device, stream)
            await self.link.carry(len(payload), can_drop=False)
            await client.publish(topics.work(self.settings.run, device), payload, qos=1, retain=True)
            work.sent[device] = len(payload)

    async def republish(self, client: aiomqtt.Client, device: str) -> None:
        """A device refused a forged model: ours goes out again (retained, so that a device that joins
        later finds the server's, not the forgery); with --fakes server, that device's work again."""
        if self.work is not None:
            self.work.sent.pop(device, None)  # serve_work sends it again
            return
        if self.global_sent is None or time.monotonic() - self.republished_at < REPUBLISH_INTERVAL_S:
            return
        self.republished_at = time.monotonic()
        log.warning("device %s refused a forged or replayed global model; republishing the server's own",
                    device)  # fmt: skip
        await client.publish(topics.global_model(self.settings.run), self.global_sent, qos=1, retain=True)

    def sign(self, envelope: wire.Envelope) -> bytes:
        """The message, signed; its digest is remembered so that updates trained on it count."""
        payload, digest = self.signer.sign(envelope)
        self.published.add(digest)
        return payload

    def global_payload(self, round_index: int, tensors: dict) -> bytes:
        """Round `round_index`'s global model as published: absolute, or a delta (edgegan/downlink.py)."""
        message = self.downlink.publish(round_index, tensors)
        return self.sign(to_envelope(message, kind="global", run=self.settings.run, device="server"))

    def work_payload(self, device: str, stream: int) -> bytes:
        work = self.work
        batches = self.gan.fakes_for(work.generator_state, stream, work.round_index)
        return self.sign(
            to_envelope(work.message, kind="work", run=self.settings.run, device=device,
                     extras=wire.fake_tensors(batches))
        )  # fmt: skip

    async def unless_stopped(self, work):
        """What `work` (a coroutine) returns, or None if a stop is requested first (it is then cancelled:
        only waits on the network are, never a worker thread's computation)."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return None if task.cancelled() else task.result()

    async def collect(
        self, client: aiomqtt.Client, round_index: int
    ) -> dict[str, tuple[DiscriminatorUpdate, int, float, int]]:
        """Arrivals for this round until `quorum` devices reported, or the deadline passed with at least
        `min_devices`; below that the deadline is extended (and logged) a bounded number of times."""
        settings = self.settings
        arrivals: dict[str, tuple[DiscriminatorUpdate, int, float, int]] = {}
        self.refused = set()
        loop = asyncio.get_running_loop()
        for extension in range(MAX_DEADLINE_EXTENSIONS + 1):
            try:
                async with asyncio.timeout_at(loop.time() + settings.deadline_s):
                    async for message in client.messages:
                        if message.topic.matches(topics.all_statuses(settings.run)):
                            forged = self.reports.status(message.topic.value, bytes(message.payload))
                            await self.keyframes.answer(client, bytes(message.payload))
                            if forged:
                                await self.republish(client, forged)
                            if self.work is not None:
                                await self.serve_work(client)
                        elif self.shards is None:
                            await self.receive(message, round_index, arrivals)
                        else:
                            await self.shards.receive(client, message, round_index, arrivals)
                        if self.round_closes(arrivals, at_deadline=False):
                            return arrivals
            except TimeoutError:
                if self.round_closes(arrivals, at_deadline=True):
                    return arrivals
                log.warning(
                    "round %d: %d of at least %d devices after %.1f s; waiting longer (%d)",
                    round_index, len(arrivals), settings.min_devices, settings.deadline_s, extension + 1,
                )  # fmt: skip
        waited = (MAX_DEADLINE_EXTENSIONS + 1) * settings.deadline_s
        raise TimeoutError(
            f"round {round_index}: only {len(arrivals)} of at least {settings.min_devices} devices "
            f"reported in {waited:.0f} s"
        )

    def round_closes(self, arrivals: dict, *, at_deadline: bool) -> bool:
        """Rejected devices have reported too (edgegan/algorithms/admission.py: round_closes)."""
        return admission.round_closes(
            accepted=len(arrivals), rejected=len(self.refused - arrivals.keys()),
            quorum=self.reports.expected_arrivals(self.settings.quorum),  # less devices out of DP budget
            fleet=self.fleet, min_devices=self.settings.min_devices, at_deadline=at_deadline,
        )  # fmt: skip

    def note(self, device: str | None, round_index: int, verdict: Verdict) -> None:
        """Counts a verdict by kind and device; logs the first rejection of each (device, reason) only, so
        that a misbehaving device cannot flood the log."""
        self.counters.record(device, verdict)
        if verdict.outcome in (Outcome.LATE, Outcome.STALE) and verdict.detail:  # the window rule's
            # Routine below a full quorum (the slowest device's update lands in the next round): summed
            # up in the next evaluation's line, one line each only at debug level.
            self.drops_since_evaluation[device or "?"] += 1
            log.debug("dropped %s's update from round %d in round %d",
                      device, round_index - verdict.staleness, round_index)  # fmt: skip
        if verdict.outcome not in (Outcome.REJECT, Outcome.REPLAY):
            return
        key = (device, verdict.reason)
        if key not in self.logged_rejections and len(self.logged_rejections) < MAX_LOGGED_REJECTIONS:
            self.logged_rejections.add(key)
            log.warning(
                "rejected an update from %s in round %d (%s): %s; further ones are only counted",
                device, round_index, verdict.reason, verdict.detail,
            )  # fmt: skip

    def log_evaluation(self, done: int, quality: dict) -> None:
        """One INFO line per evaluation: the round, the quality figures, the time so far, what the
        admission policy made of the updates so far, and the late or stale drops since the last one."""
        counters = self.counters
        rejected = sum(counters.rejected.values())
        figures = quality_text(quality, digits=4)
        drops = self.drops_since_evaluation
        dropped = ""
        if drops:
            by_device = ", ".join(f"{device} {drops[device]}" for device in sorted(drops, key=natural_key))
            total = sum(drops.values())
            dropped = f"; since the last evaluation dropped {total} late or stale ({by_device})"
        slowest = self.reports.slowest()
        dropped += f"; {slowest}" if slowest else ""
        log.info(
            "round %d/%d: %s; %.1f s elapsed; so far %d accepted, %d late, %d stale, %d duplicates, "
            "%d rejected%s",
            done, self.settings.rounds, figures, self.recorder.wall_time_s(), counters.accepted,
            counters.late, counters.stale, counters.duplicates, rejected, dropped,
            extra={
                "round": done, "quality": dict(quality), "elapsed_s": round(self.recorder.wall_time_s(), 3),
                "accepted": counters.accepted, "late": counters.late, "stale": counters.stale,
                "duplicates": counters.duplicates, "rejected": rejected,
                "dropped_since_evaluation": dict(drops),
            },
        )  # fmt: skip
        self.drops_since_evaluation = Counter()

    def open_round(self, round_index: int, arrivals: dict) -> admission.OpenRound:
        return admission.OpenRound(
            index=round_index, arrived=arrivals, last_counted=self.last_counted, held_bases=self.history
        )

    async def receive(self, message: aiomqtt.Message, round_index: int, arrivals: dict) -> None:
        """Transport only: the admission policy decides whether an update counts; this moves its bytes
        (emulated link, worker-thread hops) between the policy's steps and folds it when told to."""
        if not message.topic.matches(topics.all_updates(self.settings.run)):
            # Brokers may deliver retained messages of other topics (amqtt does on connect): not updates.
            self.counters.ignored += 1
            return
        payload = bytes(message.payload)
        device = topics.device_of(message.topic.value)
        verdict = admission.screen(self.rules, device=device, payload_bytes=len(payload))
        screened = verdict is None  # from a device that may take part, not an unknown or oversized one
        if screened:
            self.reporters.sent(device, round_index)
        if verdict is None and not await self.link.carry(len(payload)):
            self.counters.dropped += 1
            self.counters.count(device, "dropped")
            return
        if verdict is None:
            try:
                envelope = await off_loop(len(payload), wire.decode, payload, self.expected)
            except wire.WireError as error:
                verdict = admission.reject(error.reason, str(error))
            else:
                verdict = admission.check_envelope(self.rules, envelope, kind="update", sender=device)
                if verdict is None and self.device_keys is not None:
                    verdict = self.device_keys.judge(device, envelope)
        if verdict is None:
            open_round = self.open_round(round_index, arrivals)
            verdict = admission.judge(self.rules, open_round, device=device, base_round=envelope.base_round)
        if verdict.folds:  # bound to a model this server published (runtime/trust.py); a late, stale or
            # duplicate update is counted as such first, whatever it was trained on (one from before a resume)
            verdict = self.published.judge(envelope.trained_on) or verdict
        if not verdict.folds:
            # A fleet device whose update was rejected has reported (round_closes; admission.Reporters).
            if verdict.outcome is Outcome.REJECT and screened:
                if self.reporters.counts(device, round_index, verdict.reason):
                    self.refused.add(device)
            self.note(device, round_index, verdict)
            return
        state = onto_current(
            wire.discriminator_state(envelope.tensors), envelope.delta,
            self.history[envelope.base_round] if verdict.staleness else None,
            cpu_state(self.gan.discriminator),
        )  # fmt: skip
        weight = envelope.samples * self.discount(verdict.staleness)
        # Folded in now, so the round holds one running sum, not every device's state (for mean and clip).
        # Counted when the round closes (`commit`): a round cut short by a lost broker is played again.
        verdict = await off_loop(self.discriminator_bytes, self.admit, state, weight, verdict.staleness)
        if not verdict.folds:
            if self.reporters.counts(device, round_index, verdict.reason):
                self.refused.add(device)
            self.note(device, round_index, verdict)
            return
        self.reporters.folded(device)
        loss = envelope.loss if envelope.loss is not None else float("nan")
        arrivals[device] = (
            DiscriminatorUpdate({}, envelope.samples, loss),
            len(payload),
            weight,
            envelope.base_round,
        )
        self.reports.answered(device, envelope.base_round)

    def admit(self, state: dict, weight: float, staleness: int) -> admission.Verdict:
        """Judges the update by its change from the global D and folds it into the round when it counts
        (one worker-thread hop for both)."""
        verdict = admission.judge_rebased(self.rules, state, cpu_state(self.gan.discriminator), staleness)
        if verdict.folds:
            self.fold.add(state, weight)
        return verdict

    def commit(self, round_index: int, arrivals: dict) -> None:
        for device, (_, _, _, base_round) in arrivals.items():
            self.last_counted[device] = base_round
            self.counters.record(device, admission.Verdict(admission.Outcome.FOLD, round_index - base_round))
