"""Runtime performance (issue 5): what the MQTT runtime costs over the in-process simulator, how close the
parallel schedule comes to its round-time bound, what each codec costs and saves, how the server scales
with real and light clients, what the aggregation rules cost against N, what a device process weighs, and
where a server and a device spend their time.

Every run goes through the `edgegan` command (or, for micro-benchmarks, the package's own functions) and
is measured from outside: whole-command wall time, the run's own summary.json / metrics.csv / trace.jsonl,
and each process's peak RSS and CPU seconds from wait4(2) and /proc. Writes runs/bench-runtime/report.md
(section by section, so an interrupted run keeps what it measured), results.json and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import csv
import json
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgegan.runtime.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SECTIONS = ("overhead", "parallel", "codecs", "scale", "load", "aggregation", "footprint", "profile")
IDLE_FUNCTIONS = ("poll' of 'select.epoll", "acquire' of '_thread.lock", "time.sleep", "_thread.lock")


@dataclass(frozen=True)
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


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile (kB) and Threads of a live process; {} once it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                    fields[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return fields


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process so far (from /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            after_name = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(after_name[11]) + int(after_name[12])) / ticks


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


# --- brokers and live MQTT observers ---------------------------------------------------------------------


class Broker:
    """Mosquitto from broker/mosquitto-dev.conf on a free loopback port (as tests/test_runtime_mqtt.py
    starts it), or the embedded broker when Mosquitto is not installed."""

    def __init__(self, work: Path):
        self.work = work
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.mosquitto = Path(MOSQUITTO).exists()
        self.name = "Mosquitto" if self.mosquitto else "embedded broker (Mosquitto not installed)"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Broker:
        self.work.mkdir(parents=True, exist_ok=True)
        if self.mosquitto:
            shipped = (ROOT / "broker" / "mosquitto-dev.conf").read_text()
            if "listener 1883 127.0.0.1" not in shipped:
                raise RuntimeError("broker/mosquitto-dev.conf no longer has 'listener 1883 127.0.0.1'")
            config = self.work / "mosquitto.conf"
            config.write_text(shipped.replace("listener 1883 127.0.0.1", f"listener {self.port} 127.0.0.1"))
            config.chmod(0o644)
            self.work.chmod(0o755)
            version = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True).stdout.split("\n")[0]
            self.name = "Mosquitto " + version.strip().removeprefix("mosquitto version ")
            command = [MOSQUITTO, "-c", str(config)]
        else:
            command = edgegan_command("broker", "--port", str(self.port), "--log-level", "warning")
        with open(self.work / "broker.log", "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for_port(self.port)
        return self

    def cpu_s(self) -> float:
        """The broker process's CPU seconds so far (0 when it is not running)."""
        return (proc_cpu_s(self.process.pid) or 0.0) if self.process is not None else 0.0

    def __exit__(self, *exc) -> None:
        if self.process is not None:
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


# --- the report ------------------------------------------------------------------------------------------


