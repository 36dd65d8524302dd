"""What every section of the runtime benchmark shares: the sizes it runs at, starting and measuring
processes (wall time, peak RSS and CPU from wait4(2) and /proc), the broker it runs over, a live watcher of
device status messages, and readers of a run's outputs (metrics.csv, trace.jsonl, summary.json)."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgegan.devtools.mosquitto import Mosquitto, mosquitto_installed
from edgegan.devtools.procfs import proc_cpu_s, proc_status
from edgegan.runtime.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[3]


@dataclass(kw_only=True, frozen=True)
class Sizes:
    """How big each section runs; --quick and the defaults are two instances."""

    repeats: int = 3  # overhead: runs per variant (median reported)
    overhead_devices: int = 4
    overhead_rounds: tuple[tuple[str, int], ...] = (("mnist", 100), ("ring8", 500))
    parallel_devices: int = 1  # each party gets a core of its own only with one device on 2 cores
    parallel_rounds: int = 100
    codec_rounds: int = 300
    codec_repeats: int = 200  # encode/decode timings: median of this many
    codec_trained: tuple[str, ...] = ("fp32", "fp16", "int8", "fp32+zstd", "fp16+zstd", "int8+zstd")
    eval_samples: int = 2500
    scale_devices: int = 32
    scale_rounds: int = 50
    load_clients: tuple[int, ...] = (10, 100, 1000)
    load_rounds: int = 3  # measured rounds per N (plus a warm-up round and the final, evaluated, round)
    load_connections: int = 4
    aggregate_clients: tuple[int, ...] = (10, 100, 1000)
    aggregate_repeats: int = 3
    footprint_rounds: int = 50
    profile_rounds: int = 50


QUICK = Sizes(
    repeats=1,
    overhead_devices=2,
    overhead_rounds=(("ring8", 20),),
    parallel_rounds=6,
    codec_rounds=3,
    codec_repeats=10,
    codec_trained=("fp32", "int8+zstd"),
    eval_samples=500,
    scale_devices=4,
    scale_rounds=5,
    load_clients=(5, 20),
    load_rounds=2,
    load_connections=2,
    aggregate_clients=(5, 20),
    aggregate_repeats=1,
    footprint_rounds=5,
    profile_rounds=5,
)


# --- measuring processes ---------------------------------------------------------------------------------


@dataclass
class Measured:
    """One finished process: wall seconds, exit code, peak RSS (MB) and CPU seconds from wait4(2)."""

    wall_s: float
    returncode: int
    max_rss_mb: float
    cpu_s: float


def edgegan_command(*args: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "edgegan", *args]


def child_env(python: str = sys.executable) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if python != sys.executable:  # another interpreter (e.g. a CPU-only torch) runs this checkout's edgegan
        env["PYTHONPATH"] = str(ROOT)
    return env


# Each measured command runs under this small wrapper, which forks it and reports its wait4(2) usage. A
# child forked straight from this script would inherit the script's own peak RSS (torch is loaded here):
# Linux carries the pre-exec image's high-water mark into ru_maxrss. The wrapper is a bare `python -S`.
WRAPPER = """
import json, os, signal, sys
result, command = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(command[0], command)
    finally:
        os._exit(127)
with open(result + ".pid", "w") as handle:
    handle.write(str(pid))
