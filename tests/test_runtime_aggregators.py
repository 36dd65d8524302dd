"""Sharded aggregation (`--aggregators K`): partial sums on the wire, their merge, and a real fleet over a
real Mosquitto whose K = 2 generator equals the K = 1 one."""

import asyncio
import itertools
import json
import threading
import time
from pathlib import Path

import aiomqtt
import msgpack
import paho.mqtt.client as mqtt
import pytest
import torch
from test_runtime_mqtt import MOSQUITTO, SMALL, edgegan, finish
from typer.testing import CliRunner

from edgegan import topics, wire
from edgegan.algorithms.aggregation import RunningWeightedMean, weighted_mean
from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.proposed import GlobalGan
from edgegan.algorithms.staleness import apply_difference, difference
from edgegan.cli import app
from edgegan.models import ModelSpec, build_discriminator
from edgegan.runtime.aggregator import Aggregator, AggregatorSettings
from edgegan.runtime.connection import BrokerAddress
from edgegan.runtime.server_settings import ServerCounters, ServerSettings
from edgegan.runtime.sharded import ShardedCollector

needs_mosquitto = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed")


def discriminators(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Nearby discriminators, as devices return them after training from the same global model."""
    torch.manual_seed(seed)
    base = build_discriminator(ModelSpec((2,), 8, 32)).state_dict()
    return [{name: t + 0.01 * torch.randn_like(t) for name, t in base.items()} for _ in range(count)]


def shard_mean(states, weights, shards: list[list[int]], base=None, changes=False):
    """What K aggregators and the server compute: a running sum per shard, merged in shard order."""
    partials = []
    for indices in shards:
        running = RunningWeightedMean()
        for index in indices:
            running.add(states[index], weights[index], is_change=changes)
        partials.append(running.partial())
    merged = RunningWeightedMean()
    for partial in partials:
        merged.merge(partial)
    return merged.result(base or states[0], base)


def test_partial_sums_give_the_one_server_mean_bit_for_bit_however_the_updates_are_split():
    states, weights = discriminators(4), [2500.0, 2500.0, 2499.0, 2501.0]
    one_server = weighted_mean(states, weights)
    for order in itertools.permutations(range(4)):
        for cut in range(1, 4):
            sharded = shard_mean(states, weights, [list(order[:cut]), list(order[cut:])])
            assert all(torch.equal(sharded[name], one_server[name]) for name in one_server), (order, cut)


def test_changes_from_the_round_model_are_summed_and_the_model_added_back_once():
    base = discriminators(1, seed=1)[0]
    states, weights = discriminators(3, seed=2), [10.0, 20.0, 30.0]
    changes = [difference(state, base) for state in states]
    as_models = weighted_mean([apply_difference(base, change) for change in changes], weights)
    as_changes = shard_mean(changes, weights, [[0, 2], [1]], base=base, changes=True)
    for name, tensor in as_models.items():
        assert torch.allclose(as_changes[name], tensor, atol=1e-6, rtol=0), name


def partial_envelope(**changes) -> wire.Envelope:
    running = RunningWeightedMean()
    for state in discriminators(2):
        running.add(state, 100.0)
    fields = {
        "kind": "partial", "run": "r", "round": 3, "base_round": 3, "device": "aggregator-0",
        "samples": 200, "codec": "fp64", "tensors": wire.discriminator_tensors(running.partial().sums),
        "weight": 200.0, "devices": ("device-0", "device-1"),
    }  # fmt: skip
    return wire.Envelope(**(fields | changes))


def test_a_partial_sum_travels_as_exact_float64_with_its_weight_and_devices():
    sent = partial_envelope()
    received = wire.decode(wire.encode(sent), {name: tuple(t.shape) for name, t in sent.tensors.items()})
    assert (received.kind, received.weight, received.change_weight) == ("partial", 200.0, 0.0)
    assert received.devices == ("device-0", "device-1") and received.samples == 200
    for name, tensor in sent.tensors.items():
        assert received.tensors[name].dtype == torch.float64 and torch.equal(received.tensors[name], tensor)


@pytest.mark.parametrize(
    "head_changes,reason",
    [
        ({"codec": "fp32"}, "bad-codec"),  # a partial sum is float64 or nothing
        ({"weight": 0.0}, "bad-field"),
        ({"weight": float("nan")}, "bad-field"),
        ({"change_weight": 500.0}, "bad-field"),  # more than the whole weight
        ({"devices": ["device-0", "device-0"]}, "bad-field"),
        ({"devices": []}, "bad-field"),
        ({"samples": 0}, "bad-field"),
    ],
)
def test_a_malformed_partial_sum_is_refused_with_a_reason(head_changes, reason):
    head = msgpack.unpackb(wire.encode(partial_envelope()), raw=False) | head_changes
    with pytest.raises(wire.WireError) as error:
        wire.decode(msgpack.packb(head, use_bin_type=True))
    assert error.value.reason == reason


def test_float64_tensors_are_refused_outside_partial_sums():
    update = wire.Envelope(
        kind="update",
        run="r",
        round=1,
        base_round=1,
        device="device-0",
        samples=10,
        codec="fp32",
        tensors={"D.w": torch.ones(2)},
    )
    head = msgpack.unpackb(wire.encode(update), raw=False)
    head["tensors"] = msgpack.packb(
        {"D.w": wire.encode_tensor(torch.ones(2, dtype=torch.float64), "fp64")}, use_bin_type=True
    )
    with pytest.raises(wire.WireError, match="bad-dtype"):
        wire.decode(msgpack.packb(head, use_bin_type=True))
    with pytest.raises(wire.WireError, match="bad-codec"):
        wire.decode(msgpack.packb(head | {"codec": "fp64"}, use_bin_type=True))


def test_claims_and_orders_are_validated_like_every_other_message():
    claim = wire.decode_claim(wire.encode_claim("device-1", 4, 2500, 12345, float("nan")))
    assert claim == {"device": "device-1", "round": 4, "samples": 2500, "bytes": 12345, "loss": None}
    assert wire.decode_claim(wire.encode_rejection("device-1", "not-msgpack"))["rejected"] == "not-msgpack"
    assert wire.decode_order(wire.encode_verdict(4, "device-1", True))["accept"] is True
    assert wire.decode_order(wire.encode_close(4, 2))["close"] == 2
    for bad in (b"[]", b'{"device": "d", "round": -1, "samples": 1, "bytes": 0}', b'{"device": 3}'):
        with pytest.raises(wire.WireError):
            wire.decode_claim(bad)
    for bad in (b'{"round": 1, "device": "d", "accept": 1}', b'{"round": 1, "close": -2}', b"\xff"):
        with pytest.raises(wire.WireError):
            wire.decode_order(bad)


runner = CliRunner()


@pytest.mark.parametrize(
    "command,named",
    [
        (["run", "--aggregators", "2"], "embedded broker"),
        (["server", "--aggregators", "2", "--schedule", "parallel"], "--schedule sync"),
        (["server", "--aggregators", "0"], "--aggregators"),
    ],
)
def test_aggregators_that_cannot_work_give_a_one_line_error_and_exit_code_2(command, named, tmp_path):
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "run"), "--dataset", "ring8"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]


def inject_garbage_update(port: int, run: str, device: str, stop: threading.Event) -> None:
    """As soon as `run` publishes its first global model, publish a non-msgpack update as `device`."""
    seen = threading.Event()
    intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"intruder-{run}")
    intruder.on_message = lambda client, userdata, message: seen.set() if message.payload else None
    intruder.connect("127.0.0.1", port)
    intruder.subscribe(topics.global_model(run), qos=1)
    intruder.loop_start()
    try:
        while not seen.wait(0.1):
            if stop.is_set():
                return
        intruder.publish(topics.update(run, device), b"\x00not msgpack", qos=1).wait_for_publish(5)
    finally:
        intruder.loop_stop()
        intruder.disconnect()


@needs_mosquitto
def test_two_aggregators_give_the_same_generator_as_one_server_and_share_the_updates(broker, tmp_path):
    """Exact equality, not a tolerance: every weight * float32 parameter is exact in float64, and these
    sums of four nearby values do not round in float64, so the split cannot show in the float32 mean
    (test_partial_sums_give_the_one_server_mean_bit_for_bit_however_the_updates_are_split)."""
    url, port = broker  # conftest: broker/mosquitto-dev.conf, which speaks MQTT 5 too
    rounds = 8
    common = ["--broker", url, "--devices", "4", "--rounds", str(rounds), "--eval-every", str(rounds), *SMALL]
    started = time.monotonic()
    # Both fleets at once on one broker (different runs), so the two CPU-bound starts overlap.
    one = edgegan("run", "--run", "k1", "--out", str(tmp_path / "k1"), *common)
    two = edgegan("run", "--run", "k2", "--out", str(tmp_path / "k2"), "--aggregators", "2", *common)
    stop = threading.Event()
    intruder = threading.Thread(target=inject_garbage_update, args=(port, "k2", "device-0", stop))
    intruder.start()
    try:
        finish(one, timeout_s=240)
        finish(two, timeout_s=240)
    finally:
        stop.set()
        intruder.join(10)
    elapsed = time.monotonic() - started
    generators = [
        torch.load(tmp_path / name / "generator.pt", weights_only=True)["state_dict"] for name in ("k1", "k2")
    ]
    for name, tensor in generators[0].items():
        assert torch.equal(generators[1][name], tensor), name
    summary = json.loads((tmp_path / "k2" / "summary.json").read_text())
    assert summary["aggregators"] == 2 and summary["aggregator_exit_codes"] == [0, 0]
    assert summary["rounds"] == rounds and summary["updates_accepted"] == 4 * rounds
    shares = summary["updates_by_aggregator"]
    assert sorted(shares) == ["aggregator-0", "aggregator-1"]
    assert all(share["granted"] > 0 and share["partials"] >= 1 for share in shares.values()), shares
    assert sum(share["granted"] for share in shares.values()) == 4 * rounds
    # The garbage went to one aggregator, which refused it without crashing; the server counted it.
    assert summary["updates_rejected"] == {"not-msgpack": 1}
    logs = [(tmp_path / "k2" / "logs" / f"aggregator-{index}.log").read_text() for index in range(2)]
    assert sum("rejected an update from device-0" in log for log in logs) == 1
    assert all("'granted': 0" not in log for log in logs)
    print(f"K=1 and K=2 fleets together: {elapsed:.1f} s")


class RecordingClient:
    """Stands in for aiomqtt.Client where only publishing matters."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, payload))


def message(topic: str, payload: bytes) -> aiomqtt.Message:
    return aiomqtt.Message(topic, payload, qos=1, retain=False, mid=1, properties=None)


def test_a_resend_handed_to_another_aggregator_is_refused_as_a_duplicate_and_late_claims_as_late():
    settings = ServerSettings(run="r", broker=BrokerAddress(host="127.0.0.1", port=1883), rounds=5, quorum=4,
                              deadline_s=5, min_devices=1, aggregators=2)  # fmt: skip
    counters = ServerCounters()
    gan = GlobalGan(ModelSpec((2,), 8, 32), TrainConfig(), seed=0)
    collector = ShardedCollector(settings=settings, counters=counters, expected={}, gan=gan)
    client, arrivals = RecordingClient(), {}

    def claim(aggregator, device, round_index, closed=False):
        payload = wire.encode_claim(device, round_index, 100, 5000, 0.5)
        consider = collector.receive(
            client, message(topics.claim("r", aggregator), payload), 3, arrivals, closed
        )
        asyncio.run(consider)
        return wire.decode_order(client.published[-1][1]), client.published[-1][0]

    assert claim("aggregator-0", "device-0", 3) == (
        {"round": 3, "device": "device-0", "accept": True},
        topics.order("r", "aggregator-0"),
    )
    assert claim("aggregator-1", "device-0", 3)[0]["accept"] is False  # the same update, resent
    assert claim("aggregator-1", "device-1", 2)[0]["accept"] is False  # trained from an older round
    assert claim("aggregator-1", "device-2", 3, closed=True)[0]["accept"] is False  # after the quorum
    rejection = message(topics.claim("r", "aggregator-1"), wire.encode_rejection("device-3", "not-msgpack"))
    asyncio.run(collector.receive(client, rejection, 3, arrivals))
    asyncio.run(collector.receive(client, message(topics.claim("r", "aggregator-1"), b"junk"), 3, arrivals))
    assert list(arrivals) == ["device-0"] and arrivals["device-0"][0].aggregator == "aggregator-0"
    assert (counters.accepted, counters.duplicates, counters.late) == (1, 1, 2)
    assert counters.rejected == {"not-msgpack": 1}
    assert counters.by_aggregator["aggregator-1"] == {"claimed": 3, "rejected": 1, "bad_claims": 1}


def test_an_aggregator_sums_only_granted_updates_and_survives_garbage():
    states = discriminators(3)
    expected = wire.tensor_shapes(discriminator=states[0])
    aggregator = Aggregator(
        AggregatorSettings("r", "aggregator-0", BrokerAddress(host="127.0.0.1", port=1883)), expected
    )
    client = RecordingClient()

    async def scenario():
        for index, state in enumerate(states):
            update = wire.Envelope(
                kind="update",
                run="r",
                round=3,
                base_round=3,
                device=f"device-{index}",
                samples=100 + index,
                codec="fp32",
                tensors=wire.discriminator_tensors(state),
                loss=0.25,
            )
            await aggregator.handle(
                client, message(topics.update("r", f"device-{index}"), wire.encode(update))
            )
        await aggregator.handle(client, message(topics.update("r", "device-9"), b"\x00not msgpack"))
        await aggregator.handle(client, message(topics.order("r", "aggregator-0"), b"not json"))
        for index, accept in enumerate((True, False, True)):
            verdict = wire.encode_verdict(3, f"device-{index}", accept)
            await aggregator.handle(client, message(topics.order("r", "aggregator-0"), verdict))
        await aggregator.handle(client, message(topics.order("r", "aggregator-0"), wire.encode_close(3, 2)))

    asyncio.run(scenario())
    claims = [wire.decode_claim(payload) for topic, payload in client.published if "/claim/" in topic]
    assert [claim.get("rejected") for claim in claims] == [None, None, None, "not-msgpack"]
    topic, payload = client.published[-1]
    assert topic == topics.partial("r", "aggregator-0")
    partial = wire.decode(payload, expected)
    assert partial.devices == ("device-0", "device-2") and partial.weight == 202.0 and partial.samples == 202
    for name, tensor in states[0].items():
        summed = tensor.double() * 100 + states[2][name].double() * 102
        assert torch.equal(partial.tensors[f"D.{name}"], summed), name
    counters = aggregator.counters
    assert (counters.granted, counters.refused, counters.ignored, counters.partials_sent) == (2, 1, 1, 1)
    assert counters.rejected == {"not-msgpack": 1} and not aggregator.held and not aggregator.rounds


def test_a_close_that_overtakes_a_verdict_waits_for_it_before_sending_the_partial_sum():
    states = discriminators(2)
    expected = wire.tensor_shapes(discriminator=states[0])
    settings = AggregatorSettings("r", "aggregator-0", BrokerAddress(host="127.0.0.1", port=1883))
    aggregator, client = Aggregator(settings, expected), RecordingClient()
    orders = topics.order("r", "aggregator-0")

    async def scenario():
        for index, state in enumerate(states):
            update = wire.Envelope(
                kind="update",
                run="r",
                round=5,
                base_round=5,
                device=f"device-{index}",
                samples=50,
                codec="fp32",
                tensors=wire.discriminator_tensors(state),
            )
            await aggregator.handle(
                client, message(topics.update("r", f"device-{index}"), wire.encode(update))
            )
        await aggregator.handle(client, message(orders, wire.encode_verdict(5, "device-0", True)))
        await aggregator.handle(client, message(orders, wire.encode_close(5, 2)))  # redelivered out of order
        assert not any("/partial/" in topic for topic, _ in client.published)
        await aggregator.handle(client, message(orders, wire.encode_verdict(5, "device-1", True)))

    asyncio.run(scenario())
    topic, payload = client.published[-1]
    assert topic == topics.partial("r", "aggregator-0")
    assert wire.decode(payload, expected).devices == ("device-0", "device-1")
    assert not aggregator.held and not aggregator.rounds


@needs_mosquitto
def test_two_aggregators_with_server_drawn_fakes_give_the_one_server_device_drawn_generator(broker, tmp_path):
    """--fakes server with --aggregators 2: the server serves each device's work from its statuses, which
    it subscribes to after waiting for the aggregators (the wait reads no status)."""
    url, _ = broker
    rounds = 6
    common = ["--broker", url, "--devices", "4", "--rounds", str(rounds), "--eval-every", str(rounds), *SMALL]
    one = edgegan("run", "--run", "f1", "--out", str(tmp_path / "f1"), *common)
    two = edgegan(
        "run", "--run", "f2", "--out", str(tmp_path / "f2"), "--aggregators", "2", "--fakes", "server",
        *common,
    )  # fmt: skip
    finish(one, timeout_s=240)
    finish(two, timeout_s=240)
    generators = [
        torch.load(tmp_path / name / "generator.pt", weights_only=True)["state_dict"] for name in ("f1", "f2")
    ]
    for name, tensor in generators[0].items():
        assert torch.equal(generators[1][name], tensor), name
    summary = json.loads((tmp_path / "f2" / "summary.json").read_text())
    assert summary["fakes"] == "server" and summary["aggregators"] == 2
    assert summary["updates_accepted"] == 4 * rounds
    assert sum(share["granted"] for share in summary["updates_by_aggregator"].values()) == 4 * rounds
