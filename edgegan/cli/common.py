"""What every command shares: the one-line error, the closing line, logging set-up, the broker login,
number lists, and the live fleet view."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from edgegan import logs
from edgegan.algorithms.health import failure_line

console = Console(stderr=True)
# The run-health policy stopped the run (edgegan/algorithms/health.py): diverged, or too many updates
# rejected. Its state is saved; a service manager should not restart it into the same failure.
RUN_FAILED_EXIT = 3


def fail(message: str, code: int = 2) -> NoReturn:
    """A one-line error a user can act on, and exit code 2 (a usage error) unless told otherwise; under
    --log-format json, a log record like every other line."""
    if logs.active_format() == "json":
        logging.getLogger("edgegan").error(message)
    else:
        print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def fail_if_run_failed(summary: dict) -> None:
    """A run the health policy stopped: its one line (summary.json's `failure`) and exit code 3."""
    if summary.get("failure"):
        fail(failure_line(summary["failure"]), code=RUN_FAILED_EXIT)


def report(text: str) -> None:
    """A closing line for people; under --log-format json, a log record like every other line."""
    if logs.active_format() == "json":
        logging.getLogger("edgegan").info(text)
    else:
        console.print(text, highlight=False)


def setup_logging(level: str, log_format: str) -> None:
    try:
        logs.setup_logging(level, log_format)
    except ValueError as error:
        fail(str(error))


def broker_login(
    url: str, username: str | None, password_file: Path | None, tls_ca: Path | None, tls_cert: Path | None,
    tls_key: Path | None, first_connect_s: float | None = None,
):  # fmt: skip
    """The broker address of --broker with its login and TLS files (and --connect-timeout-s), checked; a bad
    flag is a usage error."""
    import dataclasses

    from edgegan.runtime.connection import parse_broker, with_login

    try:
        address = with_login(parse_broker(url), username, password_file, tls_ca, tls_cert, tls_key)
        if first_connect_s is not None:
            address = dataclasses.replace(address, first_connect_s=first_connect_s)
        return address
    except ValueError as error:
        fail(str(error))


def parse_numbers(flag: str, text: str | None, example: str, kind: type = float) -> tuple:
    """`1,1,0.25` as numbers (`kind`); anything else is a usage error naming `flag` and an example."""
    if not text:
        return ()
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError:
        noun = "numbers" if kind is float else "device indices"
        fail(f"{flag} takes comma-separated {noun} such as {example}, got {text!r}")


# Libraries whose INFO lines (the embedded broker's connections, its state machine) would scroll through
# the live view: while it is shown they log warnings and errors only.
CHATTY_LIBRARIES = ("amqtt", "transitions", "paho", "aiomqtt", "passlib")


class LiveFleet:
    """A rich Live view of a FleetView (edgegan/runtime/fleetview.py), redrawn on every update and as
    wide as the screen (a narrow table below 120 columns); third-party INFO logs are held back meanwhile."""

    def __init__(self, target: Console = console, rows: int | None = None) -> None:
        from rich.live import Live

        from edgegan.runtime.fleetview import DEFAULT_ROWS

        self.live = Live(console=target, refresh_per_second=4, transient=False)
        self.rows = rows or DEFAULT_ROWS
        self.started = False
        self.quieted: dict[str, int] = {}  # library logger -> its level before the view
        self.quiet_libraries()  # from now: `edgegan run` starts its embedded broker before the first frame

    def update(self, view) -> None:
        import time

        from edgegan.runtime.fleetview import render_fleet

        if not self.started:
            self.live.start()
            self.started = True
        width = self.live.console.width
        self.live.update(render_fleet(view, time.time(), self.rows, width=width))

    def stop(self) -> None:
        if self.started:
            self.live.stop()
            self.started = False
        for name, level in self.quieted.items():
            logging.getLogger(name).setLevel(level)
        self.quieted = {}

    def quiet_libraries(self) -> None:
        for name in CHATTY_LIBRARIES:
            library = logging.getLogger(name)
            if library.getEffectiveLevel() == logging.INFO:  # --log-level debug keeps them
                self.quieted[name] = library.level
                library.setLevel(logging.WARNING)


def quality_source(quality_from: str, reference: Path | None) -> str:
    """--reference-set PATH alone means --quality-from reference."""
    return "reference" if reference is not None and quality_from == "data" else quality_from


def extra_providing(module: str) -> str | None:
    """The optional extra of edgegan (pyproject's, from the installed metadata) that installs `module`,
    or None: each extra's distributions are named as they import (`dp-accounting` as `dp_accounting`)."""
    from importlib import metadata

    wanted = module.split(".")[0].replace("_", "-").lower()
    try:
        requirements = metadata.requires("edgegan") or []
    except metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([\w-]+)['\"]", marker)
        distribution = re.split(r"[<>=!~\[ (]", name.strip(), maxsplit=1)[0].replace("_", "-").lower()
        if extra and extra.group(1) != "dev" and distribution == wanted:
            return extra.group(1)
    return None


def fail_for_missing_extra(error: ModuleNotFoundError) -> NoReturn:
    """A package an extra brings, missing (a board's install runs `edgegan device` only): one line naming
    the extra; any other missing module is a broken install, and its traceback is the report."""
    extra = extra_providing(error.name or "")
    if extra is None:
        raise error
    try:
        fail(f"this command needs {error.name}, which a base install leaves out: "
             f"pip install 'edgegan[{extra}]'")
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