def machine_description() -> dict:
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or "unknown",
    )
    memory_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(memory_kb / 2**20, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return lines


class Report:
    """report.md and results.json, rewritten after every section."""

    def __init__(self, out: Path, command: str, machine: dict, sizes: Sizes):
        self.out = out
        self.command = command
        self.machine = machine
        self.sizes = sizes
        self.sections: list[tuple[str, list[str]]] = []
        self.results: dict[str, object] = {"machine": machine, "sizes": asdict(sizes)}

    def machine_line(self) -> str:
        m = self.machine
        load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
        return (
            f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, torch {m['torch']}, "
            f"Python {m['python']}; load average at the start {m['load_average_at_start']}, "
            f"after this section {load}."
        )

    def add(self, title: str, lines: list[str], results: object) -> None:
        self.sections.append((title, [f"Command: `{self.command}`. " + self.machine_line(), "", *lines]))
        self.results[title] = results
        self.write()

    def write(self) -> None:
        text = ["# Runtime performance", "", f"Command: `{self.command}`", ""]
        for title, lines in self.sections:
            text += [f"## {title}", "", *lines, ""]
        (self.out / "report.md").write_text("\n".join(text))
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


# --- 1. runtime against simulator ------------------------------------------------------------------------


STARTUP_ROUNDS = 2  # overhead: the short run whose CPU is start-up and shutdown


def section_overhead(sizes: Sizes, work: Path, broker: Broker) -> tuple[list[str], dict]:
    variants = {
        "simulate": "edgegan simulate --algo serial",
        "run-embedded": "edgegan run (embedded broker)",
        "run-mosquitto": f"edgegan run --broker {broker.name}",
    }
    keys = ("command_s", "training_s", "steady_s", "round_s", "cpu_s")
    results: dict = {}
    rows = []
    cpu_rows = []

    def run_variant(dataset: str, rounds: int, variant: str, tag: str) -> tuple[Measured, Path, float]:
        """One run; returns what wait4 measured, its run directory and the CPU seconds of every process
        it used: the command's tree (wait4 counts the children it reaped) plus Mosquitto's share."""
        common = ["--dataset", dataset, "--devices", str(sizes.overhead_devices), "--rounds", str(rounds),
                  "--seed", "0", "--eval-every", str(rounds)]  # fmt: skip
        out = work / f"{dataset}-{variant}-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        if variant == "simulate":
            command = edgegan_command("simulate", "--algo", "serial", *common, "--out", str(out))
        else:
            extra = ["--broker", broker.url] if variant == "run-mosquitto" else []
            run_name = f"bench-overhead-{dataset}-{variant}-{tag}-{os.getpid()}"
            command = edgegan_command("run", *common, "--run", run_name, "--out", str(out), *extra)
        log = work / f"{dataset}-{variant}-{tag}.log"
        broker_before = broker.cpu_s() if variant == "run-mosquitto" else 0.0
        measured = run_measured(command, log, 30 * 60)
        broker_cpu = broker.cpu_s() - broker_before if variant == "run-mosquitto" else 0.0
        if measured.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed; see {log}")
        return measured, out, measured.cpu_s + broker_cpu

    for dataset, rounds in sizes.overhead_rounds:
        runs: dict[str, list[dict]] = {variant: [] for variant in variants}
        names = list(variants)
        for repeat in range(sizes.repeats):
            for variant in names[repeat % len(names) :] + names[: repeat % len(names)]:
                print(f"  overhead: {dataset} {variant} (run {repeat + 1})", file=sys.stderr, flush=True)
                measured, out, cpu_s = run_variant(dataset, rounds, variant, str(repeat))
                summary = json.loads((out / "summary.json").read_text())
                durations = list(round_durations(read_metrics(out)).values())
                runs[variant].append({
                    "command_s": measured.wall_s, "training_s": summary["wall_time_s"],
                    "steady_s": sum(durations), "round_s": median(durations), "final": final_quality(summary),
                    "cpu_s": cpu_s,
                })  # fmt: skip
        # The same command for STARTUP_ROUNDS rounds: what start-up, the two evaluations and shutdown cost
        # in CPU, so that the difference is what the rounds themselves cost, summed over every process.
        startup = {}
        for variant in names:
            print(f"  overhead: {dataset} {variant} ({STARTUP_ROUNDS} rounds)", file=sys.stderr, flush=True)
            startup[variant] = run_variant(dataset, STARTUP_ROUNDS, variant, "startup")[2]
        results[dataset] = {"rounds": rounds, "runs": runs}
        for variant in variants:
            results[dataset][variant] = {key: median([run[key] for run in runs[variant]]) for key in keys}
            results[dataset][variant]["startup_cpu_s"] = startup[variant]
            results[dataset][variant]["cpu_ms_per_round"] = (
                1000 * (results[dataset][variant]["cpu_s"] - startup[variant]) / (rounds - STARTUP_ROUNDS)
            )
        base = results[dataset]["simulate"]
        for variant, label in variants.items():
            values = results[dataset][variant]
            cpu_rows.append([
                dataset, label, values["cpu_s"], values["startup_cpu_s"], values["cpu_ms_per_round"],
                # (a few rounds, as --quick runs, are within the start-up's noise: no ratio then)
                f"{values['cpu_ms_per_round'] / base['cpu_ms_per_round']:.2f}"
                if base["cpu_ms_per_round"] > 0
                else "n/a",
                values["cpu_ms_per_round"] / os.cpu_count(), values["round_s"] * 1000,
            ])  # fmt: skip
        for variant, label in variants.items():
            values = results[dataset][variant]
            rows.append([
                dataset, rounds, label, values["command_s"], values["training_s"], values["steady_s"],
                values["round_s"] * 1000, f"{values['steady_s'] / base['steady_s']:.3f}",
                f"{values['round_s'] / base['round_s']:.3f}",
                f"{values['training_s'] / base['training_s']:.3f}",
                ", ".join(f"{run['steady_s']:.1f}" for run in runs[variant]),
                "; ".join(sorted({run["final"] for run in runs[variant]})),
            ])  # fmt: skip
    ratios = {
        (dataset, variant): results[dataset][variant]["steady_s"] / results[dataset]["simulate"]["steady_s"]
        for dataset, _ in sizes.overhead_rounds
        for variant in variants
        if variant != "simulate"
    }
    finals_agree = all(
        len({run["final"] for variant in variants for run in results[dataset]["runs"][variant]}) == 1
        for dataset, _ in sizes.overhead_rounds
    )
    results["steady_ratios"] = {f"{dataset} {variant}": ratio for (dataset, variant), ratio in ratios.items()}
    lines = [
        f"The same rounds three ways: `edgegan simulate --algo serial`, `edgegan run` (embedded broker) and "
        f"`edgegan run --broker mqtt://127.0.0.1:PORT` on {broker.name} started from "
        f"broker/mosquitto-dev.conf; {sizes.overhead_devices} devices, seed 0, fp32, full quorum, "
        f"evaluation only at the start and the end (`--eval-every ROUNDS`), {sizes.repeats} run(s) each, "
        "the order rotated between repeats. *Command* is the whole command from outside (start-up, "
        "broker, children, shutdown); *training wall* is summary.json's `wall_time_s` (the simulator's "
        "loop or the server's, both with the initial and final evaluation; the server's also waits for "
        "the device processes to start); *rounds* is the sum and *per round* the median of the rounds in "
        "metrics.csv's wall clock, leaving out round 1 (devices starting) and evaluation rounds. Medians "
        "over the runs; ratios are against the simulator.",
        "",
        *table(
            [
                "data",
                "rounds",
                "variant",
                "command s",
                "training wall s",
                "rounds s",
                "per round ms",
                "rounds vs sim",
                "per round vs sim",
                "training wall vs sim",
                "each run (rounds s)",
                "final quality",
            ],
            rows,
        ),  # fmt: skip
        "",
        "Target: the runtime at most 10% over the simulator (the rounds column) — "
        + "; ".join(
            f"{dataset}, {variant}: {verdict(ratio <= 1.10)} ({ratio:.2f}x)"
            for (dataset, variant), ratio in ratios.items()
        )  # fmt: skip
        + f". The simulator trains the devices one after another in one process; `edgegan run` trains "
        f"them in {sizes.overhead_devices} processes at once on {os.cpu_count()} cores, so where training "
        "dominates (MNIST) the runtime can even be faster; on ring8 a round is a few milliseconds of "
        "compute and what is left is messaging: publishing, a thread hop for every decode, fold and "
        "generator step, and a QoS 1 round trip per message. Final quality the same in every variant "
        f"(fp32 and a full quorum reproduce the simulator): {'yes' if finals_agree else '**no**'}.",
        "",
        f"What a round costs in CPU, summed over every process a variant uses (the command and the children "
        f"it reaps, from wait4(2), plus Mosquitto's own CPU from /proc for the Mosquitto variant): *CPU s* "
        f"is the run above (median), *start-up CPU s* the same command for {STARTUP_ROUNDS} rounds (imports, "
        f"data, the two evaluations, shutdown), and *CPU per round* their difference over the rounds "
        f"between. With {os.cpu_count()} cores a round cannot take less wall time than its CPU divided by "
        "the cores (*CPU floor*), whatever the scheduling:",
        "",
        *table(
            [
                "data",
                "variant",
                "CPU s",
                "start-up CPU s",
                "CPU ms per round",
                "CPU per round vs sim",
                "CPU floor ms per round",
                "measured ms per round",
            ],
            cpu_rows,
        ),  # fmt: skip
    ]
    return lines, results


# --- 2. parallel schedule against its bound --------------------------------------------------------------


def section_parallel(sizes: Sizes, work: Path, broker: Broker) -> tuple[list[str], dict]:
    rounds = sizes.parallel_rounds
    out = work / "parallel"
    shutil.rmtree(out, ignore_errors=True)
    run_name = f"bench-parallel-{os.getpid()}"
    command = edgegan_command(
        "run",
        "--dataset",
        "mnist",
        "--devices",
        str(sizes.parallel_devices),
        "--rounds",
        str(rounds),
        "--eval-every",
        str(rounds),
        "--schedule",
        "parallel",
        "--tau",
        "1",
        "--status-interval",  # the bound needs every round's device compute, which status messages carry
        "0",
        "--broker",
        broker.url,
        "--run",
        run_name,
        "--out",
        str(out),
    )
    watcher = StatusWatcher(broker.port, run_name)
    try:
        print(f"  parallel: {rounds} rounds, {sizes.parallel_devices} device(s)", file=sys.stderr, flush=True)
        measured = run_measured(command, work / "parallel.log", 30 * 60)
    finally:
        watcher.close()
    if measured.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {work}/parallel.log")
    traces = {row["round"]: row for row in read_trace(out)}  # keyed by rounds done (1-based)
    durations = round_durations(read_metrics(out))
    compute = watcher.compute_by_round()  # keyed by 0-based round index
    sample = traces[max(traces)]
    transfer = transfer_probe(broker.port, {"down": sample["bytes_down"][0], "up": sample["bytes_up"][0]})
    per_round = []
    for done, measured_s in sorted(durations.items()):
        trace, devices = traces.get(done), compute.get(done - 1)
        if trace is None or not devices or len(devices) < sizes.parallel_devices:
            continue
        device_phase = max(devices.values()) + transfer["down"] + transfer["up"]
        overlap = trace["server_overlap_s"]
        bound = trace["server_before_s"] + max(device_phase, overlap) + trace["server_after_s"]
        per_round.append(
            {
                "round": done,
                "measured_s": measured_s,
                "bound_s": bound,
                "device_s": max(devices.values()),
                "overlap_s": overlap,
                "before_s": trace["server_before_s"],
                "after_s": trace["server_after_s"],
            }
        )
    if not per_round:
        raise RuntimeError("no round had both the server's trace and every device's compute")
    ratio = median([item["measured_s"] / item["bound_s"] for item in per_round])
    total_ratio = sum(item["measured_s"] for item in per_round) / sum(item["bound_s"] for item in per_round)
    keys = ("measured_s", "bound_s", "device_s", "overlap_s", "before_s", "after_s")
    medians = {key: median([item[key] for item in per_round]) for key in keys}
    rows = [
        [
            sizes.parallel_devices,
            len(per_round),
            medians["measured_s"] * 1000,
            medians["bound_s"] * 1000,
            f"{ratio:.3f}",
            f"{total_ratio:.3f}",
            medians["device_s"] * 1000,
            (transfer["down"] + transfer["up"]) * 1000,
            medians["overlap_s"] * 1000,
            medians["before_s"] * 1000,
            medians["after_s"] * 1000,
        ]
    ]
    plot_parallel(per_round, work.parent.parent / "parallel-rounds.png")
    lines = [
        f"`edgegan run --dataset mnist --devices {sizes.parallel_devices} --rounds {rounds} "
        f"--schedule parallel --tau 1` over {broker.name}. Per round r the bound is server_before + "
        "max(device compute + transfer, server_overlap) + server_after, from what the run records: "
        "the server's trace.jsonl "
        "(`server_before_s`: snapshot and encoding of the global model; `server_overlap_s`: the generator "
        "step that overlaps the devices; `server_after_s`: folding the updates in), each device's "
        "`round_compute_s` from its status messages (decoding the global model, training, encoding the "
        "update; the slowest device counts), and the loopback transfer of one global model and one update "
        f"through the same broker (a QoS 1 round trip of a message of each size: "
        f"{transfer['down'] * 1000:.1f} + {transfer['up'] * 1000:.1f} ms). *Measured* is the round's wall "
        "time at the server (metrics.csv), leaving out round 1 and evaluation rounds. The bound assumes "
        "every party has a core of its own, which on this machine holds only for one device.",
        "",
        *table(
            [
                "devices",
                "rounds",
                "measured ms",
                "bound ms",
                "measured / bound (median)",
                "sum measured / sum bound",
                "device compute ms",
                "transfer ms",
                "G step (overlap) ms",
                "before ms",
                "after ms",
            ],
            rows,
        ),
        "",
        f"Target: within 10% of the bound — {verdict(ratio <= 1.10)}. Per-round plot: "
        "[parallel-rounds.png](parallel-rounds.png).",
    ]
    return lines, {"per_round": per_round, "transfer_s": transfer, "ratio": ratio, "total_ratio": total_ratio}


def plot_parallel(per_round: list[dict], path: Path) -> None:
    pyplot = matplotlib_pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 3.5), dpi=100)
    rounds = [item["round"] for item in per_round]
    axes.plot(rounds, [item["measured_s"] * 1000 for item in per_round], label="measured", marker=".")
    axes.plot(rounds, [item["bound_s"] * 1000 for item in per_round], label="bound", marker=".")
    axes.set_xlabel("round")
    axes.set_ylabel("ms")
    axes.set_title("parallel schedule: round time against its bound")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def matplotlib_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


