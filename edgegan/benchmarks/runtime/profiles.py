"""Section 6: a server and a device, each under cProfile (its event-loop thread and its worker threads),
and the functions they spend their busy time in."""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import runpy
import shutil
import sys
import threading
from pathlib import Path

from edgegan.benchmarks.runtime.harness import Broker, Sizes, reap, start
from edgegan.benchmarks.runtime.report import table

IDLE_FUNCTIONS = ("poll' of 'select.epoll", "acquire' of '_thread.lock", "time.sleep", "_thread.lock")


def profile_child(profile_path: str, arguments: list[str]) -> None:
    """Runs `edgegan ARGUMENTS` under cProfile: the event-loop thread and every asyncio.to_thread call
    (training, encoding, decoding run there), merged into one stats file per thread group."""
    main_profile = cProfile.Profile()
    worker_profiles: list[cProfile.Profile] = []
    local = threading.local()
    original = asyncio.to_thread

    def profiled_to_thread(function, /, *args, **kwargs):
        def run():
            profile = getattr(local, "profile", None)
            if profile is None:
                profile = local.profile = cProfile.Profile()
                worker_profiles.append(profile)
            profile.enable()
            try:
                return function(*args, **kwargs)
            finally:
                profile.disable()

        return original(run)

    asyncio.to_thread = profiled_to_thread
    # Imported before profiling starts, so that the profile shows rounds rather than module imports. The
    # command runs as `python -m edgegan` runs it (runpy), so that this package does not import edgegan.cli;
    # what is left in the profile of importing it is its own module body (a few milliseconds).
    import rich.progress  # noqa: F401
    import typer  # noqa: F401

    import edgegan.metrics  # noqa: F401
    import edgegan.runtime.device  # noqa: F401
    import edgegan.runtime.server  # noqa: F401

    sys.argv = ["edgegan", *arguments]
    main_profile.enable()
    try:
        runpy.run_module("edgegan", run_name="__main__", alter_sys=False)
    except SystemExit:
        pass
    finally:
        main_profile.disable()
        main_profile.dump_stats(profile_path + ".loop")
        if worker_profiles:
            workers = pstats.Stats(worker_profiles[0])
            for profile in worker_profiles[1:]:
                workers.add(profile)
            workers.dump_stats(profile_path + ".workers")


def top_functions(path: Path, count: int) -> tuple[list[list], float]:
    """The `count` functions with the most own time, idle waits left out; (rows, busy seconds)."""
    stats = pstats.Stats(str(path))
    entries = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        label = f"{short_path(filename)}:{line}({name})" if line else name
        if any(idle in label for idle in IDLE_FUNCTIONS) or "select.epoll" in label or "wait" == name:
            continue
        entries.append((own, cumulative, calls, label))
    busy = sum(own for own, *_ in entries)
    entries.sort(reverse=True)
    rows = [
        [label, calls, own, cumulative, f"{100 * own / busy:.1f}%"]
        for own, cumulative, calls, label in entries[:count]
    ]
    return rows, busy


def short_path(filename: str) -> str:
    for marker in ("site-packages/", "/edgegan/", "lib/python3"):
        if marker in filename:
            return (
                filename.split(marker, 1)[1]
                if marker != "/edgegan/"
                else "edgegan/" + filename.split(marker, 1)[1]
            )
    return filename


def section_profile(sizes: Sizes, work: Path, broker: Broker) -> tuple[list[str], dict]:
    rounds = sizes.profile_rounds
    run_name = f"bench-profile-{os.getpid()}"
    out = work / "profile"
    shutil.rmtree(out, ignore_errors=True)
    shared = ["--broker", broker.url, "--run", run_name, "--dataset", "mnist"]
    harness = [sys.executable, "-m", "edgegan.benchmarks.runtime", "--profile-child"]
    server_args = [
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
    ]
    device_args = [
        "device",
        *shared,
        "--id",
        "device-0",
        "--index",
        "0",
        "--of",
        "1",
        "--log-level",
        "warning",
    ]
    print(f"  profile: server and device, {rounds} MNIST rounds", file=sys.stderr, flush=True)
    measured = reap(
        {
            "server": start([*harness, str(work / "server.prof"), *server_args], work / "profile-server.log"),
            "device": start([*harness, str(work / "device.prof"), *device_args], work / "profile-device.log"),
        },
        20 * 60,
    )
    if any(item.returncode != 0 for item in measured.values()):
        raise RuntimeError(f"the profiled run failed; see {work}/profile-*.log")
    lines = [
        f"One `edgegan server` and one `edgegan device` (MNIST, {rounds} rounds, over {broker.name}), each "
        "under cProfile (stdlib): the event-loop thread and, merged, every `asyncio.to_thread` call (where "
        "training, encoding and decoding run). Own time per function, waits (epoll, locks, sleeps) left "
        "out; the share is of the busy time listed for that thread group. The whole process's CPU time "
        f"(wait4): server {measured['server'].cpu_s:.1f} s, device {measured['device'].cpu_s:.1f} s, "
        "start-up and profiling overhead included.",
        "",
    ]
    results = {}
    for role in ("server", "device"):
        for group in ("workers", "loop"):
            path = work / f"{role}.prof.{group}"
            if not path.is_file():
                continue
            rows, busy = top_functions(path, 12)
            results[f"{role}-{group}"] = {"busy_s": busy, "top": rows}
            where = "worker threads (to_thread)" if group == "workers" else "event-loop thread"
            lines += [
                f"**{role}, {where}** — {busy:.2f} s busy:",
                "",
                *table(["function", "calls", "own s", "cumulative s", "share"], rows),
                "",
            ]
    return lines, results
