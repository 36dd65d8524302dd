"""What a run looks like from the broker: each device's retained status, the server's metrics, and the
quality curve collected from successive metrics messages. `edgegan run`'s live view and `edgegan status`
both fill a `FleetView` with `watch` and draw it with `render_fleet`, a pure function of the view.
"""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiomqtt
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from edgegan import topics, wire
from edgegan.figures import quality_text
from edgegan.runtime.connection import BrokerAddress, mqtt_client

SPARK = "▁▂▃▄▅▆▇█"
DEFAULT_ROWS = 50
WIDE_COLUMNS = 120  # narrower screens (80x24 terminals) get the narrow table: fewer columns, never wrapped
SLOW_FACTOR = 1.5  # a device whose last round took this many times the fleet's median stands out
RECONNECT_S = 0.5


@dataclass(kw_only=True)
class FleetView:
    """Everything the view shows, filled from the status and metrics topics."""

    run: str
    devices: int = 0  # the fleet size if known (edgegan run); else as many as have published a status
    rounds: int = 0  # the run's length; the metrics messages say it too
    metrics: dict = field(default_factory=dict)
    statuses: dict[str, dict] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)  # device -> wall time of its latest status
    quality: dict[int, dict[str, float | None]] = field(default_factory=dict)  # evaluated round -> quality
    messages: int = 0  # status and metrics messages of this run received
    retained: int = 0  # of which the broker had kept (sent when we subscribed)
    rejected_messages: int = 0
    connection_error: str = ""  # the latest reason the watcher could not reach the broker

    @property
    def online(self) -> int:
        return sum(1 for status in self.statuses.values() if status.get("state") == "online")

    @property
    def fleet_size(self) -> int:
        return max(self.devices, len(self.statuses))

    @property
    def finished(self) -> bool:
        rounds = self.metrics.get("rounds") or self.rounds
        return bool(rounds) and self.metrics.get("round", 0) >= rounds

    def record_metrics(self, metrics: dict) -> None:
        """The server's progress; each evaluation's quality joins the curve."""
        self.metrics = metrics
        self.rounds = metrics.get("rounds") or self.rounds
        quality = metrics.get("quality") or {}
        evaluated = metrics.get("quality_round")
        if not isinstance(evaluated, int):  # a server that does not say which round it evaluated
            latest = self.quality[max(self.quality)] if self.quality else None
            evaluated = metrics.get("round", 0) if quality != latest else None
        if quality and evaluated is not None:
            self.quality[evaluated] = quality

    def record_status(self, device: str, status: dict, received_at: float, retained: bool) -> None:
        """A device's state and counters. A retained status was published before we subscribed: it was
        last seen when it says it was sent, if it says so. A status without counters (the MQTT last will
        of a device that vanished: `{"state": "offline"}`) changes the state and keeps the last counters."""
        if "round" not in status and device in self.statuses:
            kept = {key: value for key, value in self.statuses[device].items()
                    if key not in ("field", "detail", "time")}  # fmt: skip
            status = {**kept, **status}
        self.statuses[device] = status
        sent = status.get("time")
        seen = (sent if isinstance(sent, int | float) else None) if retained else received_at
        if seen is not None:
            self.last_seen[device] = float(seen)


async def watch(
    address: BrokerAddress, view: FleetView, stopped: asyncio.Event, identifier: str | None = None
) -> None:
    """Keeps `view` current from the retained status and metrics messages until `stopped`; reconnects
    when the broker goes away. A refused login (LoginRefused) is raised: retrying cannot help."""
    identifier = identifier or f"edgegan-watch-{view.run}"
    while not stopped.is_set():
        try:
            async with mqtt_client(address, identifier) as client:
                view.connection_error = ""
                await client.subscribe(topics.all_statuses(view.run), qos=1)
                await client.subscribe(topics.metrics(view.run), qos=1)
                async for message in client.messages:
                    receive(view, message.topic.value, bytes(message.payload), bool(message.retain))
        except aiomqtt.MqttError as error:
            view.connection_error = str(error)
            await asyncio.sleep(RECONNECT_S)


def receive(view: FleetView, topic: str, payload: bytes, retained: bool) -> None:
    """Folds one message into the view; a malformed one is counted, not shown."""
    try:
        if topic == topics.metrics(view.run):
            view.record_metrics(wire.decode_metrics(payload))
        elif (device := topics.device_of(topic)) is not None and topic == topics.status(view.run, device):
            view.record_status(device, wire.decode_status(payload), time.time(), retained)
        else:
            return
        view.messages += 1
        view.retained += retained
    except (wire.WireError, ValueError):
        view.rejected_messages += 1