# --- 3. codecs -------------------------------------------------------------------------------------------


def mnist_messages() -> tuple[dict, dict, dict]:
    """(global G+D tensors, an update's full D state, an update's change from the global D) of the MNIST
    DCGAN after one real local step, with the documented defaults."""
    import torch

    from edgegan import wire
    from edgegan.algorithms.proposed import GlobalGan, LocalDiscriminator
    from edgegan.algorithms.staleness import difference
    from edgegan.config import resolve_run, resolve_train
    from edgegan.data import load_dataset
    from edgegan.models import ModelSpec

    torch.set_num_threads(1)
    dataset = load_dataset("mnist")
    spec = ModelSpec(
        dataset.sample_shape, resolve_run("mnist", "latent_dim", None), resolve_run("mnist", "width", None)
    )
    train = resolve_train("mnist", {})
    server = GlobalGan(spec, train, 0)
    generator_state, discriminator_state = server.snapshot()
    device = LocalDiscriminator(spec, train, dataset.x[:2500], 0, 0)
    update = device.update(0, generator_state, discriminator_state)
    published = wire.prefixed("G", generator_state) | wire.prefixed("D", discriminator_state)
    change = difference(update.state, discriminator_state)
    return published, wire.prefixed("D", update.state), wire.prefixed("D", change)


