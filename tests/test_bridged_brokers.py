"""Brokers across sites (broker/site.conf, docs/scaling.md): each device on its own site broker, bridged over
TLS with a site login to the core broker where the server runs, both Mosquitto from the shipped configs (but
for ports and file paths). The run gives one broker's generator, and a site broker restarted mid-run loses
no round."""

import json
import time
from pathlib import Path

import pytest
import torch
from test_broker_security import ROOT, config, hand_to_broker_user, shipped_mosquitto_config  # noqa: F401
from test_broker_security import edgegan as edgegan_cli
from test_reliability import metric_rounds
from test_runtime_mqtt import SMALL, edgegan, finish

from edgegan import topics
from edgegan.devtools.mosquitto import Mosquitto, mosquitto_installed
from edgegan.runtime.ports import free_port, wait_for_port

pytestmark = pytest.mark.skipif(not mosquitto_installed(), reason="mosquitto is not installed")
SHIPPED_SITE = ROOT / "broker" / "site.conf"


def site_config(logins, name: str, ports: tuple[int, int, int], core_tls_port: int) -> str:
    """broker/site.conf as shipped, but for ports, file paths, the core's address and the site's login."""
    shipped = SHIPPED_SITE.read_text()
    rewrites = {
        "/mosquitto/config/": f"{logins.folder}/",
        "/mosquitto/data/": f"{logins.folder}/data-{name}/",
        "listener 1883 127.0.0.1\n": f"listener {ports[0]} 127.0.0.1\n",
        "listener 8883\n": f"listener {ports[1]} 127.0.0.1\n",
        "listener 8884\n": f"listener {ports[2]} 127.0.0.1\n",
        "address core.example.org:8883\n": f"address 127.0.0.1:{core_tls_port}\n",
        "remote_clientid edgegan-site-a\n": f"remote_clientid edgegan-{name}\n",
        "remote_username site-a\n": f"remote_username {name}\n",
        "remote_password CHANGE-ME-to-the-password-edgegan-broker-add-site-wrote\n":
            f"remote_password {logins.secret(name)}\n",
    }  # fmt: skip
    for shipped_text, test_text in rewrites.items():
        assert shipped_text in shipped, shipped_text
        shipped = shipped.replace(shipped_text, test_text)
    return shipped


class Broker(Mosquitto):
    """devtools' Mosquitto (start, stop, restart on the same ports) from a whole config text."""

    def __init__(self, path: Path, text: str, ports: list[int], log: Path):
        super().__init__(path.parent, log_path=log)
        self.path, self.text, self.ports, self.port = path, text, ports, ports[0]

    def write_config(self) -> Path:
        self.path.write_text(self.text)
        self.path.chmod(0o644)
        return self.path

    def start(self) -> "Broker":
        super().start()
        for port in self.ports[1:]:
            wait_for_port(port)
        return self


def test_the_shipped_site_config_is_the_core_config_plus_a_bridge_of_exactly_the_device_topics():
    directives = [line for line in SHIPPED_SITE.read_text().splitlines() if line and not line.startswith("#")]
    core = [line for line in (ROOT / "broker" / "mosquitto.conf").read_text().splitlines()
            if line and not line.startswith("#")]  # fmt: skip
    assert directives[: len(core)] == core  # part 1: the boards' side, as broker/mosquitto.conf
    bridged = [tuple(line.split()[1:3]) for line in directives if line.startswith("topic ")]
    assert bridged == topics.bridge_topics()
    assert "try_private true" in directives and "cleansession false" in directives


def test_devices_on_two_bridged_site_brokers_give_one_brokers_generator_and_a_site_restart_loses_no_round(
    config, tmp_path  # noqa: F811 - the fixture of test_broker_security: logins, ACL and certificates
):
    for site in ("site-a", "site-b"):
        edgegan_cli("broker", "add-site", site, "--passwd", str(config.folder / "passwd"),
                    "--acl", str(config.folder / "acl"), "--secrets-dir", str(config.secrets))  # fmt: skip
    core_plain, core_tls, core_servers = free_port(), free_port(), free_port()
    ports = {site: (free_port(), free_port(), free_port()) for site in ("site-a", "site-b")}
    data = [config.folder / folder for folder in ("data", "data-site-a", "data-site-b")]
    for folder in data:
        folder.mkdir()
    hand_to_broker_user(config.folder / "passwd", config.folder / "passwd.servers", config.folder / "acl",
                        config.folder / "certs", *data)  # fmt: skip
    core = Broker(config.folder / "core.conf",
                  shipped_mosquitto_config(config, core_plain, core_tls, core_servers),
                  [core_plain, core_tls, core_servers], tmp_path / "core.log")  # fmt: skip
    sites = {
        site: Broker(config.folder / f"{site}.conf", site_config(config, site, site_ports, core_tls),
                     list(site_ports), tmp_path / f"{site}.log")
        for site, site_ports in ports.items()
    }  # fmt: skip
    run, out, rounds = "bridged", tmp_path / "server", 100
    brokers = [core, *sites.values()]
    processes = []
    try:
        for broker in brokers:
            broker.start()

        def login(name: str, port: int) -> list[str]:
            return ["--broker", f"mqtt://127.0.0.1:{port}", "--username", name,
                    "--password-file", str(config.secrets / f"{name}.password")]  # fmt: skip

        server = edgegan("server", *login("server", core_plain), "--run", run, "--devices", "2", "--rounds",
                         str(rounds), "--eval-every", str(rounds), "--deadline-s", "30", "--out", str(out),
                         *SMALL)  # fmt: skip
        processes.append(server)
        for index, site in enumerate(sites):
            processes.append(edgegan("device", *login(f"device-{index}", ports[site][0]), "--run", run,
                                     "--id", f"device-{index}", "--index", str(index), "--of", "2",
                                     "--resend-s", "2", *SMALL))  # fmt: skip
        deadline = time.monotonic() + 120
        while len(metric_rounds(out)) < 15:
            assert time.monotonic() < deadline, "the bridged run did not start"
            time.sleep(0.1)
        sites["site-a"].stop()  # device-0's broker: its bridge and its board lose the connection
        stopped_at = len(metric_rounds(out))
        time.sleep(2)
        sites["site-a"].start()
        assert stopped_at < rounds and server.poll() is None, "the run ended before the site broker stopped"
        finish(server, timeout_s=200)
        for device in processes[1:]:
            finish(device)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for broker in brokers:
            broker.stop()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds and metric_rounds(out) == list(range(rounds + 1))
    assert summary["updates_accepted"] == 2 * rounds  # no round lost, none counted twice
    simulated = tmp_path / "sim"
    finish(edgegan("simulate", "--algo", "serial", "--devices", "2", "--rounds", str(rounds), "--eval-every",
                   str(rounds), "--out", str(simulated), *SMALL))  # fmt: skip
    bridged = torch.load(out / "generator.pt", weights_only=True)["state_dict"]
    alone = torch.load(simulated / "generator.pt", weights_only=True)["state_dict"]
    for name, tensor in alone.items():
        assert torch.allclose(bridged[name], tensor, atol=1e-6, rtol=0), name
