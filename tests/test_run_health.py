"""Safe defaults (edgegan/algorithms/health.py, the auto update bound of edgegan/algorithms/admission.py):
honest runs reject nothing, a x100 device is rejected from its first update, and a run that rejects too
much or diverges stops with exit code 3, one line, its outputs saved and `failure` in summary.json."""

import json
import subprocess
import sys

import pytest

from edgegan.algorithms.health import RunHealth
from edgegan.config import resolve_train
from edgegan.simulate import SimConfig, simulate


def ring8(tmp_path, name, **changes) -> dict:
    settings = dict(
        algo="serial", dataset="ring8", devices=8, partition="iid", rounds=30, seed=0, out=tmp_path / name,
        train=resolve_train("ring8", {}), width=32, latent_dim=8, eval_every=30, eval_samples=500,
    )  # fmt: skip
    return simulate(SimConfig(**{**settings, **changes}))


@pytest.mark.parametrize("algo", ["serial", "parallel"])
def test_with_defaults_an_honest_run_rejects_nothing(tmp_path, algo):
    summary = ring8(tmp_path, algo, algo=algo)
    assert summary["max_update_norm"].startswith("auto")
    assert summary["updates_rejected_norm"] == 0 and summary["failure"] is None


def test_with_defaults_a_x100_device_is_rejected_from_its_first_update(tmp_path):
    first = ring8(tmp_path, "first", rounds=1, poison="scale:100")
    assert first["updates_rejected_norm"] == 1
    summary = ring8(tmp_path, "all", poison="scale:100")
    assert summary["updates_rejected_norm"] == 30 and summary["failure"] is None  # 1 of 8: below 25%


def test_max_update_norm_0_switches_the_bound_off(tmp_path):
    summary = ring8(tmp_path, "off", rounds=3, poison="scale:100", max_update_norm=0)
    assert summary["updates_rejected_norm"] == 0


def test_auto_does_not_apply_to_the_baselines_and_a_fixed_bound_is_refused(tmp_path):
    assert ring8(tmp_path, "fedgan", algo="fedgan", rounds=2)["failure"] is None
    with pytest.raises(ValueError, match="--max-update-norm applies to serial and parallel only"):
        ring8(tmp_path, "mdgan", algo="mdgan", max_update_norm=5.0)


def test_the_rejected_share_is_judged_only_after_the_warm_up():
    health = RunHealth(devices=4)
    assert health.judge(done=19, accepted=0, rejected=76, finite=True) is None
    assert health.judge(done=20, accepted=0, rejected=15, finite=True) is None
    assert health.judge(done=20, accepted=60, rejected=20, finite=True) is None  # 25%: not above
    failure = health.judge(done=20, accepted=59, rejected=21, finite=True)
    expected = "run stopped at round 20: 26% of updates rejected (> 25%, --max-rejected-fraction)"
    assert failure.line() == expected
    just_above = health.judge(done=2000, accepted=5999, rejected=2001, finite=True)
    assert just_above.reason.startswith("25.01% of updates rejected (> 25%")
    assert health.judge(done=1, accepted=4, rejected=0, finite=False).reason.startswith("the global model")


def simulate_command(out, *flags) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgegan", "simulate", "--dataset", "ring8", "--devices", "4", "--partition",
         "iid", "--rounds", "60", "--eval-every", "30", "--eval-samples", "500", "--out", str(out), *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_run_rejecting_more_than_the_share_exits_3_with_one_line_and_its_outputs(tmp_path):
    out = tmp_path / "attacked"
    result = simulate_command(out, "--poison", "scale:100", "--poisoned", "2")
    assert result.returncode == 3, result.stderr
    assert error_lines(result) == [
        "error: run stopped at round 20: 50% of updates rejected (> 25%, --max-rejected-fraction)"
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failure"] == {"reason": "50% of updates rejected (> 25%, --max-rejected-fraction)",
                                  "round": 20}  # fmt: skip
    assert summary["rounds"] == 20 and (out / "generator.pt").is_file()
    assert "done:" not in result.stderr


def test_a_diverging_run_exits_3_with_one_line(tmp_path):
    result = simulate_command(tmp_path / "boom", "--g-lr", "1e30")
    assert result.returncode == 3, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].endswith("the global model diverged (non-finite weights)")


def test_edgegan_run_of_a_diverging_fleet_exits_3_with_the_servers_one_line(tmp_path):
    """The whole fleet over the embedded broker: the server stops itself, the devices are told to stop, and
    `edgegan run` turns the server's exit code 3 into its own, with the reason from summary.json."""
    out = tmp_path / "fleet"
    result = subprocess.run(
        [sys.executable, "-m", "edgegan", "run", "--devices", "2", "--rounds", "50", "--eval-every", "50",
         "--dataset", "ring8", "--partition", "shards:4", "--width", "32", "--latent-dim", "8",
         "--g-lr", "1e30", "--run", "boom", "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["server_exit_code"] == 3 and summary["device_exit_codes"] == [0, 0]
    assert summary["failure"]["reason"] == "the global model diverged (non-finite weights)"
    assert error_lines(result) == [f"error: run stopped at round {summary['failure']['round']}: "
                                   "the global model diverged (non-finite weights)"]  # fmt: skip
