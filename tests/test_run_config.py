"""The run's configuration travels with the run (edgegan/runtime/runconfig.py): the server publishes it,
devices join from it, wait for it, and refuse a run they cannot join, naming the field."""

import json
import threading
import time
from dataclasses import replace

import paho.mqtt.client as mqtt
import pytest
from test_runtime_mqtt import SMALL, edgegan, finish

from edgegan import signing, topics, wire
from edgegan.algorithms.config import TrainConfig
from edgegan.models import ModelSpec, build_discriminator, build_generator
from edgegan.runtime.devicereports import DeviceReports
from edgegan.runtime.fleetview import state_of
from edgegan.runtime.runconfig import RunConfig

CONFIG = RunConfig(
    dataset="ring8", partition="shards:4", devices=2, seed=0, sample_shape=(2,), width=32, latent_dim=8,
    codec="int8+zstd", schedule="sync", train=TrainConfig(g_lr=3e-4),
)  # fmt: skip


def test_a_run_configuration_travels_as_versioned_json_and_comes_back_equal():
    payload = CONFIG.encode()
    assert json.loads(payload)["v"] == 1
    assert RunConfig.decode(payload) == CONFIG


@pytest.mark.parametrize(
    "change,reason",
    [({"v": 2}, "bad-version"), ({"sample_shape": [0]}, "bad-field"), ({"codec": "gzip"}, "bad-field"),
     ({"train": {"loss": "nope"}}, "bad-field"), ({"width": "32"}, "bad-field")],
)  # fmt: skip
def test_a_configuration_a_device_cannot_read_is_a_wire_error(change, reason):
    fields = json.loads(CONFIG.encode()) | change
    with pytest.raises(wire.WireError) as raised:
        RunConfig.decode(json.dumps(fields).encode())
    assert raised.value.reason == reason


def test_a_flag_a_device_was_given_must_agree_with_the_run_and_the_refusal_names_it():
    assert CONFIG.conflicts({"width": 32, "dataset": "ring8", "codec": "int8+zstd"}) is None
    refusal = CONFIG.conflicts({"dataset": "ring8", "width": 64})
    assert refusal.field == "width" and "--width 64" in str(refusal) and "32" in str(refusal)
    assert replace(CONFIG, seed=1).conflicts({"seed": 0}).field == "seed"


