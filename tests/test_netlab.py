"""The lab of real links (edgegan/devtools/netlab.py): its commands, checked without root, and one real lab
of two device namespaces with a ring8 run through it, skipped where namespaces cannot be made."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess

import pytest

from edgegan.costmodel import LinkProfile
from edgegan.devtools import netlab
from edgegan.devtools.mosquitto import SHIPPED_CONFIG, mosquitto_installed
from edgegan.devtools.netlab import Lab, LabSpec, lab_steps


def commands(spec: LabSpec) -> list[str]:
    return [" ".join(step.apply) for step in lab_steps(spec)]


def test_each_device_link_is_shaped_on_both_veth_ends_at_the_profile_rates():
    spec = LabSpec(name="t", devices=3, profile=LinkProfile(uplink_mbps=10, downlink_mbps=20))
    text = commands(spec)
    shaper = "root tbf rate {} burst {} latency 100ms"
    for index in range(3):
        assert (
            f"ip netns exec t-dev{index} tc qdisc add dev eth0 " + shaper.format("10000000bit", 12500) in text
        )
        assert (
            f"ip netns exec t-server tc qdisc add dev port{index} " + shaper.format("20000000bit", 25000)
            in text
        )
        assert f"ip -n t-server link add port{index} type veth peer name eth0 netns t-dev{index}" in text
        assert f"ip -n t-server link set port{index} master br0 up" in text


def test_a_slow_link_still_gets_a_burst_of_two_full_frames():
    steps = netlab.tbf_steps("ns", "eth0", 0.1)
    assert steps[0].apply[steps[0].apply.index("burst") + 1] == str(2 * 1514)


def test_loss_drops_packets_both_ways_on_the_device_link_and_zero_loss_adds_no_table():
    lossy = commands(LabSpec(name="t", devices=1, loss_percent=5))
    assert (
        "ip netns exec t-dev0 nft add rule inet netlab uplink oifname eth0 numgen random mod 100 < 5 drop"
        in lossy
    )
    assert (
        "ip netns exec t-dev0 nft add rule inet netlab downlink iifname eth0 numgen random mod 100 < 5 drop"
        in lossy
    )
    assert not any(" nft " in line for line in commands(LabSpec(name="t", devices=1, loss_percent=0)))


def test_loss_devices_limit_the_drops_to_those_links():
    text = commands(LabSpec(name="t", devices=3, loss_percent=5, lossy_devices=(1,)))
    assert [line.split()[3] for line in text if "numgen" in line] == ["t-dev1", "t-dev1"]


def test_the_lab_adds_nothing_to_the_hosts_namespace():
    """Every link command runs inside one of the lab's namespaces (ip -n NS, ip netns exec NS)."""
    spec = LabSpec(name="t", devices=2, loss_percent=1)
    for step in lab_steps(spec):
        for command in (step.apply, step.undo):
            assert command[:3] in {
                ("ip", "netns", "add"),
                ("ip", "netns", "del"),
                ("ip", "netns", "exec"),
            } or (command[:2] == ("ip", "-n") and command[2] in spec.namespaces), command
            if command[:3] == ("ip", "netns", "exec"):
                assert command[3] in spec.namespaces


def test_teardown_undoes_every_step_in_reverse_even_when_parts_are_already_gone(monkeypatch):
    spec = LabSpec(name="t", devices=2, loss_percent=1)
    ran: list[tuple[str, ...]] = []

    def failing(command):
        ran.append(tuple(command))
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="Cannot find device")

    monkeypatch.setattr(netlab, "execute", failing)
    assert Lab(spec).teardown() == []
    undos = [command for command in ran if command[:3] != ("ip", "netns", "list")]
    assert undos == [step.undo for step in reversed(lab_steps(spec))]
    assert undos[-1] == ("ip", "netns", "del", "t-server")


def test_a_bad_spec_names_its_flag():
    with pytest.raises(ValueError, match="--loss"):
        LabSpec(loss_percent=100)
    with pytest.raises(ValueError, match="--devices"):
        LabSpec(devices=0)
    with pytest.raises(ValueError, match="--loss-devices"):
        LabSpec(devices=2, lossy_devices=(2,))
    with pytest.raises(ValueError, match="--name"):
        LabSpec(name="a b")


