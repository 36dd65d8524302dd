"""Pictures of runs: quality against simulated (or real) time and against bytes, several runs overlaid."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def run_label(run_dir: Path) -> str:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return run_dir.name
    summary = json.loads(summary_path.read_text())
    schedule = (
        f" ({summary['schedule']})"
        if summary.get("schedule", summary.get("algo")) != summary.get("algo")
        else ""
    )
    return f"{run_dir.name}: {summary.get('algo', '?')}{schedule}, {summary.get('dataset', '?')}"


def quality_points(run_dir: Path) -> tuple[str, list[dict]]:
    """(metric, [{time, bytes, value}]) from a run's metrics.csv, evaluation rows only."""
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise ValueError(f"{run_dir} has no metrics.csv; give the directory of an edgegan run")
    rows = list(csv.DictReader(open(metrics)))
    metric = "fid" if rows and "fid" in rows[0] else "hq"
    points = [
        {"time": float(row["sim_time_s"]), "bytes": int(row["bytes_up"]) + int(row["bytes_down"]),
         "value": float(row[metric])}
        for row in rows if row.get(metric)
    ]  # fmt: skip
    return metric, points


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    curves, metrics = {}, set()
    for run_dir in run_dirs:
        metric, points = quality_points(run_dir)
        metrics.add(metric)
        curves[run_label(run_dir)] = points
    if len(metrics) > 1:
        raise ValueError("these runs measure quality differently (fid and hq): plot image and 2-D runs apart")
    plot_curves(curves, metrics.pop(), "time (s; simulated for edgegan simulate, real for edgegan run)", out)


def plot_curves(
    curves: dict[str, list[dict]], metric: str, time_label: str, out: Path, title: str = "", bytes_log=False
) -> None:
    """Quality against time (left) and against bytes (right); points are {time, bytes, value}."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (by_time, by_bytes) = pyplot.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for label, points in curves.items():
        values = [p["value"] for p in points]
        by_time.plot([p["time"] for p in points], values, marker=".", label=label)
        by_bytes.plot([p["bytes"] / 1e6 for p in points], values, marker=".", label=label)
    names = {"fid": "fid (lower is better)", "hq": "high-quality fraction (higher is better)"}
    by_time.set_xlabel(time_label)
    by_bytes.set_xlabel("bytes transferred (MB)")
    if bytes_log:
        by_bytes.set_xscale("symlog")
    for axes in (by_time, by_bytes):
        axes.set_ylabel(names.get(metric, metric))
        axes.grid(alpha=0.3)
        if metric == "fid":
            axes.set_yscale("log")
    by_time.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    pyplot.close(figure)
