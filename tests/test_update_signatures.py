"""Per-device update signatures (--update-key on a device, --device-keys on the server): the keys
`edgegan broker add-device` provisions, the server's check (runtime/trust.py, DeviceKeys), and a run over
a real Mosquitto in which forged updates on a device's topic — unsigned, or signed by another key — are
rejected and counted while the devices' own are folded in."""

import json
import stat
import threading

import paho.mqtt.client as mqtt
import pytest
import torch
from test_runtime_mqtt import edgegan, finish
from typer.testing import CliRunner

from edgegan import signing, topics, wire
from edgegan.cli import app
from edgegan.runtime import trust

runner = CliRunner()


def update(device: str = "pi-0", scale: float = 1.0) -> wire.Envelope:
    return wire.Envelope(
        kind="update", run="r", round=3, base_round=3, device=device, samples=10, codec="fp32",
        tensors={"d.weight": torch.full((4,), scale)}, loss=0.5, delta=False, trained_on=bytes(32),
    )  # fmt: skip


def test_an_update_counts_only_when_its_own_devices_key_signed_it():
    own, other = signing.generate_key(), signing.generate_key()
    keys = trust.DeviceKeys({"pi-0": signing.public_bytes(own), "pi-1": signing.public_bytes(other)})
    signed = wire.decode(signing.Signer(own).sign(update())[0])
    assert keys.judge("pi-0", signed) is None
    assert keys.judge("pi-0", wire.decode(wire.encode(update()))).reason == trust.UNSIGNED_UPDATE
    assert keys.judge("pi-1", signed).reason == trust.WRONG_DEVICE_KEY  # pi-0's update on pi-1's topic
    assert keys.judge("pi-9", signed).reason == trust.NO_DEVICE_KEY
    # The same signature over other weights: the digest it covers changed.
    forged = wire.Envelope(**{**signed.__dict__, "tensors": {"d.weight": torch.full((4,), 100.0)}})
    tampered = wire.decode(wire.encode_signed(forged, lambda _: (signed.signer, signed.sig))[0])
    assert keys.judge("pi-0", tampered).reason == trust.BAD_UPDATE_SIGNATURE


@pytest.mark.parametrize(
    "text",
    ["pi-0\n", "pi-0 abc\n", "pi-0 " + "0" * 64 + " extra\n", "pi-0 " + "G" * 64 + "\n"],
    ids=["no-key", "short", "three-words", "not-hex"],
)
def test_a_malformed_device_keys_file_is_one_line_naming_the_file_and_line(tmp_path, text):
    path = tmp_path / "device-keys"
    path.write_text("# a comment\n\n" + text)
    with pytest.raises(ValueError, match=rf"^--device-keys {path}, line 3: expected 'DEVICE HEX'"):
        trust.DeviceKeys.load(path)
    with pytest.raises(ValueError, match=r"^--device-keys .*nowhere: No such file"):
        trust.DeviceKeys.load(tmp_path / "nowhere")


def test_add_device_writes_the_devices_key_for_it_only_and_its_public_half_for_the_server(tmp_path):
    common = ["--passwd", str(tmp_path / "passwd"), "--acl", str(tmp_path / "acl"),
              "--secrets-dir", str(tmp_path / "secrets")]  # fmt: skip
    for name in ("pi-0", "pi-1", "pi-0"):  # pi-0 twice: a rotation
        result = runner.invoke(app, ["broker", "add-device", name, *common])
        assert result.exit_code == 0, result.output
    assert "--update-key pi-0.update-key" in result.output.replace("\n", "")
    key_path = tmp_path / "secrets" / "pi-0.update-key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    keys = trust.DeviceKeys.load(tmp_path / "secrets" / trust.DEVICE_KEYS_FILE).keys
    assert set(keys) == {"pi-0", "pi-1"}
    assert keys["pi-0"] == signing.public_bytes(signing.load_key(key_path))  # the rotated key's


def test_forged_updates_on_a_devices_topic_are_rejected_and_counted_while_its_own_are_folded(
    broker, tmp_path
):
    url, port = broker
    run, rounds, tiny = "signed-updates", 3, ["--dataset", "mnist", "--width", "8", "--latent-dim", "8"]
    own = {name: signing.generate_key() for name in ("device-0", "device-1")}
    for name, key in own.items():
        signing.save_key(key, tmp_path / f"{name}.update-key")
    (tmp_path / "device-keys").write_text(
        trust.device_keys_text({name: signing.public_bytes(key) for name, key in own.items()})
    )
    rogue = signing.Signer(signing.generate_key())
    forged = {"sent": 0}
    subscribed = threading.Event()
    forger = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="forger")

    def on_message(client, userdata, message):
        envelope = wire.decode(message.payload)
        if envelope.signer != signing.public_bytes(own["device-1"]):
            return  # one of ours
        heavy = wire.Envelope(**{**envelope.__dict__, "signer": None, "sig": None, "tensors": {
            name: tensor * 100 for name, tensor in envelope.tensors.items()}})  # fmt: skip
        for payload in (wire.encode(heavy), rogue.sign(heavy)[0]):
            client.publish(message.topic, payload, qos=1)
            forged["sent"] += 1

    forger.on_subscribe = lambda *args: subscribed.set()
    forger.on_message = on_message
    forger.connect("127.0.0.1", port)
    forger.loop_start()
    forger.subscribe(topics.update(run, "device-1"), qos=1)
    try:
        assert subscribed.wait(10), "the forger never subscribed"
        server = edgegan(
            "server", "--broker", url, "--run", run, "--devices", "2", "--rounds", str(rounds),
            "--eval-every", str(rounds), "--deadline-s", "60", "--out", str(tmp_path / "server"),
            "--device-keys", str(tmp_path / "device-keys"), *tiny,
        )  # fmt: skip
        devices = [
            edgegan("device", "--broker", url, "--run", run, "--id", name, "--index", str(index), "--of", "2",
                    "--update-key", str(tmp_path / f"{name}.update-key"), *tiny)
            for index, name in enumerate(own)
        ]  # fmt: skip
        output = finish(server, timeout_s=240)
        for device in devices:
            finish(device)
    finally:
        forger.loop_stop()
        forger.disconnect()
    assert "updates count only when signed by their device's key: 2 keys" in output
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["rounds"] == rounds and summary["updates_accepted"] == 2 * rounds
    assert forged["sent"] >= 2 * rounds
    assert summary["updates_by_device"]["device-1"]["accepted"] == rounds
    assert summary["updates_by_device"]["device-0"] == {"accepted": rounds}
    # The forgeries of the last round may arrive after the server has ended; the others are counted.
    rejected = summary["updates_rejected"]
    assert set(rejected) == {trust.UNSIGNED_UPDATE, trust.WRONG_DEVICE_KEY}, rejected
    assert rejected[trust.UNSIGNED_UPDATE] >= rounds - 1 and rejected[trust.WRONG_DEVICE_KEY] >= rounds - 1
