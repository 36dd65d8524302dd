"""edgegan.benchmarks.runtime's parts at small sizes: the load generator against a real server over a real
broker, the device's per-round compute in its status messages, the server's per-phase trace, and the
helpers that measure processes and read run outputs. (The whole `--quick` run takes minutes: too slow for
the suite; it is the CI smoke test of the benchmark itself.)"""

import asyncio
import json
import subprocess
import sys

import pytest
import torch

from edgegan.algorithms.proposed import GlobalGan, LocalDiscriminator
from edgegan.algorithms.steps import PlainSgd
from edgegan.benchmarks.runtime import harness as bench
from edgegan.benchmarks.runtime.load import memory_answer
from edgegan.config import resolve_train
from edgegan.models import ModelSpec, build_discriminator
from edgegan.runtime.connection import parse_broker
from edgegan.runtime.loadgen import LoadSettings, encode_updates, generate_load

SMALL = ["--dataset", "ring8", "--width", "32", "--latent-dim", "8"]


@pytest.fixture
def broker(tmp_path):
    with bench.Broker(tmp_path / "broker") as running:
        yield running


def test_load_generator_answers_every_round_and_the_server_accepts_every_update(broker, tmp_path):
    clients, rounds = 6, 3
    out = tmp_path / "server"
    server = bench.start(
        bench.edgegan_command(
            "server", "--broker", broker.url, "--run", "load-test", "--devices", str(clients),
            "--rounds", str(rounds), "--eval-every", str(rounds), "--deadline-s", "60", "--out", str(out),
            *SMALL,
        ),
        tmp_path / "server.log",
    )  # fmt: skip
    address = parse_broker(broker.url)
    settings = LoadSettings(
        run="load-test", broker=address, clients=clients, rounds=rounds, connections=2, timeout_s=90
    )
    payloads = encode_updates(settings, build_discriminator(ModelSpec((2,), 8, 32)).state_dict())
    try:
        report = asyncio.run(generate_load(settings, payloads))
    finally:
        measured = bench.reap({"server": server}, 90)["server"]
    assert measured.returncode == 0, (tmp_path / "server.log").read_text()[-2000:]
    assert report.rounds_answered == [0, 1, 2] and report.published == clients * rounds
    assert report.stopped_by_server
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates_accepted"] == clients * rounds and summary["updates_rejected"] == {}
    assert measured.max_rss_mb > 50 and measured.cpu_s > 0
    trace = bench.read_trace(out)
    assert len(trace) == rounds
    # The runtime server now times its own phases, as the simulator does.
    assert all(row["server_before_s"] > 0 and row["server_after_s"] > 0 for row in trace)


def test_devices_report_their_compute_per_round_in_their_status(broker, tmp_path):
    rounds = 3
    run = "compute-test"
    shared = ["--broker", broker.url, "--run", run, *SMALL]
    processes = {
        "server": bench.start(
            bench.edgegan_command("server", *shared, "--devices", "1", "--rounds", str(rounds),
                                  "--eval-every", str(rounds), "--out", str(tmp_path / "server")),
            tmp_path / "server.log",
        ),
        "device": bench.start(
            bench.edgegan_command("device", *shared, "--id", "device-0", "--index", "0", "--of", "1",
                                  "--status-interval", "0"),  # one status per round, as the benchmark asks
            tmp_path / "device.log",
        ),
    }  # fmt: skip
    watcher = bench.StatusWatcher(broker.port, run, {"device-0": bench.command_pid(processes["device"])})
    try:
        measured = bench.reap(processes, 90)
    finally:
        watcher.close()
    assert all(item.returncode == 0 for item in measured.values()), (tmp_path / "device.log").read_text()
    compute = watcher.compute_by_round()
    assert sorted(compute) == [0, 1, 2]
    assert all(0 < per_device["device-0"] < 30 for per_device in compute.values())
    samples = watcher.samples["device-0"]
    assert samples and all(sample["cpu_s"] is not None and sample["VmHWM"] > 0 for sample in samples)


def test_round_durations_leave_out_the_first_round_and_evaluation_rounds():
    rows = [
        {"round": "0", "wall_time_s": "1.0", "modes": "0"},
        {"round": "1", "wall_time_s": "5.0", "modes": ""},
        {"round": "2", "wall_time_s": "5.5", "modes": ""},
        {"round": "3", "wall_time_s": "5.75", "modes": ""},
        {"round": "4", "wall_time_s": "9.0", "modes": "3"},
    ]
    assert bench.round_durations(rows) == {2: 0.5, 3: 0.25}


