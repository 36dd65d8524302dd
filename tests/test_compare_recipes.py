"""scripts/compare_recipes.py end to end at a few rounds: its rows are what docs/algorithms.md quotes."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str, out: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare_recipes.py"), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [line for line in done.stdout.splitlines() if line.startswith("| grid25")]


def test_a_grid25_recipe_runs_on_the_chosen_algorithm_and_rounds_and_reports_its_quality(tmp_path):
    rows = run_script(
        "--datasets", "grid25", "--algo", "central", "--rounds", "3",
        "--only", "ns loss, G Adam 1e-3, batch 128", out=tmp_path,
    )  # fmt: skip
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[:6] == ["grid25", "central", "all", "ns loss, G Adam 1e-3, batch 128", "0", "3"]
    assert cells[7].startswith("modes ") and "hq " in cells[7]
    # One run directory per recipe, algorithm, rounds and seed: runs of different recipes never collide.
    expected = "grid25-central-shards-2-ns-loss-g-adam-1e-3-batch-128-r3-s0"
    assert [path.name for path in tmp_path.iterdir()] == [expected]


def test_a_recipe_that_diverges_is_reported_as_diverged(tmp_path):
    rows = run_script(
        "--datasets", "grid25", "--algo", "central", "--rounds", "30", "--only", "device SGD 0.3",
        out=tmp_path,
    )  # fmt: skip
    assert len(rows) == 1 and re.search(r"\| diverged at round \d+ \|$", rows[0].rstrip())
