"""Faults and bad input with real processes over a real Mosquitto: a matrix of malformed updates, a device
killed mid-run, the server killed and resumed, the broker restarted. Every run must end complete, with each
round once in its metrics and a finite model."""

import json
import math
import signal
import subprocess
import threading
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

import msgpack
import paho.mqtt.client as mqtt
import pytest
import torch
from test_runtime_mqtt import MOSQUITTO, SMALL, edgegan, finish, start_fleet

from edgegan import topics, wire
from edgegan.algorithms.health import failure_line
from edgegan.devtools.mosquitto import Mosquitto
from edgegan.runsetup import read_rows

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed")


def metric_rounds(out: Path) -> list[int]:
    # The server may be writing the file: read its complete rows only.
    return [int(row["round"]) for row in read_rows(out / "metrics.csv")]


def generator_is_finite(out: Path) -> bool:
    state = torch.load(out / "generator.pt", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(tensor).all()) for tensor in state.values())


class Watcher:
    """A plain MQTT client that records the run's messages (the dev broker is anonymous)."""

    def __init__(self, port: int, run: str, topics_to_watch: list[str]):
        self.messages: dict[str, list[bytes]] = {}
        self.arrived = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watcher-{time.time_ns()}")
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        for topic in topics_to_watch:
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def on_message(self, client, userdata, message) -> None:
        with self.arrived:
            self.messages.setdefault(message.topic, []).append(bytes(message.payload))
            self.arrived.notify_all()

    def wait_for(self, predicate, timeout_s: float = 180.0):
        deadline = time.monotonic() + timeout_s
        with self.arrived:
            while not (result := predicate(self.messages)):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"timed out; topics seen: {sorted(self.messages)}"
                self.arrived.wait(remaining)
        return result

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def open_round(seen: dict, model_topic: str) -> int:
    """The round the server is collecting: the global model, published every round, names it."""
    return wire.decode(seen[model_topic][-1]).round if seen.get(model_topic) else -1


def scaled_update(valid: wire.Envelope, device: str, round_index: int, scale: float) -> bytes:
    """A well-formed update for the open round whose weights are `valid`'s times `scale`."""
    return wire.encode(wire.Envelope(**{
        **valid.__dict__, "device": device, "round": round_index, "base_round": round_index,
        "tensors": {name: tensor * scale for name, tensor in valid.tensors.items()},
    }))  # fmt: skip


def repacked(payload: bytes, **changes) -> bytes:
    head = msgpack.unpackb(payload, raw=False)
    head.update(changes)
    return msgpack.packb(head, use_bin_type=True)


def with_body(payload: bytes, edit) -> bytes:
    """A valid fp32 update whose tensor map went through `edit(items)`."""
    head = msgpack.unpackb(payload, raw=False)
    items = msgpack.unpackb(head["tensors"], raw=False)
    edit(items)
    head["tensors"] = msgpack.packb(items, use_bin_type=True)
    return msgpack.packb(head, use_bin_type=True)