async def observe(
    address: BrokerAddress,
    view: FleetView,
    *,
    once: bool,
    timeout_s: float,
    stopped: asyncio.Event,
    on_tick: Callable[[FleetView], None] | None = None,
    settle_s: float = 0.5,
    tick_s: float = 0.25,
    identifier: str | None = None,
) -> bool:
    """`edgegan status`: waits up to `timeout_s` for the run's first message (False if none came). With
    `once`, returns when the retained messages have arrived (`settle_s` without another); otherwise
    calls `on_tick` until the run finishes or `stopped` is set."""
    watch_stopped = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        watcher = group.create_task(watch(address, view, watch_stopped, identifier))
        try:
            deadline = asyncio.get_running_loop().time() + timeout_s
            async with asyncio.timeout_at(deadline):
                while view.messages == 0 and not stopped.is_set():
                    await asyncio.sleep(0.05)
                if once:
                    seen = -1
                    while seen != view.retained:  # the retained messages come in one burst
                        seen = view.retained
                        await asyncio.sleep(settle_s)
        except TimeoutError:
            if view.messages == 0:
                watch_stopped.set()
                watcher.cancel()
                return False
        while not once and not stopped.is_set():
            if on_tick is not None:
                on_tick(view)
            if view.finished:
                break
            try:
                await asyncio.wait_for(stopped.wait(), timeout=tick_s)
            except TimeoutError:
                pass
        watch_stopped.set()
        watcher.cancel()
    return True


