"""`edgegan status`: the fleet as the broker sees it. The rendering is a pure function of the collected
view (unit tests); a real `edgegan run` over Mosquitto is watched with --once and in a pseudo-terminal."""

import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from edgegan import topics, wire
from edgegan.runtime.fleetview import FleetView, receive, render_fleet, sparkline

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SMALL = ["--dataset", "ring8", "--partition", "shards:4", "--width", "32", "--latent-dim", "8"]
CAPTION = re.compile(r"round (\d+)/(\d+|\?) · online (\d+)/(\d+)")
NOW = 1_800_000_000.0


def text_of(renderable, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def status(state: str, round: int, sent_at: float | None = None, **counters) -> bytes:
    extra = {} if sent_at is None else {"time": sent_at}
    return wire.encode_status(state, round=round, updates_sent=round + 1, bytes_up=2_000_000,
                              bytes_down=5_000_000, **extra, **counters)  # fmt: skip


def metrics(round: int, quality: dict, quality_round: int | None, by_device: dict | None = None) -> bytes:
    fields = {"round": round, "rounds": 100, "quality": quality, "quality_round": quality_round,
              "bytes_up": 8_000_000, "bytes_down": 20_000_000, "late": 1, "stale": 0,
              "rejected": {"not-msgpack": 2}}  # fmt: skip
    if by_device is not None:
        fields["by_device"] = by_device
    return wire.encode_json(fields)


def test_a_fleet_renders_one_row_per_device_with_staleness_and_the_servers_verdicts():
    view = FleetView(run="demo", devices=5)
    receive(view, topics.metrics("demo"), metrics(12, {"fid": 40.0}, 10, {"device-2": {"accepted": 11},
            "device-10": {"accepted": 9, "late": 1, "rejected": 2}}), retained=True)  # fmt: skip
    receive(view, topics.status("demo", "device-10"), status("online", 9, NOW - 30), retained=True)
    receive(view, topics.status("demo", "device-2"), status("online", 11), retained=False)
    receive(view, topics.status("demo", "pi-0"), wire.encode_status("offline"), retained=True)  # a last will
    text = text_of(render_fleet(view, NOW))
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in text.splitlines() if line.startswith("│")}  # fmt: skip
    assert list(rows) == ["device-2", "device-10", "pi-0"]  # device-2 before device-10
    state, seen, trained, staleness, sent, accepted, late, rejected, up, down = rows["device-10"]
    assert (state, seen, trained, staleness) == ("online", "30 s ago", "9", "2")
    assert (sent, accepted, late, rejected) == ("10", "9", "1", "2")
    assert (up, down) == ("2.0", "5.0")
    assert rows["device-2"][2:4] == ["11", "0"]
    assert rows["pi-0"][:4] == ["offline", "—", "—", "—"]  # a retained last will says neither when nor round
    caption = CAPTION.search(text)
    assert caption and caption.groups() == ("12", "100", "2", "5")
    assert "fid 40" in text and "rejected 2" in text and "late 1" in text


def test_without_per_device_counts_from_the_server_those_columns_say_so():
    view = FleetView(run="demo")
    receive(view, topics.metrics("demo"), metrics(3, {}, None), retained=True)
    receive(view, topics.status("demo", "device-0"), status("online", 2), retained=False)
    row = next(line for line in text_of(render_fleet(view, time.time())).splitlines() if "device-0" in line)
    assert [cell.strip() for cell in row.split("│")[7:10]] == ["—", "—", "—"]
    assert "no evaluation seen yet" in text_of(render_fleet(view, time.time()))


def test_the_quality_curve_grows_with_each_evaluation_and_keeps_the_latest_points():
    view = FleetView(run="demo")
    for done, fid in ((50, 300.0), (60, 300.0), (100, 120.0), (150, 60.0), (200, 30.0)):
        evaluated = done - done % 50
        receive(view, topics.metrics("demo"), metrics(done, {"fid": fid, "classes": 10}, evaluated), False)
    assert sorted(view.quality) == [50, 100, 150, 200]
    text = text_of(render_fleet(view, NOW))
    assert "round 50: 300 → round 200: 30" in text and sparkline([300, 120, 60, 30]) in text
    assert sparkline([300.0, 120.0, 60.0, 30.0]) == "█▃▂▁" and sparkline([1.0, 1.0]) == "▅▅"
    old_server = FleetView(run="demo")  # metrics without quality_round: a new value is a new evaluation
    for done, fid in ((1, 300.0), (2, 300.0), (50, 100.0)):
        receive(old_server, topics.metrics("demo"), wire.encode_json({"round": done, "rounds": 100,
                "quality": {"fid": fid}}), False)  # fmt: skip
    assert old_server.quality == {1: {"fid": 300.0}, 50: {"fid": 100.0}}