def malformed_matrix(valid: bytes, run: str) -> list[tuple[str, str, bytes]]:
    """(device topic level, expected reason, payload): 27 distinct bad updates built from a real one."""
    good = wire.decode(valid)
    first = sorted(good.tensors)[0]

    def envelope(**changes) -> bytes:
        fields = {**good.__dict__, "device": "eve", "sent_at": time.time(), **changes}
        return wire.encode(wire.Envelope(**fields))

    def tensors(edit) -> dict:
        copy = {name: tensor.clone() for name, tensor in good.tensors.items()}
        edit(copy)
        return copy

    eve = repacked(valid, device="eve")
    return [
        ("eve", "not-msgpack", b"\xc1\xc1 not msgpack"),
        ("eve", "not-msgpack", eve[: len(eve) // 2]),
        ("eve", "bad-envelope", msgpack.packb([1, 2, 3])),
        ("eve", "bad-envelope", repacked(eve, tensors=[1, 2])),
        ("eve", "bad-version", repacked(eve, v=99)),
        ("eve", "bad-kind", repacked(eve, kind="global")),
        ("eve", "bad-codec", repacked(eve, codec="fp99")),
        ("eve", "bad-compression", repacked(eve, codec="fp32+zstd")),
        ("eve", "bad-field", repacked(eve, samples=0)),
        ("eve", "bad-field", repacked(eve, samples=10**9)),
        ("eve", "bad-field", repacked(eve, sent_at=math.nan)),
        ("eve", "bad-field", repacked(eve, loss="low")),
        ("eve", "wrong-run", repacked(eve, run="another-run")),
        ("eve", "device-mismatch", repacked(valid)),  # device-0's update, sent on eve's topic
        ("mallory", "unknown-device", repacked(valid, device="mallory")),
        ("eve", "bad-names", envelope(tensors=tensors(lambda t: t.pop(first)))),
        ("eve", "bad-names", envelope(tensors=tensors(lambda t: t.update(extra=torch.zeros(2))))),
        (
            "eve",
            "bad-shape",
            envelope(tensors=tensors(lambda t: t.update({first: t[first].reshape(-1)[:1]}))),
        ),
        ("eve", "bad-dtype", with_body(eve, lambda items: items[first].update(dtype="complex"))),
        ("eve", "bad-tensor", with_body(eve, lambda items: items.update({first: "not a tensor"}))),
        ("eve", "non-finite", envelope(tensors=tensors(lambda t: t[first].view(-1)[0].fill_(math.nan)))),
        ("eve", "non-finite", envelope(tensors=tensors(lambda t: t[first].view(-1)[0].fill_(math.inf)))),
        ("eve", "oversized", eve + b"\x00" * 2_000_000),
        ("eve", "future-round", envelope(round=10**6, base_round=10**6)),
        # Sent until one is in time (IN_TIME; an update that is not is counted late, whatever else is wrong
        # with it): bound to no global model, or to one the server never published (runtime/trust.py); and
        # boosted weights, rejected by --max-update-norm.
        ("eve", "unbound", b""),
        ("eve", "unknown-global", b""),
        ("eve", "norm", b""),
    ]


def unbound(payload: bytes) -> bytes:
    head = msgpack.unpackb(payload, raw=False)
    head.pop("trained_on", None)
    return msgpack.packb(head, use_bin_type=True)


# The matrix's rows that must name the round being collected, each made for that round from a valid update.
IN_TIME = {
    "unbound": lambda boosted, current: unbound(scaled_update(boosted, "eve", current, 1.0)),
    "unknown-global": lambda boosted, current: repacked(
        scaled_update(boosted, "eve", current, 1.0), trained_on=b"\x00" * 32
    ),
    "norm": lambda boosted, current: scaled_update(boosted, "eve", current, 1e6),
}


def test_a_matrix_of_malformed_updates_is_rejected_and_counted_by_reason(broker, tmp_path):
    url, port = broker
    run, out = "matrix", tmp_path / "server"
    server, agents = start_fleet(url, run, out, devices=2, rounds=300, extra=(
        "--allow-devices", "device-0,device-1,eve", "--max-update-norm", "1000",
        # 26 rejections in the first rounds: above the default share, which would stop the run.
        "--max-rejected-fraction", "1"))  # fmt: skip
    # The global model is published every round (metrics only once a second): it says which round is open.
    watcher = Watcher(
        port, run, [topics.update(run, "device-0"), topics.metrics(run), topics.global_model(run)]
    )
    try:
        valid = watcher.wait_for(lambda seen: seen.get(topics.update(run, "device-0"), [None])[0])
        matrix = malformed_matrix(valid, run)
        sent = [(device, payload) for device, reason, payload in matrix if reason not in IN_TIME]
        assert len(matrix) >= 20 and len({payload for _, payload in sent}) == len(sent)
        for device, payload in sent:
            watcher.publish(topics.update(run, device), payload)

        def rejected(seen) -> dict:
            latest = seen.get(topics.metrics(run), [])
            return json.loads(latest[-1])["rejected"] if latest else {}

        # These must name the round being collected: each retried until one lands in time.
        boosted = wire.decode(valid)
        for reason, make in IN_TIME.items():
            for _ in range(200):
                watcher.wait_for(lambda seen: open_round(seen, topics.global_model(run)) >= 0)
                current = open_round(watcher.messages, topics.global_model(run))
                watcher.publish(topics.update(run, "eve"), make(boosted, current))  # late ones: counted late
                if rejected(watcher.messages).get(reason):  # metrics say so within a second
                    break
                time.sleep(0.02)
        # The replay: device-0's round-0 update again, once round 0 has closed (metrics come after a round).
        watcher.publish(topics.update(run, "device-0"), valid)
    finally:
        watcher.close()
    finish(server, timeout_s=300)
    for agent in agents:
        finish(agent)
    summary = json.loads((out / "summary.json").read_text())
    expected = Counter(reason for _, reason, _ in matrix)
    assert summary["rounds"] == 300 and metric_rounds(out) == list(range(301))
    got = summary["updates_rejected"]
    assert {reason: got.get(reason, 0) for reason in expected if reason not in IN_TIME} == {
        reason: count for reason, count in expected.items() if reason not in IN_TIME
    }, got
    assert all(got.get(reason, 0) >= 1 for reason in IN_TIME) and set(got) == set(expected), got
    assert summary["updates_late"] >= 1  # the replayed round-0 update
    assert summary["updates_by_device"]["eve"].get("accepted", 0) == 0
    assert summary["updates_accepted"] == 2 * 300
    assert generator_is_finite(out)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def test_a_device_killed_mid_run_is_marked_offline_and_rejoins_when_restarted(broker, tmp_path):
    url, port = broker
    run, out, rounds = "killdev", tmp_path / "server", 120
    server, agents = start_fleet(url, run, out, devices=3, rounds=rounds,
                                 extra=("--min-devices", "2", "--deadline-s", "2"))  # fmt: skip
    status, model = topics.status(run, "device-2"), topics.global_model(run)
    # The global model is published every round and names the open round (metrics come at most once a
    # second: on a fast machine the first after round 0 can be the last one).
    watcher = Watcher(port, run, [status, model])
    try:
        watcher.wait_for(lambda seen: open_round(seen, model) >= 10)
        kill(agents[2])
        # Its last will: the broker publishes "offline" for it once the connection is seen dead.
        watcher.wait_for(lambda seen: any(json.loads(m)["state"] == "offline" for m in seen.get(status, [])))
        killed_at = open_round(watcher.messages, model)
        # Rounds go on with the two others, each closed at the deadline.
        watcher.wait_for(lambda seen: open_round(seen, model) >= killed_at + 3)
        agents[2] = edgegan("device", "--broker", url, "--run", run, "--id", "device-2", "--index", "2",
                            "--of", "3", *SMALL)  # fmt: skip
        watcher.wait_for(lambda seen: json.loads(seen[status][-1])["state"] == "online")
    finally:
        watcher.close()
    finish(server, timeout_s=300)
    for agent in agents:
        finish(agent)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds and metric_rounds(out) == list(range(rounds + 1))
    accepted = {device: tally.get("accepted", 0) for device, tally in summary["updates_by_device"].items()}
    assert accepted["device-0"] == accepted["device-1"] == rounds
    assert killed_at - 1 <= accepted["device-2"] < rounds  # it missed rounds, then rejoined
    assert summary["updates_accepted"] == sum(accepted.values())
    assert generator_is_finite(out)


def test_a_killed_server_resumed_from_its_checkpoint_ends_with_the_uninterrupted_result(broker, tmp_path):
    url, port = broker
    run, out, rounds = "resume", tmp_path / "server", 60
    extra = ("--checkpoint-every", "5")
    server, agents = start_fleet(url, run, out, devices=2, rounds=rounds, extra=extra)
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "no checkpoint after 10 rounds"
        try:
            done = torch.load(out / "checkpoint.pt", weights_only=True)["rounds_done"]
        except (FileNotFoundError, RuntimeError, EOFError):
            done = 0
        if done >= 10:
            break
        time.sleep(0.1)
    kill(server)
    resumed_at = torch.load(out / "checkpoint.pt", weights_only=True)["rounds_done"]
    server = edgegan(
        "server", "--broker", url, "--run", run, "--devices", "2", "--rounds", str(rounds), "--eval-every",
        str(rounds), "--deadline-s", "30", "--out", str(out), *SMALL, *extra, "--resume",
    )  # fmt: skip
    finish(server, timeout_s=200)  # under the 300 s test timeout, so a hang shows its log
    for agent in agents:
        finish(agent)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] == resumed_at >= 10
    assert summary["rounds"] == rounds and metric_rounds(out) == list(range(rounds + 1))
    assert summary["updates_accepted"] == 2 * rounds  # no round lost, none counted twice
    # Sync with a full quorum is deterministic: the resumed run ends where an uninterrupted one does.
    simulated = tmp_path / "sim"
    finish(edgegan("simulate", "--algo", "serial", "--devices", "2", "--rounds", str(rounds), "--eval-every",
                   str(rounds), "--out", str(simulated), *SMALL))  # fmt: skip
    resumed = torch.load(out / "generator.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(simulated / "generator.pt", weights_only=True)["state_dict"]
    for name, tensor in uninterrupted.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6, rtol=0), name


def test_every_client_reconnects_after_a_broker_restart_and_the_run_completes(tmp_path):
    mosquitto = Mosquitto(tmp_path).start()  # restarted below on the same port, from the same config
    url, run, out, rounds = mosquitto.url, "restart", tmp_path / "server", 80
    server, agents = start_fleet(url, run, out, devices=2, rounds=rounds)
    try:
        deadline = time.monotonic() + 120
        while len(metric_rounds(out)) < 15:
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.1)
        mosquitto.stop()
        time.sleep(2)
        mosquitto.start()
        finish(server, timeout_s=300)
        for agent in agents:
            finish(agent)
    finally:
        mosquitto.stop()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds and metric_rounds(out) == list(range(rounds + 1))
    assert summary["updates_accepted"] == 2 * rounds
    assert generator_is_finite(out)