for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda number, frame: os.kill(pid, number))
_, status, usage = os.wait4(pid, 0)
with open(result, "w") as handle:
    json.dump({"max_rss_kb": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime}, handle)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def start(command: Sequence[str], log_path: Path, python: str = sys.executable) -> subprocess.Popen:
    """Starts `command` under the measuring wrapper; its output goes to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage_path = log_path.with_suffix(".usage.json")
    for stale in (usage_path, Path(f"{usage_path}.pid")):
        stale.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-S", "-c", WRAPPER, str(usage_path), *command],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(python),
        )  # fmt: skip
    process.started_at = time.perf_counter()  # type: ignore[attr-defined]
    process.usage_path = usage_path  # type: ignore[attr-defined]
    return process


def command_pid(process: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """The pid of the command itself (the wrapper's child), for sampling /proc while it runs."""
    pid_path = Path(f"{process.usage_path}.pid")  # type: ignore[attr-defined]
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if pid_path.is_file() and pid_path.read_text().strip():
            return int(pid_path.read_text())
        time.sleep(0.01)
    raise TimeoutError(f"{process.args[4:]} did not start")


def reap(processes: dict[str, subprocess.Popen], timeout_s: float) -> dict[str, Measured]:
    """Waits for every process and reads each command's own peak RSS and CPU time; past `timeout_s` the
    rest are terminated, then killed, and reported with their exit codes."""
    deadline = time.perf_counter() + timeout_s
    results: dict[str, Measured] = {}
    pending = dict(processes)
    terminated_at = None
    while pending:
        for name, process in list(pending.items()):
            if process.poll() is None:
                continue
            usage_path = process.usage_path  # type: ignore[attr-defined]
            usage = json.loads(usage_path.read_text()) if usage_path.is_file() else {}
            results[name] = Measured(
                wall_s=time.perf_counter() - process.started_at,  # type: ignore[attr-defined]
                returncode=process.returncode,
                max_rss_mb=usage.get("max_rss_kb", float("nan")) / 1024,
                cpu_s=usage.get("cpu_s", float("nan")),
            )
            del pending[name]
        now = time.perf_counter()
        if pending and now > deadline and terminated_at is None:
            print(f"  timeout: stopping {', '.join(pending)}", file=sys.stderr, flush=True)
            for process in pending.values():
                process.send_signal(signal.SIGTERM)  # the wrapper passes it on
            terminated_at = now
        elif pending and terminated_at is not None and now > terminated_at + 20:
            for process in pending.values():
                try:
                    os.kill(command_pid(process, 0.1), signal.SIGKILL)
                except (TimeoutError, ProcessLookupError):
                    pass
                process.kill()
        time.sleep(0.05)
    return results


def run_measured(command: Sequence[str], log_path: Path, timeout_s: float) -> Measured:
    return reap({"command": start(command, log_path)}, timeout_s)["command"]


def mapped_rss_mb(pid: int) -> dict[str, float]:
    """Resident MB per kind of mapping (torch, CUDA libraries, torchvision, other files, anonymous)."""
    groups: dict[str, float] = {}
    current = "anonymous"
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                head = line.split()
                if not head:
                    continue
                if not head[0].endswith(":") or len(head[0]) > 1 and "-" in head[0]:
                    path = head[5] if len(head) > 5 else ""
                    current = mapping_group(path)
                elif head[0] == "Rss:":
                    groups[current] = groups.get(current, 0.0) + int(head[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return groups


def mapping_group(path: str) -> str:
    if not path.startswith("/"):
        return "anonymous (heap, tensors, Python objects)"
    if "/nvidia/" in path or "cuda" in path.rsplit("/", 1)[-1]:
        return "CUDA libraries (nvidia/*, libtorch_cuda)"
    if "/torchvision" in path:
        return "torchvision"
    if "/torch/" in path:
        return "torch CPU libraries"
    return "other files (python, numpy, ...)"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def time_median(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return median(times)


# --- brokers and live MQTT observers ---------------------------------------------------------------------


class Broker:
    """Mosquitto from broker/mosquitto-dev.conf on a free loopback port (edgegan.devtools.mosquitto, as the
    test suite starts it), or the embedded broker when Mosquitto is not installed."""

    def __init__(self, work: Path):
        self.work = work
        self.mosquitto = Mosquitto(work, log_path=work / "broker.log") if mosquitto_installed() else None
        self.port = self.mosquitto.port if self.mosquitto is not None else free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.name = "Mosquitto" if self.mosquitto else "embedded broker (Mosquitto not installed)"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Broker:
        self.work.mkdir(parents=True, exist_ok=True)
        if self.mosquitto is not None:
            self.name = "Mosquitto " + self.mosquitto.version
            self.mosquitto.__enter__()
            self.process = self.mosquitto.process
            return self
        command = edgegan_command("broker", "--port", str(self.port), "--log-level", "warning")
        with open(self.work / "broker.log", "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for_port(self.port)
        return self

    def cpu_s(self) -> float:
        """The broker process's CPU seconds so far (0 when it is not running)."""
        return (proc_cpu_s(self.process.pid) or 0.0) if self.process is not None else 0.0

    def __exit__(self, *exc) -> None:
        if self.mosquitto is not None:
            self.mosquitto.__exit__(*exc)
        elif self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class StatusWatcher:
    """Records every device status message of a run (they carry the device's per-round compute) and, for
    devices whose pid it knows, samples that process's CPU time and memory at each status."""

    def __init__(self, port: int, run: str, pids: dict[str, int] | None = None):
        import paho.mqtt.client as mqtt

        from edgegan import topics, wire

        self.run = run
        self.pids = pids or {}
        self.records: list[dict] = []
        self.samples: dict[str, list[dict]] = {}
        self.lock = threading.Lock()
        self.decode_status = wire.decode_status
        self.device_of = topics.device_of
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-watch-{run}")
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topics.all_statuses(run), qos=1)
        self.client.loop_start()

    def on_message(self, client, userdata, message) -> None:
        try:
            status = self.decode_status(message.payload)
        except ValueError:
            return
        device = self.device_of(message.topic)
        record = {"device": device, "time": time.perf_counter(), **status}
        with self.lock:
            self.records.append(record)
            pid = self.pids.get(device)
            if pid is not None:
                sample = {
                    "time": record["time"],
                    "round": status.get("round"),
                    "cpu_s": proc_cpu_s(pid),
                    **proc_status(pid),
                }
                self.samples.setdefault(device, []).append(sample)

    def compute_by_round(self) -> dict[int, dict[str, float]]:
        """round -> device -> that device's compute (decode + train + encode) in that round."""
        table: dict[int, dict[str, float]] = {}
        with self.lock:
            for record in self.records:
                if record.get("state") == "online" and record.get("round", -1) >= 0:
                    if "round_compute_s" in record:
                        table.setdefault(record["round"], {})[record["device"]] = record["round_compute_s"]
        return table

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def transfer_probe(port: int, sizes: dict[str, int], repeats: int = 15) -> dict[str, float]:
    """Median seconds for a QoS 1 message of each size to go client -> broker -> client on loopback: what
    one message between a device and the server costs on the wire here."""
    import paho.mqtt.client as mqtt

    from edgegan import topics

    topic = topics.update("bench-probe", "probe")
    arrived = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-probe")
    client.on_message = lambda *_: arrived.set()
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    time.sleep(0.3)
    results = {}
    try:
        for name, size in sizes.items():
            payload = os.urandom(size)
            times = []
            for _ in range(repeats):
                arrived.clear()
                started = time.perf_counter()
                client.publish(topic, payload, qos=1)
                if not arrived.wait(10):
                    raise TimeoutError("the probe message did not come back")
                times.append(time.perf_counter() - started)
            results[name] = median(times)
    finally:
        client.loop_stop()
        client.disconnect()
    return results


# --- run outputs -----------------------------------------------------------------------------------------


def read_metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def read_trace(out: Path) -> list[dict]:
    with open(out / "trace.jsonl") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def round_durations(rows: list[dict]) -> dict[int, float]:
    """round -> seconds that round took, from metrics.csv's wall clock. Leaves out round 1 (it includes
    waiting for device processes to start) and evaluation rounds (they include the quality probe)."""
    durations = {}
    quality_key = "fid" if "fid" in rows[0] else "modes"
    for previous, row in zip(rows, rows[1:], strict=False):
        round_index = int(row["round"])
        if round_index >= 2 and not row.get(quality_key):
            durations[round_index] = float(row["wall_time_s"]) - float(previous["wall_time_s"])
    return durations


def final_quality(summary: dict) -> str:
    final = summary.get("final") or {}
    if "fid" in final:
        return f"fid {final['fid']:.1f}, {final['classes']} classes"
    if "modes" in final:
        return f"{final['modes']} modes, hq {final['hq']:.2f}"
    return "—"
