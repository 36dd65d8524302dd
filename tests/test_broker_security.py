"""Broker security as shipped: broker/mosquitto.conf and broker/acl, with logins and certificates made by
`edgegan broker add-device/add-server` and `edgegan certs`, against a real Mosquitto and the embedded
broker. Only ports and file paths of the shipped files are rewritten."""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from typer.testing import CliRunner

from edgegan import topics
from edgegan.cli import app
from edgegan.devtools.mosquitto import MOSQUITTO
from edgegan.runtime import credentials
from edgegan.runtime.broker import BrokerSecurity, check_security
from edgegan.runtime.broker_audit import AuditLog
from edgegan.runtime.brokerbytes import BrokerByteCounter
from edgegan.runtime.connection import (
    PASSWORD_ENV,
    BrokerAddress,
    LoginRefused,
    mqtt_client,
    parse_broker,
    with_login,
)
from edgegan.runtime.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--dataset", "ring8", "--partition", "shards:4", "--width", "32", "--latent-dim", "8"]
needs_mosquitto = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed")
runner = CliRunner()


def edgegan(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


@dataclass
class Config:
    """A broker configuration folder in the shipped layout (what Docker mounts as /mosquitto/config)."""

    folder: Path
    secrets: Path

    def secret(self, name: str) -> str:
        return (self.secrets / f"{name}.password").read_text().strip()

    def login(self, port: int, name: str | None, tls: bool = False, password: str | None = None):
        address = BrokerAddress(host="127.0.0.1", port=port, tls=tls, tls_ca=self.folder / "certs" / "ca.crt")
        if name is None:
            return address
        return BrokerAddress(
            host=address.host,
            port=port,
            tls=tls,
            username=name,
            password=password or self.secret(name),
            tls_ca=address.tls_ca,
        )


@pytest.fixture
def config():
    """broker/acl as shipped, and logins and certificates made by edgegan's own commands. The folder lives
    in a world-traversable temporary directory: Mosquitto started as root reads it as `mosquitto`."""
    folder = Path(tempfile.mkdtemp(prefix="edgegan-broker-"))
    folder.chmod(0o755)
    secrets = folder.parent / f"{folder.name}-secrets"
    try:
        shutil.copy(ROOT / "broker" / "acl", folder / "acl")
        (folder / "acl").chmod(0o600)
        common = [
            "--passwd",
            str(folder / "passwd"),
            "--acl",
            str(folder / "acl"),
            "--secrets-dir",
            str(secrets),
        ]
        edgegan("broker", "add-server", "server", *common)
        for name in ("device-0", "device-1"):
            edgegan("broker", "add-device", name, *common)
        edgegan(
            "certs", "--out", str(folder / "certs"), "--hosts", "127.0.0.1,localhost", "--client", "fleet"
        )
        yield Config(folder, secrets)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(secrets, ignore_errors=True)


def hand_to_broker_user(*paths: Path) -> None:
    """What a deployment does (and the Docker image's entrypoint): the broker's user owns its files."""
    if os.geteuid() != 0:
        return  # Mosquitto started by a user keeps that user
    try:
        account = pwd.getpwnam("mosquitto")
    except KeyError:
        return  # no such user to hand the files to
    for path in paths:
        for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.chown(item, account.pw_uid, account.pw_gid)


@dataclass
class RunningBroker:
    plain_port: int
    tls_port: int | None  # the boards' listener (a client's id is its login)
    process: subprocess.Popen
    servers_port: int | None = None  # the servers' listener (server logins only, ids free)


def shipped_mosquitto_config(config: Config, plain_port: int, tls_port: int, servers_port: int) -> str:
    shipped = (ROOT / "broker" / "mosquitto.conf").read_text()
    rewrites = {
        "/mosquitto/config/": f"{config.folder}/",
        "/mosquitto/data/": f"{config.folder}/data/",
        "listener 1883 127.0.0.1\n": f"listener {plain_port} 127.0.0.1\n",
        "listener 8883\n": f"listener {tls_port} 127.0.0.1\n",  # the tests stay on loopback
        "listener 8884\n": f"listener {servers_port} 127.0.0.1\n",
    }
    for shipped_text, test_text in rewrites.items():
        assert shipped_text in shipped, shipped_text
        shipped = shipped.replace(shipped_text, test_text)
    return shipped


@pytest.fixture
def mosquitto(config):
    """Mosquitto started from broker/mosquitto.conf as shipped, but for ports and file paths."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    plain_port, tls_port, servers_port = free_port(), free_port(), free_port()
    (config.folder / "data").mkdir()
    path = config.folder / "mosquitto.conf"
    path.write_text(shipped_mosquitto_config(config, plain_port, tls_port, servers_port))
    hand_to_broker_user(config.folder / "passwd", config.folder / "passwd.servers", config.folder / "acl",
                        config.folder / "certs", config.folder / "data")  # fmt: skip
    process = subprocess.Popen([MOSQUITTO, "-c", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(plain_port)
        wait_for_port(tls_port)
        wait_for_port(servers_port)
        yield RunningBroker(plain_port, tls_port, process, servers_port)
    finally:
        process.terminate()
        process.wait(timeout=10)


def start_embedded(config: Config, *flags: str) -> tuple[int, subprocess.Popen]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "edgegan", "broker", "start", "--port", str(port), "--log-level", "warning",
         "--passwd", str(config.folder / "passwd"), "--acl", str(config.folder / "acl"), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(port)
    except TimeoutError:
        process.kill()
        raise AssertionError(process.communicate()[0].decode()[-2000:]) from None
    return port, process


@pytest.fixture
def embedded(config):
    """The embedded broker with the same password file and ACL."""
    port, process = start_embedded(config)
    try:
        yield RunningBroker(port, None, process)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(params=["mosquitto", "embedded"])
def secured(request, config):
    return request.getfixturevalue(request.param), config


async def receive_until(client, last_topic: str, timeout_s: float = 10.0) -> list[tuple[str, bytes]]:
    """Messages in arrival order, up to and including the first on `last_topic`."""
    received = []
    async with asyncio.timeout(timeout_s):
        async for message in client.messages:
            received.append((message.topic.value, bytes(message.payload)))
            if message.topic.value == last_topic:
                return received
    return received


@needs_mosquitto
def test_the_shipped_config_starts_mosquitto_with_both_listeners(mosquitto):
    assert mosquitto.process.poll() is None


def test_anonymous_clients_and_wrong_passwords_are_refused(secured):
    broker, config = secured

    async def attempt(address: BrokerAddress) -> None:
        async with mqtt_client(address, "edgegan-test-stranger"):
            pass

    with pytest.raises(LoginRefused, match="anonymous"):
        asyncio.run(attempt(config.login(broker.plain_port, None)))
    with pytest.raises(LoginRefused, match="device-0"):
        asyncio.run(attempt(config.login(broker.plain_port, "device-0", password="not-the-password")))
    if broker.tls_port is not None:
        with pytest.raises(LoginRefused, match="anonymous"):
            asyncio.run(attempt(config.login(broker.tls_port, None, tls=True)))


def test_a_device_can_neither_forge_another_devices_update_nor_the_global_model(secured):
    broker, config = secured
    port, run = broker.plain_port, "acl"

    async def scenario():
        async with (
            mqtt_client(config.login(port, "server"), "edgegan-test-server") as server,
            mqtt_client(config.login(port, "device-0"), "edgegan-test-device-0") as device,
            mqtt_client(config.login(port, "device-1"), "edgegan-test-device-1") as other,
        ):
            await server.subscribe(topics.all_updates(run), qos=1)
            await other.subscribe(topics.global_model(run), qos=1)
            await other.subscribe(topics.all_updates(run), qos=1)  # not its to read
            # Denied publishes are acknowledged and dropped, so only what arrives tells.
            await device.publish(topics.update(run, "device-1"), b"forged update", qos=1)
            await device.publish(topics.global_model(run), b"forged global", qos=1)
            await device.publish(topics.update(run, "device-0"), b"own update", qos=1)
            await server.publish(topics.global_model(run), b"global", qos=1)
            return (
                await receive_until(server, topics.update(run, "device-0")),
                await receive_until(other, topics.global_model(run)),
            )

    at_server, at_other_device = asyncio.run(scenario())
    assert at_server == [(topics.update(run, "device-0"), b"own update")]
    assert at_other_device == [(topics.global_model(run), b"global")]


def test_a_device_does_not_see_other_devices_retained_statuses(secured):
    broker, config = secured
    port, run = broker.plain_port, "retained"

    async def scenario():
        async with mqtt_client(config.login(port, "server"), "edgegan-test-server") as server:
            await server.subscribe(topics.all_statuses(run), qos=1)  # amqtt replays retained by these
            async with mqtt_client(config.login(port, "device-0"), "edgegan-test-device-0") as device:
                await device.publish(
                    topics.status(run, "device-0"), b'{"state": "online"}', qos=1, retain=True
                )
            await server.publish(topics.control(run), b"", qos=1, retain=True)
            await server.publish(topics.global_model(run), b"global", qos=1, retain=True)
            async with mqtt_client(config.login(port, "device-1"), "edgegan-test-device-1") as other:
                await other.subscribe(topics.all_statuses(run), qos=1)
                await other.subscribe(topics.global_model(run), qos=1)
                received = await receive_until(other, topics.global_model(run))
                try:  # anything still on its way
                    received += await receive_until(other, "never", timeout_s=1.0)
                except TimeoutError:
                    pass
            return received, await receive_until(server, topics.status(run, "device-0"))

    at_other_device, at_server = asyncio.run(scenario())
    assert at_other_device == [(topics.global_model(run), b"global")]
    assert at_server[-1] == (topics.status(run, "device-0"), b'{"state": "online"}')


@needs_mosquitto
def test_a_short_run_over_tls_with_logins_completes_and_prints_no_password(mosquitto, config, tmp_path):
    out = tmp_path / "run"
    certs = config.folder / "certs"
    process = subprocess.run(
        [sys.executable, "-m", "edgegan", "run", "--broker", f"mqtts://127.0.0.1:{mosquitto.servers_port}",
         "--device-broker", f"mqtts://127.0.0.1:{mosquitto.tls_port}", "--tls-ca", str(certs / "ca.crt"),
         "--tls-cert", str(certs / "fleet.crt"),
         "--tls-key", str(certs / "fleet.key"), "--username", "server",
         "--password-file", str(config.secrets / "server.password"), "--device-secrets", str(config.secrets),
         "--devices", "2", "--rounds", "4", "--eval-every", "4", "--run", "tls", "--out", str(out), *SMALL],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["updates_accepted"] == 8
    assert summary["broker"] == f"mqtts://127.0.0.1:{mosquitto.servers_port}"
    assert summary["device_exit_codes"] == [0, 0]
    everything = output + "".join(
        path.read_text() for path in out.rglob("*") if path.suffix in (".log", ".json")
    )
    for name in ("server", "device-0", "device-1"):
        assert config.secret(name) not in everything


@needs_mosquitto
def test_a_device_with_a_wrong_password_stops_with_an_error_naming_its_login(mosquitto, config, tmp_path):
    wrong = tmp_path / "wrong.password"
    credentials.write_secret(wrong, "not-the-password")
    process = subprocess.run(
        [sys.executable, "-m", "edgegan", "device", "--broker", f"mqtt://127.0.0.1:{mosquitto.plain_port}",
         "--username", "device-0", "--password-file", str(wrong), "--index", "0", "--of", "2",
         "--log-level", "debug", *SMALL],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert process.returncode == 1, process.stdout + process.stderr
    assert "refused the login 'device-0'" in process.stderr
    assert "not-the-password" not in process.stdout + process.stderr


@needs_mosquitto
def test_a_server_with_a_wrong_password_exits_at_once_with_one_line_naming_its_login(mosquitto, tmp_path):
    wrong = tmp_path / "wrong.password"
    credentials.write_secret(wrong, "not-the-password")
    process = subprocess.run(
        [sys.executable, "-m", "edgegan", "server", "--broker", f"mqtt://127.0.0.1:{mosquitto.plain_port}",
         "--username", "server", "--password-file", str(wrong), "--devices", "2", "--rounds", "2",
         "--out", str(tmp_path / "server"), *SMALL],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert process.returncode == 1, process.stdout + process.stderr
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, process.stderr
    assert f"127.0.0.1:{mosquitto.plain_port} refused the login 'server'" in errors[0], errors[0]
    assert "not-the-password" not in process.stdout + process.stderr


@needs_mosquitto
def test_rotating_a_password_disconnects_and_locks_out_the_old_one_after_a_reload(mosquitto, config):
    port, old = mosquitto.plain_port, config.secret("device-0")
    common = ["--passwd", str(config.folder / "passwd"), "--acl", str(config.folder / "acl"),
              "--secrets-dir", str(config.secrets)]  # fmt: skip

    async def rotate_while_connected() -> bool:
        async with mqtt_client(config.login(port, "device-0"), "edgegan-test-rotate") as connected:
            await connected.subscribe(topics.global_model("rotate"), qos=1)
            result = edgegan("broker", "add-device", "device-0", *common)  # blocks the loop a moment
            assert "new password for device" in result.output
            assert config.secret("device-0") not in result.output
            mosquitto.process.send_signal(signal.SIGHUP)
            try:
                async with asyncio.timeout(5):
                    async for _ in connected.messages:
                        pass
            except aiomqtt.MqttError:
                return True  # the broker dropped the connection that used the old password
            return False

    assert asyncio.run(rotate_while_connected())
    new = config.secret("device-0")
    assert new != old

    async def attempt(password: str) -> None:
        async with mqtt_client(config.login(port, "device-0", password=password), "edgegan-test-rotate"):
            pass

    with pytest.raises(LoginRefused):
        asyncio.run(attempt(old))
    asyncio.run(attempt(new))


def test_the_embedded_broker_serves_tls_with_the_generated_certificates(config):
    certs = config.folder / "certs"
    port, process = start_embedded(
        config, "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key")
    )

    async def attempt(address: BrokerAddress) -> None:
        async with mqtt_client(address, "edgegan-test-tls") as client:
            await client.publish(topics.status("tls", "device-0"), b"{}", qos=1)

    try:
        asyncio.run(attempt(config.login(port, "device-0", tls=True)))
        with pytest.raises(LoginRefused, match="anonymous"):
            asyncio.run(attempt(config.login(port, None, tls=True)))
    finally:
        process.terminate()
        process.wait(timeout=10)


@needs_mosquitto
def test_the_server_login_reads_mosquittos_byte_counters_and_a_device_login_does_not(mosquitto, config):
    async def first_reading(name: str):
        async with BrokerByteCounter(config.login(mosquitto.plain_port, name), "acl") as counter:
            return (
                counter.start,
                (await counter.finish() if counter.start is None else None),
                counter.unavailable,
            )

    server_start, _, _ = asyncio.run(first_reading("server"))
    device_start, device_counted, reason = asyncio.run(first_reading("device-0"))
    assert server_start is not None  # the retained pair (0 and 0 on a broker just started)
    assert device_start is None and device_counted is None and "ACL" in reason


def test_the_shipped_acl_grants_exactly_what_topics_says_each_role_may_do():
    acl = credentials.read_acl(ROOT / "broker" / "acl")
    assert [(rule.access, rule.topic) for rule in acl.patterns] == topics.access_rules("device")
    assert [(rule.access, rule.topic) for rule in acl.users["server"]] == topics.access_rules("server")
    assert acl.anonymous == []
    assert acl.allows("pi-0", "c", topics.update("demo", "pi-0"), "write")
    assert not acl.allows("pi-0", "c", topics.update("demo", "pi-1"), "write")
    assert not acl.allows("pi-0", "c", topics.global_model("demo"), "write")
    assert not acl.allows("pi-0", "c", topics.status("demo", "pi-1"), "read")
    assert acl.allows("server", "c", topics.global_model("demo"), "write")
    assert acl.allows("server", "c", topics.BROKER_BYTES_SENT, "read")
    assert not acl.allows("pi-0", "c", topics.BROKER_BYTES_SENT, "read")
    # As in Mosquitto, patterns without %u apply to anonymous clients too; the config refuses those.
    assert not acl.allows(None, "c", topics.update("demo", "pi-0"), "write")


def test_the_shipped_config_turns_anonymous_access_off_and_plain_mqtt_stays_on_loopback():
    lines = [line.split() for line in (ROOT / "broker" / "mosquitto.conf").read_text().splitlines()]
    options = [line for line in lines if line and not line[0].startswith("#")]
    assert ["per_listener_settings", "true"] in options
    starts = [index for index, line in enumerate(options) if line[0] == "listener"]
    sections = [options[start:end] for start, end in zip(starts, [*starts[1:], len(options)], strict=True)]
    assert [section[0] for section in sections] == [
        ["listener", "1883", "127.0.0.1"], ["listener", "8883"], ["listener", "8884"]
    ]  # fmt: skip
    for section, logins in zip(sections, ("passwd", "passwd", "passwd.servers"), strict=True):
        assert ["allow_anonymous", "false"] in section and ["acl_file", "/mosquitto/config/acl"] in section
        assert ["password_file", f"/mosquitto/config/{logins}"] in section
    boards, servers = sections[1], sections[2]
    assert ["use_username_as_clientid", "true"] in boards
    assert ["use_username_as_clientid", "true"] not in servers
    for tls in (boards, servers):
        assert {"cafile", "certfile", "keyfile"} <= {line[0] for line in tls}


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd is not installed")
def test_password_hashes_are_mosquitto_passwds(tmp_path):
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(path), "pi-0", "s3cret"], check=True)
    hashed = credentials.read_password_file(path)["pi-0"]
    assert hashed.startswith("$7$")
    assert credentials.verify_password("s3cret", hashed) and not credentials.verify_password("other", hashed)
    assert credentials.verify_password("s3cret", credentials.hash_password("s3cret"))


def test_commands_write_secrets_and_keys_for_their_owner_only_and_never_print_a_secret(tmp_path):
    common = ["--passwd", str(tmp_path / "passwd"), "--acl", str(tmp_path / "acl"),
              "--secrets-dir", str(tmp_path / "secrets")]  # fmt: skip
    result = edgegan("broker", "add-device", "pi-0", *common)
    secret_path = tmp_path / "secrets" / "pi-0.password"
    secret = secret_path.read_text().strip()
    assert (
        len(secret) >= 40
        and secret not in result.output
        and str(secret_path) in result.output.replace("\n", "")
    )
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "passwd").stat().st_mode) == 0o600
    assert credentials.verify_password(secret, credentials.read_password_file(tmp_path / "passwd")["pi-0"])
    edgegan("broker", "add-server", "hub", *common)
    assert "hub" in credentials.server_identities(tmp_path / "acl")
    refused = runner.invoke(app, ["broker", "add-device", "hub", *common])
    assert refused.exit_code == 2 and "server identity" in refused.stderr
    edgegan("certs", "--out", str(tmp_path / "certs"), "--client", "pi-0")
    for key in ("ca.key", "server.key", "pi-0.key"):
        assert stat.S_IMODE((tmp_path / "certs" / key).stat().st_mode) == 0o600
    edgegan("broker", "remove", "pi-0", "--passwd", str(tmp_path / "passwd"))
    assert "pi-0" not in credentials.read_password_file(tmp_path / "passwd")


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--id", "pi-0", "--username", "pi-1"], "--username"),
        ([], "--id"),
        (["--username", "pi-0"], "--password-file"),
        (["--id", "pi-0", "--tls-ca", "ca.crt"], "mqtts"),
    ],
)
def test_device_login_flags_that_cannot_work_are_usage_errors(flags, named, monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    result = runner.invoke(app, ["device", "--index", "0", "--of", "2", *flags, *SMALL])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and named in result.stderr


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--username", "server", "--password-file", "server.password"], "--broker"),
        (["--broker", "mqtt://127.0.0.1:1", "--username", "server"], "--device-secrets"),
        (["--broker", "mqtt://127.0.0.1:1", "--device-secrets", "."], "device-0.password"),
    ],
)
def test_run_login_flags_that_cannot_work_are_usage_errors(flags, named, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    result = runner.invoke(app, ["run", "--devices", "2", *flags, *SMALL])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and named in result.stderr


def test_mqtts_means_tls_on_port_8883_and_the_password_can_come_from_the_environment():
    address = with_login(parse_broker("mqtts://broker.local"), "pi-0", environ={PASSWORD_ENV: "s3cret"})
    assert (address.port, address.tls, address.password) == (8883, True, "s3cret")
    assert str(address) == "mqtts://broker.local:8883" and "s3cret" not in repr(address)


def test_the_embedded_broker_listens_beyond_loopback_only_with_logins_an_acl_and_tls(config):
    folder = config.folder
    with pytest.raises(ValueError, match="loopback"):
        check_security("0.0.0.0", BrokerSecurity())
    with pytest.raises(ValueError, match="TLS"):
        check_security("0.0.0.0", BrokerSecurity(password_file=folder / "passwd", acl_file=folder / "acl"))
    with pytest.raises(ValueError, match="go together"):
        check_security("127.0.0.1", BrokerSecurity(password_file=folder / "passwd"))
    certs = folder / "certs"
    secured = BrokerSecurity(
        password_file=folder / "passwd",
        acl_file=folder / "acl",
        tls_cert=certs / "server.crt",
        tls_key=certs / "server.key",
    )
    check_security("0.0.0.0", secured)


def test_adding_logins_with_the_default_paths_changes_no_tracked_file(tmp_path, monkeypatch):
    # A checkout of the deployment files alone: every file the commands write must be git-ignored.
    shipped = [".gitignore", "broker/acl", "broker/mosquitto.conf", "broker/docker-compose.yml"]
    for name in shipped:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("add", *shipped)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "shipped")
    before = {name: (tmp_path / name).read_bytes() for name in shipped}
    monkeypatch.chdir(tmp_path)
    edgegan("broker", "add-server", "server")
    edgegan("broker", "add-server", "watcher")
    edgegan("broker", "add-device", "pi-0")
    assert git("status", "--porcelain", "--untracked-files=all") == ""
    assert {name: (tmp_path / name).read_bytes() for name in shipped} == before
    local_acl = tmp_path / "broker" / "acl.local"
    local = credentials.read_acl(local_acl)
    assert {"server", "watcher"} <= set(local.users)
    assert local.patterns == credentials.read_acl(tmp_path / "broker" / "acl").patterns
    assert stat.S_IMODE(local_acl.stat().st_mode) & 0o044  # not a secret: the broker's user reads it
    logins = credentials.read_password_file(tmp_path / "broker" / "passwd")
    assert set(logins) == {"server", "watcher", "pi-0"}


async def takeover_attempt(port: int, config: Config, run: str, server_id: str, thief_id: str) -> dict:
    """The server holds a persistent session (client id `server_id`) subscribed to the updates; device-1's
    login, then a wrong password, connect with `thief_id`; then device-0 sends an update. What each got."""
    seen: dict = {"thief": [], "thief_error": None, "wrong_password_error": None}
    async with mqtt_client(config.login(port, "server"), server_id, clean_session=False) as server:
        await server.subscribe(topics.all_updates(run), qos=1)
        for name, password in (("device-1", None), ("device-1", "not-the-password")):
            key = "thief_error" if password is None else "wrong_password_error"
            try:
                async with mqtt_client(
                    config.login(port, name, password=password), thief_id, clean_session=False
                ) as thief:
                    await thief.subscribe(topics.all_updates(run), qos=1)
                    async with mqtt_client(config.login(port, "device-0"), "edgegan-t-device-0") as device:
                        await device.publish(topics.update(run, "device-0"), b"stolen?", qos=1)
                    try:
                        seen["thief"] += await receive_until(thief, "never", timeout_s=1.5)
                    except TimeoutError:
                        pass
            except (aiomqtt.MqttError, LoginRefused) as error:
                seen[key] = str(error)
        async with mqtt_client(config.login(port, "device-0"), "edgegan-t-device-0") as device:
            await device.publish(topics.update(run, "device-0"), b"update", qos=1)
        seen["server"] = []
        try:  # device-0's two updates, the one sent during the attempts included
            while b"update" not in [payload for _, payload in seen["server"]]:
                seen["server"] += await receive_until(server, topics.update(run, "device-0"), timeout_s=10)
        except aiomqtt.MqttError as error:
            seen["server"] = f"disconnected: {error}"
    return seen


def test_the_embedded_broker_refuses_another_logins_client_id_and_leaves_the_session_intact(embedded, config):
    # Even with the server's client id known (here the id it had before ids were derived from logins).
    server_id = "edgegan-server-takeover"
    seen = asyncio.run(takeover_attempt(embedded.plain_port, config, "takeover", server_id, server_id))
    assert seen["thief"] == [] and "identifier" in (seen["thief_error"] or "").lower(), seen
    assert seen["wrong_password_error"], seen
    # The server's session was neither taken over nor disconnected: it gets the update sent afterwards.
    assert seen["server"] == [(topics.update("takeover", "device-0"), b"update")], seen



async def boards_listener_takeover(broker: RunningBroker, config: Config, run: str) -> dict:
    """The server holds a persistent session on the servers' listener; device-1's login connects with the
    server's exact client id, on the boards' listener and then on the servers'. What each got."""
    seen: dict = {"thief": [], "servers_listener_error": None}
    server_address = config.login(broker.servers_port, "server", tls=True)
    server_id = server_address.client_id(f"edgegan-server-{run}")
    async with mqtt_client(server_address, server_id, clean_session=False) as server:
        await server.subscribe(topics.all_updates(run), qos=1)
        async with mqtt_client(config.login(broker.tls_port, "device-1", tls=True), server_id,
                               clean_session=False) as thief:  # fmt: skip
            await thief.subscribe(topics.all_updates(run), qos=1)  # its own id is "device-1" now
            async with mqtt_client(config.login(broker.tls_port, "device-0", tls=True), "any") as device:
                await device.publish(topics.update(run, "device-0"), b"update", qos=1)
            with contextlib.suppress(TimeoutError):
                seen["thief"] += await receive_until(thief, "never", timeout_s=1.5)
        try:
            async with mqtt_client(config.login(broker.servers_port, "device-1", tls=True), server_id):
                pass
        except (aiomqtt.MqttError, LoginRefused) as error:
            seen["servers_listener_error"] = str(error)
        try:
            seen["server"] = await receive_until(server, topics.update(run, "device-0"), timeout_s=10)
        except aiomqtt.MqttError as error:
            seen["server"] = f"disconnected: {error}"
    return seen


@needs_mosquitto
def test_on_mosquittos_boards_listener_a_client_id_is_its_login_so_no_device_can_take_the_servers_session(
    mosquitto, config
):
    """broker/mosquitto.conf as shipped: use_username_as_clientid on the boards' listener, and a servers'
    listener whose password file holds only server logins."""
    seen = asyncio.run(boards_listener_takeover(mosquitto, config, "bound"))
    # The thief's session was its own ("device-1"): it read nothing (the ACL lets no device read updates)
    # and the server, never disconnected, got device-0's update.
    assert seen["thief"] == [] and seen["server"] == [(topics.update("bound", "device-0"), b"update")], seen
    assert seen["servers_listener_error"] and "device-1" in seen["servers_listener_error"], seen
    servers = credentials.read_password_file(config.folder / "passwd.servers")
    assert set(servers) == {"server"} and set(credentials.read_password_file(config.folder / "passwd")) >= {
        "server", "device-0", "device-1"
    }


def test_client_ids_hang_on_the_login_s_password_so_another_login_cannot_guess_them():
    address = BrokerAddress(host="127.0.0.1", port=1883, username="server", password="secret")
    name = "edgegan-server-demo"
    assert address.client_id(name) == address.client_id(name) != name
    assert address.client_id(name).startswith(f"{name}-")
    assert dataclasses.replace(address, password="other").client_id(name) != address.client_id(name)
    assert address.client_id("edgegan-demo-pi-0") != address.client_id(name)
    assert dataclasses.replace(address, username=None, password=None).client_id(name) == name  # anonymous


@needs_mosquitto
def test_on_mosquitto_a_device_login_with_the_servers_old_client_id_neither_reads_nor_disconnects_it(
    mosquitto, config
):
    """Mosquitto takes over any session whose client id a valid login reuses; the server's id is no
    longer guessable, so the predictable one a thief tries is another session."""
    run = "takeover"
    server_id = config.login(mosquitto.plain_port, "server").client_id(f"edgegan-server-{run}")
    seen = asyncio.run(
        takeover_attempt(mosquitto.plain_port, config, run, server_id, f"edgegan-server-{run}")
    )
    assert seen["thief"] == [] and seen["wrong_password_error"], seen
    assert seen["server"] == [(topics.update(run, "device-0"), m) for m in (b"stolen?", b"update")], seen


def test_a_flood_of_refused_logins_is_one_line_and_a_count_per_login_and_interval(caplog):
    now = [0.0]
    audit = AuditLog(logging.getLogger("edgegan.test-audit"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="edgegan.test-audit"):
        for _ in range(50):
            audit.note("refused the login", "'pi-0'")
            now[0] += 0.01
        audit.note("refused the login", "'pi-1'")
        now[0] = 20.0
        audit.note("refused the login", "'pi-0'")  # a new interval: the count of the last one, then this
        audit.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "refused the login 'pi-0'",
        "refused the login 'pi-1'",
        "refused the login 'pi-0': 49 more times in 20 s",
        "refused the login 'pi-0'",
    ]


def test_the_embedded_broker_closes_connections_past_its_cap_and_those_that_send_no_connect():
    from edgegan.runtime.broker import broker_config
    from edgegan.runtime.broker_plugins import PermissionCheckingBroker

    async def scenario() -> tuple[bytes, float]:
        port = free_port()
        broker = PermissionCheckingBroker(
            broker_config("127.0.0.1", port), max_clients=2, connect_deadline_s=1.0
        )
        await broker.start()
        try:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await asyncio.sleep(0.2)
            reader, _ = await asyncio.open_connection("127.0.0.1", port)  # the third: past the cap
            past_cap = await asyncio.wait_for(reader.read(), timeout=5)
            started = time.monotonic()
            await asyncio.wait_for(idle[0][0].read(), timeout=5)  # closed at the CONNECT deadline
            return past_cap, time.monotonic() - started
        finally:
            await broker.shutdown()

    past_cap, waited_s = asyncio.run(scenario())
    assert past_cap == b""  # closed without a word
    assert waited_s < 3.0


def test_the_embedded_broker_closes_a_connection_that_sends_a_packet_over_its_limit_before_reading_it():
    from edgegan.runtime.broker import broker_config
    from edgegan.runtime.broker_plugins import PermissionCheckingBroker

    async def scenario() -> tuple[list[bytes], str]:
        port = free_port()
        broker = PermissionCheckingBroker(broker_config("127.0.0.1", port), max_packet_bytes=100_000)
        await broker.start()
        address = BrokerAddress(host="127.0.0.1", port=port)
        try:
            async with mqtt_client(address, "edgegan-t-reader") as reader:
                await reader.subscribe("edgegan/limit/#", qos=1)
                async with mqtt_client(address, "edgegan-t-sender") as sender:
                    await sender.publish("edgegan/limit/small", b"x" * 50_000, qos=1)
                outcome = "connected"
                try:
                    async with mqtt_client(address, "edgegan-t-flooder") as flooder:
                        await flooder.publish("edgegan/limit/big", b"x" * 300_000, qos=1, timeout=5)
                except aiomqtt.MqttError as error:
                    outcome = f"closed: {error}"
                received: list[bytes] = []
                try:
                    async with asyncio.timeout(2):
                        async for message in reader.messages:
                            received.append(message.topic.value.encode())
                except TimeoutError:
                    pass
                return received, outcome
        finally:
            await broker.shutdown()

    received, outcome = asyncio.run(scenario())
    assert received == [b"edgegan/limit/small"]
    assert outcome.startswith("closed"), outcome


def test_edgegan_runs_embedded_broker_is_sized_by_its_run(tmp_path):
    from edgegan.runsetup import resolve_setup
    from edgegan.runtime.launcher import largest_message_bound

    mnist = resolve_setup(dataset="mnist", devices=4, partition="iid", seed=0, out=tmp_path)
    ring8 = resolve_setup(dataset="ring8", devices=4, partition="iid", seed=0, out=tmp_path)
    # MNIST's global model is 2.3 MB in fp32: the bound is a few times that, far below the decoder's 64 MB.
    assert 4.6e6 < largest_message_bound(mnist) < 8e6
    assert largest_message_bound(ring8) < 2e6
