"""Signed models and bound updates (docs/protocol.md, "Threat model"): the policy units, then a real run
over a real Mosquitto into which another client publishes forged and replayed globals."""

import json
import re
import time
from pathlib import Path

import msgpack
import pytest
import torch
from test_reliability import Watcher, metric_rounds, open_round
from test_runtime_mqtt import MOSQUITTO, SMALL, edgegan, finish, start_fleet
from typer.testing import CliRunner

from edgegan import signing, topics, wire
from edgegan.cli import app
from edgegan.runtime.runconfig import RunIncompatible
from edgegan.runtime.trust import FORGED, OLD_KEYFRAME, REPLAYED, PublishedDigests, ServerTrust

SERVER = signing.Signer(signing.generate_key())
runner = CliRunner()


def signed(round_index: int, sent_at: float, signer: signing.Signer = SERVER) -> wire.Envelope:
    envelope = wire.Envelope(
        kind="global", run="r", round=round_index, base_round=round_index, device="server", samples=0,
        codec="fp32", tensors={"D.w": torch.ones(2)}, sent_at=sent_at,
    )  # fmt: skip
    return wire.decode(signer.sign(envelope)[0])


class Config:
    """What ServerTrust reads of a run configuration."""

    def __init__(self, server_key: str = "") -> None:
        self.server_key = server_key


def test_a_device_trusts_the_configurations_key_on_first_use_and_a_pinned_key_over_it(caplog):
    first_use = ServerTrust(device="pi-0", pinned=None)
    with caplog.at_level("WARNING", logger="edgegan.device"):
        first_use.join(Config(SERVER.public_key.hex()))
    assert "trust on first use" in caplog.text and "--server-key" in caplog.text
    assert first_use.check(signed(1, 10.0)) is None
    other = signing.Signer(signing.generate_key())
    first_use.join(Config(other.public_key.hex()))  # a later configuration cannot swap the key
    assert first_use.key == SERVER.public_key
    pinned = ServerTrust(device="pi-0", pinned=SERVER.public_key)
    pinned.join(Config(other.public_key.hex()))
    assert pinned.check(signed(1, 10.0, other)) == FORGED and pinned.check(signed(1, 10.0)) is None
    with pytest.raises(RunIncompatible) as refused:
        ServerTrust(device="pi-0", pinned=None).join(Config(""))
    assert refused.value.field == "server_key"


def test_an_older_signed_global_is_a_replay_but_a_new_run_from_round_0_is_not(caplog):
    trust = ServerTrust(device="pi-0", pinned=SERVER.public_key)
    assert trust.check(signed(5, 50.0)) is None
    assert trust.check(signed(5, 50.0)) is None  # the same one redelivered (a resubscription)
    assert trust.check(signed(2, 20.0)) == REPLAYED
    keyframe = wire.Envelope(**{**signed(3, 30.0).__dict__, "kind": "keyframe"})
    # Left retained by an earlier request, when a device asks again: ignored, not counted as a replay.
    assert trust.check(wire.decode(SERVER.sign(keyframe)[0])) == OLD_KEYFRAME
    assert trust.check(signed(0, 60.0)) is None  # a restarted run: round 0 again, signed later
    unsigned = wire.decode(wire.encode(signed(7, 70.0)))
    with caplog.at_level("WARNING", logger="edgegan.device"):
        for _ in range(50):
            assert trust.check(unsigned) == FORGED
    assert caplog.text.count("forged") == 1  # rate-limited: one line, counts in the next


def test_the_server_remembers_the_digests_it_published_within_its_capacity():
    assert PublishedDigests.capacity_for(tau=1, devices=8) == 4096
    assert PublishedDigests.capacity_for(tau=3, devices=1000) == 4 * 5 * 1000
    published = PublishedDigests(capacity=2, digests=[b"a" * 32, b"b" * 32])
    assert published.judge(b"a" * 32) is None and published.judge(None).reason == "unbound"
    published.add(b"c" * 32)
    assert published.judge(b"a" * 32).reason == "unknown-global" and published.judge(b"c" * 32) is None
    assert PublishedDigests(capacity=2, digests=map(bytes.fromhex, published.hex())).known == published.known


def counter(output: str, name: str) -> int:
    """A device's counter from the line it prints when it stops."""
    return int(re.search(rf"\b{name}=(\d+)", output).group(1))


def forged_globals(real: bytes) -> list[bytes]:
    """An all-zero global of the next round, unsigned; the same signed by another key; and the same bytes
    claiming the server's key with another key's signature."""
    envelope = wire.decode(real)
    zeros = wire.Envelope(**{
        **envelope.__dict__, "round": envelope.round + 1, "base_round": envelope.round + 1,
        "sent_at": time.time(), "signer": None, "sig": None,
        "tensors": {name: torch.zeros_like(tensor) for name, tensor in envelope.tensors.items()},
    })  # fmt: skip
    wrong_key, _ = signing.Signer(signing.generate_key()).sign(zeros)
    head = msgpack.unpackb(wrong_key, raw=False)
    head["signer"] = envelope.signer  # names the server; signed by someone else
    return [wire.encode(zeros), wrong_key, msgpack.packb(head, use_bin_type=True)]


