"""scripts/search_recipes.py end to end at a few rounds: its tables are what docs/algorithms.md quotes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def search(*args: str, out: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "search_recipes.py"), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return [line for line in done.stdout.splitlines() if line.startswith("| probe")]


def test_a_stage_runs_each_candidate_and_seed_once_in_its_own_directory_and_tabulates_the_median(tmp_path):
    args = ("--stage", "central", "--rounds", "2", "--eval-every", "2", "--seeds", "0,1",
            "--only", "probe, ema 0.99")  # fmt: skip
    rows = search(*args, out=tmp_path)
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[:5] == ["probe, ema 0.99", "central", "iid", "2", "0,1"]
    runs = sorted(path.name for path in tmp_path.iterdir())
    assert runs == ["central-iid-probe-ema-0-99-r2-s0", "central-iid-probe-ema-0-99-r2-s1"]
    results = [json.loads((tmp_path / run / "search.json").read_text()) for run in runs]
    fids = sorted(result["final"]["fid"] for result in results)
    each = ", ".join(f"{result['final']['fid']:.1f}" for result in results)
    assert cells[5] == f"{(fids[0] + fids[1]) / 2:.1f} ({each})"
    assert all(abs(sum(result["class_shares"]) - 1) < 1e-3 for result in results)
    assert json.loads((tmp_path / runs[0] / "summary.json").read_text())["generator"] == "ema 0.99"
    # Finished runs are not run again: the table comes back from their directories.
    assert search(*args, "--table-only", out=tmp_path) == rows
