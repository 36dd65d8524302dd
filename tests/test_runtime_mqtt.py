"""The MQTT runtime with real processes over a real Mosquitto started from the shipped config file."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import small_runs
import torch

from edgegan import topics
from edgegan.devtools.mosquitto import MOSQUITTO
from edgegan.runtime.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--dataset", "ring8", "--partition", "shards:4", "--width", "32", "--latent-dim", "8"]

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed")


def edgegan(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "edgegan", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def finish(process: subprocess.Popen, timeout_s: float = 120, code: int = 0) -> str:
    return small_runs.finish(process, timeout_s, code)


def start_fleet(url: str, run: str, out: Path, devices: int, rounds: int, extra=()):
    server = edgegan(
        "server", "--broker", url, "--run", run, "--devices", str(devices), "--rounds", str(rounds),
        "--eval-every", str(rounds), "--deadline-s", "30", "--out", str(out), *SMALL, *extra,
    )  # fmt: skip
    agents = [
        edgegan("device", "--broker", url, "--run", run, "--id", f"device-{index}", "--index", str(index),
                "--of", str(devices), *SMALL)
        for index in range(devices)
    ]  # fmt: skip
    return server, agents


def test_sync_schedule_over_mosquitto_gives_the_simulators_generator(broker, tmp_path):
    url, _ = broker
    server, agents = start_fleet(url, "equiv", tmp_path / "server", devices=2, rounds=12)
    finish(server)
    for agent in agents:
        assert "updates_sent=12" in finish(agent)
    simulated = tmp_path / "sim"
    finish(edgegan("simulate", "--algo", "serial", "--devices", "2", "--rounds", "12", "--eval-every", "12",
                   "--out", str(simulated), *SMALL))  # fmt: skip
    over_mqtt = torch.load(tmp_path / "server" / "generator.pt", weights_only=True)["state_dict"]
    in_process = torch.load(simulated / "generator.pt", weights_only=True)["state_dict"]
    for name, tensor in in_process.items():
        assert torch.allclose(over_mqtt[name], tensor, atol=1e-6, rtol=0), name
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["rounds"] == 12 and summary["updates_accepted"] == 24
    checkpoint = torch.load(tmp_path / "server" / "checkpoint.pt", weights_only=True)
    assert checkpoint["rounds_done"] == 12
    for name, tensor in checkpoint["generator"].items():
        assert torch.equal(tensor, over_mqtt[name])
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    assert set(summary["final"]) == {"modes", "hq", "dist"}


def test_with_g_ema_the_server_saves_the_same_generator_average_as_the_simulator(broker, tmp_path):
    url, _ = broker
    average = ("--g-ema", "0.9")
    server, agents = start_fleet(url, "ema", tmp_path / "server", devices=2, rounds=6, extra=average)
    finish(server)
    for agent in agents:
        finish(agent)
    simulated = tmp_path / "sim"
    finish(edgegan("simulate", "--algo", "serial", "--devices", "2", "--rounds", "6", "--eval-every", "6",
                   "--out", str(simulated), *SMALL, *average))  # fmt: skip
    over_mqtt = torch.load(tmp_path / "server" / "generator.pt", weights_only=True)["state_dict"]
    in_process = torch.load(simulated / "generator.pt", weights_only=True)["state_dict"]
    for name, tensor in in_process.items():
        assert torch.allclose(over_mqtt[name], tensor, atol=1e-6, rtol=0), name
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["generator"] == "ema 0.9"
    checkpoint = torch.load(tmp_path / "server" / "checkpoint.pt", weights_only=True)
    assert all(
        torch.equal(tensor, over_mqtt[name])
        for name, tensor in checkpoint["recorder"]["generator_average"].items()
    )


def test_malformed_updates_are_rejected_and_counted_and_the_run_completes(broker, tmp_path):
    url, port = broker
    server, agents = start_fleet(url, "bad", tmp_path / "server", devices=2, rounds=30)
    round_one = threading.Event()
    intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="intruder")
    intruder.on_message = lambda client, userdata, message: (
        round_one.set() if len(message.payload) > 0 else None
    )
    intruder.connect("127.0.0.1", port)
    intruder.subscribe(topics.global_model("bad"), qos=1)
    intruder.loop_start()
    try:
        assert round_one.wait(60), "the server never published a global model"
        for payload in (b"\x00not msgpack", b"\x93\x01\x02\x03"):
            intruder.publish(topics.update("bad", "device-0"), payload, qos=1).wait_for_publish(5)
    finally:
        intruder.loop_stop()
        intruder.disconnect()
    finish(server)
    for agent in agents:
        finish(agent)
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["rounds"] == 30
    assert summary["updates_rejected"] == {"not-msgpack": 1, "bad-envelope": 1}
    assert all(
        torch.isfinite(t).all()
        for t in torch.load(tmp_path / "server" / "generator.pt")["state_dict"].values()
    )


def run_and_compare(
    tmp_path, *flags: str, algo: str = "serial", codec: str = "fp32", sim_flags: tuple[str, ...] = ()
) -> dict:
    """`edgegan run` with 2 devices for 10 rounds; checks its outputs and that its generator equals the
    simulator's for the same seed; returns the summary."""
    out = tmp_path / "run"
    finish(edgegan("run", "--devices", "2", "--rounds", "10", "--eval-every", "5", "--out", str(out),
                   "--run", "cmp", "--codec", codec, *flags, *SMALL))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    for key in ("algo", "dataset", "devices", "partition", "seed", "rounds", "wall_time_s", "sim_time_s",
                "bytes_up", "bytes_down", "initial", "final"):  # fmt: skip
        assert key in summary, key
    assert (
        summary["rounds"] == 10
        and summary["server_exit_code"] == 0
        and summary["device_exit_codes"] == [0, 0]
    )
    counters = json.loads((out / "devices.json").read_text())
    assert sorted(counters) == ["device-0", "device-1"]
    assert all(device["updates_sent"] == 10 and device["state"] == "offline" for device in counters.values())
    assert (out / "metrics.csv").is_file() and (out / "samples" / "round_000010.png").is_file()
    simulated = tmp_path / "sim"
    finish(edgegan("simulate", "--algo", algo, "--devices", "2", "--rounds", "10", "--eval-every", "5",
                   "--codec", codec, "--out", str(simulated), *sim_flags, *SMALL))  # fmt: skip
    over_mqtt = torch.load(out / "generator.pt", weights_only=True)["state_dict"]
    in_process = torch.load(simulated / "generator.pt", weights_only=True)["state_dict"]
    for name, tensor in in_process.items():
        assert torch.allclose(over_mqtt[name], tensor, atol=1e-6, rtol=0), name
    return summary