def test_status_and_metrics_are_paced_so_fast_rounds_do_not_flood_the_broker(broker, tmp_path):
    """A device reports at most every --status-interval and the server every second (plus each evaluation
    and the last round): at hundreds of rounds a second, one message per round would outweigh the round."""
    url, port = broker
    run, out, rounds = "paced", tmp_path / "server", 400
    watcher = Watcher(port, run, [topics.status(run, "device-0"), topics.metrics(run)])
    try:
        server = edgegan("server", "--broker", url, "--run", run, "--devices", "1", "--rounds", str(rounds),
                         "--eval-every", "200", "--out", str(out), *SMALL)  # fmt: skip
        device = edgegan("device", "--broker", url, "--run", run, "--id", "device-0", "--index", "0",
                         "--of", "1", "--status-interval", "0.5", *SMALL)  # fmt: skip
        finish(server)
        finish(device)
        status = topics.status(run, "device-0")
        watcher.wait_for(lambda seen: json.loads(seen[status][-1])["state"] == "offline")
    finally:
        watcher.close()
    metrics = [json.loads(m) for m in watcher.messages[topics.metrics(run)]]
    statuses = [json.loads(m) for m in watcher.messages[topics.status(run, "device-0")]]
    wall_s = metrics[-1]["wall_time_s"]
    assert [m["round"] for m in metrics if m["quality_round"] == m["round"]] == [200, 400]  # evaluations
    assert metrics[-1]["round"] == rounds and len(metrics) <= wall_s / 1.0 + 4 < rounds
    gaps = [b["wall_time_s"] - a["wall_time_s"] for a, b in pairwise(metrics) if b["round"] % 200]
    assert all(gap >= 0.9 for gap in gaps), gaps
    training = [s for s in statuses if s["state"] == "online" and s["round"] >= 0]
    assert 1 <= len(training) <= wall_s / 0.5 + 2
    assert all(b["time"] - a["time"] >= 0.45 for a, b in pairwise(training))
    assert statuses[-1]["updates_sent"] == rounds  # the final (offline) status still carries every count


