"""DP-SGD over MQTT (real Mosquitto, real processes): the simulator's numbers, and a device that spends its
privacy budget stops contributing while the run completes (docs/privacy.md)."""

import json
import os
import subprocess
import sys

import pytest
import small_runs
import torch

from edgegan.algorithms.privacy import epsilon_after

MODEL = ["--dataset", "ring8", "--width", "32", "--latent-dim", "8"]
# dirichlet:0.2 gives 2 devices 7,623 and 12,377 examples: at noise 0.5 and budget 4, device 0 (the
# larger sampling rate) may train 3 rounds, device 1 all 8 (tests/test_privacy.py has the same split).
PRIVATE = ["--partition", "dirichlet:0.2", "--dp-clip", "1.0", "--dp-noise", "0.5", "--dp-epsilon", "4"]


def edgegan(*args: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "edgegan", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, text=True,
    )  # fmt: skip
    return small_runs.finish(process, 240)


def generator_of(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "generator.pt", weights_only=True)["state_dict"]


def run_over_mosquitto_and_simulate(url: str, tmp_path, flags: list[str], rounds: int = 8) -> dict:
    """`edgegan run` over the Mosquitto at `url` and `edgegan simulate` with the same flags; asserts the
    same generator; returns the run's summary."""
    common = ["--devices", "2", "--rounds", str(rounds), "--eval-every", str(rounds), *MODEL, *flags]
    edgegan("run", "--broker", url, "--run", "dp", "--out", str(tmp_path / "run"), *common)
    edgegan("simulate", "--algo", "serial", "--out", str(tmp_path / "sim"), *common)
    over_mqtt, in_process = generator_of(tmp_path / "run"), generator_of(tmp_path / "sim")
    for name, tensor in in_process.items():
        assert torch.allclose(over_mqtt[name], tensor, atol=1e-6, rtol=0), name
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def test_dp_sgd_over_mosquitto_gives_the_simulators_generator_and_epsilons(broker, tmp_path):
    url, _ = broker
    flags = ["--partition", "dirichlet:0.2", "--dp-clip", "0.5", "--dp-noise", "1.0"]
    summary = run_over_mosquitto_and_simulate(url, tmp_path, flags, rounds=5)
    simulated = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["privacy"]["device-0"] == pytest.approx(simulated["privacy"]["0"])
    assert summary["privacy"]["device-1"] == pytest.approx(simulated["privacy"]["1"])
    assert summary["privacy"]["device-0"] == pytest.approx(
        epsilon_after(noise=1.0, rate=32 / 7623, steps=5, delta=1e-5)
    )
    # Without DP the same split gives other numbers: the noise and the clipping did something.
    plain = tmp_path / "plain"
    edgegan("simulate", "--algo", "serial", "--devices", "2", "--rounds", "5", "--eval-every", "5",
            "--partition", "dirichlet:0.2", "--out", str(plain), *MODEL)  # fmt: skip
    assert any(
        not torch.allclose(generator_of(plain)[name], tensor)
        for name, tensor in generator_of(tmp_path / "run").items()
    )


def test_over_mosquitto_a_device_that_spends_its_budget_stops_contributing_and_the_run_completes(
    broker, tmp_path
):
    url, port = broker
    summary = run_over_mosquitto_and_simulate(url, tmp_path, PRIVATE)
    assert summary["rounds"] == 8 and summary["server_exit_code"] == 0
    # the server's last metrics message (retained) carries each device's epsilon too
    from test_reliability import Watcher

    from edgegan import topics

    watcher = Watcher(port, "dp", [topics.metrics("dp")])
    try:
        metrics = json.loads(watcher.wait_for(lambda seen: seen.get(topics.metrics("dp")), timeout_s=10)[-1])
    finally:
        watcher.close()
    assert sorted(metrics["privacy"]) == ["device-0", "device-1"]
    assert all(0 < epsilon <= 4.0 for epsilon in metrics["privacy"].values())
    assert summary["device_exit_codes"] == [0, 0]
    counters = json.loads((tmp_path / "run" / "devices.json").read_text())
    assert counters["device-0"]["updates_sent"] == 3 and counters["device-0"]["privacy"] == "budget-spent"
    assert counters["device-1"]["updates_sent"] == 8 and counters["device-1"]["privacy"] == "within-budget"
    assert summary["privacy_budget_spent"] == ["device-0"]
    assert summary["privacy"]["device-0"] <= 4.0 and summary["privacy"]["device-1"] <= 4.0
    assert summary["updates_accepted"] == 11
    log = (tmp_path / "run" / "logs" / "device-0.log").read_text()
    assert log.count("stops contributing") == 1, log[-2000:]
