import csv
import json

import pytest
import torch

from edgegan.config import resolve_train
from edgegan.simulate import SimConfig, simulate

TIME_COLUMNS = {"sim_time_s", "wall_time_s"}


def run(tmp_path, name, **changes) -> tuple[dict, list[dict], dict]:
    settings = dict(
        algo="serial", dataset="ring8", devices=4, partition="shards:2", rounds=30, seed=0,
        out=tmp_path / name, train=resolve_train("ring8", {}), width=32, latent_dim=8, eval_every=15,
        eval_samples=500,
    )  # fmt: skip
    settings.update(changes)
    summary = simulate(SimConfig(**settings))
    rows = list(csv.DictReader(open(tmp_path / name / "metrics.csv")))
    weights = torch.load(tmp_path / name / "generator.pt", weights_only=True)["state_dict"]
    return summary, rows, weights


def without_times(rows):
    return [{key: value for key, value in row.items() if key not in TIME_COLUMNS} for row in rows]


@pytest.mark.parametrize("algo", ["parallel", "mdgan"])
def test_a_simulation_repeated_with_the_same_seed_gives_the_same_numbers(tmp_path, algo):
    first_summary, first_rows, first_weights = run(tmp_path, "first", algo=algo)
    second_summary, second_rows, second_weights = run(tmp_path, "second", algo=algo)
    assert without_times(first_rows) == without_times(second_rows)
    assert first_summary["final"] == second_summary["final"]
    assert all(torch.equal(first_weights[name], second_weights[name]) for name in first_weights)
    _, other_rows, _ = run(tmp_path, "other", algo=algo, seed=1)
    assert without_times(other_rows) != without_times(first_rows)


def test_summary_json_carries_the_keys_other_tools_read(tmp_path):
    run(tmp_path, "run", algo="fedgan")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"algo", "dataset", "devices", "partition", "seed", "rounds", "wall_time_s", "sim_time_s",
            "bytes_up", "bytes_down", "initial", "final"} <= set(summary)  # fmt: skip
    assert summary["algo"] == "fedgan" and summary["rounds"] == 30 and summary["bytes_up"] > 0


def test_a_slow_device_stretches_the_simulated_clock_but_not_the_training(tmp_path):
    fast, fast_rows, fast_weights = run(tmp_path, "fast", device_speeds=(1.0, 1.0, 1.0, 1.0))
    slow, slow_rows, slow_weights = run(tmp_path, "slow", device_speeds=(1.0, 1.0, 1.0, 0.01))
    assert all(torch.equal(fast_weights[name], slow_weights[name]) for name in fast_weights)
    assert slow["sim_time_s"] > 5 * fast["sim_time_s"]


def test_a_thinner_link_costs_more_simulated_time_for_the_same_bytes(tmp_path):
    from edgegan.costmodel import LinkProfile

    lan, _, _ = run(tmp_path, "lan", link=LinkProfile(100.0, 100.0, 1.0))
    edge, _, _ = run(tmp_path, "edge", link=LinkProfile(1.0, 2.0, 50.0))
    assert lan["bytes_up"] == edge["bytes_up"] and lan["bytes_down"] == edge["bytes_down"]
    assert edge["sim_time_s"] > lan["sim_time_s"] + 30 * 0.1  # at least two 50 ms latencies a round


def test_a_short_mnist_run_of_the_proposed_method_improves_fid_by_half(tmp_path):
    summary, rows, _ = run(
        tmp_path, "mnist", dataset="mnist", partition="iid", rounds=200, eval_every=200, eval_samples=1000,
        width=32, latent_dim=64, train=resolve_train("mnist", {}),
    )  # fmt: skip
    assert summary["final"]["fid"] < 0.5 * summary["initial"]["fid"]
    assert summary["final"]["classes"] > summary["initial"]["classes"]


def test_a_diverging_run_stops_early_and_says_where(tmp_path):
    summary, _, _ = run(tmp_path, "boom", rounds=50, train=resolve_train("ring8", {"g_lr": 1e30}))
    assert summary["diverged_at_round"] is not None and summary["rounds"] < 50
    written = json.loads((tmp_path / "boom" / "summary.json").read_text())
    assert written["diverged_at_round"] == summary["diverged_at_round"]
    assert written["failure"] == {"reason": "the global model diverged (non-finite weights)",
                                  "round": summary["diverged_at_round"]}  # fmt: skip


def test_a_run_can_be_recosted_under_another_link_without_training_again(tmp_path):
    from edgegan.costmodel import LinkProfile, load_trace, recost

    summary, rows, _ = run(tmp_path, "lan")
    traces = [load_trace(json.loads(line)) for line in open(tmp_path / "lan" / "trace.jsonl")]
    assert len(traces) == 30
    same = recost(traces, [1.0] * 4, LinkProfile())
    assert same[-1] == pytest.approx(summary["sim_time_s"])
    assert [float(row["sim_time_s"]) for row in rows[1:]] == pytest.approx(same, abs=1e-6)  # 6 decimals
    slower = recost(traces, [1.0, 1.0, 1.0, 0.25], LinkProfile(10.0, 20.0, 50.0))
    assert slower[-1] > same[-1] + 30 * 0.1