def test_reap_gives_each_process_its_own_peak_memory_and_cpu_time(tmp_path):
    allocate = "import time; block = bytearray(80 * 2**20); block[::4096] = b'x' * len(block[::4096]); "
    processes = {
        "big": bench.start([sys.executable, "-c", allocate + "time.sleep(0.2)"], tmp_path / "big.log"),
        "small": bench.start([sys.executable, "-c", "pass"], tmp_path / "small.log"),
    }
    measured = bench.reap(processes, 30)
    assert measured["big"].returncode == 0 and measured["small"].returncode == 0
    assert measured["big"].max_rss_mb > 80 > measured["small"].max_rss_mb


def test_reap_counts_the_cpu_of_the_children_a_command_waits_for(tmp_path):
    # The overhead section sums a round's CPU over `edgegan run` and the server and devices it starts.
    burn = "import time; end = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}], check=True)"
    measured = bench.reap({"parent": bench.start([sys.executable, "-c", parent], tmp_path / "p.log")}, 30)
    assert measured["parent"].returncode == 0
    assert measured["parent"].cpu_s >= 0.5


def test_reap_stops_a_process_that_runs_past_its_timeout(tmp_path):
    sleeper = bench.start([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "sleep.log")
    measured = bench.reap({"sleeper": sleeper}, 0.5)["sleeper"]
    assert measured.returncode != 0 and measured.wall_s < 30


DEVICE_IMPORTS = """
import sys
from pathlib import Path

import edgegan.cli
from edgegan.algorithms.proposed import LocalDiscriminator
from edgegan.config import resolve_train
from edgegan.models import build_discriminator, build_generator
from edgegan.runtime.device import run_device
from edgegan.runsetup import RunSetup, prepare

config = RunSetup(dataset="mnist", devices=4, partition="iid", seed=0,
                  out=Path(sys.argv[1]), train=resolve_train("mnist", {}), width=32, latent_dim=64)
prepared = prepare(config, with_probe=False)
local = LocalDiscriminator(spec=prepared.spec, cfg=config.train, data=prepared.dataset.x[:100],
                           device_index=0, seed=0)
local.update(0, build_generator(prepared.spec).state_dict(), build_discriminator(prepared.spec).state_dict())
heavy = {"torchvision", "matplotlib", "torchmetrics", "sympy", "torch._dynamo"}
print(sorted(heavy & set(sys.modules)))
"""


def test_a_device_process_imports_neither_torchvision_nor_torch_dynamo(tmp_path):
    # torchvision adds 100-200 MB to a device process, torch._dynamo and sympy (pulled in by building any
    # torch.optim optimiser) about 70 MB (edgegan/benchmarks/runtime/footprint.py).
    result = subprocess.run(
        [sys.executable, "-c", DEVICE_IMPORTS, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_plain_sgd_updates_a_discriminator_exactly_as_torch_sgd_does():
    torch.manual_seed(0)
    spec = ModelSpec((2,), 8, 32)
    cfg = resolve_train("ring8", {})  # wgan-gp: the gradient penalty's double backward included
    data = torch.randn(256, 2)
    generator_state, discriminator_state = GlobalGan(spec, cfg, 0).snapshot()
    plain = LocalDiscriminator(spec=spec, cfg=cfg, data=data, device_index=0, seed=0)
    reference = LocalDiscriminator(spec=spec, cfg=cfg, data=data, device_index=0, seed=0)
    reference.optimizer = torch.optim.SGD(reference.discriminator.parameters(), lr=cfg.device_lr)
    assert isinstance(plain.optimizer, PlainSgd)
    for round_index in range(3):
        ours = plain.update(round_index, generator_state, discriminator_state)
        theirs = reference.update(round_index, generator_state, discriminator_state)
        assert all(torch.equal(ours.state[name], theirs.state[name]) for name in ours.state)
        discriminator_state = ours.state


def test_load_settings_refuse_names_that_are_not_topic_levels():
    with pytest.raises(ValueError):
        LoadSettings(run="bad/run", broker=parse_broker("mqtt://127.0.0.1:1883"), clients=2, rounds=1)
    with pytest.raises(ValueError):
        LoadSettings(run="run", broker=parse_broker("mqtt://127.0.0.1:1883"), clients=0, rounds=1)


def test_server_memory_is_read_against_what_holding_every_update_would_cost():
    runs = [{"clients": 10}, {"clients": 1010}]
    assert memory_answer(5, 140, runs, 0.14).startswith("**yes**")
    assert memory_answer(150, 140, runs, 0.14).startswith("**no**")
    assert memory_answer(40, 2, [{"clients": 5}, {"clients": 20}], 0.14).startswith("too few clients")
