"""The server's side of sharded aggregation (`--aggregators K`, docs/scaling.md; the aggregators themselves
are runtime/aggregator.py): grant the aggregators' claims until the quorum, close the round, and merge their
partial sums into the weighted mean one server would have formed from the same updates."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

import aiomqtt

from edgegan import topics, wire
from edgegan.algorithms.aggregation import PartialSum, RunningWeightedMean, State
from edgegan.algorithms.proposed import GlobalGan
from edgegan.runtime.aggregator import AGGREGATORS_ONLINE_S
from edgegan.runtime.offload import off_loop
from edgegan.runtime.server_settings import ServerCounters, ServerSettings

log = logging.getLogger("edgegan.server")


@dataclass(frozen=True)
class Grant:
    """A claimed update the server accepted, as far as the server sees it: the tensors stay with the
    aggregator. Stands where `ServerCoordinator.collect` puts a DiscriminatorUpdate."""

    aggregator: str
    num_samples: int
    d_loss: float


class ShardedCollector:
    """The server's side of sharded aggregation: waits for the aggregators, grants their claims (called
    from `ServerCoordinator.collect` instead of `consider`), closes the round, and folds the merged partial
    sums into the global discriminator."""

    def __init__(
        self, settings: ServerSettings, counters: ServerCounters, expected: dict, gan: GlobalGan
    ) -> None:
        if gan.rule.kind != "mean":
            raise ValueError(f"--aggregators > 1 needs the mean aggregate; {gan.rule} is not a sum")
        self.settings = settings
        self.counters = counters
        self.expected = expected
        self.float_names = {
            f"D.{name}" for name, t in gan.discriminator.state_dict().items() if t.is_floating_point()
        }
        self.gan = gan
        self.online: set[str] = set()

    def tally(self, aggregator: str | None) -> Counter:
        return self.counters.by_aggregator.setdefault(aggregator or "?", Counter())

    async def start(self, client: aiomqtt.Client) -> None:
        """Subscribes, then waits until `--aggregators` aggregators say they are online: updates published
        before any of them subscribed would be dropped by the broker."""
        run, wanted = self.settings.run, self.settings.aggregators
        for topic in (topics.all_claims(run), topics.all_partials(run), topics.all_aggregator_statuses(run)):
            await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(AGGREGATORS_ONLINE_S):
                async for message in client.messages:
                    if message.topic.matches(topics.all_aggregator_statuses(run)):
                        self.note_status(message)
                    if len(self.online) >= wanted:
                        break
        except TimeoutError:
            raise TimeoutError(
                f"only {len(self.online)} of {wanted} aggregators came online in "
                f"{AGGREGATORS_ONLINE_S:.0f} s; start them with `edgegan aggregator --run {run} --name NAME` "
                "(they need an MQTT 5 broker)"
            ) from None
        log.info("aggregators online: %s", ", ".join(sorted(self.online)))

    def note_status(self, message: aiomqtt.Message) -> None:
        aggregator = topics.aggregator_of(message.topic.value)
        try:
            state = wire.decode_status(bytes(message.payload))["state"]
        except wire.WireError:
            return
        if state == "online" and aggregator not in self.online:
            self.online.add(aggregator)
        elif state == "offline" and aggregator in self.online:
            self.online.discard(aggregator)
            log.warning("aggregator %s went offline", aggregator)

    async def consider(
        self, client: aiomqtt.Client, message: aiomqtt.Message, round_index: int, arrivals: dict,
        closed: bool = False,
    ) -> None:  # fmt: skip
        """A claim: granted (for this round, first copy, before the round closed) or refused with the
        reason `ServerCoordinator.consider` would give, counted the same way. Aggregator rejections are
        counted as the server's own."""
        run = self.settings.run
        if message.topic.matches(topics.all_aggregator_statuses(run)):
            self.note_status(message)
            return
        if message.topic.matches(topics.all_partials(run)):
            self.tally(topics.aggregator_of(message.topic.value))["partials_late"] += 1
            return
        if not message.topic.matches(topics.all_claims(run)):
            self.counters.ignored += 1
            return
        aggregator = topics.aggregator_of(message.topic.value)
        try:
            claim = wire.decode_claim(bytes(message.payload))
        except wire.WireError as error:
            self.tally(aggregator)["bad_claims"] += 1
            log.warning("ignored a malformed claim from aggregator %s: %s", aggregator, error)
            return
        device = claim["device"] if topics.NAME_PATTERN.match(claim["device"]) else "?"
        if "rejected" in claim:
            self.counters.rejected[claim["rejected"]] += 1
            self.counters.count(device, "rejected")
            self.tally(aggregator)["rejected"] += 1
            return
        self.tally(aggregator)["claimed"] += 1
        staleness = round_index - claim["round"]
        outcome = None
        if device == "?":
            self.counters.rejected["bad-field"] += 1
            outcome = "rejected"
        elif staleness < 0:
            self.counters.rejected["future-round"] += 1
            outcome = "rejected"
            log.warning("rejected %s's update for future round %d in round %d",
                        device, claim["round"], round_index)  # fmt: skip
        elif staleness > 0:
            self.counters.late += 1
            outcome = "late"
            log.info("dropped %s's update from round %d in round %d", device, claim["round"], round_index)
        elif device in arrivals:
            self.counters.duplicates += 1  # a resend, perhaps handed to another aggregator
            outcome = "duplicate"
        elif closed:
            self.counters.late += 1  # arrived after the quorum closed the round
            outcome = "late"
        if outcome is None:
            loss = claim["loss"] if claim["loss"] is not None else float("nan")
            grant = Grant(aggregator, claim["samples"], loss)
            arrivals[device] = (grant, claim["bytes"], float(claim["samples"]), claim["round"])
            self.counters.accepted += 1
            self.counters.staleness[0] += 1
            self.tally(aggregator)["granted"] += 1
            outcome = "accepted"
        self.counters.count(device, outcome)
        if aggregator is not None:
            verdict = wire.encode_verdict(claim["round"], device, outcome == "accepted")
            await client.publish(topics.order(run, aggregator), verdict, qos=1)

    async def fold(self, client: aiomqtt.Client, round_index: int, arrivals: dict, base: State) -> None:
        """Closes the round at every aggregator, gathers the partial sums of those granted updates, and
        folds their merged mean into the global discriminator (`base` is the D published this round)."""
        run = self.settings.run
        shares: dict[str, set[str]] = {}
        for device, (grant, *_) in arrivals.items():
            shares.setdefault(grant.aggregator, set()).add(device)
        for aggregator in sorted(self.online | set(shares)):
            close = wire.encode_close(round_index, len(shares.get(aggregator, ())))
            await client.publish(topics.order(run, aggregator), close, qos=1)
        partials: dict[str, PartialSum] = {}
        try:
            async with asyncio.timeout(self.settings.deadline_s):
                async for message in client.messages:
                    if not message.topic.matches(topics.all_partials(run)):
                        await self.consider(client, message, round_index, arrivals, closed=True)
                        continue
                    aggregator = topics.aggregator_of(message.topic.value)
                    partial = await self.accept_partial(message, aggregator, round_index, shares, arrivals)
                    if partial is not None:
                        partials[aggregator] = partial
                    if set(partials) == set(shares):
                        break
        except TimeoutError:
            missing = ", ".join(sorted(set(shares) - set(partials)))
            waited = self.settings.deadline_s
            raise TimeoutError(
                f"round {round_index}: no valid partial sum from {missing} within {waited:.0f} s"
            ) from None
        await asyncio.to_thread(self.merge_and_fold, partials, base)

    async def accept_partial(
        self, message: aiomqtt.Message, aggregator: str | None, round_index: int, shares: dict, arrivals: dict
    ) -> PartialSum | None:
        """A partial sum that counts exactly the updates granted to its aggregator this round, or None
        (logged and counted per aggregator)."""
        payload = bytes(message.payload)
        tally = self.tally(aggregator)
        try:
            envelope = await off_loop(len(payload), wire.decode, payload, self.expected)
            if envelope.kind != "partial":
                raise wire.WireError("bad-kind", f"{envelope.kind} on a partial topic")
            if envelope.run != self.settings.run:
                raise wire.WireError("wrong-run", envelope.run)
            if envelope.device != aggregator:
                raise wire.WireError("device-mismatch", f"{envelope.device} sent on {aggregator}'s topic")
            if envelope.round != round_index:
                tally["partials_late"] += 1  # for a round that closed without it (it timed out)
                return None
            granted = shares.get(aggregator, set())
            samples = sum(arrivals[device][0].num_samples for device in granted)
            if set(envelope.devices) != granted:
                raise wire.WireError("wrong-devices", f"counts {sorted(envelope.devices)[:3]}...")
            if envelope.samples != samples or envelope.weight != float(samples):
                raise wire.WireError("wrong-weight", f"{envelope.weight} for {samples} samples")
            tensors = wire.unprefixed("D", envelope.tensors)
            sums = {name: tensor for name, tensor in tensors.items() if tensor.is_floating_point()}
            if {f"D.{name}" for name in sums} != self.float_names:
                raise wire.WireError("bad-dtype", "integer tensors where the model has floating ones")
        except wire.WireError as error:
            tally["partials_rejected"] += 1
            log.warning("rejected the partial sum of %s for round %d: %s", aggregator, round_index, error)
            return None
        tally["partials"] += 1
        tally["partial_bytes"] += len(payload)
        counters = {name: tensor for name, tensor in tensors.items() if not tensor.is_floating_point()}
        return PartialSum(sums, envelope.weight, envelope.change_weight, counters)

    def merge_and_fold(self, partials: dict[str, PartialSum], base: State) -> None:
        """In a fixed order (by aggregator name), so a rerun merges the same way."""
        running = RunningWeightedMean()
        for aggregator in sorted(partials):
            running.merge(partials[aggregator])
        self.gan.fold_aggregate(running.result(base, base))
