"""A lab of real links on one machine: the broker and the server in one network namespace, each device in
its own, joined by veth pairs through a bridge, each device link rate-limited with tbf and lossy with
nftables. Why: the runtime's own link emulation (`--drop-rate`, `--delay-ms`) loses whole MQTT messages,
which TCP never does; this lab puts the kernel's TCP between the processes instead (docs/netlab.md).

The commands are built by pure functions (`lab_steps`), testable without root; `Lab` applies them and
undoes them in reverse, idempotently, also after a failure, Ctrl-C or SIGTERM; `run_in_lab` runs Mosquitto,
`edgegan server` and one `edgegan device` per device namespace in it.

Rate limits sit on both ends of each veth pair (no ifb needed): egress of the device's `eth0` is its
uplink, egress of the bridge port facing it is its downlink. The bridge lives inside the server's
namespace, so the lab adds nothing to the host's own network namespace.

One file (about 500 lines) on purpose: the steps that build the lab and the ones that undo them must be
read side by side, or a teardown step goes missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgegan.costmodel import LinkProfile
from edgegan.devtools.mosquitto import MOSQUITTO, SHIPPED_CONFIG, SHIPPED_LISTENER

# Named links. `edge` is issue 19's (10 Mbit/s up, 20 down); the cost model itself had no named profiles.
# latency_ms is what the real link has; the lab cannot add it (no netem), so predictions against the lab
# use `lab_link(profile)`, which is the same rates at zero latency.
PROFILES: dict[str, LinkProfile] = {
    "edge": LinkProfile(uplink_mbps=10.0, downlink_mbps=20.0, latency_ms=10.0),
    "wifi": LinkProfile(uplink_mbps=40.0, downlink_mbps=80.0, latency_ms=2.5),
    "lte": LinkProfile(uplink_mbps=5.0, downlink_mbps=25.0, latency_ms=25.0),
    # A control: links so fast that a round is compute and messaging only.
    "lan": LinkProfile(uplink_mbps=1000.0, downlink_mbps=1000.0, latency_ms=0.1),
}
SUBNET = "10.231.0"  # inside the lab's own namespaces only: never routed, never on the host
SERVER_ADDRESS = f"{SUBNET}.1"
BROKER_PORT = 1883
BRIDGE = "br0"
NFT_TABLE = "netlab"
# tbf's queue limit: the longest a packet may wait in the shaper before it is dropped. It does not delay
# a packet that finds the queue empty, so it is a buffer size (100 ms of the link's rate), not a latency.
TBF_QUEUE_MS = 100
# The flags `edgegan device` shares with `edgegan server`: a lab run passes these from its server args.
DEVICE_SHARED_FLAGS = frozenset(
    {"--run", "--dataset", "--partition", "--seed", "--data-dir", "--width", "--latent-dim", "--codec",
     "--features", "--threads", "--torch-device", "--log-level", "--log-format"}
)  # fmt: skip


def lab_link(profile: LinkProfile) -> LinkProfile:
    """The link the lab really builds for `profile`: its rates, no added latency."""
    return LinkProfile(uplink_mbps=profile.uplink_mbps, downlink_mbps=profile.downlink_mbps, latency_ms=0.0)


@dataclass(kw_only=True, frozen=True)
class LabSpec:
    """What to build: `devices` device namespaces behind links of `profile`, each dropping `loss_percent`
    of its packets in each direction (only those in `lossy_devices`, when given); every name starts with
    `name` so that labs can coexist."""

    name: str = "netlab"
    devices: int = 2
    profile: LinkProfile = field(default_factory=lambda: PROFILES["edge"])
    loss_percent: int = 0
    lossy_devices: tuple[int, ...] | None = None  # None: every device

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 200:
            raise ValueError(f"--devices must be between 1 and 200, got {self.devices}")
        if not 0 <= self.loss_percent < 100:
            raise ValueError(f"--loss must be a whole percentage in [0, 100), got {self.loss_percent}")
        if self.lossy_devices is not None and any(not 0 <= i < self.devices for i in self.lossy_devices):
            raise ValueError(
                f"--loss-devices must be between 0 and {self.devices - 1}, got {self.lossy_devices}"
            )
        if not self.name.replace("-", "").isalnum() or len(self.name) > 20:
            raise ValueError(f"--name must be letters, digits and '-', at most 20, got {self.name!r}")

    def is_lossy(self, index: int) -> bool:
        return self.lossy_devices is None or index in self.lossy_devices

    @property
    def server_namespace(self) -> str:
        return f"{self.name}-server"

    def device_namespace(self, index: int) -> str:
        return f"{self.name}-dev{index}"

    @property
    def namespaces(self) -> list[str]:
        return [self.server_namespace] + [self.device_namespace(index) for index in range(self.devices)]

    @property
    def broker_url(self) -> str:
        return f"mqtt://{SERVER_ADDRESS}:{BROKER_PORT}"


@dataclass(frozen=True)
class Step:
    """One command that builds part of the lab, and the one that takes that part away again."""

    apply: tuple[str, ...]
    undo: tuple[str, ...]


def in_namespace(namespace: str, *command: str) -> tuple[str, ...]:
    return ("ip", "netns", "exec", namespace, *command)


def tbf_steps(namespace: str, device: str, mbps: float) -> list[Step]:
    """A token bucket on `device`'s egress: `mbps`, a burst of 10 ms of it (at least two full frames)."""
    rate_bits = int(mbps * 1e6)
    burst_bytes = max(2 * 1514, rate_bits // 8 // 100)
    tc = ("tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", f"{rate_bits}bit",
          "burst", str(burst_bytes), "latency", f"{TBF_QUEUE_MS}ms")  # fmt: skip
    undo = in_namespace(namespace, "tc", "qdisc", "del", "dev", device, "root")
    return [Step(in_namespace(namespace, *tc), undo)]


def loss_steps(namespace: str, device: str, percent: int) -> list[Step]:
    """An nftables table dropping `percent`% of the packets leaving and entering through `device`
    (loopback inside the namespace is untouched)."""
    if percent == 0:
        return []
    nft = ("nft",)
    table = ("inet", NFT_TABLE)
    steps = [Step(in_namespace(namespace, *nft, "add", "table", *table),
                  in_namespace(namespace, *nft, "delete", "table", *table))]  # fmt: skip
    for chain, hook, match in (("uplink", "output", "oifname"), ("downlink", "input", "iifname")):
        steps.append(Step(
            in_namespace(namespace, *nft, "add", "chain", *table, chain,
                         f"{{ type filter hook {hook} priority 0 ; policy accept ; }}"),
            in_namespace(namespace, *nft, "delete", "chain", *table, chain),
        ))  # fmt: skip
        steps.append(Step(
            in_namespace(namespace, *nft, "add", "rule", *table, chain, match, device,
                         "numgen", "random", "mod", "100", "<", str(percent), "drop"),
            in_namespace(namespace, *nft, "flush", "chain", *table, chain),
        ))  # fmt: skip
    return steps


def ip(namespace: str, *args: str) -> tuple[str, ...]:
    return ("ip", "-n", namespace, *args)


def lab_steps(spec: LabSpec) -> list[Step]:
    """Every command that builds the lab of `spec`, in order; undone in reverse."""
    server = spec.server_namespace
    bridge_address = f"{SERVER_ADDRESS}/24"
    steps = [
        Step(("ip", "netns", "add", server), ("ip", "netns", "del", server)),
        Step(ip(server, "link", "set", "lo", "up"), ip(server, "link", "set", "lo", "down")),
        Step(ip(server, "link", "add", BRIDGE, "type", "bridge"), ip(server, "link", "del", BRIDGE)),
        Step(
            ip(server, "addr", "add", bridge_address, "dev", BRIDGE),
            ip(server, "addr", "del", bridge_address, "dev", BRIDGE),
        ),  # fmt: skip
        Step(ip(server, "link", "set", BRIDGE, "up"), ip(server, "link", "set", BRIDGE, "down")),
    ]
    for index in range(spec.devices):
        device = spec.device_namespace(index)
        port = f"port{index}"  # the bridge's end of the device's veth pair, in the server's namespace
        address = f"{SUBNET}.{10 + index}/24"
        steps += [
            Step(("ip", "netns", "add", device), ("ip", "netns", "del", device)),
            Step(ip(device, "link", "set", "lo", "up"), ip(device, "link", "set", "lo", "down")),
            Step(
                ip(server, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", device),
                ip(server, "link", "del", port),
            ),  # fmt: skip
            Step(
                ip(server, "link", "set", port, "master", BRIDGE, "up"),
                ip(server, "link", "set", port, "nomaster"),
            ),
            Step(
                ip(device, "addr", "add", address, "dev", "eth0"),
                ip(device, "addr", "del", address, "dev", "eth0"),
            ),
            Step(ip(device, "link", "set", "eth0", "up"), ip(device, "link", "set", "eth0", "down")),
            *tbf_steps(device, "eth0", spec.profile.uplink_mbps),
            *tbf_steps(server, port, spec.profile.downlink_mbps),
            *loss_steps(device, "eth0", spec.loss_percent if spec.is_lossy(index) else 0),
        ]
    return steps


def broker_config(shipped: str) -> str:
    """broker/mosquitto-dev.conf as shipped, listening on the server's lab address instead of loopback."""
    if SHIPPED_LISTENER not in shipped:
        raise RuntimeError(f"broker/mosquitto-dev.conf no longer has '{SHIPPED_LISTENER}'")
    return shipped.replace(SHIPPED_LISTENER, f"listener {BROKER_PORT} {SERVER_ADDRESS}")


def flag_values(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """`--flag value` and `--flag=value` pairs of an argument list (a flag followed by a flag has None)."""
    pairs, index = [], 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--"):
            raise ValueError(f"expected a --flag among the edgegan args, got {arg!r}")
        if "=" in arg:
            flag, value = arg.split("=", 1)
            pairs.append((flag, value))
            index += 1
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            pairs.append((arg, args[index + 1]))
            index += 2
        else:
            pairs.append((arg, None))
            index += 1
    return pairs


def device_args(server_args: Sequence[str]) -> list[str]:
    """The part of the server's args that every device must be given too (data set, codec, seed ...)."""
    kept: list[str] = []
    for flag, value in flag_values(server_args):
        if flag in DEVICE_SHARED_FLAGS:
            kept += [flag] if value is None else [flag, value]
    return kept


def server_command(spec: LabSpec, server_args: Sequence[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "edgegan", "server", "--broker", spec.broker_url,
            "--devices", str(spec.devices), "--out", str(out), *server_args]  # fmt: skip


def device_command(spec: LabSpec, index: int, server_args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "edgegan", "device", "--id", f"device-{index}", "--index", str(index),
            "--of", str(spec.devices), "--broker", spec.broker_url, *device_args(server_args)]  # fmt: skip


class LabError(RuntimeError):
    """A lab command failed: the message names the command and what it printed."""


def execute(command: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=30)


def namespaces_present(names: Sequence[str]) -> list[str]:
    """Which of `names` exist as network namespaces now."""
    listed = execute(["ip", "netns", "list"]).stdout.split("\n")
    existing = {line.split()[0] for line in listed if line.strip()}
    return [name for name in names if name in existing]


def lab_device_count(name: str) -> int:
    """How many device namespaces a lab called `name` has now (one past the highest NAME-devI)."""
    listed = execute(["ip", "netns", "list"]).stdout.split("\n")
    pattern = re.compile(rf"{re.escape(name)}-dev(\d+)$")
    indices = [
        int(match.group(1)) for line in listed if line.strip() and (match := pattern.match(line.split()[0]))
    ]
    return max(indices, default=-1) + 1


class Lab:
    """`with Lab(spec) as lab:` builds the lab, `lab.spawn(...)` starts processes in its namespaces; leaving
    the block (normally, on an error, Ctrl-C or SIGTERM) stops them and undoes every step in reverse."""

    def __init__(self, spec: LabSpec):
        self.spec = spec
        self.processes: list[subprocess.Popen] = []

    def build(self) -> None:
        for step in lab_steps(self.spec):
            result = execute(step.apply)
            if result.returncode != 0:
                raise LabError(f"{' '.join(step.apply)}: {result.stderr.strip() or result.returncode}")

    def spawn(self, namespace: str, command: Sequence[str], log_path: Path) -> subprocess.Popen:
        """Starts `command` in `namespace` in a session of its own, its output in `log_path`."""
        with open(log_path, "ab") as log:
            process = subprocess.Popen(list(in_namespace(namespace, *command)), stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def stop_processes(self) -> None:
        """Terminates what `spawn` started (kills it after 10 s), newest first, then anything left over in
        the lab's namespaces (a grandchild), by pid, so that the namespaces can go."""
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for namespace in namespaces_present(self.spec.namespaces):
            for pid in execute(["ip", "netns", "pids", namespace]).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

    def teardown(self) -> list[str]:
        """Stops the lab's processes and undoes every step in reverse, ignoring parts already gone; returns
        the namespaces still there afterwards (none, unless something else holds them)."""
        self.stop_processes()
        for step in reversed(lab_steps(self.spec)):
            execute(step.undo)
        return namespaces_present(self.spec.namespaces)

    def __enter__(self) -> Lab:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
        self.previous_handler = previous
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            left = self.teardown()
        finally:
            signal.signal(signal.SIGTERM, self.previous_handler)
        if left:
            raise LabError(f"namespaces left after teardown: {', '.join(left)}")


def raise_interrupt(signum, frame) -> None:
    """SIGTERM as Ctrl-C: unwinds the `with Lab` block, which tears the lab down."""
    raise KeyboardInterrupt


def wait_for_broker(lab: Lab, timeout_s: float = 15.0) -> None:
    """Returns once the broker accepts connections on the lab's address, as seen from device 0."""
    probe = f"import socket; socket.create_connection(('{SERVER_ADDRESS}', {BROKER_PORT}), 1).close()"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if execute(in_namespace(lab.spec.device_namespace(0), sys.executable, "-c", probe)).returncode == 0:
            return
        time.sleep(0.2)
    raise LabError(f"no broker answers at {SERVER_ADDRESS}:{BROKER_PORT} within {timeout_s:g} s")


def snmp_counters(text: str, section: str, names: Sequence[str]) -> dict[str, int]:
    """Named counters of one section of /proc/net/snmp or /proc/net/netstat (a header line, then values)."""
    lines = [line.split() for line in text.splitlines() if line.startswith(f"{section}:")]
    if len(lines) < 2:
        return {}
    values = dict(zip(lines[0][1:], lines[1][1:], strict=True))
    return {name: int(values[name]) for name in names if name in values}


def link_counters(spec: LabSpec) -> dict[str, dict]:
    """What the kernel saw on each namespace: TCP segments sent and retransmitted, retransmission timeouts,
    and the packets each tbf shaper dropped for a full queue (the loss nftables adds is not among those)."""
    counters = {}
    for index, namespace in enumerate(spec.namespaces):
        snmp = execute(in_namespace(namespace, "cat", "/proc/net/snmp")).stdout
        netstat = execute(in_namespace(namespace, "cat", "/proc/net/netstat")).stdout
        ports = ["eth0"] if index > 0 else [f"port{device}" for device in range(spec.devices)]
        shaped = {}
        for port in ports:
            listed = execute(in_namespace(namespace, "tc", "-s", "-j", "qdisc", "show", "dev", port)).stdout
            with contextlib.suppress(json.JSONDecodeError):
                shaped[port] = sum(qdisc.get("drops", 0) for qdisc in json.loads(listed or "[]"))
        counters[namespace] = {
            **snmp_counters(snmp, "Tcp", ("OutSegs", "RetransSegs")),
            **snmp_counters(netstat, "TcpExt", ("TCPTimeouts", "TCPLossProbes", "TCPSlowStartRetrans")),
            "tbf_drops": shaped,
        }
    return counters


def run_in_lab(spec: LabSpec, server_args: Sequence[str], out: Path, timeout_s: float = 3600.0) -> dict:
    """Builds the lab, runs Mosquitto and `edgegan server` in the server's namespace and `edgegan device`
    in each device's, waits for the server to finish and returns its summary.json (logs in out/netlab/)."""
    if any(flag in ("--broker", "--devices", "--out") for flag, _ in flag_values(server_args)):
        raise ValueError("netlab sets --broker, --devices and --out of the server; give netlab those")
    logs = out / "netlab"
    logs.mkdir(parents=True, exist_ok=True)
    config = logs / "mosquitto.conf"
    config.write_text(broker_config(SHIPPED_CONFIG.read_text()))
    config.chmod(0o644)
    started = time.monotonic()
    with Lab(spec) as lab:
        lab.spawn(spec.server_namespace, [MOSQUITTO, "-c", str(config)], logs / "mosquitto.log")
        wait_for_broker(lab)
        server = lab.spawn(spec.server_namespace, server_command(spec, server_args, out), logs / "server.log")
        for index in range(spec.devices):
            lab.spawn(spec.device_namespace(index), device_command(spec, index, server_args),
                      logs / f"device-{index}.log")  # fmt: skip
        try:
            code = server.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise LabError(f"the server did not finish within {timeout_s:g} s (logs in {logs})") from None
        wall_s = time.monotonic() - started
        counters = link_counters(spec)
    summary_path = out / "summary.json"
    if code != 0 or not summary_path.is_file():
        raise LabError(f"edgegan server exited {code} without summary.json: see {logs / 'server.log'}")
    summary = json.loads(summary_path.read_text())
    summary["netlab"] = {"devices": spec.devices, "uplink_mbps": spec.profile.uplink_mbps,
                         "downlink_mbps": spec.profile.downlink_mbps, "loss_percent": spec.loss_percent,
                         "lossy_devices": spec.lossy_devices, "wall_s": round(wall_s, 3),
                         "kernel": counters}  # fmt: skip
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="scripts/netlab", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {
        "run": "build a lab, run a fleet through it, tear it down",
        "up": "build a lab and leave it (for trying things by hand)",
        "down": "tear a lab down (idempotent; after a crash too)",
        "plan": "print the commands that build the lab, without running them",
    }
    for command, help_text in helps.items():
        sub = commands.add_parser(command, help=help_text)
        sub.add_argument("--name", default="netlab", help="prefix of every namespace (default: netlab)")
        sub.add_argument("--devices", type=int, default=2)
        sub.add_argument("--profile", choices=sorted(PROFILES), default="edge")
        sub.add_argument("--uplink-mbps", type=float, help="overrides the profile's uplink")
        sub.add_argument("--downlink-mbps", type=float, help="overrides the profile's downlink")
        sub.add_argument("--loss", type=int, default=0, help="percent of packets dropped each way")
        sub.add_argument("--loss-devices", help="comma-separated device indices the loss applies to (all)")
        if command == "run":
            sub.add_argument("--out", type=Path, default=Path("runs/netlab"))
            sub.add_argument("--timeout-s", type=float, default=3600.0)
    argv = list(argv)
    rest: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, rest = argv[:split], argv[split + 1 :]
    return parser.parse_args(argv), rest


def spec_from(args: argparse.Namespace) -> LabSpec:
    profile = PROFILES[args.profile]
    profile = LinkProfile(uplink_mbps=args.uplink_mbps or profile.uplink_mbps,
                          downlink_mbps=args.downlink_mbps or profile.downlink_mbps,
                          latency_ms=profile.latency_ms)  # fmt: skip
    lossy = None
    if args.loss_devices:
        lossy = tuple(int(index) for index in args.loss_devices.split(","))
    return LabSpec(name=args.name, devices=args.devices, profile=profile, loss_percent=args.loss,
                   lossy_devices=lossy)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = spec_from(args)
    except ValueError as error:
        print(f"netlab: {error}", file=sys.stderr)
        return 2
    if args.command == "plan":
        for step in lab_steps(spec):
            print(" ".join(step.apply))
        return 0
    if os.geteuid() != 0:
        print("netlab: needs root (ip netns, tc, nft)", file=sys.stderr)
        return 2
    if args.command == "down":
        # The lab as built, whatever --devices says now: every NAME-devI namespace there is.
        found = lab_device_count(spec.name)
        if found > spec.devices:
            spec = dataclasses.replace(spec, devices=found)
        left = Lab(spec).teardown()
        print(f"netlab: {', '.join(left)} still there" if left else f"netlab: lab {spec.name} is down")
        return 1 if left else 0
    if args.command == "up":
        lab = Lab(spec)
        try:
            lab.build()
        except BaseException:
            lab.teardown()
            raise
        print(f"netlab: up: {', '.join(spec.namespaces)}; undo: scripts/netlab down --name {spec.name}")
        return 0
    try:
        summary = run_in_lab(spec, rest, args.out, args.timeout_s)
    except (LabError, ValueError) as error:
        print(f"netlab: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netlab: interrupted; the lab is torn down", file=sys.stderr)
        return 130
    print(json.dumps({key: summary.get(key) for key in ("rounds", "wall_time_s", "final", "netlab")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