def natural_key(name: str) -> tuple:
    """device-2 before device-10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def ago(seconds: float) -> str:
    if seconds < 0:
        return "now"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def sparkline(values: list[float]) -> str:
    """One block character per value, scaled between the smallest and the largest."""
    finite = [value for value in values if value is not None and math.isfinite(value)]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    span = high - low
    return "".join(
        " " if value is None or not math.isfinite(value)
        else SPARK[round((value - low) / span * (len(SPARK) - 1)) if span else len(SPARK) // 2]
        for value in values
    )  # fmt: skip


def megabytes(count: object) -> str:
    return f"{count / 1e6:.1f}" if isinstance(count, int | float) else "—"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def eta(metrics: dict, rounds: int) -> str:
    """The time left at the pace so far (the server's wall time over the rounds done), or "" if unknown."""
    done, wall_s = metrics.get("round", 0), metrics.get("wall_time_s")
    if not (isinstance(wall_s, int | float) and isinstance(done, int) and 0 < done < (rounds or 0)):
        return ""
    return f"ETA {duration(wall_s / done * (rounds - done))}"


def slowness(statuses: dict[str, dict]) -> dict[str, float]:
    """Each device's last round time (`round_compute_s`) over the fleet's median, for devices that say."""
    times = {
        name: float(status["round_compute_s"])
        for name, status in statuses.items()
        if isinstance(status.get("round_compute_s"), int | float) and status["round_compute_s"] > 0
    }
    if len(times) < 2:
        return {}
    median = statistics.median(times.values())
    return {name: seconds / median for name, seconds in times.items()}


# The narrow table's columns, most wanted first: the first ones that fit the width are shown, in this order.
NARROW_COLUMNS = (
    "device",
    "state",
    "round",
    "s/round",
    "late",
    "seen",
    "stale",
    "acc",
    "rej",
    "sent",
    "MB up",
)
NARROW_ORDER = ("device", "state", "seen", "round", "stale", "s/round", "sent", "acc", "late", "rej", "MB up")


def render_fleet(
    view: FleetView, now: float, rows: int = DEFAULT_ROWS, curve_points: int = 40, width: int | None = None
) -> RenderableType:
    """The fleet table (one row per device: state, last seen, round, staleness, what the server made of
    its updates, bytes) with the run's totals as its caption, and the quality curve below it. Below
    WIDE_COLUMNS of `width` the table is narrow: the columns that fit, on one line each."""
    if width is not None and width < WIDE_COLUMNS:
        return render_narrow(view, now, rows, curve_points, width)
    metrics = view.metrics
    done = metrics.get("round", 0)
    by_device = metrics.get("by_device")
    table = Table(title=f"edgegan run {view.run}", title_justify="left")
    for column in ("device", "state", "last seen", "round", "staleness", "sent", "accepted", "late/stale",
                   "rejected", "MB up", "MB down"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("device", "state", "last seen") else "right")
    names = sorted(view.statuses, key=natural_key)
    slow = slowness(view.statuses)
    for name in names[:rows]:
        status = view.statuses[name]
        trained = status.get("round")
        trained = trained if isinstance(trained, int) and trained >= 0 else None
        # Round t closed means `round` t + 1 in the metrics; a device that trained round t is current.
        staleness = max(0, done - 1 - trained) if trained is not None and metrics else None
        at_server = by_device.get(name, {}) if isinstance(by_device, dict) else None
        state = state_of(status)
        table.add_row(
            Text(name, style="bold red" if slow.get(name, 0) >= SLOW_FACTOR else ""),
            Text(state, style="green" if state == "online" else "red"),
            ago(now - view.last_seen[name]) if name in view.last_seen else "—",
            "—" if trained is None else str(trained),
            "—" if staleness is None else str(staleness),
            str(status.get("updates_sent", "—")),
            "—" if at_server is None else str(at_server.get("accepted", 0)),
            "—" if at_server is None else str(at_server.get("late", 0) + at_server.get("stale", 0)),
            "—" if at_server is None else str(at_server.get("rejected", 0)),
            megabytes(status.get("bytes_up")),
            megabytes(status.get("bytes_down")),
        )
    if len(names) > rows:
        table.add_row(f"… {len(names) - rows} more", *[""] * 10)
    quality = metrics.get("quality") or {}
    shown = quality_text(quality)
    rejected = sum((metrics.get("rejected") or {}).values())
    dropped = sum(
        status.get("updates_dropped", 0) + status.get("globals_dropped", 0)
        for status in view.statuses.values()
    )
    rounds = metrics.get("rounds") or view.rounds
    up, down = megabytes(metrics.get("bytes_up", 0)), megabytes(metrics.get("bytes_down", 0))
    left = eta(metrics, rounds)
    privacy = privacy_text(view.statuses, metrics.get("central_privacy"))
    table.caption = (
        f"round {done}/{rounds or '?'} · online {view.online}/{view.fleet_size}"
        + (f" · {left}" if left else "")
        + (f" · {privacy}" if privacy else "")
        + (f" · {shown}" if shown else "")
        + f" · up {up} MB, down {down} MB · late {metrics.get('late', 0)}, stale {metrics.get('stale', 0)},"
        f" rejected {rejected}, lost on links {dropped}"
    )
    table.caption_justify = "left"
    return Group(table, render_quality(view.quality, curve_points))


def state_of(status: dict) -> str:
    """A device's state as shown: "incompatible: FIELD" names what stands in its way."""
    state = str(status.get("state", "?"))
    if status.get("privacy") == "budget-spent":  # DP-SGD: it stopped contributing (docs/privacy.md)
        return f"{state}: budget spent"
    return f"{state}: {status['field']}" if state == "incompatible" and status.get("field") else state


def privacy_text(statuses: dict[str, dict], central: object = None) -> str:
    """The largest epsilon any private device reports (its status) and the server's central-DP epsilon
    (its metrics, `CentralPrivacy.report`; None there: no noise, infinite), or "" for a run without DP."""
    parts = []
    epsilons = [status["epsilon"] for status in statuses.values() if "epsilon" in status]
    if epsilons:
        finite = [epsilon for epsilon in epsilons if isinstance(epsilon, int | float)]
        largest = f"{max(finite):.3g}" if len(finite) == len(epsilons) else "inf"
        parts.append(f"epsilon max {largest}")
    if isinstance(central, dict):
        epsilon = central.get("epsilon")
        shown = f"{epsilon:.3g}" if isinstance(epsilon, int | float) else "inf"
        parts.append(f"central epsilon {shown} after {central.get('rounds', '?')} rounds")
    return " · ".join(parts)


def server_count(at_server: dict | None, *outcomes: str) -> str:
    """What the server counted of a device's updates, summed over `outcomes`; "—" if it did not say."""
    return "—" if at_server is None else str(sum(at_server.get(outcome, 0) for outcome in outcomes))


def render_narrow(view: FleetView, now: float, rows: int, curve_points: int, width: int) -> RenderableType:
    """The fleet on a narrow screen: whole device names, the most wanted columns that fit in `width`, no
    row wrapped; a slow device's name and round time in red with its multiple of the fleet's median."""
    metrics = view.metrics
    done = metrics.get("round", 0)
    by_device = metrics.get("by_device")
    slow = slowness(view.statuses)
    names = sorted(view.statuses, key=natural_key)
    cells: list[dict[str, Text]] = []
    for name in names[:rows]:
        status = view.statuses[name]
        trained = status.get("round")
        trained = trained if isinstance(trained, int) and trained >= 0 else None
        staleness = max(0, done - 1 - trained) if trained is not None and metrics else None
        at_server = by_device.get(name, {}) if isinstance(by_device, dict) else None
        state = state_of(status)
        ratio = slow.get(name, 0.0)
        flagged = "bold red" if ratio >= SLOW_FACTOR else ""
        seconds = status.get("round_compute_s")
        per_round = f"{seconds:.2f}" if isinstance(seconds, int | float) and seconds > 0 else "—"
        if ratio >= SLOW_FACTOR:
            per_round += f" ×{ratio:.1f}"
        seen = ago(now - view.last_seen[name]).removesuffix(" ago") if name in view.last_seen else "—"
        cells.append({
            "device": Text(name, style=flagged),
            "state": Text(state, style="green" if state == "online" else "red"),
            "seen": Text(seen),
            "round": Text("—" if trained is None else str(trained)),
            "stale": Text("—" if staleness is None else str(staleness)),
            "s/round": Text(per_round, style=flagged),
            "sent": Text(str(status.get("updates_sent", "—"))),
            "acc": Text(server_count(at_server, "accepted")),
            "late": Text(server_count(at_server, "late", "stale")),
            "rej": Text(server_count(at_server, "rejected")),
            "MB up": Text(megabytes(status.get("bytes_up"))),
        })  # fmt: skip
    if len(names) > rows:
        cells.append({"device": Text(f"… {len(names) - rows} more")})

    def needed(column: str) -> int:  # its widest cell, a space either side and the separator
        return max([len(column), *(len(row.get(column, Text())) for row in cells)]) + 3

    chosen, used = [], 0
    for column in NARROW_COLUMNS:
        if used + needed(column) <= width + 2:  # no separator after the last column
            chosen.append(column)
            used += needed(column)
    shown = [column for column in NARROW_ORDER if column in chosen]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), expand=False)
    for column in shown:
        table.add_column(column, justify="left" if column in ("device", "state", "seen") else "right",
                         no_wrap=True, overflow="ellipsis")  # fmt: skip
    for row in cells:
        table.add_row(*(row.get(column, Text()) for column in shown))
    quality = metrics.get("quality") or {}
    figures = quality_text(quality)
    rounds = metrics.get("rounds") or view.rounds
    left = eta(metrics, rounds)
    up, down = megabytes(metrics.get("bytes_up", 0)), megabytes(metrics.get("bytes_down", 0))
    rejected = sum((metrics.get("rejected") or {}).values())
    dropped = sum(
        status.get("updates_dropped", 0) + status.get("globals_dropped", 0)
        for status in view.statuses.values()
    )
    lines = [
        f"edgegan run {view.run}: round {done}/{rounds or '?'} · online {view.online}/{view.fleet_size}"
        + (f" · {left}" if left else ""),
        f"late {metrics.get('late', 0)}, stale {metrics.get('stale', 0)}, rejected {rejected}, lost on links"
        f" {dropped} · up {up} MB, down {down} MB",
    ]
    if figures:
        lines.append(figures)
    privacy = privacy_text(view.statuses, metrics.get("central_privacy"))
    if privacy:
        lines.append(privacy)
    header = Text("\n".join(lines), no_wrap=True, overflow="ellipsis")
    return Group(header, table, render_quality(view.quality, min(curve_points, max(8, width - 48))))


def render_quality(history: dict[int, dict[str, float | None]], points: int) -> RenderableType:
    """A sparkline per quality measure over the evaluated rounds seen, with its first and latest values."""
    if not history:
        return Text("quality: no evaluation seen yet", style="dim")
    evaluated = sorted(history)[-points:]
    lines = Text()
    scalars = {
        key for round_ in evaluated for key, value in history[round_].items() if not isinstance(value, list)
    }
    for key in sorted(scalars):
        values = [history[round_].get(key) for round_ in evaluated]
        known = [
            (round_, value) for round_, value in zip(evaluated, values, strict=True) if value is not None
        ]
        if not known:
            continue
        (first_round, first), (last_round, last) = known[0], known[-1]
        lines.append(f"{key:>8} ", style="bold")
        lines.append(sparkline(values), style="cyan")
        lines.append(f"  round {first_round}: {first:.3g} → round {last_round}: {last:.3g}\n")
    lines.rstrip()
    return lines
