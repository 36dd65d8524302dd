"""Section 5: what a device process weighs (peak RSS, resident memory by mapping, threads, CPU per round)
and what torch threads do to its update."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgegan.benchmarks.runtime.harness import (
    Broker,
    Sizes,
    StatusWatcher,
    command_pid,
    edgegan_command,
    mapped_rss_mb,
    median,
    reap,
    start,
    time_median,
)
from edgegan.benchmarks.runtime.report import table, verdict


def footprint_run(sizes: Sizes, work: Path, broker: Broker, python: str, label: str) -> dict:
    rounds = sizes.footprint_rounds
    run_name = f"bench-footprint-{label}-{os.getpid()}"
    out = work / f"footprint-{label}"
    shutil.rmtree(out, ignore_errors=True)
    shared = ["--broker", broker.url, "--run", run_name, "--dataset", "mnist"]
    server = start(
        edgegan_command(
            "server",
            *shared,
            "--devices",
            "1",
            "--rounds",
            str(rounds),
            "--eval-every",
            str(rounds),
            "--out",
            str(out),
            "--log-level",
            "warning",
        ),
        work / f"footprint-{label}-server.log",
    )
    device = start(
        edgegan_command(
            "device",
            *shared,
            "--id",
            "device-0",
            "--index",
            "0",
            "--of",
            "1",
            "--status-interval",  # CPU and memory are sampled at every status message: one per round
            "0",
            "--log-level",
            "warning",
            python=python,
        ),
        work / f"footprint-{label}-device.log",
        python=python,
    )
    watcher = StatusWatcher(broker.port, run_name, {"device-0": command_pid(device)})
    smaps: dict[str, float] = {}
    try:
        print(f"  footprint ({label}): 1 device, {rounds} rounds", file=sys.stderr, flush=True)
        # Take the mapping breakdown once the device is training (its second status), while it is alive.
        deadline = time.perf_counter() + 15 * 60
        while time.perf_counter() < deadline and device.poll() is None:
            with watcher.lock:
                samples = list(watcher.samples.get("device-0", []))
            if len(samples) >= 2 and not smaps:
                smaps = mapped_rss_mb(command_pid(device))
            if smaps:
                break
            time.sleep(0.2)
        measured = reap({"server": server, "device": device}, 20 * 60)
    finally:
        watcher.close()
    if any(item.returncode != 0 for item in measured.values()):
        raise RuntimeError(f"the footprint run failed; see {work}/footprint-{label}-*.log")
    samples = [item for item in watcher.samples.get("device-0", []) if item.get("cpu_s") is not None]
    trained = [item for item in samples if item.get("round") is not None and item["round"] >= 0]
    first, last = trained[0], trained[-1]
    cpu_per_round = (last["cpu_s"] - first["cpu_s"]) / max(1, last["round"] - first["round"])
    compute = [value for per_device in watcher.compute_by_round().values() for value in per_device.values()]
    return {
        "label": label,
        "python": python,
        "rounds": rounds,
        "peak_rss_mb": measured["device"].max_rss_mb,
        "rss_anon_mb": max(item.get("RssAnon", 0) for item in samples) / 1024,
        "rss_file_mb": max(item.get("RssFile", 0) for item in samples) / 1024,
        "threads": max(item.get("Threads", 0) for item in samples),
        "cpu_s_total": measured["device"].cpu_s,
        "cpu_s_per_round": cpu_per_round,
        "compute_s_per_round": median(compute),
        "mappings_mb": smaps,
        "server_peak_rss_mb": measured["server"].max_rss_mb,
        "torch": torch_version(python),
    }


def torch_version(python: str) -> str:
    result = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    )
    return result.stdout.strip() or "?"


def thread_scaling(repeats: int) -> list[dict]:
    """A device's update (MNIST, 2,500 examples) at 1 torch thread and at every core of this machine."""
    import torch

    from edgegan.algorithms.proposed import GlobalGan, LocalDiscriminator
    from edgegan.config import resolve_run, resolve_train
    from edgegan.data import load_dataset
    from edgegan.models import ModelSpec

    dataset = load_dataset("mnist")
    spec = ModelSpec(
        dataset.sample_shape, resolve_run("mnist", "latent_dim", None), resolve_run("mnist", "width", None)
    )
    train = resolve_train("mnist", {})
    generator_state, discriminator_state = GlobalGan(spec, train, 0).snapshot()
    device = LocalDiscriminator(spec=spec, cfg=train, data=dataset.x[:2500], device_index=0, seed=0)
    previous = torch.get_num_threads()
    results = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        device.update(0, generator_state, discriminator_state)  # warm-up
        seconds = time_median(lambda: device.update(1, generator_state, discriminator_state), repeats)
        results.append({"threads": threads, "update_ms": seconds * 1000})
    torch.set_num_threads(previous)
    return results


