"""The server's side of sharded aggregation (`--aggregators K`, docs/scaling.md; the aggregators themselves
are runtime/aggregator.py): grant the aggregators' claims until the quorum, close the round, and merge their
partial sums into the weighted mean one server would have formed from the same updates."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt

from edgegan import topics, wire
from edgegan.algorithms import admission
from edgegan.algorithms.aggregation import PartialSum, RunningWeightedMean, State
from edgegan.algorithms.proposed import GlobalGan
from edgegan.runtime.aggregator import AGGREGATORS_ONLINE_S
from edgegan.runtime.offload import off_loop
from edgegan.runtime.server_settings import ServerCounters, ServerSettings, admission_rules

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
        self, *, settings: ServerSettings, counters: ServerCounters, expected: dict, gan: GlobalGan,
        rules: admission.AdmissionRules | None = None,
        note: Callable[[str | None, int, admission.Verdict], None] | None = None,
    ) -> None:  # fmt: skip
        if gan.rule.kind != "mean":
            raise ValueError(f"--aggregators > 1 needs the mean aggregate; {gan.rule} is not a sum")
        self.settings = settings
        self.rules = rules or admission_rules(settings)
        self.counters = counters
        # Counts (and the server also logs) a verdict, as the server does for its own arrivals.
        self.note = note or (lambda device, round_index, verdict: counters.record(device, verdict))
        self.expected = expected
        floating = {name: t for name, t in gan.discriminator.state_dict().items() if t.is_floating_point()}
        self.float_names = set(wire.tensor_shapes(discriminator=floating))
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

    async def receive(
        self, client: aiomqtt.Client, message: aiomqtt.Message, round_index: int, arrivals: dict,
        closed: bool = False,
    ) -> None:  # fmt: skip
        """A claim: granted or refused by the admission policy, as the server judges its own arrivals, and
        counted the same way; the verdict goes back to the aggregator. Aggregator rejections are counted as
        the server's own."""
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
        device = claim["device"] if topics.NAME_PATTERN.match(claim["device"]) else None
        if "rejected" in claim:
            self.counters.record(device, admission.reject(claim["rejected"]))
            self.tally(aggregator)["rejected"] += 1
            return
        self.tally(aggregator)["claimed"] += 1
        verdict = admission.screen(self.rules, device=device)
        if verdict is None:
            open_round = admission.OpenRound(index=round_index, arrived=arrivals, closed=closed)
            verdict = admission.judge(self.rules, open_round, device=device, base_round=claim["round"])
        if verdict.folds:
            loss = claim["loss"] if claim["loss"] is not None else float("nan")
            grant = Grant(aggregator, claim["samples"], loss)
            arrivals[device] = (grant, claim["bytes"], float(claim["samples"]), claim["round"])
            self.tally(aggregator)["granted"] += 1
        self.note(device, round_index, verdict)
        if aggregator is not None:
            order = wire.encode_verdict(claim["round"], device or "?", verdict.folds)
            await client.publish(topics.order(run, aggregator), order, qos=1)

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
                        await self.receive(client, message, round_index, arrivals, closed=True)
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
            refused = admission.check_envelope(self.rules, envelope, kind="partial", sender=aggregator)
            if refused is not None:
                raise wire.WireError(refused.reason, refused.detail)
            if envelope.round != round_index:
                tally["partials_late"] += 1  # for a round that closed without it (it timed out)
                return None
            granted = shares.get(aggregator, set())
            samples = sum(arrivals[device][0].num_samples for device in granted)
            if set(envelope.devices) != granted:
                raise wire.WireError("wrong-devices", f"counts {sorted(envelope.devices)[:3]}...")
            if envelope.samples != samples or envelope.weight != float(samples):
                raise wire.WireError("wrong-weight", f"{envelope.weight} for {samples} samples")
            tensors = wire.discriminator_state(envelope.tensors)
            sums = {name: tensor for name, tensor in tensors.items() if tensor.is_floating_point()}
            if set(wire.discriminator_tensors(sums)) != self.float_names:
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
