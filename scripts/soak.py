"""Soak: a long run under lossy links and random kills of devices, server and broker; reports what it
survived. The server restarts with --resume, so the run must go on from its checkpoints with every round
in metrics.csv once; the report says whether it did."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt

from edgegan.devtools.mosquitto import Mosquitto
from edgegan.runsetup import read_rows

MODEL = ["--dataset", "ring8", "--partition", "shards:2", "--width", "64", "--latent-dim", "8"]
# Link trouble on every device: 10 % of messages lost, 50 +- 20 ms delay; half of them also drop off the
# broker for 5 s every minute.
LOSSY = ["--drop-rate", "0.1", "--delay-ms", "50", "--jitter-ms", "20", "--resend-s", "3"]
OFFLINE = ["--offline-every", "60", "--offline-for", "5"]


class Fleet:
    def __init__(self, out: Path, devices: int, seed: int):
        self.out = out
        self.devices = devices
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # The shipped dev config on a free port; restarted on the same port after each kill.
        self.broker = Mosquitto(out, log_path=self.logs / "broker.log")
        self.port = self.broker.port
        self.url = self.broker.url
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: Counter = Counter()
        self.random = random.Random(seed)

    def spawn(self, name: str, command: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "a")
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

    def start_broker(self) -> None:
        self.processes["broker"] = self.broker.start().process

    def start_server(self, rounds: int) -> None:
        self.spawn("server", [
            sys.executable, "-m", "edgegan", "server", "--broker", self.url, "--run", "soak",
            "--devices", str(self.devices), "--quorum", str(self.devices - 2), "--min-devices", "3",
            "--deadline-s", "2", "--rounds", str(rounds), "--eval-every", "500", "--checkpoint-every", "20",
            "--aggregate", "mean", "--out", str(self.out / "run"), "--resume", *MODEL,
        ])  # fmt: skip

    def start_device(self, index: int) -> None:
        self.spawn(f"device-{index}", [
            sys.executable, "-m", "edgegan", "device", "--broker", self.url, "--run", "soak",
            "--id", f"device-{index}", "--index", str(index), "--of", str(self.devices), *MODEL, *LOSSY,
            *(OFFLINE if index % 2 else []),
        ])  # fmt: skip

    def kill_and_restart(self, target: str, rounds: int) -> None:
        process = self.processes[target]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        time.sleep(self.random.uniform(1.0, 5.0))
        if target == "broker":
            self.start_broker()
        elif target == "server":
            self.start_server(rounds)
        else:
            self.start_device(int(target.split("-")[1]))
        self.restarts[target.split("-")[0]] += 1

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)


def last_metrics(url_port: int) -> dict:
    """The server's retained metrics message (its counters and latest quality)."""
    received: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"soak-reader-{time.time_ns()}")
    client.on_message = lambda c, u, message: received.append(bytes(message.payload))
    client.connect("127.0.0.1", url_port)
    client.subscribe("edgegan/soak/metrics", qos=1)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.1)
    client.loop_stop()
    client.disconnect()
    return json.loads(received[-1]) if received else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=45.0, help="seconds between random kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    rounds = 10**6  # bounded by time, not rounds
    fleet = Fleet(args.out.resolve(), args.devices, args.seed)
    started = time.monotonic()
    end = started + args.minutes * 60
    try:
        fleet.start_broker()
        fleet.start_server(rounds)
        for index in range(args.devices):
            fleet.start_device(index)
        next_kill = started + args.kill_every
        while time.monotonic() < end:
            time.sleep(1.0)
            for name, process in fleet.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited by itself with {process.returncode}; see {fleet.logs}")
            if time.monotonic() >= next_kill:
                roll = fleet.random.random()
                target = "server" if roll < 0.15 else "broker" if roll < 0.3 else \
                    f"device-{fleet.random.randrange(args.devices)}"  # fmt: skip
                print(f"{time.monotonic() - started:7.1f} s: killing {target}", flush=True)
                fleet.kill_and_restart(target, rounds)
                next_kill = time.monotonic() + args.kill_every
        metrics = last_metrics(fleet.port)
    finally:
        fleet.stop()
    report(args, fleet, metrics, time.monotonic() - started)


def report(args, fleet: Fleet, metrics: dict, elapsed_s: float) -> None:
    rows = read_rows(fleet.out / "run" / "metrics.csv")  # the killed server may have left half a row
    rounds = [int(row["round"]) for row in rows]
    evaluated = [row for row in rows if row.get("modes")]
    consecutive = rounds == list(range(len(rounds)))
    summary = {
        "minutes": round(elapsed_s / 60, 1),
        "devices": args.devices,
        "rounds_completed": rounds[-1] if rounds else 0,
        "rounds_in_metrics_once_each": consecutive,
        "restarts_survived": dict(fleet.restarts),
        "updates_accepted": metrics.get("accepted"),
        "updates_late": metrics.get("late"),
        "updates_stale": metrics.get("stale"),
        "updates_rejected": metrics.get("rejected"),
        "final_quality": {key: evaluated[-1][key] for key in ("round", "modes", "hq", "dist")}
        if evaluated
        else None,
        "command": "scripts/soak " + " ".join(sys.argv[1:]),
    }
    (fleet.out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if not consecutive:
        sys.exit("metrics.csv does not hold each round exactly once")


if __name__ == "__main__":
    main()