def test_a_gan_that_diverges_stops_the_run_and_keeps_the_last_finite_checkpoint(broker, tmp_path):
    # An allowed device's update that is huge but finite passes validation (--max-update-norm 0), the mean
    # takes it in and the generator step against that discriminator overflows.
    url, port = broker
    run, out, rounds = "boom", tmp_path / "server", 2000
    server, agents = start_fleet(url, run, out, devices=2, rounds=rounds, extra=(
        "--allow-devices", "device-0,device-1,eve", "--checkpoint-every", "5", "--max-update-norm", "0",
        "--max-rejected-fraction", "1"))  # fmt: skip
    model = topics.global_model(run)
    watcher = Watcher(port, run, [topics.update(run, "device-0"), model])
    try:
        update = topics.update(run, "device-0")
        valid = wire.decode(watcher.wait_for(lambda seen: seen.get(update, [None])[0]))
        # Past round 10, so that a checkpoint of a finite model exists.
        watcher.wait_for(lambda seen: open_round(seen, model) >= 12)
        while server.poll() is None:
            current = open_round(watcher.messages, model)
            watcher.publish(topics.update(run, "eve"), scaled_update(valid, "eve", current, 1e30))
            time.sleep(0.02)
    finally:
        watcher.close()
    output = finish(server, code=3)
    for agent in agents:
        finish(agent)  # the server's "stop" ends them
    summary = json.loads((out / "summary.json").read_text())
    diverged_at = summary["diverged_at_round"]
    assert diverged_at is not None and summary["rounds"] == diverged_at < rounds
    assert "diverged in round" in output and metric_rounds(out)[-1] == diverged_at
    reason = "the global model diverged (non-finite weights)"
    assert summary["failure"] == {"reason": reason, "round": diverged_at}
    assert output.rstrip().splitlines()[-1] == f"error: {failure_line(summary['failure'])}"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["rounds_done"] < diverged_at
    assert all(bool(torch.isfinite(tensor).all()) for tensor in checkpoint["generator"].values())