def test_an_unwritable_run_directory_is_an_error_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot write the run directory"):
        run(tmp_path, "a-file/run")


def test_a_nearly_full_disk_is_an_error_at_start_not_at_the_first_checkpoint(tmp_path, monkeypatch):
    import shutil

    import edgegan.runsetup

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(edgegan.runsetup.shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    with pytest.raises(ValueError, match="only 10 MB free"):
        run(tmp_path, "full")


def test_with_g_ema_the_run_evaluates_and_saves_the_moving_average_of_each_rounds_generator(tmp_path):
    small = dict(rounds=3, eval_every=3)
    generators = [run(tmp_path, f"plain{rounds}", rounds=rounds, eval_every=1)[2] for rounds in range(4)]
    decay = 0.7
    expected = dict(generators[0])
    for current in generators[1:]:
        expected = {name: decay * expected[name] + (1 - decay) * current[name] for name in current}
    summary, _, weights = run(tmp_path, "ema", train=resolve_train("ring8", {"g_ema": decay}), **small)
    assert summary["generator"] == "ema 0.7"
    assert expected.keys() == weights.keys()
    for name, tensor in expected.items():
        assert torch.allclose(weights[name], tensor, atol=1e-6, rtol=0), name
    # The average is only evaluated and saved: the generator's own training is unchanged by it.
    plain, _, plain_weights = run(tmp_path, "plain", **small)
    assert plain["generator"] == "last"
    assert all(torch.equal(plain_weights[name], generators[3][name]) for name in plain_weights)
    assert summary["final"] != plain["final"]


def test_a_recorder_resumed_from_its_totals_ends_as_an_uninterrupted_one_with_g_ema(tmp_path):
    from edgegan.inprocess import build_runner
    from edgegan.runsetup import RunRecorder, prepare

    def config(name):
        return SimConfig(
            algo="serial", dataset="ring8", devices=2, partition="iid", rounds=6, seed=0, out=tmp_path / name,
            train=resolve_train("ring8", {"g_ema": 0.5}), width=16, latent_dim=4, eval_every=2,
            eval_samples=200,
        )  # fmt: skip

    def recorded(name, interrupt_at=None):
        settings = config(name)
        prepared = prepare(settings.setup)
        shards = [prepared.dataset.x[part] for part in prepared.parts]
        torch.manual_seed(0)
        runner = build_runner("serial", prepared.spec, settings.train, shards, 0, "fp32")
        recorder = RunRecorder(out=settings.out, prepared=prepared, eval_every=2, rounds=6, g_ema=0.5)
        recorder.start(runner.generator)
        for done in range(1, 7):
            recorder.record(done, 0.0, runner.run_round(done - 1), runner.generator)
            if done == interrupt_at:  # the server's checkpoint: through torch.save, read back weights-only
                torch.save({"recorder": recorder.totals()}, tmp_path / "checkpoint.pt")
                totals = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["recorder"]
                recorder = RunRecorder(
                    out=settings.out, prepared=prepared, eval_every=2, rounds=6, g_ema=0.5,
                    resume_from=done, totals=totals,
                )  # fmt: skip
        recorder.finish(runner.generator, {})
        rows = list(csv.DictReader(open(settings.out / "metrics.csv")))
        return rows, torch.load(settings.out / "generator.pt", weights_only=True)["state_dict"]

    rows, weights = recorded("uninterrupted")
    resumed_rows, resumed_weights = recorded("resumed", interrupt_at=3)
    assert [row["hq"] for row in resumed_rows] == [row["hq"] for row in rows]
    assert all(torch.equal(resumed_weights[name], weights[name]) for name in weights)


def test_g_ema_must_be_a_decay_in_0_1():
    from edgegan.algorithms.config import TrainConfig

    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="g_ema"):
            TrainConfig(g_ema=bad)


def test_the_averages_batch_norm_statistics_are_measured_on_its_own_weights_not_copied():
    from edgegan.models import ModelSpec, build_generator
    from edgegan.runsetup import GeneratorAverage

    torch.manual_seed(0)
    generator = build_generator(ModelSpec((1, 28, 28), 8, 4))
    average = GeneratorAverage(0.9, latent_dim=8)
    first = {name: tensor.clone() for name, tensor in average.of(generator).state_dict().items()}
    for name, buffer in generator.named_buffers():
        if "running_mean" in name:
            buffer.fill_(5.0)  # the generator's own statistics, which the average must not inherit
    average.update(generator)  # same weights: the average's parameters stay where they were
    again = average.of(generator).state_dict()
    assert all(
        torch.allclose(again[name], first[name], atol=1e-6) for name in first if "num_batches" not in name
    )
    assert not torch.allclose(first["2.running_mean"], torch.zeros_like(first["2.running_mean"]))