def same_generators(over_mqtt_dir, in_process_dir) -> bool:
    """Whether two runs' generator.pt hold the same tensors, bit for bit."""
    over_mqtt = torch.load(over_mqtt_dir / "generator.pt", weights_only=True)["state_dict"]
    in_process = torch.load(in_process_dir / "generator.pt", weights_only=True)["state_dict"]
    return all(torch.equal(over_mqtt[name], tensor) for name, tensor in in_process.items())


def test_run_over_the_embedded_broker_matches_the_simulator_and_counts_per_device(tmp_path):
    run_and_compare(tmp_path)


def test_parallel_schedule_with_a_full_quorum_matches_the_simulators_parallel_algorithm(tmp_path):
    summary = run_and_compare(tmp_path, "--schedule", "parallel", "--tau", "1", algo="parallel")
    assert summary["algo"] == "parallel" and summary["staleness_histogram"] == {"0": 20}


@pytest.mark.parametrize("schedule", ["sync", "parallel"])
def test_server_drawn_fakes_over_mqtt_give_the_simulators_device_drawn_generator_for_fewer_bytes(
    tmp_path, schedule
):
    algo = "serial" if schedule == "sync" else "parallel"
    summary = run_and_compare(tmp_path, "--fakes", "server", "--schedule", schedule, algo=algo)
    simulated = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["fakes"] == "server" and simulated["fakes"] == "device"
    assert summary["bytes_down"] < simulated["bytes_down"]


def test_a_lossy_codec_changes_the_numbers_the_same_way_in_the_runtime_and_the_simulator(tmp_path):
    # With --keyframe-every 4 the 10 rounds hold deltas and scheduled keyframes: bit for bit the same.
    summary = run_and_compare(tmp_path, "--keyframe-every", "4", codec="int8+zstd",
                              sim_flags=("--keyframe-every", "4"))  # fmt: skip
    assert summary["codec"] == "int8+zstd" and summary["keyframe_every"] == 4
    assert same_generators(tmp_path / "run", tmp_path / "sim")


def test_run_over_mosquitto_with_the_broker_flag_matches_the_simulator(broker, tmp_path):
    url, _ = broker
    summary = run_and_compare(tmp_path, "--broker", url)
    assert summary["broker"] == url