class Statuses:
    """The retained device statuses of a run, as `edgegan status` reads them."""

    def __init__(self, port: int, run: str):
        self.latest: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topics.all_statuses(run), qos=1)
        self.client.loop_start()

    def on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.latest[topics.device_of(message.topic)] = wire.decode_status(message.payload)

    def wait_for(self, device: str, state: str, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                status = self.latest.get(device, {})
            if status.get("state") == state:
                return status
            time.sleep(0.05)
        raise AssertionError(f"{device} never reported {state!r}; last: {self.latest.get(device)}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_device_started_before_the_server_waits_for_the_configuration_and_joins(broker, tmp_path):
    url, port = broker
    statuses = Statuses(port, "early")
    try:
        # Its identity and its partition only: data set, split, model, seed and codec come from the run.
        device = edgegan("device", "--broker", url, "--run", "early", "--id", "device-0", "--index", "0",
                         "--of", "1")  # fmt: skip
        statuses.wait_for("device-0", "waiting")
        server = edgegan("server", "--broker", url, "--run", "early", "--devices", "1", "--rounds", "3",
                         "--eval-every", "3", "--deadline-s", "30", "--out", str(tmp_path / "server"),
                         "--seed", "3", "--codec", "int8+zstd", *SMALL)  # fmt: skip
        assert "round 3/3: modes" in (logged := finish(server)) and "slowest device device-0: " in logged
        output = finish(device)
        assert "updates_sent=3" in output and "model (2,), codec int8+zstd" in output
    finally:
        statuses.close()
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["updates_accepted"] == 3


def test_a_device_with_a_mismatched_flag_is_refused_in_one_line_and_shows_as_incompatible(broker, tmp_path):
    url, port = broker
    statuses = Statuses(port, "mismatch")
    server = edgegan("server", "--broker", url, "--run", "mismatch", "--devices", "1", "--rounds", "2",
                     "--eval-every", "2", "--deadline-s", "30", "--out", str(tmp_path / "server"),
                     *SMALL)  # fmt: skip
    try:
        wrong = [*SMALL[:-4], "--width", "64", "--latent-dim", "8"]
        refused = edgegan("device", "--broker", url, "--run", "mismatch", "--id", "device-0", "--index", "0",
                          "--of", "1", *wrong)  # fmt: skip
        output, _ = refused.communicate(timeout=120)
        assert refused.returncode == 2, output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "width" in errors[0] and "--width 64" in errors[0], output
        assert "Traceback" not in output
        status = statuses.wait_for("device-0", "incompatible")
        assert status["field"] == "width"
        # A device that fits joins the same run and it completes.
        fits = edgegan("device", "--broker", url, "--run", "mismatch", "--id", "device-0", "--index", "0",
                       "--of", "1", *SMALL)  # fmt: skip
        finish(server)
        finish(fits)
    finally:
        statuses.close()
        if server.poll() is None:
            server.kill()


def test_a_recipe_given_to_the_server_alone_reaches_the_devices_and_gives_the_simulators_generator(
    broker, tmp_path
):
    import torch
    from test_runtime_mqtt import start_fleet

    url, _ = broker
    recipe = ["--g-lr", "1e-3", "--device-lr", "0.05", "--batch-size", "16", "--loss", "hinge"]
    server, agents = start_fleet(url, "recipe", tmp_path / "server", devices=2, rounds=8, extra=recipe)
    finish(server)
    for agent in agents:  # started with no recipe flag: they train with the one the run published
        finish(agent)
    simulated = tmp_path / "sim"
    finish(edgegan("simulate", "--algo", "serial", "--devices", "2", "--rounds", "8", "--eval-every", "8",
                   "--out", str(simulated), *SMALL, *recipe))  # fmt: skip
    over_mqtt = torch.load(tmp_path / "server" / "generator.pt", weights_only=True)["state_dict"]
    in_process = torch.load(simulated / "generator.pt", weights_only=True)["state_dict"]
    for name, tensor in in_process.items():
        assert torch.allclose(over_mqtt[name], tensor, atol=1e-6, rtol=0), name
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["train"]["g_lr"] == 1e-3 and summary["train"]["loss"] == "hinge"


SERVER = signing.Signer(signing.generate_key())  # the test plays the server: it signs what it publishes


def global_model(run: str, width: int) -> bytes:
    spec = ModelSpec((2,), 8, width)
    tensors = wire.global_tensors(build_generator(spec).state_dict(), build_discriminator(spec).state_dict())
    return SERVER.sign(wire.Envelope(kind="global", run=run, round=0, base_round=0, device="server",
                                     samples=0, codec="fp32", tensors=tensors))[0]  # fmt: skip


def test_a_joined_device_that_cannot_use_a_global_model_says_so_in_its_status_and_recovers(broker):
    url, port = broker
    statuses = Statuses(port, "unfit")
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    config = replace(CONFIG, partition="iid", devices=1, codec="fp32", server_key=SERVER.public_key.hex())
    device = edgegan("device", "--broker", url, "--run", "unfit", "--id", "device-0", "--index", "0",
                     "--of", "1", "--resend-s", "60")  # fmt: skip
    try:
        publisher.publish(topics.run_config("unfit"), config.encode(), qos=1, retain=True).wait_for_publish()
        statuses.wait_for("device-0", "online")
        # A global model of another width than the run's: the device cannot train on it.
        publisher.publish(topics.global_model("unfit"), global_model("unfit", 16), qos=1).wait_for_publish()
        status = statuses.wait_for("device-0", "incompatible")
        assert status["field"] == "bad-shape" and "cannot use the global model" in status["detail"]
        assert state_of(status) == "incompatible: bad-shape"
        publisher.publish(topics.global_model("unfit"), global_model("unfit", 32), qos=1).wait_for_publish()
        statuses.wait_for("device-0", "online")
    finally:
        publisher.publish(topics.control("unfit"), b"stop", qos=1).wait_for_publish()
        publisher.publish(topics.run_config("unfit"), b"", qos=1, retain=True).wait_for_publish()
        publisher.loop_stop()
        statuses.close()
    output = finish(device)
    assert output.count("cannot use the global model") == 1, output


def test_the_server_reports_a_device_that_cannot_take_part_once_and_names_the_slowest_device(caplog):
    now = [0.0]
    reports = DeviceReports(clock=lambda: now[0])
    incompatible = wire.encode_status("incompatible", field="bad-shape", detail="pi-2 cannot use it")
    with caplog.at_level("INFO", logger="edgegan.server"):
        for _ in range(3):
            reports.status(topics.status("demo", "pi-2"), incompatible)
        reports.status(topics.status("demo", "pi-3"), b"not json")
        reports.status(topics.status("demo", "pi-2"), wire.encode_status("online"))
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == ["device pi-2 cannot take part: pi-2 cannot use it"]
    assert "device pi-2 takes part again" in caplog.text
    assert reports.ever_incompatible == {"pi-2": "bad-shape"} and reports.incompatible == {}
    assert reports.unreadable == 1
    for round_index in range(3):
        reports.published(round_index)
        now[0] += 0.2
        reports.answered("pi-0", round_index)
        now[0] += 0.6
        reports.answered("pi-1", round_index)
        reports.round_took(1.0)
    assert reports.slowest() == "slowest device pi-1: 0.80 s per update, 80% of a 1.00 s round"
    assert reports.slowest() == ""  # a new window
