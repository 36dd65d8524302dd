"""`edgegan run`'s fleet as settings objects (edgegan/runtime/fleetplan.py): built and checked once, and
handed to each child as one document on its stdin, never as flags."""

from pathlib import Path

import pytest

from edgegan.runsetup import resolve_setup
from edgegan.runtime.connection import BrokerAddress
from edgegan.runtime.credentials import write_secret
from edgegan.runtime.device import DeviceSettings
from edgegan.runtime.fleetplan import EMBEDDED_BROKER, ChildJob, FleetLogin, plan_fleet
from edgegan.runtime.impairment import LinkImpairment
from edgegan.runtime.launcher import child_command
from edgegan.runtime.server_settings import ServerSettings


def fleet_parts(tmp_path: Path, devices: int = 2, aggregate: str = "mean", aggregators: int = 1):
    setup = resolve_setup(
        dataset="ring8",
        devices=devices,
        partition="shards:2",
        seed=3,
        out=tmp_path / "run",
        width=32,
        latent_dim=8,
        eval_every=5,
        aggregate=aggregate,
    )
    server = ServerSettings(run="plan", broker=EMBEDDED_BROKER, rounds=10, quorum=devices, deadline_s=30.0,
                            min_devices=1, aggregators=aggregators, seed=3)  # fmt: skip
    device = DeviceSettings(run="plan", device="device-0", broker=EMBEDDED_BROKER, resend_s=2.0, seed=3)
    return setup, server, device


def secured_login(tmp_path: Path) -> FleetLogin:
    secrets = tmp_path / "secrets"
    for name in ("server", "device-0", "device-1"):
        write_secret(secrets / f"{name}.password", f"secret-of-{name}")
    ca = tmp_path / "ca.crt"
    ca.write_text("not read here")
    return FleetLogin(
        username="server", password_file=secrets / "server.password", device_secrets=secrets, tls_ca=ca
    )


def test_device_i_logs_in_as_device_i_with_its_own_password_speed_and_link(tmp_path):
    plan = plan_fleet(
        *fleet_parts(tmp_path), broker="mqtts://broker.local", login=secured_login(tmp_path),
        speeds=(1.0, 0.5), impairment=LinkImpairment(delay_ms=20.0), impaired=(1,),
    )  # fmt: skip
    assert not plan.embedded_broker and plan.server.allowed_devices == ("device-0", "device-1")
    assert (plan.server.broker.username, plan.server.broker.password) == ("server", "secret-of-server")
    for index, device in enumerate(plan.devices):
        assert device.device == device.broker.username == f"device-{index}"
        assert device.broker.password == f"secret-of-device-{index}" and device.broker.tls_ca.is_file()
    assert [device.speed for device in plan.devices] == [1.0, 0.5]
    assert [device.impairment.delay_ms for device in plan.devices] == [0.0, 20.0]


def test_a_child_job_comes_back_whole_from_its_document_and_its_command_line_carries_no_setting(tmp_path):
    plan = plan_fleet(*fleet_parts(tmp_path), broker="mqtts://broker.local", login=secured_login(tmp_path))
    aggregators, server, devices = plan.jobs(BrokerAddress(host="127.0.0.1", port=1))
    assert aggregators == [] and server.settings.broker.host == "broker.local"  # a given broker is kept
    for job in (server, *devices):
        assert ChildJob.from_document(job.document()) == job
        command = " ".join(child_command(job))
        assert command.endswith(f"edgegan.cli.child {job.role} {job.name}") and "secret" not in command
        assert "secret" not in repr(job)


def test_on_the_embedded_broker_every_child_gets_its_address(tmp_path):
    plan = plan_fleet(*fleet_parts(tmp_path))
    started = BrokerAddress(host="127.0.0.1", port=40123)
    _, server, devices = plan.jobs(started)
    assert plan.embedded_broker and {job.settings.broker for job in (server, *devices)} == {started}


@pytest.mark.parametrize(
    "parts,options,named",
    [
        ({}, {"speeds": (1.0, 2.0)}, "--device-speeds"),
        ({}, {"speeds": (1.0,)}, "--device-speeds"),
        ({}, {"impaired": (0, 5)}, "--impair-devices"),
        ({}, {"login": FleetLogin(username="server")}, "need --broker"),
        ({"aggregators": 2}, {}, "embedded broker"),
        ({"aggregators": 2, "aggregate": "median"}, {"broker": "mqtt://127.0.0.1:1"}, "--aggregate mean"),
        ({}, {"broker": "mqtt://127.0.0.1:1", "login": FleetLogin(device_secrets=Path("."))}, "device-0"),
    ],
)
def test_a_fleet_that_cannot_work_is_refused_before_any_process_starts(tmp_path, parts, options, named):
    with pytest.raises(ValueError, match=named):
        plan_fleet(*fleet_parts(tmp_path, **parts), **options)


def test_each_device_of_edgegan_run_gets_its_partition_as_a_file_of_its_own(tmp_path):
    import torch

    from edgegan.data import load_dataset, parse_partition, partition_indices
    from edgegan.data.local import load_local
    from edgegan.runsetup import resolve_setup
    from edgegan.runtime.fleetplan import write_partitions

    setup = resolve_setup(dataset="ring8", devices=3, partition="shards:2", seed=4, out=tmp_path / "run")
    paths = write_partitions(setup, tmp_path / "device-data")
    dataset = load_dataset("ring8")
    parts = partition_indices(dataset.y, 3, parse_partition("shards:2"), 4)
    for path, part in zip(paths, parts, strict=True):
        # What a device reads with --data is exactly the simulator's shard for it.
        assert torch.equal(load_local(path, sample_shape=(2,)).x, dataset.x[part])


def test_edgegan_run_pins_the_servers_signing_key_on_every_device_and_reuses_it_on_a_rerun(tmp_path):
    from edgegan import signing

    plan = plan_fleet(*fleet_parts(tmp_path))
    key_path = plan.server.signing_key
    assert key_path == plan.setup.out / signing.KEY_FILE and key_path.is_file()
    public = signing.public_bytes(signing.load_key(key_path)).hex()
    assert {device.server_key for device in plan.devices} == {public}
    assert {device.server_key for device in plan_fleet(*fleet_parts(tmp_path)).devices} == {public}
