"""The parallel schedule with a quorum, played in one process on an event clock.

With every device in every round (`ProposedRunner`), the parallel schedule waits for its slowest device
like the serial one. Deployed with `--quorum Q` it does not: the server closes a round once Q updates no
staler than `tau` rounds have arrived, folds them in (a stale one rebased onto the current model, as the
MQTT server does), and publishes the next model while slow devices are still training on an older one.
Which updates a round folds therefore depends on when they arrive, so this runner keeps its own clock from
each device's speed, the link and the measured compute, with the cost model's rules: a device downloads
the newest model, computes for its measured CPU seconds divided by its speed, uploads; once its update
has arrived it starts again on the newest model published by then, or waits for the next one (nothing
overlaps on a device's link, as in the serial cost model). A round's trace
carries the simulated time it took (`RoundTrace.elapsed_s`): the run belongs to the link and speeds it was
played with and is not re-costed under others.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgegan import wire
from edgegan.algorithms import admission
from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.proposed import DiscriminatorUpdate, GlobalGan, check_fakes, local_discriminators
from edgegan.algorithms.staleness import difference, onto_current
from edgegan.algorithms.steps import cpu_state
from edgegan.costmodel import LinkProfile, RoundTrace
from edgegan.downlink import DEFAULT_KEYFRAME_EVERY, DownlinkReceiver, DownlinkSender, deliver
from edgegan.models import ModelSpec
from edgegan.torchdevice import CPU
from edgegan.transfer import Timer, mean, send_change, transmit, uplink_residuals

State = dict[str, torch.Tensor]


@dataclass(kw_only=True)
class InFlight:
    """A device's update on its way: trained on `base`'s model, at the server at `arrival_s`."""

    arrival_s: float
    base: int
    received: State  # as the server decodes it: the state (fp32) or the change from the base (lossy)
    samples: int
    d_loss: float
    compute_s: float
    bytes_up: int


def check_quorum(quorum: int, devices: int, tau: int) -> None:
    if not 1 <= quorum <= devices:
        raise ValueError(f"--quorum must be between 1 and --devices ({devices}), got {quorum}")
    if tau < 1:
        raise ValueError(f"--tau must be >= 1, got {tau}")


class QuorumParallelRunner:
    def __init__(
        self,
        *,
        spec: ModelSpec,
        cfg: TrainConfig,
        shards: Sequence[torch.Tensor],
        seed: int,
        codec: str,
        quorum: int,
        tau: int,
        speeds: Sequence[float],
        link: LinkProfile,
        torch_device: torch.device = CPU,
        fakes: str = "device",
        keyframe_every: int = DEFAULT_KEYFRAME_EVERY,
        max_update_norm: float | str = 0.0,
        noise_secret: int | None = None,
    ):
        check_quorum(quorum, len(shards), tau)
        # The global model as over MQTT (edgegan/downlink.py): a lossy codec sends deltas, which every
        # subscribed device receives and applies whether or not it is training, so one receiver holds
        # what every device holds. (--fakes server's per-device messages stay absolute here.)
        self.downlink = DownlinkSender(codec=codec, keyframe_every=keyframe_every)
        self.receiver = DownlinkReceiver()
        self.message_bytes: dict[int, int] = {}  # round -> bytes of its global message
        self.fakes = check_fakes(fakes)
        self.codec, self.quorum, self.tau = codec, quorum, tau
        self.speeds, self.link = list(speeds), link
        self.server = GlobalGan(
            spec, cfg, seed, torch_device=torch_device, expected_updates=quorum, noise_secret=noise_secret
        )
        self.devices = local_discriminators(
            spec=spec, cfg=cfg, shards=shards, seed=seed, torch_device=torch_device, fakes=fakes
        )
        self.residuals = uplink_residuals(codec, len(self.devices))  # topk+: each device's error feedback
        self.clock = 0.0  # when the current round's model is published
        # round -> (time, G, D, bytes); --fakes server: G is the server's own (it draws from it), D the
        # state before the wire, bytes those of D alone (each device's message adds its fakes).
        self.published: dict[int, tuple[float, State, State, int]] = {}
        self.history: dict[int, State] = {}  # round -> the server's D then, for rebasing stale updates
        self.in_flight: dict[int, InFlight] = {}  # device -> its update on the way
        self.trained_on: dict[int, int] = {}  # device -> the newest base it trained on
        self.moved_down: list[int] = []  # bytes of every model a device took, this round
        self.moved_up: list[int] = []  # bytes of every update that arrived this round, used or not
        self.staleness: Counter[int] = Counter()  # staleness -> updates folded in
        self.stale = 0  # updates dropped for being staler than tau
        self.duplicates = 0  # a second update of one device within a round (the MQTT server drops it too)
        self.rejected = 0  # non-finite or too long changes, left out as the MQTT server leaves them out
        bound = admission.parse_update_bound(max_update_norm)
        self.rules = admission.AdmissionRules(run="sim", window=tau, update_bound=bound)

    @property
    def generator(self) -> nn.Module:
        return self.server.generator

    @property
    def discriminator(self) -> nn.Module:
        return self.server.discriminator

    @property
    def accepted(self) -> int:
        return sum(self.staleness.values())

    def start(self, index: int, round_index: int, at_s: float) -> None:
        """Device `index` downloads round `round_index`'s model at `at_s` and trains on it."""
        _, generator_state, discriminator_state, down = self.published[round_index]
        if wire.is_lossy(self.codec) and self.fakes == "device":
            # Deltas: it received every global since the one it last took, not only this one.
            since = self.trained_on.get(index, -1)
            down = sum(self.message_bytes.get(taken, 0) for taken in range(since + 1, round_index + 1))
        device = self.devices[index]
        if self.fakes == "server":
            # The server draws this device's batches from the round's G as the device takes the round.
            batches = self.server.fakes_for(generator_state, index, round_index)
            sent = wire.discriminator_tensors(discriminator_state) | wire.fake_tensors(batches)
            down, received = transmit("work", round_index, sent, self.codec)
            discriminator_state = wire.discriminator_state(received)
            with Timer() as timer:
                update = device.update(round_index, None, discriminator_state, wire.fake_batches(received))
        else:
            with Timer() as timer:
                update = device.update(round_index, generator_state, discriminator_state)
        if wire.is_lossy(self.codec):
            change = difference(update.state, discriminator_state)
            up, received = send_change(round_index, change, self.codec, self.residuals.get(index))
        else:
            sent = wire.discriminator_tensors(update.state)
            up, received = transmit("update", round_index, sent, self.codec)
        sent_s = at_s + self.link.download_s(down) + timer.seconds / self.speeds[index]
        self.in_flight[index] = InFlight(
            arrival_s=sent_s + self.link.upload_s(up), base=round_index,
            received=wire.discriminator_state(received), samples=update.num_samples, d_loss=update.d_loss,
            compute_s=timer.seconds, bytes_up=up,
        )  # fmt: skip
        self.trained_on[index] = round_index
        self.moved_down.append(down)

    def newest_round_at(self, time_s: float) -> int:
        return max(round_index for round_index, (at, *_) in self.published.items() if at <= time_s)

    def run_round(self, round_index: int) -> RoundTrace:
        trace = RoundTrace()
        server = self.server
        generator_state, discriminator_state = server.snapshot()
        if self.fakes == "server":
            self.published[round_index] = (self.clock, generator_state, discriminator_state, 0)
        else:
            tensors = wire.global_tensors(generator_state, discriminator_state)
            if wire.is_lossy(self.codec):
                down, received = deliver(self.downlink.publish(round_index, tensors), self.receiver,
                                         kind="global")  # fmt: skip
            else:
                down, received = transmit("global", round_index, tensors, self.codec)
            self.message_bytes[round_index] = down
            self.published[round_index] = (
                self.clock,
                wire.generator_state(received),
                wire.discriminator_state(received),
                down,
            )
        self.history[round_index] = discriminator_state
        for old in [r for r in self.published if r < round_index - self.tau - 1]:
            self.published.pop(old)
            self.history.pop(old, None)
        oldest_held = min(self.trained_on.values(), default=-1)  # no device needs bytes of rounds before it
        for old in [r for r in self.message_bytes if r <= oldest_held]:
            self.message_bytes.pop(old)
        for index in range(len(self.devices)):  # idle devices take the new model at once
            if index not in self.in_flight:
                self.start(index, round_index, self.clock)
        g_loss, overlap_s = float("nan"), 0.0
        if server.generator_due(round_index):
            with Timer() as timer:
                g_loss = server.update_generator(round_index)  # against D_t, while the devices train
            overlap_s = timer.seconds
        accepted: dict[int, tuple[InFlight, State]] = {}  # device -> its update, rebased onto D_t
        current = cpu_state(server.discriminator)
        closed_at = self.clock
        queue = [(flight.arrival_s, index) for index, flight in self.in_flight.items()]
        heapq.heapify(queue)
        timer = Timer()  # the server's own work on arrivals and the fold
        while len(accepted) < self.quorum and queue:  # empty: every device that could report has
            arrival_s, index = heapq.heappop(queue)
            flight = self.in_flight.pop(index)
            closed_at = max(closed_at, arrival_s)
            self.moved_up.append(flight.bytes_up)
            open_round = admission.OpenRound(index=round_index, arrived=accepted, held_bases=self.history)
            verdict = admission.judge(self.rules, open_round, device=index, base_round=flight.base)
            if verdict.folds:
                with timer:
                    base = self.history[flight.base] if verdict.staleness else None
                    state = onto_current(flight.received, wire.is_lossy(self.codec), base, current)
                    verdict = admission.judge_rebased(self.rules, state, current, verdict.staleness)
            if verdict.folds:
                accepted[index] = (flight, state)
                self.staleness[verdict.staleness] += 1
            elif verdict.outcome is admission.Outcome.STALE:
                self.stale += 1
            elif verdict.outcome is admission.Outcome.DUPLICATE:
                self.duplicates += 1
            else:
                self.rejected += 1
            # Its link is free again: it starts on the newest model out by now, if it has not trained on it.
            newest = self.newest_round_at(arrival_s)
            if newest > self.trained_on[index]:
                self.start(index, newest, max(arrival_s, self.published[newest][0]))
                heapq.heappush(queue, (self.in_flight[index].arrival_s, index))
        updates = [
            DiscriminatorUpdate(state, flight.samples, flight.d_loss)
            for flight, state in (accepted[index] for index in sorted(accepted))
        ]
        with timer:
            if updates:  # every update may have been left out: D stays as it is
                server.fold_discriminators(
                    updates, [float(update.num_samples) for update in updates], round_index
                )
        round_s = max(closed_at - self.clock, overlap_s) + timer.seconds
        self.clock += round_s
        # Bytes are what crossed the links this round, dropped updates included; compute is the folded
        # updates'. The lists need not line up: a trace with elapsed_s is not re-costed.
        trace.device_compute_s = [accepted[index][0].compute_s for index in sorted(accepted)]
        trace.bytes_down, trace.bytes_up, self.moved_down, self.moved_up = (
            self.moved_down,
            self.moved_up,
            [],
            [],
        )
        trace.server_overlap_s, trace.server_after_s = overlap_s, timer.seconds
        trace.d_loss, trace.g_loss = mean([update.d_loss for update in updates]), g_loss
        trace.elapsed_s = round_s
        return trace