def time_median(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return median(times)


def section_codecs(sizes: Sizes, work: Path) -> tuple[list[str], dict]:
    import torch

    from edgegan import wire

    published, full_update, change = mnist_messages()
    micro = {}
    decoded_by_codec = {}
    for codec in wire.CODECS:
        # As a device sends it: fp32 carries its D, a lossy codec the change from the global D.
        update_tensors = change if wire.is_lossy(codec) else full_update
        update = wire.Envelope(
            "update",
            "bench",
            1,
            1,
            "device-0",
            2500,
            codec,
            update_tensors,
            loss=0.0,
            delta=wire.is_lossy(codec),
        )
        global_model = wire.Envelope("global", "bench", 1, 1, "server", 0, codec, published)
        update_bytes, global_bytes = wire.encode(update), wire.encode(global_model)
        decoded_by_codec[codec] = wire.decode(update_bytes).tensors
        micro[codec] = {
            "update_bytes": len(update_bytes),
            "global_bytes": len(global_bytes),
            "update_encode_ms": time_median(lambda update=update: wire.encode(update), sizes.codec_repeats)
            * 1e3,
            "update_decode_ms": time_median(lambda data=update_bytes: wire.decode(data), sizes.codec_repeats)
            * 1e3,
            "global_encode_ms": time_median(
                lambda g=global_model: wire.encode(g), max(3, sizes.codec_repeats // 10)
            )
            * 1e3,
            "global_decode_ms": time_median(
                lambda data=global_bytes: wire.decode(data), max(3, sizes.codec_repeats // 10)
            )
            * 1e3,
        }
    lossless = all(
        all(
            torch.equal(decoded_by_codec[f"{base}+zstd"][name], tensor)
            for name, tensor in decoded_by_codec[base].items()
        )
        for base in wire.BASE_CODECS
    )

    def train(codec: str) -> dict:
        out = work / f"codec-{codec}"
        shutil.rmtree(out, ignore_errors=True)
        command = edgegan_command(
            "simulate",
            "--algo",
            "serial",
            "--dataset",
            "mnist",
            "--devices",
            "4",
            "--rounds",
            str(sizes.codec_rounds),
            "--eval-every",
            str(sizes.codec_rounds),
            "--eval-samples",
            str(sizes.eval_samples),
            "--codec",
            codec,
            "--out",
            str(out),
        )
        print(f"  codecs: training with {codec}", file=sys.stderr, flush=True)
        measured = run_measured(command, work / f"codec-{codec}.log", 60 * 60)
        if measured.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed; see {work}/codec-{codec}.log")
        return json.loads((out / "summary.json").read_text())

    # Two trainings at a time, one torch thread each; fid and bytes are deterministic, times not reported.
    with ThreadPoolExecutor(max_workers=2) as pool:
        trained = [codec for codec in wire.CODECS if codec in sizes.codec_trained]
        summaries = dict(zip(trained, pool.map(train, trained), strict=True))
    base = micro["fp32"]
    rows = []
    for codec in wire.CODECS:
        item, summary = micro[codec], summaries.get(codec, {})
        fid = (summary.get("final") or {}).get("fid")
        item["final_fid"], item["final_classes"] = fid, (summary.get("final") or {}).get("classes")
        rows.append(
            [
                codec,
                f"{item['update_bytes']:,}",
                f"{base['update_bytes'] / item['update_bytes']:.2f}x",
                f"{item['global_bytes']:,}",
                f"{base['global_bytes'] / item['global_bytes']:.2f}x",
                f"{item['update_encode_ms']:.2f}",
                f"{item['update_decode_ms']:.2f}",
                f"{item['global_encode_ms']:.1f}",
                f"{item['global_decode_ms']:.1f}",
                "—" if fid is None else f"{fid:.1f}",
                "—" if item["final_classes"] is None else item["final_classes"],
            ]
        )
    ratio = base["update_bytes"] / micro["int8+zstd"]["update_bytes"]
    global_ratio = base["global_bytes"] / micro["int8+zstd"]["global_bytes"]
    lines = [
        "Bytes and encode/decode times of real envelopes (wire.encode / wire.decode, real msgpack and zstd) "
        "for the MNIST DCGAN with the documented defaults, after one real local step: an *update* is one "
        "device's discriminator (fp32: its parameters; lossy codecs: its change from the global one, as "
        "devices send it), the *global* message is G + D. Times are medians of "
        f"{sizes.codec_repeats} (update) and {max(3, sizes.codec_repeats // 10)} (global) calls on one "
        f"core. *Final fid*: `edgegan simulate --algo serial --dataset mnist --devices 4 --rounds "
        f"{sizes.codec_rounds} --eval-samples {sizes.eval_samples} --codec CODEC` (the 1500-round version "
        "is `scripts/bench-codecs`, in docs/benchmarks.md).",
        "",
        *table(
            [
                "codec",
                "update bytes",
                "fp32 / this",
                "global bytes",
                "fp32 / this",
                "update encode ms",
                "update decode ms",
                "global encode ms",
                "global decode ms",
                "final fid",
                "classes",
            ],
            rows,
        ),
        "",
        "zstd is lossless on top of each base codec: decoded tensors identical — "
        f"{'yes' if lossless else 'NO'}. "
        f"Target: int8+zstd at least 3.5x smaller than fp32 — {verdict(ratio >= 3.5)} ({ratio:.2f}x for an "
        f"update, {global_ratio:.2f}x for the global model).",
    ]
    return lines, {"codecs": micro, "lossless_zstd": lossless, "int8_zstd_ratio": ratio}


# --- 4a. many device processes ---------------------------------------------------------------------------


def section_scale(sizes: Sizes, work: Path, broker: Broker) -> tuple[list[str], dict]:
    devices, rounds = sizes.scale_devices, sizes.scale_rounds
    out = work / "scale"
    shutil.rmtree(out, ignore_errors=True)
    run_name = f"bench-scale-{os.getpid()}"
    shared = ["--broker", broker.url, "--run", run_name, "--dataset", "ring8"]
    processes = {
        "server": start(
            edgegan_command(
                "server",
                *shared,
                "--devices",
                str(devices),
                "--rounds",
                str(rounds),
                "--eval-every",
                str(rounds),
                "--deadline-s",
                "300",
                "--out",
                str(out),
                "--log-level",
                "warning",
            ),
            work / "scale-server.log",
        )
    }
    for index in range(devices):
        processes[f"device-{index}"] = start(
            edgegan_command(
                "device",
                *shared,
                "--id",
                f"device-{index}",
                "--index",
                str(index),
                "--of",
                str(devices),
                "--log-level",
                "warning",
            ),
            work / f"scale-device-{index}.log",
        )
    print(f"  scale: {devices} device processes, {rounds} rounds", file=sys.stderr, flush=True)
    measured = reap(processes, 40 * 60)
    failed = [name for name, item in measured.items() if item.returncode != 0]
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    durations = list(round_durations(read_metrics(out)).values()) if summary else []
    rows_metrics = read_metrics(out) if summary else []
    first_round_s = (
        float(rows_metrics[1]["wall_time_s"]) - float(rows_metrics[0]["wall_time_s"])
        if len(rows_metrics) > 1
        else None
    )
    device_rss = [item.max_rss_mb for name, item in measured.items() if name != "server"]
    device_cpu = [item.cpu_s for name, item in measured.items() if name != "server"]
    result = {
        "devices": devices,
        "rounds": rounds,
        "rounds_done": summary.get("rounds"),
        "accepted": summary.get("updates_accepted"),
        "server_wall_s": measured["server"].wall_s,
        "training_s": summary.get("wall_time_s"),
        "round_median_s": median(durations),
        "first_round_s": first_round_s,
        "failed": failed,
        "server_rss_mb": measured["server"].max_rss_mb,
        "device_rss_mb_median": median(device_rss),
        "device_rss_mb_max": max(device_rss),
        "device_cpu_s_median": median(device_cpu),
    }
    complete = (
        not failed and summary.get("rounds") == rounds and summary.get("updates_accepted") == devices * rounds
    )
    rows = [
        [
            devices,
            f"{summary.get('rounds')} of {rounds}",
            f"{summary.get('updates_accepted')} of {devices * rounds}",
            measured["server"].wall_s,
            summary.get("wall_time_s", float("nan")),
            first_round_s or float("nan"),
            result["round_median_s"] * 1000,
            measured["server"].max_rss_mb,
            result["device_rss_mb_median"],
            result["device_cpu_s_median"],
        ]
    ]
    lines = [
        f"`edgegan server --dataset ring8 --devices {devices} --rounds {rounds}` and {devices} `edgegan "
        f"device` processes, all started at once, over {broker.name}. *Server wall* is the server process "
        "from start to exit; *first round* includes the devices' start-up (each imports torch on a shared "
        f"{os.cpu_count()}-core machine); *per round* is the median of the later rounds (metrics.csv).",
        "",
        *table(
            [
                "devices",
                "rounds done",
                "updates accepted",
                "server wall s",
                "training wall s",
                "first round s",
                "per round ms (median)",
                "server peak RSS MB",
                "device peak RSS MB (median)",
                "device CPU s (median)",
            ],
            rows,
        ),
        "",
        f"Target: {devices} device processes complete {rounds} rounds — {verdict(complete)}"
        + (f" (failed: {', '.join(failed)})" if failed else "")
        + ".",
    ]
    return lines, result


# --- 4b. load generator ----------------------------------------------------------------------------------


def section_load(sizes: Sizes, work: Path, broker: Broker) -> tuple[list[str], dict]:
    from edgegan.config import resolve_run
    from edgegan.data import load_dataset
    from edgegan.models import ModelSpec, build_discriminator
    from edgegan.runtime.connection import parse_broker
    from edgegan.runtime.loadgen import LoadSettings, encode_updates, generate_load

    spec = ModelSpec(
        load_dataset("mnist").sample_shape,
        resolve_run("mnist", "latent_dim", None),
        resolve_run("mnist", "width", None),
    )
    state = build_discriminator(spec).state_dict()
    state_mb = sum(tensor.numel() * tensor.element_size() for tensor in state.values()) / 2**20
    total_rounds = sizes.load_rounds + 2  # a warm-up round, the measured rounds, the final evaluated round
    results = []
    for clients in sizes.load_clients:
        run_name = f"bench-load-{clients}-{os.getpid()}"
        out = work / f"load-{clients}"
        shutil.rmtree(out, ignore_errors=True)
        settings = LoadSettings(
            run_name,
            parse_broker(broker.url),
            clients,
            total_rounds,
            connections=min(sizes.load_connections, clients),
            timeout_s=20 * 60,
        )
        print(
            f"  load: {clients} clients, encoding {clients * total_rounds} updates",
            file=sys.stderr,
            flush=True,
        )
        payloads = encode_updates(settings, state)
        server = start(
            edgegan_command(
                "server",
                "--broker",
                broker.url,
                "--run",
                run_name,
                "--dataset",
                "mnist",
                "--devices",
                str(clients),
                "--rounds",
                str(total_rounds),
                "--eval-every",
                str(total_rounds),
                "--deadline-s",
                "600",
                "--out",
                str(out),
                "--log-level",
                "warning",
            ),
            work / f"load-{clients}-server.log",
        )
        try:
            report = asyncio.run(generate_load(settings, payloads))
        except BaseException:
            reap({"server": server}, 0)  # stops it: no load will come
            raise
        measured = reap({"server": server}, 10 * 60)["server"]
        del payloads
        if measured.returncode != 0:
            raise RuntimeError(
                f"the server failed with {clients} load clients; see {work}/load-{clients}-server.log"
            )
        summary = json.loads((out / "summary.json").read_text())
        durations = round_durations(read_metrics(out))
        traces = {row["round"]: row for row in read_trace(out)}
        round_s = median(list(durations.values()))
        measured_rounds = [done for done in durations if done in traces]
        after_s = median([traces[done]["server_after_s"] for done in measured_rounds])
        collect_s = median(
            [
                durations[done] - traces[done]["server_before_s"] - traces[done]["server_after_s"]
                for done in measured_rounds
            ]
        )
        results.append(
            {
                "clients": clients,
                "round_median_s": round_s,
                "updates_per_s": clients / round_s,
                "after_median_s": after_s,
                "collect_median_s": collect_s,
                "collect_updates_per_s": clients / collect_s,
                "server_rss_mb": measured.max_rss_mb,
                "server_cpu_s": measured.cpu_s,
                "accepted": summary.get("updates_accepted"),
                "expected": clients * total_rounds,
                "publish_median_s": median(report.publish_s),
                "published": report.published,
            }
        )
    rows = [
        [
            item["clients"],
            f"{item['accepted']} of {item['expected']}",
            item["round_median_s"] * 1000,
            item["updates_per_s"],
            item["collect_median_s"] * 1000,
            item["collect_updates_per_s"],
            item["after_median_s"] * 1000,
            item["publish_median_s"] * 1000,
            item["server_rss_mb"],
            item["server_rss_mb"] - results[0]["server_rss_mb"],
            (item["clients"] - results[0]["clients"]) * state_mb,
        ]
        for item in results
    ]
    plot_load(results, work.parent.parent / "load-clients.png")
    growth = results[-1]["server_rss_mb"] - results[0]["server_rss_mb"]
    held = (results[-1]["clients"] - results[0]["clients"]) * state_mb
    flat = growth < 0.25 * held + RSS_NOISE_MB
    lines = [
        f"`edgegan server --dataset mnist --devices N` over {broker.name}, fed by the load generator "
        "(`edgegan/runtime/loadgen.py`): N logical clients multiplexed over "
        f"min(N, {sizes.load_connections}) MQTT connections — not N real connections — each answering "
        "every global model at once with a valid fp32 update envelope (the MNIST discriminator, "
        f"{state_mb * 1024:.0f} kB) encoded before the run, on its own topic `update/load-K`. "
        f"{sizes.load_rounds} measured rounds per N (plus a warm-up round and the final, evaluated round). "
        "*Round* is the server's round wall time (publish the global model, receive and decode N updates, "
        "fold, step G; metrics.csv) and *updates/s* = N / round; *collect* is the part of the round between "
        "publishing the global model and the last update accepted (round - `server_before_s` - "
        "`server_after_s` of trace.jsonl), with its own updates/s; *fold + G* is `server_after_s` "
        "(aggregating the N updates, the server optimiser, the generator step); *publish* is the "
        "generator's time from its first to its last PUBACK of a round; *peak RSS* is the server "
        "process's (wait4).",
        "",
        *table(
            [
                "N",
                "updates accepted",
                "round ms",
                "updates/s",
                "collect ms",
                "updates/s while collecting",
                "fold + G ms",
                "publish ms",
                "server peak RSS MB",
                f"RSS over N={results[0]['clients']} MB",
                "N x update size MB",
            ],
            rows,
        ),
        "",
        "Does the server's memory stay flat as N grows? " + memory_answer(growth, held, results, state_mb),
        "",
        "Plot: [load-clients.png](load-clients.png).",
    ]
    return lines, {"state_mb": state_mb, "runs": results, "flat": flat}


RSS_NOISE_MB = 64  # peak RSS of the same server varies by tens of MB from run to run (heap, evaluation)


def memory_answer(growth: float, held: float, results: list[dict], state_mb: float) -> str:
    """Reads the RSS growth against what holding every update of a round would cost."""
    low, high = results[0]["clients"], results[-1]["clients"]
    per_client_kb = growth * 1024 / max(1, high - low)
    measured = (
        f"its peak RSS grew by {growth:.0f} MB from N={low} to N={high} ({per_client_kb:.0f} kB per extra "
        f"client), against {held:.0f} MB ({state_mb * 1024:.0f} kB per client) for holding every update "
        "of a round until it closes."
    )
    if held < RSS_NOISE_MB:
        return f"too few clients to tell apart from run-to-run noise (~{RSS_NOISE_MB} MB): " + measured
    if growth < 0.25 * held + RSS_NOISE_MB:
        return (
            "**yes**: " + measured + " The server folds each accepted update into the round's running sum "
            "as it arrives (mean and clip rules); median and trimmed mean need every update at once (4c)."
        )
    return (
        "**no**: " + measured + " The server holds the round's updates (and, while decoding lags behind the "
        "broker, undecoded payloads) until the round closes; folding each into a running sum as it is "
        "accepted would keep it flat for the mean and clip rules (4c)."
    )


def plot_load(results: list[dict], path: Path) -> None:
    pyplot = matplotlib_pyplot()
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    clients = [item["clients"] for item in results]
    left.plot(clients, [item["updates_per_s"] for item in results], marker="o")
    left.set_ylabel("updates aggregated per second")
    right.plot(clients, [item["server_rss_mb"] for item in results], marker="o")
    right.set_ylabel("server peak RSS (MB)")
    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_xlabel("clients N")
        axes.grid(alpha=0.3)
    figure.suptitle("server against N light clients (MNIST discriminator updates)")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


# --- 4c. aggregation rules -------------------------------------------------------------------------------


def rss_kb() -> int:
    return proc_status(os.getpid()).get("VmRSS", 0)


def reset_peak_rss() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def section_aggregation(sizes: Sizes, plots: Path) -> tuple[list[str], dict]:
    import torch

    from edgegan.algorithms.aggregation import aggregate, parse_aggregate
    from edgegan.config import resolve_run
    from edgegan.models import ModelSpec, build_discriminator

    torch.set_num_threads(1)
    spec = ModelSpec(
        (1, 28, 28), resolve_run("mnist", "latent_dim", None), resolve_run("mnist", "width", None)
    )
    base = build_discriminator(spec).state_dict()
    state_mb = sum(tensor.numel() * tensor.element_size() for tensor in base.values()) / 2**20
    rules = ("mean", "median", "trimmed:0.1")
    results = []
    generator = torch.Generator().manual_seed(0)
    for clients in sizes.aggregate_clients:
        states = [
            {
                name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
                for name, tensor in base.items()
            }
            for _ in range(clients)
        ]
        weights = [1.0 + index % 7 for index in range(clients)]
        for rule_text in rules:
            rule = parse_aggregate(rule_text)
            before = rss_kb()
            peaks, times = [], []
            for _ in range(sizes.aggregate_repeats):
                reset = reset_peak_rss()
                started = time.perf_counter()
                aggregate(rule, states, weights, base)
                times.append(time.perf_counter() - started)
                peaks.append(proc_status(os.getpid()).get("VmHWM", 0) - before if reset else float("nan"))
            results.append(
                {
                    "clients": clients,
                    "rule": rule_text,
                    "time_s": median(times),
                    "extra_peak_mb": max(peaks) / 1024,
                    "inputs_mb": clients * state_mb,
                }
            )
        del states
    rows = [
        [item["clients"], item["rule"], item["time_s"] * 1000, item["extra_peak_mb"], item["inputs_mb"]]
        for item in results
    ]
    plot_aggregation(results, plots / "aggregation.png")
    lines = [
        "`edgegan.algorithms.aggregation.aggregate` called directly on N MNIST discriminator states "
        f"({state_mb * 1024:.0f} kB each, fp32) with one torch thread: median time of "
        f"{sizes.aggregate_repeats} call(s) and the peak RSS the call adds above what the N input states "
        "already hold (VmHWM reset before each call). `mean` folds one state at a time into a float64 "
        "running sum (`RunningWeightedMean`); `median` and `trimmed` stack all N states per tensor "
        "(`torch.stack`, then `median` / `sort`), so they need every update of the round at once and their "
        "extra memory grows with N.",
        "",
        *table(["N", "rule", "time ms", "extra peak MB", "inputs MB (N states)"], rows),
        "",
        "Plot: [aggregation.png](aggregation.png).",
    ]
    return lines, {"state_mb": state_mb, "runs": results}


def plot_aggregation(results: list[dict], path: Path) -> None:
    pyplot = matplotlib_pyplot()
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for rule in sorted({item["rule"] for item in results}):
        points = [item for item in results if item["rule"] == rule]
        clients = [item["clients"] for item in points]
        left.plot(clients, [item["time_s"] * 1000 for item in points], marker="o", label=rule)
        right.plot(clients, [item["extra_peak_mb"] for item in points], marker="o", label=rule)
    left.set_ylabel("time per round (ms)")
    right.set_ylabel("extra peak memory (MB)")
    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_xlabel("updates N")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("aggregation rules on MNIST discriminator states")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


# --- 5. a device's footprint -----------------------------------------------------------------------------


def footprint_run(sizes: Sizes, work: Path, broker: Broker, python: str, label: str) -> dict:
    rounds = sizes.footprint_rounds
    run_name = f"bench-footprint-{label}-{os.getpid()}"
    out = work / f"footprint-{label}"
    shutil.rmtree(out, ignore_errors=True)
    shared = ["--broker", broker.url, "--run", run_name, "--dataset", "mnist"]
    server = start(
        edgegan_command(
            "server",
            *shared,
            "--devices",
            "1",
            "--rounds",
            str(rounds),
            "--eval-every",
            str(rounds),
            "--out",
            str(out),
            "--log-level",
            "warning",
        ),
        work / f"footprint-{label}-server.log",
    )
    device = start(
        edgegan_command(
            "device",
            *shared,
            "--id",
            "device-0",
            "--index",
            "0",
            "--of",
            "1",
            "--status-interval",  # CPU and memory are sampled at every status message: one per round
            "0",
            "--log-level",
            "warning",
            python=python,
        ),
        work / f"footprint-{label}-device.log",
        python=python,
    )
    watcher = StatusWatcher(broker.port, run_name, {"device-0": command_pid(device)})
    smaps: dict[str, float] = {}
    try:
        print(f"  footprint ({label}): 1 device, {rounds} rounds", file=sys.stderr, flush=True)
        # Take the mapping breakdown once the device is training (its second status), while it is alive.
        deadline = time.perf_counter() + 15 * 60
        while time.perf_counter() < deadline and device.poll() is None:
            with watcher.lock:
                samples = list(watcher.samples.get("device-0", []))
            if len(samples) >= 2 and not smaps:
                smaps = mapped_rss_mb(command_pid(device))
            if smaps:
                break
            time.sleep(0.2)
        measured = reap({"server": server, "device": device}, 20 * 60)
    finally:
        watcher.close()
    if any(item.returncode != 0 for item in measured.values()):
        raise RuntimeError(f"the footprint run failed; see {work}/footprint-{label}-*.log")
    samples = [item for item in watcher.samples.get("device-0", []) if item.get("cpu_s") is not None]
    trained = [item for item in samples if item.get("round") is not None and item["round"] >= 0]
    first, last = trained[0], trained[-1]
    cpu_per_round = (last["cpu_s"] - first["cpu_s"]) / max(1, last["round"] - first["round"])
    compute = [value for per_device in watcher.compute_by_round().values() for value in per_device.values()]
    return {
        "label": label,
        "python": python,
        "rounds": rounds,
        "peak_rss_mb": measured["device"].max_rss_mb,
        "rss_anon_mb": max(item.get("RssAnon", 0) for item in samples) / 1024,
        "rss_file_mb": max(item.get("RssFile", 0) for item in samples) / 1024,
        "threads": max(item.get("Threads", 0) for item in samples),
        "cpu_s_total": measured["device"].cpu_s,
        "cpu_s_per_round": cpu_per_round,
        "compute_s_per_round": median(compute),
        "mappings_mb": smaps,
        "server_peak_rss_mb": measured["server"].max_rss_mb,
        "torch": torch_version(python),
    }


def torch_version(python: str) -> str:
    result = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    )
    return result.stdout.strip() or "?"


def thread_scaling(repeats: int) -> list[dict]:
    """A device's update (MNIST, 2,500 examples) at 1 torch thread and at every core of this machine."""
    import torch

    from edgegan.algorithms.proposed import GlobalGan, LocalDiscriminator
    from edgegan.config import resolve_run, resolve_train
    from edgegan.data import load_dataset
    from edgegan.models import ModelSpec

    dataset = load_dataset("mnist")
    spec = ModelSpec(
        dataset.sample_shape, resolve_run("mnist", "latent_dim", None), resolve_run("mnist", "width", None)
    )
    train = resolve_train("mnist", {})
    generator_state, discriminator_state = GlobalGan(spec, train, 0).snapshot()
    device = LocalDiscriminator(spec, train, dataset.x[:2500], 0, 0)
    previous = torch.get_num_threads()
    results = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        device.update(0, generator_state, discriminator_state)  # warm-up
        seconds = time_median(lambda: device.update(1, generator_state, discriminator_state), repeats)
        results.append({"threads": threads, "update_ms": seconds * 1000})
    torch.set_num_threads(previous)
    return results


def section_footprint(
    sizes: Sizes, work: Path, broker: Broker, other_python: str | None
) -> tuple[list[str], dict]:
    runs = [footprint_run(sizes, work, broker, sys.executable, "venv")]
    if other_python:
        runs.append(footprint_run(sizes, work, broker, other_python, "other-python"))
    scaling = thread_scaling(max(3, sizes.footprint_rounds // 5))
    rows = [
        [
            run["torch"],
            run["peak_rss_mb"],
            run["rss_anon_mb"],
            run["rss_file_mb"],
            run["threads"],
            run["cpu_s_per_round"] * 1000,
            run["compute_s_per_round"] * 1000,
            run["cpu_s_total"],
        ]
        for run in runs
    ]
    mapping_rows = []
    for run in runs:
        for group, mb in sorted(run["mappings_mb"].items(), key=lambda item: -item[1]):
            mapping_rows.append([run["torch"], group, mb])
    verdicts = "; ".join(
        f"torch {run['torch']}: {verdict(run['peak_rss_mb'] <= 400)} ({run['peak_rss_mb']:.0f} MB)"
        for run in runs
    )
    cuda = [run for run in runs if "CUDA libraries (nvidia/*, libtorch_cuda)" in run["mappings_mb"]]
    lines = [
        f"`edgegan server --dataset mnist --devices 1 --rounds {sizes.footprint_rounds}` and one `edgegan "
        f"device --dataset mnist --index 0 --of 1` (the whole 10,000-image shard: the largest a device "
        f"holds) over {broker.name}. *Peak RSS* is the device process's VmHWM (wait4's ru_maxrss); "
        "*anon* / *file* are its largest RssAnon / RssFile while training (file pages are shared "
        "libraries, shared between processes); *threads* is the most OS threads it had; *CPU per round* is "
        "the CPU seconds (/proc/PID/stat) between its first and last status, per round; *compute* its own "
        "`round_compute_s` (wall). Devices run with `--threads 1` (the `edgegan device` default, also what "
        "`edgegan run` uses, one process per core being the right share when the fleet shares a machine); "
        "the other threads are asyncio's workers (decoding, training and encoding run there). A board "
        "that runs one device alone should give it its cores: `edgegan device --threads 4` on a 4-core "
        "Raspberry Pi (the last line below measures the effect of threads on this machine).",
        "",
        *table(
            [
                "torch",
                "peak RSS MB",
                "anon MB",
                "file MB",
                "threads",
                "CPU ms per round",
                "compute ms per round (median)",
                "CPU s total",
            ],
            rows,
        ),
        "",
        "Resident memory by mapping while training:",
        "",
        *table(["torch", "mapping", "MB"], mapping_rows),
        "",
        "A device's update (one local step, MNIST) by torch threads, in one process: "
        + ", ".join(f"{item['threads']} thread(s) {item['update_ms']:.1f} ms" for item in scaling)
        + ".",
        "",
        f"Target: peak RSS at most 400 MB — {verdicts}."
        + (
            " A torch build with CUDA maps its CUDA libraries into every process although a device never "
            "uses them (the CUDA row above), and touches more of them while the interpreter exits, which is "
            "where its VmHWM is reached; a board installs a CPU-only torch (a Raspberry Pi's aarch64 wheel "
            "has no CUDA). Compare with `--device-python` pointing at a venv with a CPU-only torch."
            if cuda
            else ""
        ),
    ]
    return lines, {"runs": runs, "thread_scaling": scaling}


# --- 6. profiles -----------------------------------------------------------------------------------------


def profile_child(profile_path: str, arguments: list[str]) -> None:
    """Runs `edgegan ARGUMENTS` under cProfile: the event-loop thread and every asyncio.to_thread call
    (training, encoding, decoding run there), merged into one stats file per thread group."""
    main_profile = cProfile.Profile()
    worker_profiles: list[cProfile.Profile] = []
    local = threading.local()
    original = asyncio.to_thread

    def profiled_to_thread(function, /, *args, **kwargs):
        def run():
            profile = getattr(local, "profile", None)
            if profile is None:
                profile = local.profile = cProfile.Profile()
                worker_profiles.append(profile)
            profile.enable()
            try:
                return function(*args, **kwargs)
            finally:
                profile.disable()

        return original(run)

    asyncio.to_thread = profiled_to_thread
    # Imported before profiling starts, so that the profile shows rounds rather than module imports.
    import edgegan.metrics  # noqa: F401
    import edgegan.runtime.device  # noqa: F401
    import edgegan.runtime.server  # noqa: F401
    from edgegan.cli import app

    sys.argv = ["edgegan", *arguments]
    main_profile.enable()
    try:
        app()
    except SystemExit:
        pass
    finally:
        main_profile.disable()
        main_profile.dump_stats(profile_path + ".loop")
        if worker_profiles:
            workers = pstats.Stats(worker_profiles[0])
            for profile in worker_profiles[1:]:
                workers.add(profile)
            workers.dump_stats(profile_path + ".workers")


def top_functions(path: Path, count: int) -> tuple[list[list], float]:
    """The `count` functions with the most own time, idle waits left out; (rows, busy seconds)."""
    stats = pstats.Stats(str(path))
    entries = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        label = f"{short_path(filename)}:{line}({name})" if line else name
        if any(idle in label for idle in IDLE_FUNCTIONS) or "select.epoll" in label or "wait" == name:
            continue
        entries.append((own, cumulative, calls, label))
    busy = sum(own for own, *_ in entries)
    entries.sort(reverse=True)
    rows = [
        [label, calls, own, cumulative, f"{100 * own / busy:.1f}%"]
        for own, cumulative, calls, label in entries[:count]
    ]
    return rows, busy


def short_path(filename: str) -> str:
    for marker in ("site-packages/", "/edgegan/", "lib/python3"):
        if marker in filename:
            return (
                filename.split(marker, 1)[1]
                if marker != "/edgegan/"
                else "edgegan/" + filename.split(marker, 1)[1]
            )
    return filename


def section_profile(sizes: Sizes, work: Path, broker: Broker) -> tuple[list[str], dict]:
    rounds = sizes.profile_rounds
    run_name = f"bench-profile-{os.getpid()}"
    out = work / "profile"
    shutil.rmtree(out, ignore_errors=True)
    shared = ["--broker", broker.url, "--run", run_name, "--dataset", "mnist"]
    harness = [sys.executable, str(Path(__file__).resolve()), "--profile-child"]
    server_args = [
        "server",
        *shared,
        "--devices",
        "1",
        "--rounds",
        str(rounds),
        "--eval-every",
        str(rounds),
        "--out",
        str(out),
        "--log-level",
        "warning",
    ]
    device_args = [
        "device",
        *shared,
        "--id",
        "device-0",
        "--index",
        "0",
        "--of",
        "1",
        "--log-level",
        "warning",
    ]
    print(f"  profile: server and device, {rounds} MNIST rounds", file=sys.stderr, flush=True)
    measured = reap(
        {
            "server": start([*harness, str(work / "server.prof"), *server_args], work / "profile-server.log"),
            "device": start([*harness, str(work / "device.prof"), *device_args], work / "profile-device.log"),
        },
        20 * 60,
    )
    if any(item.returncode != 0 for item in measured.values()):
        raise RuntimeError(f"the profiled run failed; see {work}/profile-*.log")
    lines = [
        f"One `edgegan server` and one `edgegan device` (MNIST, {rounds} rounds, over {broker.name}), each "
        "under cProfile (stdlib): the event-loop thread and, merged, every `asyncio.to_thread` call (where "
        "training, encoding and decoding run). Own time per function, waits (epoll, locks, sleeps) left "
        "out; the share is of the busy time listed for that thread group. The whole process's CPU time "
        f"(wait4): server {measured['server'].cpu_s:.1f} s, device {measured['device'].cpu_s:.1f} s, "
        "start-up and profiling overhead included.",
        "",
    ]
    results = {}
    for role in ("server", "device"):
        for group in ("workers", "loop"):
            path = work / f"{role}.prof.{group}"
            if not path.is_file():
                continue
            rows, busy = top_functions(path, 12)
            results[f"{role}-{group}"] = {"busy_s": busy, "top": rows}
            where = "worker threads (to_thread)" if group == "workers" else "event-loop thread"
            lines += [
                f"**{role}, {where}** — {busy:.2f} s busy:",
                "",
                *table(["function", "calls", "own s", "cumulative s", "share"], rows),
                "",
            ]
    return lines, results


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--profile-child":
        profile_child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="every section at tiny sizes (CI smoke test)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-runtime"))
    parser.add_argument("--repeats", type=int, help="overhead runs per variant")
    parser.add_argument("--scale-devices", type=int, help="device processes in the scale section")
    parser.add_argument("--load-clients", help="comma-separated N for the load generator, e.g. 10,100,1000")
    parser.add_argument("--parallel-devices", type=int, help="devices in the parallel-bound run")
    parser.add_argument(
        "--device-python",
        help="also measure the device footprint with this interpreter (e.g. a venv with a CPU-only torch); "
        "it runs this checkout's edgegan through PYTHONPATH",
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    if args.repeats:
        sizes = replace(sizes, repeats=args.repeats)
    if args.scale_devices:
        sizes = replace(sizes, scale_devices=args.scale_devices)
    if args.load_clients:
        sizes = replace(sizes, load_clients=tuple(int(n) for n in args.load_clients.split(",")))
    if args.parallel_devices:
        sizes = replace(sizes, parallel_devices=args.parallel_devices)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    command = "scripts/bench-runtime" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    report = Report(out, command, machine_description(), sizes)
    started = time.perf_counter()
    titles = {
        "overhead": "1. MQTT runtime against the in-process simulator",
        "parallel": "2. Parallel schedule against its round-time bound",
        "codecs": "3. Codecs: bytes, encode and decode time, final quality",
        "scale": "4a. Many device processes",
        "load": "4b. Server against N light clients (load generator)",
        "aggregation": "4c. Aggregation rules against N",
        "footprint": "5. Device agent footprint",
        "profile": "6. Profiles of a server and a device",
    }
    with Broker(work / "broker") as broker:
        for name in sections:
            section_started = time.perf_counter()
            print(f"{titles[name]} ...", file=sys.stderr, flush=True)
            section_work = work / name
            section_work.mkdir(parents=True, exist_ok=True)
            if name == "overhead":
                lines, results = section_overhead(sizes, section_work, broker)
            elif name == "parallel":
                lines, results = section_parallel(sizes, section_work, broker)
            elif name == "codecs":
                lines, results = section_codecs(sizes, section_work)
            elif name == "scale":
                lines, results = section_scale(sizes, section_work, broker)
            elif name == "load":
                lines, results = section_load(sizes, section_work, broker)
            elif name == "aggregation":
                lines, results = section_aggregation(sizes, out)
            elif name == "footprint":
                lines, results = section_footprint(sizes, section_work, broker, args.device_python)
            else:
                lines, results = section_profile(sizes, section_work, broker)
            elapsed = time.perf_counter() - section_started
            report.add(titles[name], [*lines, "", f"(This section took {elapsed:.0f} s.)"], results)
            print(f"  done in {elapsed:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    report.results["total_s"] = total
    report.write()
    print(f"report: {out / 'report.md'} ({total:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
