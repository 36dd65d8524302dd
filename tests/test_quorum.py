"""The parallel schedule with a quorum, on its event clock (edgegan/quorum.py)."""

import json
from itertools import pairwise

import pytest
import torch
from small_runs import POINTS, ring8_shards

from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.steps import clone_state
from edgegan.costmodel import LinkProfile, recost
from edgegan.inprocess import build_runner
from edgegan.quorum import QuorumParallelRunner

SPREAD = [0.25, 0.5, 0.75, 1.0]
EDGE = LinkProfile(10.0, 20.0, 50.0)


def play(runner, rounds: int) -> list:
    return [runner.run_round(round_index) for round_index in range(rounds)]


@pytest.mark.parametrize("codec", ["fp32", "int8+zstd"])
def test_a_quorum_of_every_device_plays_exactly_the_parallel_schedule(codec):
    cfg = TrainConfig()
    everyone = QuorumParallelRunner(
        spec=POINTS,
        cfg=cfg,
        shards=ring8_shards(),
        seed=3,
        codec=codec,
        quorum=4,
        tau=1,
        speeds=SPREAD,
        link=EDGE,
    )
    parallel = build_runner("parallel", POINTS, cfg, ring8_shards(), seed=3, codec=codec)
    quorum_traces, full_traces = play(everyone, 5), play(parallel, 5)
    ours, theirs = clone_state(everyone.generator), clone_state(parallel.generator)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    # The event clock agrees with the cost model when every round waits for every device.
    clock = recost(full_traces, SPREAD, EDGE)
    rounds = [b - a for a, b in pairwise([0.0, *clock])]
    assert [t.elapsed_s for t in quorum_traces] == pytest.approx(rounds, rel=0.5)  # each measured its compute
    assert everyone.staleness == {0: 20}


def test_without_its_slowest_device_a_round_is_shorter_and_that_device_arrives_stale():
    cfg = TrainConfig()
    waiting = QuorumParallelRunner(
        spec=POINTS,
        cfg=cfg,
        shards=ring8_shards(),
        seed=0,
        codec="fp32",
        quorum=4,
        tau=2,
        speeds=SPREAD,
        link=EDGE,
    )
    quorum = QuorumParallelRunner(
        spec=POINTS,
        cfg=cfg,
        shards=ring8_shards(),
        seed=0,
        codec="fp32",
        quorum=3,
        tau=2,
        speeds=SPREAD,
        link=EDGE,
    )
    waited, closed = play(waiting, 12), play(quorum, 12)
    assert sum(t.elapsed_s for t in closed) < 0.8 * sum(t.elapsed_s for t in waited)
    assert all(len(t.device_compute_s) == 3 for t in closed)  # each round folds exactly the quorum
    assert quorum.staleness[1] > 0 and quorum.stale == 0  # late updates folded in the next round
    assert all(torch.isfinite(p).all() for p in quorum.generator.parameters())


def test_updates_staler_than_tau_are_dropped_and_the_device_catches_up_on_the_newest_model():
    runner = QuorumParallelRunner(
        spec=POINTS,
        cfg=TrainConfig(),
        shards=ring8_shards(),
        seed=0,
        codec="fp32",
        quorum=3,
        tau=1,
        speeds=[0.05, 1, 1, 1],
        link=EDGE,
    )
    traces = play(runner, 12)
    assert runner.stale > 0  # twenty times slower: its updates come back more than one round late
    assert all(len(t.device_compute_s) == 3 for t in traces)
    downloads = sum(len(t.bytes_down) for t in traces)
    assert downloads < 4 * 12  # the slow device took fewer models than the rounds published


def test_a_quorum_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="parallel"):
        build_runner("serial", POINTS, TrainConfig(), ring8_shards(), 0, "fp32", quorum=3)
    with pytest.raises(ValueError, match="tau"):
        QuorumParallelRunner(
            spec=POINTS,
            cfg=TrainConfig(),
            shards=ring8_shards(),
            seed=0,
            codec="fp32",
            quorum=3,
            tau=0,
            speeds=SPREAD,
            link=EDGE,
        )
    with pytest.raises(ValueError, match="quorum"):
        QuorumParallelRunner(
            spec=POINTS,
            cfg=TrainConfig(),
            shards=ring8_shards(),
            seed=0,
            codec="fp32",
            quorum=5,
            tau=1,
            speeds=SPREAD,
            link=EDGE,
        )


def test_the_simulator_command_takes_a_quorum_for_the_parallel_schedule_only(tmp_path):
    from typer.testing import CliRunner

    from edgegan.cli import app

    common = ["simulate", "--dataset", "ring8", "--devices", "4", "--rounds", "20", "--eval-every", "20"]
    refused = CliRunner().invoke(
        app, [*common, "--algo", "serial", "--quorum", "3", "--out", str(tmp_path / "s")]
    )
    assert refused.exit_code != 0 and "--algo parallel" in refused.output
    speeds = ["--device-speeds", "0.25,0.5,0.75,1"]
    ran = CliRunner().invoke(
        app,
        [*common, "--algo", "parallel", "--quorum", "3", "--tau", "2", *speeds, "--out", str(tmp_path / "q")],
    )
    assert ran.exit_code == 0, ran.output
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["quorum"] == 3 and summary["tau"] == 2 and summary["rounds"] == 20