needs_mosquitto = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed")


@needs_mosquitto
def test_forged_and_replayed_globals_mid_run_are_refused_by_every_device_and_change_no_number(
    broker, tmp_path
):
    url, port = broker
    run, out, rounds = "forged", tmp_path / "server", 30
    server, agents = start_fleet(url, run, out, devices=2, rounds=rounds)
    model, update = topics.global_model(run), topics.update(run, "device-0")
    watcher = Watcher(port, run, [model, update])
    try:
        watcher.wait_for(lambda seen: open_round(seen, model) >= 5 and seen.get(update))
        real = watcher.messages[model]
        oldest, newest = real[0], real[-1]
        for payload in forged_globals(newest):
            watcher.client.publish(model, payload, qos=1, retain=True).wait_for_publish(5)
        watcher.client.publish(model, oldest, qos=1, retain=True).wait_for_publish(5)  # a replay
    finally:
        watcher.close()
    finish(server, timeout_s=300)
    outputs = [finish(agent) for agent in agents]
    for output in outputs:
        assert counter(output, "forged") >= 3 and counter(output, "replayed") >= 1, output[-2000:]
        assert counter(output, "updates_sent") == rounds  # it never trained on a forged round
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds and metric_rounds(out) == list(range(rounds + 1))
    assert summary["updates_accepted"] == 2 * rounds
    # (The server's side, updates unbound or bound to a global it never published, is in the malformed-
    # update matrix: tests/test_reliability.py, which sends them in time for the round being collected.)
    assert summary["updates_rejected"] == {}, summary["updates_rejected"]
    simulated = tmp_path / "sim"
    finish(edgegan("simulate", "--algo", "serial", "--devices", "2", "--rounds", str(rounds),
                   "--eval-every", str(rounds), "--out", str(simulated), *SMALL))  # fmt: skip
    over_mqtt = torch.load(out / "generator.pt", weights_only=True)["state_dict"]
    in_process = torch.load(simulated / "generator.pt", weights_only=True)["state_dict"]
    for name, tensor in in_process.items():
        assert torch.allclose(over_mqtt[name], tensor, atol=1e-6, rtol=0), name


def test_add_device_provisions_the_servers_public_key_with_the_login(tmp_path):
    common = ["--passwd", str(tmp_path / "passwd"), "--acl", str(tmp_path / "acl"),
              "--secrets-dir", str(tmp_path / "secrets")]  # fmt: skip
    key_path = tmp_path / "run" / signing.KEY_FILE
    key, _ = signing.load_or_create(key_path)
    result = runner.invoke(app, ["broker", "add-device", "pi-0", *common, "--server-key", str(key_path)])
    assert result.exit_code == 0, result.output
    pinned = tmp_path / "secrets" / "pi-0.server-key"
    assert pinned.read_text().strip() == signing.public_bytes(key).hex()
    assert "--server-key pi-0.server-key" in " ".join(result.output.split())
    # What the device reads it back as; the private key itself is never copied.
    assert signing.parse_public_key(str(pinned)) == signing.public_bytes(key)
    assert "PRIVATE" not in pinned.read_text()
    bad = runner.invoke(app, ["broker", "add-device", "pi-1", *common, "--server-key", "nonsense"])
    assert bad.exit_code == 2 and "--server-key" in bad.stderr


def test_a_device_reporting_a_refused_model_makes_the_server_republish_its_global_once_a_second():
    import asyncio

    from edgegan.algorithms.config import TrainConfig
    from edgegan.algorithms.proposed import GlobalGan
    from edgegan.models import ModelSpec
    from edgegan.runtime.connection import parse_broker
    from edgegan.runtime.devicereports import DeviceReports
    from edgegan.runtime.server import ServerCoordinator
    from edgegan.runtime.server_settings import ServerSettings

    reports, status = DeviceReports(), topics.status("r", "pi-0")
    assert reports.status(status, wire.encode_status("online", forged=0, replayed=0)) is None
    assert reports.status(status, wire.encode_status("online", forged=1, replayed=0)) == "pi-0"
    assert reports.status(status, wire.encode_status("online", forged=1, replayed=0)) is None
    assert reports.status(status, wire.encode_status("online", forged=1, replayed=1)) == "pi-0"

    class Client:
        def __init__(self) -> None:
            self.published: list[tuple[str, bytes, bool]] = []

        async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
            self.published.append((topic, payload, retain))

    settings = ServerSettings(run="r", broker=parse_broker("mqtt://127.0.0.1:1883"), rounds=1, quorum=1,
                              deadline_s=5, min_devices=1)  # fmt: skip
    server = ServerCoordinator(settings, GlobalGan(ModelSpec((2,), 8, 32), TrainConfig(), seed=0), None)
    client = Client()
    asyncio.run(server.republish(client, "pi-0"))  # nothing published yet: nothing to republish
    server.global_sent = b"round 3's global"
    for _ in range(3):
        asyncio.run(server.republish(client, "pi-0"))
    assert client.published == [(topics.global_model("r"), b"round 3's global", True)]
