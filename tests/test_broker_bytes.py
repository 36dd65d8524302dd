"""summary.json's broker_bytes: the bytes Mosquitto itself counted for a run ($SYS/broker/bytes/received
and /sent), against the payload bytes the cost model charges; and what a broker without them gives."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from small_runs import finish

from edgegan.devtools.mosquitto import Mosquitto, mosquitto_installed
from edgegan.runtime.brokerbytes import BrokerByteCounter
from edgegan.runtime.connection import parse_broker
from edgegan.runtime.ports import free_port, wait_for_port

needs_mosquitto = pytest.mark.skipif(not mosquitto_installed(), reason="mosquitto is not installed")
TINY_MNIST = ["--dataset", "mnist", "--partition", "iid", "--width", "8", "--latent-dim", "16"]


def edgegan(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgegan", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
    )  # fmt: skip


def mqtt_run(url: str, out: Path, devices: int, rounds: int, *extra: str) -> dict:
    server = edgegan(
        "server", "--broker", url, "--run", "bytes", "--devices", str(devices), "--rounds", str(rounds),
        "--eval-every", str(rounds), "--deadline-s", "30", "--out", str(out), *TINY_MNIST, *extra,
    )  # fmt: skip
    agents = [
        edgegan("device", "--broker", url, "--run", "bytes", "--id", f"device-{index}", "--index", str(index),
                "--of", str(devices), *TINY_MNIST)
        for index in range(devices)
    ]  # fmt: skip
    finish(server)
    for agent in agents:
        finish(agent)
    return json.loads((out / "summary.json").read_text())


@needs_mosquitto
def test_mosquittos_sent_bytes_are_the_payload_bytes_within_5_percent_and_received_holds_each_global_once(
    tmp_path,
):
    devices, rounds = 2, 4
    with Mosquitto(tmp_path / "broker") as broker:  # broker/mosquitto-dev.conf: sys_interval 1
        # device-drawn fakes: one global model for all (server-drawn fakes: the next test)
        summary = mqtt_run(broker.url, tmp_path / "run", devices, rounds, "--fakes", "device")
    counted = summary["broker_bytes"]
    assert counted["source"] == "mosquitto $SYS"
    # Observed only once two publications followed the retained one: a short run may end before that.
    assert counted["sys_interval_s"] is None or 0.5 <= counted["sys_interval_s"] <= 3
    payload = summary["bytes_up"] + summary["bytes_down"]
    assert counted["payload_bytes"] == payload
    # Each payload the cost model charges is one delivery by the broker: updates to the server, each
    # device's copy of the global model. Headers, statuses, metrics and acks are the rest.
    assert counted["sent"] == pytest.approx(payload, rel=0.05)
    assert counted["sent"] >= payload
    # The broker reads the global model once per round (the server publishes it once), each update once.
    assert counted["received"] == pytest.approx(
        summary["bytes_up"] + summary["bytes_down"] / devices, rel=0.05
    )


@needs_mosquitto
def test_with_server_drawn_fakes_the_broker_reads_and_sends_each_work_message_once(tmp_path):
    with Mosquitto(tmp_path / "broker") as broker:  # broker/mosquitto-dev.conf: sys_interval 1
        summary = mqtt_run(broker.url, tmp_path / "run", 2, 3, "--fakes", "server")
    counted, payload = summary["broker_bytes"], summary["bytes_up"] + summary["bytes_down"]
    assert counted["sent"] == pytest.approx(payload, rel=0.05)
    assert counted["received"] == pytest.approx(payload, rel=0.05)


def test_the_embedded_broker_has_no_byte_counters_and_the_counter_says_so_without_failing():
    port = free_port()
    broker = subprocess.Popen(
        [sys.executable, "-m", "edgegan", "broker", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)

        async def count() -> tuple[dict | None, str | None]:
            async with BrokerByteCounter(parse_broker(f"mqtt://127.0.0.1:{port}"), "demo") as counter:
                return await counter.finish(), counter.unavailable

        counted, reason = asyncio.run(count())
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    assert counted is None and "no $SYS/broker/bytes/#" in reason and "amqtt" in reason