def test_with_defaults_a_x100_device_is_rejected_and_a_run_rejecting_half_exits_3_without_waiting(
    broker, tmp_path
):
    """Over Mosquitto, with the default bound (auto) and --max-rejected-fraction: eve, the second of two
    devices, sends device-0's update x100 for every round. Each is rejected (norm) from the first; from
    the second round (in the first, eve is a name new to the server: admission.Reporters) each round
    closes once both have reported, with no wait for the deadline (10 s); after the warm-up (20 rounds)
    50% rejected stops the run: exit code 3, one line, the checkpoint of that round and `failure` in
    summary.json."""
    url, port = broker
    run, out = "attacked", tmp_path / "server"
    server = edgegan("server", "--broker", url, "--run", run, "--devices", "2", "--rounds", "300",
                     "--eval-every", "300", "--deadline-s", "10", "--out", str(out), *SMALL)  # fmt: skip
    device = edgegan("device", "--broker", url, "--run", run, "--id", "device-0", "--index", "0", "--of", "2",
                     *SMALL)  # fmt: skip
    model = topics.global_model(run)
    watcher = Watcher(port, run, [topics.update(run, "device-0"), model])
    started = time.monotonic()
    try:
        update = topics.update(run, "device-0")
        valid = wire.decode(watcher.wait_for(lambda seen: seen.get(update, [None])[0]))
        sent = -1
        while server.poll() is None and time.monotonic() - started < 120:
            current = open_round(watcher.messages, model)
            if current > sent:  # one update per round, as a device sends
                watcher.publish(topics.update(run, "eve"), scaled_update(valid, "eve", current, 100.0))
                sent = current
            time.sleep(0.01)
    finally:
        watcher.close()
    output = finish(server, timeout_s=60, code=3)
    finish(device)  # the server's "stop" ends it
    assert time.monotonic() - started < 120  # 20 rounds waiting for their 10 s deadline would take 200 s
    summary = json.loads((out / "summary.json").read_text())
    failure = summary["failure"]
    assert failure["reason"] == "50% of updates rejected (> 25%, --max-rejected-fraction)"
    assert failure["round"] == summary["rounds"] >= 20 and summary["diverged_at_round"] is None
    line = f"error: run stopped at round {failure['round']}: {failure['reason']}"
    assert output.rstrip().splitlines()[-1] == line
    assert summary["updates_by_device"]["eve"] == {"rejected": failure["round"]}
    assert summary["updates_rejected"] == {"norm": failure["round"]}
    assert torch.load(out / "checkpoint.pt", weights_only=True)["rounds_done"] == failure["round"]
    assert generator_is_finite(out)


