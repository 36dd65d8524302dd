"""`--log-format json`: one JSON object per line on stderr, for real commands and for every process that
`edgegan run` starts, and never a password."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgegan import logs
from edgegan.cli import app
from edgegan.runtime.launcher import child_environment
from edgegan.runtime.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--dataset", "ring8", "--partition", "shards:2", "--width", "32", "--latent-dim", "8"]
runner = CliRunner()


def json_records(text: str) -> list[dict]:
    """Every non-empty line as a JSON object; fails on the first line that is not one."""
    records = []
    for line in text.splitlines():
        if line.strip():
            record = json.loads(line)
            assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= set(record), line
            records.append(record)
    return records


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_json_format_writes_one_object_per_record_with_extra_fields_and_the_traceback(
    restore_logging, capsys
):
    logs.setup_logging("info", "json")
    assert logs.active_format() == "json"
    log = logging.getLogger("edgegan.test")
    log.info("round %d closed", 3, extra={"device": "pi-0", "round": 3})
    try:
        raise ValueError("bad update")
    except ValueError:
        log.exception("rejected")
    log.debug("not shown at info")
    first, second = json_records(capsys.readouterr().err)
    assert first["message"] == "round 3 closed" and first["device"] == "pi-0" and first["round"] == 3
    assert first["level"] == "info" and first["logger"] == "edgegan.test"
    assert second["level"] == "error" and "ValueError: bad update" in second["exc"]
    logs.setup_logging("warning", "text")
    assert logs.active_format() == "text"


@pytest.mark.parametrize(
    "level,fmt,named", [("loud", "text", "--log-level"), ("info", "xml", "--log-format")]
)
def test_a_bad_log_flag_is_a_usage_error_naming_it(level, fmt, named):
    result = runner.invoke(app, ["broker", "start", "--log-level", level, "--log-format", fmt])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and named in result.stderr


def test_child_processes_of_edgegan_run_do_not_inherit_the_options_it_passes_as_flags(monkeypatch):
    monkeypatch.setenv("EDGEGAN_LOG_FORMAT", "json")
    monkeypatch.setenv("EDGEGAN_PASSWORD_FILE", "/etc/edgegan/server.password")
    monkeypatch.setenv("EDGEGAN_PASSWORD", "kept-for-the-server")
    environment = child_environment()
    assert "EDGEGAN_LOG_FORMAT" not in environment and "EDGEGAN_PASSWORD_FILE" not in environment
    assert environment["EDGEGAN_PASSWORD"] == "kept-for-the-server" and environment["PYTHONUNBUFFERED"] == "1"


def test_broker_and_a_refused_device_log_only_json_lines_and_never_the_password(tmp_path):
    secret = "wrong-but-still-secret-6b1f0c"
    common = ["--passwd", str(tmp_path / "passwd"), "--acl", str(tmp_path / "acl"),
              "--secrets-dir", str(tmp_path / "secrets")]  # fmt: skip
    (tmp_path / "acl").write_text((ROOT / "broker" / "acl").read_text())
    assert runner.invoke(app, ["broker", "add-device", "device-0", *common]).exit_code == 0
    port = free_port()
    broker = subprocess.Popen(
        [sys.executable, "-m", "edgegan", "broker", "start", "--port", str(port), "--passwd",
         str(tmp_path / "passwd"), "--acl", str(tmp_path / "acl"), "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_port(port)
        device = subprocess.run(
            [sys.executable, "-m", "edgegan", "device", "--broker", f"mqtt://127.0.0.1:{port}",
             "--run", "logs", "--username", "device-0", "--index", "0", "--of", "1", *SMALL,
             "--log-format", "json"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "EDGEGAN_PASSWORD": secret},
        )  # fmt: skip
    finally:
        broker.send_signal(signal.SIGTERM)
        broker_out, broker_err = broker.communicate(timeout=30)
    assert device.returncode == 1, device.stderr
    records = json_records(device.stderr)
    assert records[-1]["level"] == "error" and "refused the login 'device-0'" in records[-1]["message"]
    assert json_records(broker_err), "the broker logged nothing"
    for output in (device.stdout, device.stderr, broker_out, broker_err):
        assert secret not in output


def test_edgegan_run_passes_its_log_flags_to_the_server_and_the_devices(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "edgegan", "run", "--devices", "2", "--rounds", "3", "--eval-every", "3",
         "--out", str(out), "--run", "jsonlogs", *SMALL, "--log-format", "json"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    server = json_records((out / "logs" / "server.log").read_text())
    assert any(record["message"].startswith("done: 3 rounds") for record in server)
    for index in range(2):
        device = json_records((out / "logs" / f"device-{index}.log").read_text())
        assert any(record["message"].startswith(f"device device-{index} stopped") for record in device)


def json_log_of(logger_name: str, level: int = logging.DEBUG):
    """A JSON handler on one logger, its text in the returned stream."""
    import io

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.setLevel(level)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return stream, lambda: logger.removeHandler(handler)


def test_the_server_logs_late_drops_at_debug_and_sums_them_up_in_one_info_line_per_evaluation():
    from collections import Counter
    from types import SimpleNamespace

    from edgegan.algorithms.admission import Outcome, Verdict
    from edgegan.runtime.devicereports import DeviceReports
    from edgegan.runtime.server import ServerCoordinator
    from edgegan.runtime.server_settings import ServerCounters

    server = SimpleNamespace(
        counters=ServerCounters(), logged_rejections=set(), drops_since_evaluation=Counter(),
        settings=SimpleNamespace(rounds=20), recorder=SimpleNamespace(wall_time_s=lambda: 12.25),
        reports=DeviceReports(),
    )  # fmt: skip
    stream, remove = json_log_of("edgegan.server")
    try:
        for round_index in (1, 2, 3):  # quorum 3 of 4: the slowest device lands a round late, every round
            ServerCoordinator.note(server, "device-10", round_index, Verdict(Outcome.FOLD))
            late = Verdict(Outcome.LATE, 1, detail=f"trained on round {round_index - 1}, beyond the window")
            ServerCoordinator.note(server, "device-3" if round_index < 3 else "device-2", round_index, late)
        ServerCoordinator.log_evaluation(server, 4, {"fid": 31.4159, "modes": 8})
        ServerCoordinator.log_evaluation(server, 8, {"fid": 20.0})
    finally:
        remove()
    records = json_records(stream.getvalue())
    assert [record["level"] for record in records] == ["debug"] * 3 + ["info", "info"]
    assert all(record["message"].startswith("dropped device-") for record in records[:3])
    first, second = records[3:]
    assert first["message"] == (
        "round 4/20: fid 31.42, modes 8; 12.2 s elapsed; so far 3 accepted, 3 late, 0 stale, 0 duplicates, "
        "0 rejected; since the last evaluation dropped 3 late or stale (device-2 1, device-3 2)"
    )
    assert first["round"] == 4 and first["quality"] == {"fid": 31.4159, "modes": 8}
    assert first["elapsed_s"] == 12.25 and first["accepted"] == 3 and first["late"] == 3
    assert first["dropped_since_evaluation"] == {"device-3": 2, "device-2": 1}
    assert "since the last evaluation" not in second["message"] and second["dropped_since_evaluation"] == {}