def test_malformed_and_foreign_messages_are_counted_or_ignored_not_shown():
    view = FleetView(run="demo")
    receive(view, topics.status("demo", "device-0"), b"{not json", retained=False)
    receive(view, topics.status("demo", "device-1"), b'{"state": "dancing"}', retained=False)
    receive(view, topics.status("other", "device-2"), status("online", 1), retained=False)
    receive(view, topics.metrics("demo"), b'{"round": "many"}', retained=False)
    assert view.statuses == {} and view.metrics == {} and view.messages == 0 and view.rejected_messages == 3


def test_a_large_fleet_lists_the_first_rows_and_counts_the_rest():
    view = FleetView(run="big")
    for index in range(120):
        receive(view, topics.status("big", f"device-{index}"), status("online", 5), retained=False)
    text = text_of(render_fleet(view, time.time(), rows=10))
    assert "device-9 " in text and "device-10 " not in text and "… 110 more" in text
    assert CAPTION.search(text).group(3, 4) == ("120", "120")


# --- a real run, watched ---

needs_mosquitto = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed")


def watch_in_a_terminal(url: str, run: str, seconds: float) -> tuple[str, int]:
    """`edgegan status` in a pseudo-terminal for up to `seconds` (less once two frames with different
    rounds showed the whole fleet), then Ctrl-C: (the screen's text, the exit code)."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a terminal 160 columns wide
        os.environ.update({"COLUMNS": "160", "LINES": "50"})
        os.execv(sys.executable, [sys.executable, "-m", "edgegan", "status", "--broker", url, "--run", run])
    screen = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([terminal], [], [], 0.5)[0]:
            try:
                screen += os.read(terminal, 65536)
            except OSError:
                break
        frames = CAPTION.findall(re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", screen).decode(errors="replace"))
        if len({done for done, _, online, size in frames if online == size == "4"}) >= 2:
            break
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and select.select([terminal], [], [], 0.5)[0]:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    _, code = os.waitpid(pid, 0)
    return re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", screen).decode(
        errors="replace"
    ), os.waitstatus_to_exitcode(code)


@needs_mosquitto
@pytest.mark.timeout(400)
def test_edgegan_status_shows_the_live_fleet_while_edgegan_run_trains(broker, tmp_path):
    broker, _ = broker
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "edgegan", "run", "--broker", broker, "--run", "watched", "--devices", "4",
         "--rounds", "100000", "--eval-every", "50", "--out", str(out), *SMALL],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        metrics_csv = out / "metrics.csv"
        # Past round 50: every device has reported (a round needs all 4) and one evaluation is in.
        while not (metrics_csv.is_file() and len(metrics_csv.read_text().splitlines()) > 55):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.5)
        snapshot = subprocess.run(
            [sys.executable, "-m", "edgegan", "status", "--broker", broker, "--run", "watched", "--once"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert snapshot.returncode == 0, snapshot.stderr
        done, rounds, online, size = map(int, CAPTION.search(snapshot.stdout).groups())
        assert done > 50 and rounds == 100000 and online == size == 4, snapshot.stdout
        device_rows = [line for line in snapshot.stdout.splitlines() if re.match(r"│ device-\d ", line)]
        assert len(device_rows) == 4 and all("online" in row for row in device_rows), snapshot.stdout
        assert re.search(r"dist .* round \d+: [0-9.]+", snapshot.stdout), snapshot.stdout  # the quality curve

        screen, code = watch_in_a_terminal(broker, "watched", seconds=120)
        frames = [
            (int(done), int(online)) for done, _, online, size in CAPTION.findall(screen) if size == "4"
        ]
        assert code == 0 and frames, screen[-3000:]
        assert all(online == 4 for _, online in frames) and len({done for done, _ in frames}) >= 2, frames
        assert max(done for done, _ in frames) > done
    finally:
        launcher.send_signal(signal.SIGINT)
        _, errors = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, errors[-2000:]
    counters = json.loads((out / "devices.json").read_text())
    assert sorted(counters) == [f"device-{index}" for index in range(4)]


@needs_mosquitto
def test_status_of_a_run_nobody_publishes_is_an_error_after_the_timeout(broker):
    broker, _ = broker
    result = subprocess.run(
        [sys.executable, "-m", "edgegan", "status", "--broker", broker, "--run", "nobody", "--once",
         "--timeout", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.startswith("error: nothing from run 'nobody'")
        and "edgegan/nobody/status/+" in result.stderr
    )


def fleet_of_twelve_with_one_slow_board() -> FleetView:
    view = FleetView(run="demo", devices=12)
    by_device = {f"device-{index}": {"accepted": 100 + index, "late": index % 3} for index in range(12)}
    receive(view, topics.metrics("demo"), wire.encode_json({"round": 120, "rounds": 500, "wall_time_s": 240.0,
            "quality": {"fid": 41.2}, "quality_round": 100, "late": 7, "stale": 0, "rejected": {},
            "by_device": by_device}), retained=False)  # fmt: skip
    for index in range(12):
        seconds = 6.0 if index == 10 else 1.0 + index / 100
        receive(view, topics.status("demo", f"device-{index}"),
                status("online", 119, NOW - 3, round_compute_s=seconds), retained=True)  # fmt: skip
    return view


def test_at_80_columns_the_fleet_fits_one_line_per_device_with_whole_names_a_slow_board_and_an_eta():
    text = text_of(render_fleet(fleet_of_twelve_with_one_slow_board(), NOW, width=80), width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    for index in range(12):  # whole names, each device on exactly one line: no row wrapped
        assert len([line for line in lines if re.match(rf"device-{index} ", line)]) == 1
    header = next(line for line in lines if line.startswith("device "))
    assert header.split() == "device state seen round stale s/round sent acc late rej".split()
    slow = next(line for line in lines if line.startswith("device-10 "))
    assert "6.00 ×5.7" in slow and "×" not in next(line for line in lines if line.startswith("device-11 "))
    # 120 of 500 rounds in 240 s: 380 rounds more at 2 s each.
    assert CAPTION.search(text).groups() == ("120", "500", "12", "12") and "ETA 13 min" in text
    narrower = text_of(render_fleet(fleet_of_twelve_with_one_slow_board(), NOW, width=50), width=50)
    assert max(len(line) for line in narrower.splitlines()) <= 50 and "device-10 " in narrower
    assert "ETA 13 min" in text_of(render_fleet(fleet_of_twelve_with_one_slow_board(), NOW))  # wide, too


def test_the_live_view_holds_back_third_party_info_logs_while_it_is_shown():
    import logging

    from edgegan.cli.common import LiveFleet

    root = logging.getLogger()
    level, logging_root_level = logging.getLogger("amqtt").level, root.level
    root.setLevel(logging.INFO)
    live = LiveFleet(Console(file=io.StringIO(), width=80), rows=5)
    try:
        live.update(fleet_of_twelve_with_one_slow_board())
        assert not logging.getLogger("amqtt.broker").isEnabledFor(logging.INFO)
        assert not logging.getLogger("transitions.core").isEnabledFor(logging.INFO)
        assert logging.getLogger("amqtt.broker").isEnabledFor(logging.WARNING)
        assert logging.getLogger("edgegan.server").isEnabledFor(logging.INFO)
    finally:
        live.stop()
        root.setLevel(logging_root_level)
    assert logging.getLogger("amqtt").level == level


def test_a_last_will_after_a_status_with_counters_changes_the_state_and_keeps_the_counters():
    view = FleetView(run="demo", devices=1)
    receive(view, topics.status("demo", "pi-0"), status("online", 9, NOW - 5), retained=False)
    before = dict(view.statuses["pi-0"])
    receive(view, topics.status("demo", "pi-0"), wire.encode_status("offline"), retained=False)
    after = view.statuses["pi-0"]
    assert after["state"] == "offline" and after["round"] == 9
    assert {key: value for key, value in after.items() if key not in ("state", "time")} == {
        key: value for key, value in before.items() if key not in ("state", "time")
    }
