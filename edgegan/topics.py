"""The one place that knows topic names. Everything of a run lives under `edgegan/{run}/`.

edgegan/{run}/global            server -> devices: the global GAN and its round (QoS 1, retained)
edgegan/{run}/update/{device}   device -> server: a trained local discriminator (QoS 1)
edgegan/{run}/status/{device}   device: "online" / "offline" (retained; the last will says offline)
edgegan/{run}/control           server -> devices: run-level commands such as "stop" (QoS 1, retained)
edgegan/{run}/metrics           server -> watchers: progress of the run, JSON (QoS 1, retained)
"""

from __future__ import annotations

import re

PREFIX = "edgegan"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_name(kind: str, name: str) -> str:
    """Run and device names become topic levels: no wildcards, separators or empty names."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"{kind} name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name


def global_model(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/global"


def update(run: str, device: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/update/{check_name('device', device)}"


def all_updates(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/update/+"


def status(run: str, device: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/status/{check_name('device', device)}"


def all_statuses(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/status/+"


def control(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/control"


def metrics(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/metrics"


def device_of(topic: str) -> str | None:
    """The device level of an update or status topic, or None if the topic has another shape."""
    levels = topic.split("/")
    if len(levels) == 4 and levels[0] == PREFIX and levels[2] in ("update", "status"):
        return levels[3]
    return None
