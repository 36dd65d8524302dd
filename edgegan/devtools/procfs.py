"""What /proc says about a live process: CPU seconds and memory, for the benchmarks and the dev broker."""

from __future__ import annotations

import os


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile (kB) and Threads of a live process; {} once it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                    fields[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return fields


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process so far (from /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            after_name = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(after_name[11]) + int(after_name[12])) / ticks