def section_footprint(
    sizes: Sizes, work: Path, broker: Broker, other_python: str | None
) -> tuple[list[str], dict]:
    runs = [footprint_run(sizes, work, broker, sys.executable, "venv")]
    if other_python:
        runs.append(footprint_run(sizes, work, broker, other_python, "other-python"))
    scaling = thread_scaling(max(3, sizes.footprint_rounds // 5))
    rows = [
        [
            run["torch"],
            run["peak_rss_mb"],
            run["rss_anon_mb"],
            run["rss_file_mb"],
            run["threads"],
            run["cpu_s_per_round"] * 1000,
            run["compute_s_per_round"] * 1000,
            run["cpu_s_total"],
        ]
        for run in runs
    ]
    mapping_rows = []
    for run in runs:
        for group, mb in sorted(run["mappings_mb"].items(), key=lambda item: -item[1]):
            mapping_rows.append([run["torch"], group, mb])
    verdicts = "; ".join(
        f"torch {run['torch']}: {verdict(run['peak_rss_mb'] <= 400)} ({run['peak_rss_mb']:.0f} MB)"
        for run in runs
    )
    cuda = [run for run in runs if "CUDA libraries (nvidia/*, libtorch_cuda)" in run["mappings_mb"]]
    lines = [
        f"`edgegan server --dataset mnist --devices 1 --rounds {sizes.footprint_rounds}` and one `edgegan "
        f"device --dataset mnist --index 0 --of 1` (the whole 10,000-image shard: the largest a device "
        f"holds) over {broker.name}. *Peak RSS* is the device process's VmHWM (wait4's ru_maxrss); "
        "*anon* / *file* are its largest RssAnon / RssFile while training (file pages are shared "
        "libraries, shared between processes); *threads* is the most OS threads it had; *CPU per round* is "
        "the CPU seconds (/proc/PID/stat) between its first and last status, per round; *compute* its own "
        "`round_compute_s` (wall). Devices run with `--threads 1` (the `edgegan device` default, also what "
        "`edgegan run` uses, one process per core being the right share when the fleet shares a machine); "
        "the other threads are asyncio's workers (decoding, training and encoding run there). A board "
        "that runs one device alone should give it its cores: `edgegan device --threads 4` on a 4-core "
        "Raspberry Pi (the last line below measures the effect of threads on this machine).",
        "",
        *table(
            [
                "torch",
                "peak RSS MB",
                "anon MB",
                "file MB",
                "threads",
                "CPU ms per round",
                "compute ms per round (median)",
                "CPU s total",
            ],
            rows,
        ),
        "",
        "Resident memory by mapping while training:",
        "",
        *table(["torch", "mapping", "MB"], mapping_rows),
        "",
        "A device's update (one local step, MNIST) by torch threads, in one process: "
        + ", ".join(f"{item['threads']} thread(s) {item['update_ms']:.1f} ms" for item in scaling)
        + ".",
        "",
        f"Target: peak RSS at most 400 MB — {verdicts}."
        + (
            " A torch build with CUDA maps its CUDA libraries into every process although a device never "
            "uses them (the CUDA row above), and touches more of them while the interpreter exits, which is "
            "where its VmHWM is reached; a board installs a CPU-only torch (a Raspberry Pi's aarch64 wheel "
            "has no CUDA). Compare with `--device-python` pointing at a venv with a CPU-only torch."
            if cuda
            else ""
        ),
    ]
    return lines, {"runs": runs, "thread_scaling": scaling}
