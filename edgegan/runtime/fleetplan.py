"""What `edgegan run` starts, as settings objects: the run's set-up, the server's settings, one device's
settings per device and the aggregators', each validated once by being built (`plan_fleet`), and the one
form in which a child process receives its share (`ChildJob`, a JSON document on the child's stdin).

Why stdin: a child's settings include its broker password. A pipe puts it neither on disk, nor in the
process list (argv), nor in an environment that the child's own children would inherit.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import torch

from edgegan import signing
from edgegan.data import load_dataset, parse_partition, partition_indices
from edgegan.runsetup import RunSetup
from edgegan.runtime.aggregator import AggregatorSettings
from edgegan.runtime.connection import BrokerAddress, parse_broker, with_login
from edgegan.runtime.device import DeviceSettings
from edgegan.runtime.impairment import LinkImpairment
from edgegan.runtime.server_settings import ServerSettings

# The embedded broker's address until the launcher starts it on a free loopback port.
EMBEDDED_BROKER = BrokerAddress(host="127.0.0.1", port=0)
SETTINGS = {"server": ServerSettings, "device": DeviceSettings, "aggregator": AggregatorSettings}


@dataclass(kw_only=True, frozen=True)
class FleetLogin:
    """`edgegan run`'s login flags: the server's login (also the live view's), the folder of the devices'
    password files (device I logs in as device-I), and the TLS files every process shares."""

    username: str | None = None
    password_file: Path | None = None
    device_secrets: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def given(self) -> list[str]:
        """The flags given, as users spell them."""
        return [f"--{item.name.replace('_', '-')}" for item in dataclasses.fields(self)
                if getattr(self, item.name) is not None]  # fmt: skip

    def device_address(self, broker: str, index: int) -> BrokerAddress:
        tls = (self.tls_ca, self.tls_cert, self.tls_key)
        if self.device_secrets is None:
            return with_login(parse_broker(broker), None, None, *tls)
        secret = self.device_secrets / f"device-{index}.password"
        if not secret.is_file():
            raise ValueError(
                f"--device-secrets has no {secret.name}: edgegan broker add-device device-{index} "
                f"--secrets-dir {self.device_secrets}"
            )
        return with_login(parse_broker(broker), f"device-{index}", secret, *tls)


@dataclass(kw_only=True, frozen=True)
class FleetPlan:
    """Everything `edgegan run` starts: device I (0-based) runs `devices[I]` on partition I of `setup`."""

    setup: RunSetup
    server: ServerSettings
    devices: tuple[DeviceSettings, ...]
    aggregators: tuple[AggregatorSettings, ...] = ()  # empty: the server aggregates itself
    embedded_broker: bool = True  # start the embedded broker; its address replaces EMBEDDED_BROKER
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        if len(self.devices) != self.setup.devices:
            raise ValueError(f"a plan for {self.setup.devices} devices has settings for {len(self.devices)}")
        self.server.check_setup(self.setup)

    @property
    def run(self) -> str:
        return self.server.run

    @property
    def rounds(self) -> int:
        return self.server.rounds

    @property
    def out(self) -> Path:
        return self.setup.out

    def jobs(
        self, broker: BrokerAddress, device_data: Sequence[Path] = ()
    ) -> tuple[list[ChildJob], ChildJob, list[ChildJob]]:
        """The aggregators', the server's and the devices' jobs, on `broker` when it is the embedded one;
        device I trains on the file `device_data[I]` when given (`write_partitions`)."""

        def job(role: str, name: str, settings, index: int = 0, data: Path | None = None) -> ChildJob:
            if self.embedded_broker:
                settings = dataclasses.replace(settings, broker=broker)
            return ChildJob(
                role=role,
                name=name,
                settings=settings,
                setup=self.setup,
                index=index,
                data=data,
                log_level=self.log_level,
                log_format=self.log_format,
            )

        return (
            [job("aggregator", item.name, item) for item in self.aggregators],
            job("server", "server", self.server),
            [
                job("device", item.device, item, index, device_data[index] if device_data else None)
                for index, item in enumerate(self.devices)
            ],
        )


def plan_fleet(
    setup: RunSetup,
    server: ServerSettings,
    device: DeviceSettings,
    *,
    broker: str | None = None,
    device_broker: str | None = None,
    login: FleetLogin = FleetLogin(),
    speeds: tuple[float, ...] = (),
    impairment: LinkImpairment = LinkImpairment(),
    impaired: tuple[int, ...] | None = None,
    log_level: str = "info",
    log_format: str = "text",
) -> FleetPlan:
    """The fleet of `edgegan run`: `server` and `device` (built from its flags, on EMBEDDED_BROKER) made into
    the server's and every device's settings on `broker` (None: the embedded one; the devices on
    `device_broker` if given: the shipped Mosquitto's boards' listener) with their logins;
    device I runs at `speeds[I]` (default all 1) and with `impairment` if I is in `impaired` (default all).
    A combination that cannot work is a ValueError naming the flags. The server's signing key is made (in
    the run directory, unless the server's settings name one) and pinned on every device."""
    count = setup.devices
    speeds = speeds or (1.0,) * count
    if len(speeds) != count or not all(DeviceSettings.speed_fits(speed) for speed in speeds):
        text = ",".join(f"{speed:g}" for speed in speeds)
        raise ValueError(f"--device-speeds needs {count} factors in (0, 1], got {text!r}")
    given = login.given()
    if device_broker is not None and broker is None:
        raise ValueError("--device-broker needs --broker: the embedded broker has one listener for all")
    if given and broker is None:
        raise ValueError(
            f"{', '.join(given)} need --broker: the embedded broker is anonymous and loopback only"
        )
    address = EMBEDDED_BROKER
    if broker is not None:
        address = with_login(
            parse_broker(broker), login.username, login.password_file,
            login.tls_ca, login.tls_cert, login.tls_key,
        )  # fmt: skip
    if login.username is not None and login.device_secrets is None:
        raise ValueError(
            "with --username every device needs a login too: --device-secrets DIR holding device-0.password "
            "... (edgegan broker add-device device-0 --secrets-dir DIR)"
        )
    if (login.username is not None or login.device_secrets is not None) and server.aggregators > 1:
        raise ValueError(
            "aggregator processes do not take a login yet; use --aggregators 1 with a secured broker"
        )
    device_addresses = [
        login.device_address(device_broker or broker, index) if broker else EMBEDDED_BROKER
        for index in range(count)
    ]
    if server.aggregators > 1 and broker is None:
        raise ValueError(
            f"--aggregators {server.aggregators} needs MQTT 5 shared subscriptions, which the embedded "
            "broker (amqtt) lacks; run Mosquitto >= 2.0 (mosquitto -c broker/mosquitto-dev.conf) and pass "
            "--broker mqtt://127.0.0.1:1883"
        )
    if impaired is not None and any(not 0 <= index < count for index in impaired):
        text = ",".join(str(index) for index in impaired)
        raise ValueError(f"--impair-devices indices must be between 0 and {count - 1}, got {text!r}")
    names = tuple(f"device-{index}" for index in range(count))
    # The server's signing key, made now (or reused on a rerun) so that every device starts with it pinned.
    signing_key = server.signing_key or setup.out / signing.KEY_FILE
    server_key = signing.public_bytes(signing.load_or_create(signing_key)[0]).hex()
    devices = tuple(
        dataclasses.replace(
            device, device=names[index], broker=device_addresses[index], speed=speeds[index],
            server_key=server_key,
            impairment=impairment if impaired is None or index in impaired else LinkImpairment(),
        )
        for index in range(count)
    )  # fmt: skip
    # Aggregators take neither a login nor TLS files yet (the plain broker address, as before).
    aggregators = tuple(
        AggregatorSettings(server.run, f"aggregator-{index}", parse_broker(broker) if broker else address)
        for index in range(server.aggregators)
    )
    return FleetPlan(
        setup=setup,
        server=dataclasses.replace(server, broker=address, allowed_devices=names, signing_key=signing_key),
        devices=devices,
        aggregators=aggregators if server.aggregators > 1 else (),
        embedded_broker=broker is None,
        log_level=log_level,
        log_format=log_format,
    )


def write_partitions(setup: RunSetup, folder: Path) -> list[Path]:
    """Splits the run's data set as the simulator does and writes each device's part to a file of its own,
    so that every device of `edgegan run` trains on its own data as a board does (`edgegan device --data`)."""
    dataset = load_dataset(setup.dataset, setup.data_dir)
    parts = partition_indices(dataset.y, setup.devices, parse_partition(setup.partition), setup.seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"device-{index}.pt" for index in range(setup.devices)]
    for path, part in zip(paths, parts, strict=True):
        torch.save(dataset.x[part].contiguous(), path)
    return paths


@dataclass(kw_only=True, frozen=True)
class ChildJob:
    """One process of the fleet: what it runs (`role`), under which name (its log file's), its settings,
    the run's set-up, its partition (devices) and how it logs."""

    role: str  # server | device | aggregator
    name: str
    settings: ServerSettings | DeviceSettings | AggregatorSettings = field(repr=False)
    setup: RunSetup = field(repr=False)
    index: int = 0
    data: Path | None = None  # a device's own data (its partition of the run's data set, as a file)
    log_level: str = "info"
    log_format: str = "text"

    def document(self) -> bytes:
        """The job as JSON, password included: for the child's stdin only, never a file or a log."""
        return json.dumps(to_plain(self)).encode()

    @classmethod
    def from_document(cls, text: str | bytes) -> ChildJob:
        """The job a launcher wrote with `document()`, every settings object rebuilt (and so validated)."""
        document = json.loads(text)
        settings = from_plain(SETTINGS[document["role"]], document["settings"])
        return cls(**{**document, "settings": settings, "setup": from_plain(RunSetup, document["setup"])})


def to_plain(value: Any) -> Any:
    """Dataclasses, paths and tuples as JSON values (dicts, strings, lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: to_plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, list | tuple):
        return [to_plain(item) for item in value]
    return value


def from_plain(kind: Any, value: Any) -> Any:
    """The inverse of `to_plain` for a value of type `kind` (a dataclass's field annotations say which)."""
    if value is None:
        return None
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(option for option in typing.get_args(kind) if option is not type(None))
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{item.name: from_plain(hints[item.name], value[item.name])
                       for item in dataclasses.fields(kind) if item.init and item.name in value})  # fmt: skip
    if isinstance(kind, type) and issubclass(kind, PurePath):
        return Path(value)
    if typing.get_origin(kind) is tuple:
        return tuple(from_plain(typing.get_args(kind)[0], item) for item in value)
    return value