def test_junk_under_a_stranger_name_closes_no_round_before_the_honest_devices_reported(broker, tmp_path):
    """With no allow-list, eve (a third name in a fleet of 2) sends x100 updates for every round: each is
    rejected, and none closes a round early, so both honest devices' updates count in every round."""
    url, port = broker
    run, out, rounds = "stranger", tmp_path / "server", 40
    extra = ("--max-rejected-fraction", "1")  # eve's junk is a third of the arrivals
    server, agents = start_fleet(url, run, out, devices=2, rounds=rounds, extra=extra)
    model, update = topics.global_model(run), topics.update(run, "device-0")
    watcher = Watcher(port, run, [update, model])
    try:
        valid = wire.decode(watcher.wait_for(lambda seen: seen.get(update, [None])[0]))
        sent = -1
        while server.poll() is None:
            current = open_round(watcher.messages, model)
            if current > sent:
                watcher.publish(topics.update(run, "eve"), scaled_update(valid, "eve", current, 100.0))
                sent = current
            time.sleep(0.005)
    finally:
        watcher.close()
    finish(server, timeout_s=60)
    for agent in agents:
        finish(agent)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates_rejected"].get("norm", 0) >= 1, summary["updates_rejected"]
    assert summary["updates_accepted"] == 2 * rounds


def wait_until(predicate, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM) -> str:
    """Sends `signum` (as `systemctl stop` does SIGTERM) and returns the output; it must exit as stopped."""
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return output


