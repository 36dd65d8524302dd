"""Every wait has an end: a process that never reaches its broker says why in one line and exits 1 (closed
port, TLS to a plain listener, a name that does not resolve), while a client that has connected once
retries a lost broker for as long as it takes. Real sockets, a real Mosquitto."""

import asyncio
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from edgegan.cli import app
from edgegan.devtools.mosquitto import Mosquitto, mosquitto_installed
from edgegan.runtime.connection import FIRST_CONNECT_S, BrokerAddress, BrokerUnreachable, run_connected
from edgegan.runtime.ports import free_port

SMALL = ["--dataset", "ring8", "--partition", "shards:4", "--width", "32", "--latent-dim", "8"]
needs_mosquitto = pytest.mark.skipif(not mosquitto_installed(), reason="mosquitto is not installed")
runner = CliRunner()


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgegan", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def error_line(process: subprocess.Popen, within_s: float) -> tuple[str, float]:
    """The one `error:` line of a process that must exit 1 within `within_s`, and how long it took."""
    started = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(
            f"still running after {within_s} s: {process.communicate()[1][-2000:]}"
        ) from None
    assert process.returncode == 1, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0], time.monotonic() - started


def test_the_first_connection_gives_up_within_20_s_by_default():
    assert 0 < FIRST_CONNECT_S <= 20


def test_server_and_device_against_a_closed_port_exit_within_30_s_naming_the_broker_and_refused():
    port = free_port()
    broker = f"mqtt://127.0.0.1:{port}"
    # Shorter than the default (20 s, counted once the process is up) to keep the suite fast.
    device = start("device", "--broker", broker, "--id", "pi-0", "--index", "0", "--of", "2",
                   "--connect-timeout-s", "5", *SMALL)  # fmt: skip
    server = start("server", "--broker", broker, "--devices", "2", "--rounds", "2", "--eval-every", "2",
                   "--out", "/nonexistent/never-written", "--connect-timeout-s", "2", *SMALL)  # fmt: skip
    for process in (server, device):
        line, _ = error_line(process, within_s=30)
        assert f"127.0.0.1:{port}" in line and "refused" in line, line


def test_an_aggregator_against_a_closed_port_exits_within_30_s_naming_the_broker_and_refused():
    port = free_port()
    aggregator = start("aggregator", "--name", "agg-0", "--broker", f"mqtt://127.0.0.1:{port}",
                       "--connect-timeout-s", "2", "--dataset", "ring8", "--width", "32")  # fmt: skip
    line, _ = error_line(aggregator, within_s=30)
    assert f"127.0.0.1:{port}" in line and "refused" in line, line


@needs_mosquitto
def test_mqtts_against_a_plain_listener_is_one_line_naming_tls(tmp_path):
    with Mosquitto(tmp_path) as plain:
        device = start("device", "--broker", f"mqtts://127.0.0.1:{plain.port}", "--id", "pi-0", "--index",
                       "0", "--of", "2", "--connect-timeout-s", "3", *SMALL)  # fmt: skip
        line, _ = error_line(device, within_s=30)
    assert f"127.0.0.1:{plain.port}" in line and "TLS" in line and "mqtt://" in line, line


def test_a_name_that_does_not_resolve_is_named():
    address = BrokerAddress(host="no-such-broker.invalid", port=1883, first_connect_s=1.0)

    async def session(client) -> None:
        raise AssertionError("connected to a name that does not exist")

    with pytest.raises(BrokerUnreachable, match="'no-such-broker.invalid' does not resolve"):
        asyncio.run(run_connected(address, "edgegan-test-unresolved", session, asyncio.Event()))


def test_a_listener_that_never_answers_ends_the_first_connection_at_its_deadline():
    silent = socket.create_server(("127.0.0.1", 0))  # accepts TCP (the backlog) and never sends a CONNACK
    address = BrokerAddress(host="127.0.0.1", port=silent.getsockname()[1], first_connect_s=1.5)

    async def session(client) -> None:
        raise AssertionError("connected to a listener that never answers")

    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnreachable, match="within 1.5 s: no answer"):
            asyncio.run(run_connected(address, "edgegan-test-silent", session, asyncio.Event()))
    finally:
        silent.close()
    assert time.monotonic() - started < 5  # the deadline, not the 10 s of one attempt


def test_edgegan_run_against_a_closed_port_prints_one_line_with_the_cause(tmp_path):
    port = free_port()
    result = runner.invoke(app, ["run", "--broker", f"mqtt://127.0.0.1:{port}", "--devices", "2", "--rounds",
                                 "2", "--out", str(tmp_path / "run"), *SMALL])  # fmt: skip
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"127.0.0.1:{port}" in errors[0] and "refused" in errors[0], errors[0]


@needs_mosquitto
def test_once_connected_a_lost_broker_is_retried_past_the_first_connection_timeout(tmp_path):
    mosquitto = Mosquitto(tmp_path).start()
    address = BrokerAddress(host="127.0.0.1", port=mosquitto.port, first_connect_s=1.0)
    sessions = []

    async def session(client) -> None:
        sessions.append(time.monotonic())
        if len(sessions) == 1:
            await asyncio.to_thread(mosquitto.stop)
            async for _ in client.messages:  # ends with the connection
                pass

    async def scenario() -> None:
        async def restart_later() -> None:
            await asyncio.sleep(3.0)  # three times the first connection's limit
            await asyncio.to_thread(mosquitto.start)

        async with asyncio.timeout(60), asyncio.TaskGroup() as group:
            group.create_task(restart_later())
            await run_connected(address, "edgegan-test-patient", session, asyncio.Event())

    try:
        asyncio.run(scenario())
    finally:
        mosquitto.stop()
    assert len(sessions) == 2 and sessions[1] - sessions[0] >= 3.0


def test_connect_timeout_s_must_be_positive():
    result = runner.invoke(app, ["device", "--id", "pi-0", "--index", "0", "--of", "1",
                                 "--connect-timeout-s", "0"])  # fmt: skip
    assert result.exit_code == 2 and "--connect-timeout-s" in result.stderr, result.output