def test_devices_get_the_server_flags_they_share_and_no_others():
    args = ["--dataset", "ring8", "--rounds", "20", "--seed=3", "--eval-every", "5", "--codec", "fp16"]
    assert netlab.device_args(args) == ["--dataset", "ring8", "--seed", "3", "--codec", "fp16"]
    command = netlab.device_command(LabSpec(name="t", devices=2), 1, args)
    assert command[command.index("--broker") + 1] == "mqtt://10.231.0.1:1883"
    assert command[command.index("--index") + 1] == "1" and command[command.index("--of") + 1] == "2"


def test_the_lab_broker_is_the_shipped_config_listening_on_the_servers_lab_address():
    config = netlab.broker_config(SHIPPED_CONFIG.read_text())
    listeners = [line for line in config.splitlines() if line.startswith("listener")]
    assert listeners == ["listener 1883 10.231.0.1"]


def test_profiles_have_the_issues_edge_rates_and_the_lab_adds_no_latency():
    assert (netlab.PROFILES["edge"].uplink_mbps, netlab.PROFILES["edge"].downlink_mbps) == (10.0, 20.0)
    assert netlab.lab_link(netlab.PROFILES["lte"]).latency_ms == 0.0


def test_plan_prints_the_commands_without_root(capsys):
    assert netlab.main(["plan", "--name", "t", "--devices", "1", "--loss", "2"]) == 0
    assert capsys.readouterr().out.split("\n")[0] == "ip netns add t-server"


@functools.cache
def lab_unavailable() -> str | None:
    """Why a real lab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2, nftables)"
    if not mosquitto_installed():
        return "needs mosquitto"
    name = f"nlprobe{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if probe.returncode != 0:
        return f"ip netns is unavailable: {probe.stderr.strip()}"
    return None


def host_links() -> list[str]:
    listed = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return sorted(line.split(":")[1].strip() for line in listed.splitlines())


real_lab = pytest.mark.skipif(lab_unavailable() is not None, reason=str(lab_unavailable()))


@real_lab
def test_an_error_inside_the_lab_leaves_no_namespace_behind():
    spec = LabSpec(name=f"nlerr{os.getpid()}", devices=2, loss_percent=5)
    links = host_links()
    with pytest.raises(RuntimeError, match="inside"), Lab(spec) as lab:
        assert netlab.namespaces_present(spec.namespaces) == spec.namespaces
        lab.spawn(spec.device_namespace(0), ["sleep", "60"], os.devnull)
        raise RuntimeError("inside")
    assert netlab.namespaces_present(spec.namespaces) == []
    assert host_links() == links


@real_lab
def test_a_ring8_run_through_a_two_device_lab_with_5_percent_loss_on_one_link_completes(tmp_path):
    spec = LabSpec(name=f"nlrun{os.getpid()}", devices=2, loss_percent=5, lossy_devices=(1,))
    links = host_links()
    summary = netlab.run_in_lab(
        spec, ["--dataset", "ring8", "--rounds", "10", "--eval-every", "1000", "--run", spec.name],
        tmp_path, timeout_s=45,
    )  # fmt: skip
    assert summary["rounds"] == 10 and summary["updates_accepted"] == 20
    assert json.loads((tmp_path / "summary.json").read_text())["netlab"]["loss_percent"] == 5
    assert netlab.namespaces_present(spec.namespaces) == []
    assert host_links() == links


def test_the_bench_counts_each_full_segment_with_its_headers_and_drops_first_and_last_rounds():
    from edgegan.benchmarks import reallinks

    assert reallinks.framed_bytes(0) == 0
    assert reallinks.framed_bytes(1448) == 1514 and reallinks.framed_bytes(1449) == 1449 + 2 * 66
    assert reallinks.round_times([0.0, 3.0, 4.0, 5.5, 9.5]) == [3.0, 1.0, 1.5, 4.0]
    assert reallinks.steady_mean([3.0, 1.0, 1.5, 4.0]) == 1.25
    assert reallinks.parse_settings("edge:0,lte:5") == [
        reallinks.Setting(profile="edge", loss_percent=0),
        reallinks.Setting(profile="lte", loss_percent=5),
    ]
    with pytest.raises(ValueError, match="known: edge"):
        reallinks.parse_settings("dsl:1")


def test_down_finds_every_device_namespace_of_its_lab_and_no_other(monkeypatch):
    listed = "lab-dev0 (id: 1)\nlab-dev4\nlab-server\nlab2-dev9\nother-dev7\n"
    monkeypatch.setattr(
        netlab, "execute", lambda command: subprocess.CompletedProcess(command, 0, listed, "")
    )
    assert netlab.lab_device_count("lab") == 5
    assert netlab.lab_device_count("nothere") == 0