def test_a_run_over_lossy_links_with_disconnections_completes_every_round(tmp_path):
    out = tmp_path / "lossy"
    finish(
        edgegan("run", "--devices", "3", "--rounds", "15", "--eval-every", "15", "--out", str(out),
                "--run", "lossy", "--drop-rate", "0.2", "--delay-ms", "50", "--jitter-ms", "30",
                "--resend-s", "0.5", "--deadline-s", "2", "--offline-every", "3", "--offline-for", "0.5",
                "--impair-devices", "0,1", *SMALL),
        timeout_s=240,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 15 and summary["server_exit_code"] == 0
    counters = json.loads((out / "devices.json").read_text())
    impaired, clean = counters["device-0"], counters["device-2"]
    assert impaired["offline_periods"] >= 1 and clean["offline_periods"] == 0
    assert clean["updates_dropped"] == 0 and clean["globals_dropped"] == 0
    lost = sum(
        counters[name]["updates_dropped"] + counters[name]["globals_dropped"]
        for name in ("device-0", "device-1")
    )
    assert lost >= 1
    final = torch.load(out / "generator.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(tensor).all() for tensor in final.values())


def test_parallel_schedule_with_a_slow_device_folds_stale_updates_within_tau(tmp_path):
    out = tmp_path / "stale"
    # The MNIST model, so that a device's compute (stretched 10 times) outlasts a round; device-drawn fakes,
    # so that the device also runs G (with server-drawn ones, the image default, it may not outlast one).
    finish(edgegan("run", "--devices", "3", "--rounds", "20", "--eval-every", "20", "--out", str(out),
                   "--run", "stale", "--schedule", "parallel", "--tau", "2", "--quorum", "2",
                   "--staleness-weight", "inverse", "--device-speeds", "1,1,0.1", "--dataset", "mnist",
                   "--width", "16", "--fakes", "device"))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    histogram = {int(key): count for key, count in summary["staleness_histogram"].items()}
    assert summary["rounds"] == 20 and all(0 <= staleness <= 2 for staleness in histogram)
    assert sum(histogram.values()) == summary["updates_accepted"]
    # The slow device's updates arrive after their round closed: folded in late, or dropped as too stale.
    assert summary["updates_stale"] + sum(count for staleness, count in histogram.items() if staleness) > 0


def test_a_device_behind_a_resetting_link_proxy_recovers_and_the_run_completes(broker, tmp_path):
    url, _ = broker
    proxy_port = free_port()
    proxy = edgegan("link-proxy", "--listen", f"mqtt://127.0.0.1:{proxy_port}", "--target", url,
                    "--reset-every", "1", "--delay-ms", "5", "--log-level", "info")  # fmt: skip
    try:
        wait_for_port(proxy_port)
        server = edgegan("server", "--broker", url, "--run", "proxy", "--devices", "2", "--rounds", "40",
                         "--eval-every", "40", "--deadline-s", "30", "--out", str(tmp_path / "server"),
                         *SMALL)  # fmt: skip
        behind = edgegan("device", "--broker", f"mqtt://127.0.0.1:{proxy_port}", "--run", "proxy", "--id",
                         "device-0", "--index", "0", "--of", "2", "--resend-s", "1", *SMALL)  # fmt: skip
        direct = edgegan("device", "--broker", url, "--run", "proxy", "--id", "device-1", "--index", "1",
                         "--of", "2", *SMALL)  # fmt: skip
        finish(server, timeout_s=180)
        behind_log = finish(behind)
        finish(direct)
    finally:
        proxy.terminate()
        proxy_log, _ = proxy.communicate(timeout=10)
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["rounds"] == 40 and summary["updates_accepted"] == 80
    assert "reset connection" in proxy_log
    assert "lost the broker" in behind_log and "updates_sent=40" in behind_log


def test_ctrl_c_stops_the_whole_fleet_promptly_and_keeps_what_was_written(tmp_path):
    out = tmp_path / "interrupted"
    launcher = edgegan("run", "--devices", "2", "--rounds", "100000", "--eval-every", "50", "--out", str(out),
                       "--run", "ctrlc", *SMALL)  # fmt: skip
    deadline = time.monotonic() + 90

    def rows() -> int:
        metrics = out / "metrics.csv"
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    while time.monotonic() < deadline and rows() < 3:  # the header and two rounds: the run is under way
        time.sleep(0.2)
    launcher.send_signal(signal.SIGINT)
    try:
        output, _ = launcher.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise AssertionError("edgegan run did not stop within 30 s of Ctrl-C") from None
    assert launcher.returncode == 130, output[-2000:]
    assert "interrupted" in output
    leftovers = subprocess.run(["pgrep", "-f", "--run ctrlc"], capture_output=True, text=True).stdout.split()
    assert leftovers == [], "processes of the interrupted run are still alive"
    assert len((out / "metrics.csv").read_text().splitlines()) > 2


def test_server_scores_against_devices_feature_statistics_as_against_the_union_of_their_images(
    broker, tmp_path
):
    from edgegan.data import load_dataset, parse_partition, partition_indices
    from edgegan.metrics import ImageQuality, load_classifier
    from edgegan.models import ModelSpec, build_generator
    from edgegan.runsetup import QualityProbe

    url, _ = broker
    devices, run, out = 3, "fedstats", tmp_path / "server"
    tiny = ["--dataset", "mnist", "--partition", "iid", "--width", "8", "--latent-dim", "8"]
    server = edgegan(
        "server", "--broker", url, "--run", run, "--devices", str(devices), "--rounds", "3",
        "--eval-every", "3", "--deadline-s", "30", "--out", str(out), "--quality-from", "devices", *tiny,
    )  # fmt: skip
    agents = [
        edgegan("device", "--broker", url, "--run", run, "--id", f"device-{index}", "--index", str(index),
                "--of", str(devices), *tiny)
        for index in range(devices)
    ]  # fmt: skip
    output = finish(server, timeout_s=240)
    for agent in agents:
        finish(agent)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quality_from"] == "devices" and summary["quality_devices"] == devices
    assert summary["stats_rejected"] == {} and "feature statistics of" in output

    dataset = load_dataset("mnist")
    parts = partition_indices(dataset.y, devices, parse_partition("iid"), 0)
    union = torch.cat([dataset.x[part] for part in parts])
    assert summary["quality_images"] == len(union)
    generator = build_generator(ModelSpec((1, 28, 28), 8, 8))
    generator.load_state_dict(torch.load(out / "generator.pt", weights_only=True)["state_dict"])
    # The server's evaluation noise, from a probe that reads no real image.
    probe = QualityProbe(dataset=dataset, latent_dim=8, samples=2500, seed=0, data_dir=None)
    direct = ImageQuality(load_classifier("mnist"), union, num_real=len(union))(probe.samples(generator))
    assert summary["final"]["fid"] == pytest.approx(direct["fid"], abs=1e-3)


def test_int8_downlink_deltas_with_server_drawn_fakes_give_the_simulators_generator_bit_for_bit(tmp_path):
    summary = run_and_compare(
        tmp_path, "--fakes", "server", codec="int8+zstd", sim_flags=("--fakes", "server")
    )
    assert same_generators(tmp_path / "run", tmp_path / "sim")
    simulated = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["bytes_down"] == pytest.approx(simulated["bytes_down"], rel=0.01)


def test_top_k_uplinks_with_error_feedback_give_the_simulators_generator_bit_for_bit_in_fewer_bytes(tmp_path):
    summary = run_and_compare(
        tmp_path, "--fakes", "server", codec="topk+int8+zstd", sim_flags=("--fakes", "server")
    )
    assert same_generators(tmp_path / "run", tmp_path / "sim")
    simulated = json.loads((tmp_path / "sim" / "summary.json").read_text())
    # 20 updates of about 600 B: the run's and device's names ("cmp", "device-0") against the simulator's
    # ("sim") are some 15 B of each.
    assert summary["bytes_up"] == pytest.approx(simulated["bytes_up"], abs=20 * 20)
    dense = tmp_path / "dense"
    finish(edgegan("simulate", "--algo", "serial", "--devices", "2", "--rounds", "10", "--eval-every", "10",
                   "--codec", "int8+zstd", "--fakes", "server", "--out", str(dense), *SMALL))  # fmt: skip
    # Each message's fixed part weighs on this small 2-D model's updates (0.52x measured); on MNIST's D the
    # ratio is lower (docs/benchmarks.md, "Top-k uplinks").
    assert summary["bytes_up"] < 0.6 * json.loads((dense / "summary.json").read_text())["bytes_up"]


def test_devices_that_miss_int8_deltas_ask_for_keyframes_and_the_run_completes(tmp_path):
    out = tmp_path / "gaps"
    finish(
        edgegan("run", "--devices", "3", "--rounds", "15", "--eval-every", "15", "--out", str(out),
                "--run", "gaps", "--codec", "int8+zstd", "--drop-rate", "0.3", "--resend-s", "3",
                "--deadline-s", "1", "--min-devices", "1", "--impair-devices", "0,1", *SMALL),
        timeout_s=240,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 15 and summary["server_exit_code"] == 0
    counters = json.loads((out / "devices.json").read_text())
    assert counters["device-2"]["keyframes_requested"] == 0 and counters["device-2"]["rejected"] == 0
    assert sum(counters[name]["keyframes_requested"] for name in ("device-0", "device-1")) >= 1
    assert summary["keyframes_on_request"] >= 1 and summary["keyframe_bytes_on_request"] > 0
    final = torch.load(out / "generator.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(tensor).all() for tensor in final.values())