def test_a_server_stopped_with_sigterm_mid_run_saves_its_last_round_and_resumes_to_the_uninterrupted_result(
    broker, tmp_path
):
    url, port = broker
    run, out, rounds = "sigterm", tmp_path / "server", 150
    extra = ("--checkpoint-every", "1000")  # no checkpoint but the one the stop writes
    server, agents = start_fleet(url, run, out, devices=2, rounds=rounds, extra=extra)
    wait_until(lambda: len(metric_rounds(out)) > 10, "the run did not get going")
    assert not (out / "checkpoint.pt").exists()
    output = stop(server)
    for agent in agents:
        finish(agent)  # the server's "stop" ends them
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = checkpoint["rounds_done"]
    assert f"stopped by SIGTERM after round {stopped_at} of {rounds}" in output
    assert summary["stopped_at_round"] == summary["rounds"] == stopped_at and 10 <= stopped_at < rounds
    assert summary["stopped_by"] == "SIGTERM"
    # The round it was collecting is not counted: metrics, counters and generator end at the last completed.
    assert metric_rounds(out) == list(range(stopped_at + 1))
    assert summary["updates_accepted"] == 2 * stopped_at
    generator = torch.load(out / "generator.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(generator[name], tensor) for name, tensor in checkpoint["generator"].items())
    finish(edgegan("sample", str(out / "checkpoint.pt"), "--n", "50", "--out", str(tmp_path / "mid.png")))
    assert (tmp_path / "mid.png").is_file()

    # The retained "stop" is cleared by the resumed server before devices may join (else they would leave).
    watcher = Watcher(port, run, [topics.control(run)])
    try:
        server = edgegan(
            "server", "--broker", url, "--run", run, "--devices", "2", "--rounds", str(rounds),
            "--eval-every", str(rounds), "--deadline-s", "30", "--out", str(out), *SMALL, *extra, "--resume",
        )  # fmt: skip
        watcher.wait_for(lambda seen: b"" in seen.get(topics.control(run), []))
    finally:
        watcher.close()
    agents = [
        edgegan("device", "--broker", url, "--run", run, "--id", f"device-{index}", "--index", str(index),
                "--of", "2", *SMALL)
        for index in range(2)
    ]  # fmt: skip
    finish(server, timeout_s=200)  # under the 300 s test timeout, so a hang shows its log
    for agent in agents:
        finish(agent)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] == stopped_at and summary["stopped_at_round"] is None
    assert summary["rounds"] == rounds and metric_rounds(out) == list(range(rounds + 1))
    assert summary["updates_accepted"] == 2 * rounds
    simulated = tmp_path / "sim"
    finish(edgegan("simulate", "--algo", "serial", "--devices", "2", "--rounds", str(rounds), "--eval-every",
                   str(rounds), "--out", str(simulated), *SMALL))  # fmt: skip
    resumed = torch.load(out / "generator.pt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(simulated / "generator.pt", weights_only=True)["state_dict"]
    for name, tensor in uninterrupted.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6, rtol=0), name


def test_a_server_stopped_before_its_first_round_leaves_round_0_to_resume_from(broker, tmp_path):
    url, port = broker
    run, out = "early", tmp_path / "server"
    # No device yet: round 0 cannot complete.
    server = edgegan("server", "--broker", url, "--run", run, "--devices", "1", "--rounds", "3",
                     "--eval-every", "3", "--out", str(out), *SMALL)  # fmt: skip
    wait_until(lambda: metric_rounds(out) == [0], "the server did not start")
    output = stop(server, signal.SIGINT)
    assert "stopped by SIGINT after round 0 of 3" in output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["rounds_done"] == 0
    assert json.loads((out / "summary.json").read_text())["stopped_at_round"] == 0
    finish(edgegan("sample", str(out / "checkpoint.pt"), "--n", "20", "--out", str(tmp_path / "early.png")))
    server = edgegan("server", "--broker", url, "--run", run, "--devices", "1", "--rounds", "3",
                     "--eval-every", "3", "--out", str(out), *SMALL, "--resume")  # fmt: skip
    watcher = Watcher(port, run, [topics.control(run)])
    try:
        watcher.wait_for(lambda seen: b"" in seen.get(topics.control(run), []))
    finally:
        watcher.close()
    device = edgegan("device", "--broker", url, "--run", run, "--id", "device-0", "--index", "0", "--of", "1",
                     *SMALL)  # fmt: skip
    finish(server)
    finish(device)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] == 0 and summary["rounds"] == 3
    assert metric_rounds(out) == [0, 1, 2, 3]  # round 0's row once, not again on resuming


def test_a_device_stopped_with_sigterm_says_offline_and_exits_cleanly(broker, tmp_path):
    url, port = broker
    run = "devstop"
    status = topics.status(run, "device-0")
    watcher = Watcher(port, run, [status])
    try:
        device = edgegan("device", "--broker", url, "--run", run, "--id", "device-0", "--index", "0",
                         "--of", "1", *SMALL)  # fmt: skip
        # No server yet: the device waits for its run's configuration, and a stop ends the wait too.
        watcher.wait_for(lambda seen: any(json.loads(m)["state"] == "waiting" for m in seen.get(status, [])))
        output = stop(device)
        assert "device device-0 stopped by SIGTERM" in output
        watcher.wait_for(lambda seen: json.loads(seen[status][-1])["state"] == "offline", timeout_s=10)
    finally:
        watcher.close()
