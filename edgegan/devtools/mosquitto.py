"""A Mosquitto from broker/mosquitto-dev.conf as shipped, but for the port of its listener line: the broker
the test suite (tests/conftest.py, fixture `broker`) and the benchmarks run against."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

from edgegan.devtools.procfs import proc_cpu_s
from edgegan.runtime.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SHIPPED_CONFIG = ROOT / "broker" / "mosquitto-dev.conf"
SHIPPED_LISTENER = "listener 1883 127.0.0.1"


class MosquittoNotInstalled(RuntimeError):
    """No mosquitto binary on PATH or at /usr/sbin/mosquitto."""


def mosquitto_installed() -> bool:
    return Path(MOSQUITTO).exists()


class Mosquitto:
    """`with Mosquitto(work) as broker:` runs Mosquitto on a free loopback port (`.port`, `.url`) from the
    shipped dev config, written to `work`/mosquitto.conf; its output goes to `log_path` (or nowhere).
    `extra_lines` are appended to the config (e.g. `sys_interval 1`)."""

    def __init__(self, work: Path, log_path: Path | None = None, extra_lines: tuple[str, ...] = ()):
        self.work = work
        self.log_path = log_path
        self.extra_lines = tuple(extra_lines)
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @functools.cached_property
    def version(self) -> str:
        """The installed Mosquitto's version, e.g. '2.0.18' (from the first line of `mosquitto -h`)."""
        first = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True).stdout.split("\n")[0]
        return first.strip().removeprefix("mosquitto version ")

    def write_config(self) -> Path:
        """The shipped config with its listener on this broker's port, readable by a mosquitto that drops
        privileges to another user."""
        if not SHIPPED_CONFIG.is_file():
            raise FileNotFoundError(f"{SHIPPED_CONFIG} is missing: the dev broker runs from a checkout")
        shipped = SHIPPED_CONFIG.read_text()
        if SHIPPED_LISTENER not in shipped:
            raise RuntimeError(f"broker/mosquitto-dev.conf no longer has '{SHIPPED_LISTENER}'")
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.work / "mosquitto.conf"
        extra = "".join(f"{line}\n" for line in self.extra_lines)
        config.write_text(shipped.replace(SHIPPED_LISTENER, f"listener {self.port} 127.0.0.1") + extra)
        config.chmod(0o644)
        self.work.chmod(0o755)
        return config

    def start(self) -> Mosquitto:
        """Starts the broker on its port (again, after `stop`: a restart keeps the address)."""
        if not mosquitto_installed():
            raise MosquittoNotInstalled(f"mosquitto is not installed (looked on PATH and at {MOSQUITTO})")
        command = [MOSQUITTO, "-c", str(self.write_config())]
        if self.log_path is None:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            cwd=ROOT)  # fmt: skip
        else:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_for_port(self.port)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Mosquitto:
        return self.start()

    def cpu_s(self) -> float:
        """The broker process's CPU seconds so far (0 when it is not running)."""
        return (proc_cpu_s(self.process.pid) or 0.0) if self.process is not None else 0.0

    def stop(self) -> None:
        """Terminates the broker (kills it after 10 s); a no-op when it is not running."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def __exit__(self, *exc) -> None:
        self.stop()
