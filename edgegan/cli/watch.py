"""`edgegan status` (watch a run's fleet from any machine) and `edgegan link-proxy` (a TCP proxy that
delays, throttles and resets the byte stream between devices and the broker)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from edgegan.cli import options as opt
from edgegan.cli.common import LiveFleet, broker_login, fail, report, setup_logging


def status(
    config_file: Path | None = opt.CONFIG,
    run_name: str = opt.RUN_NAME,
    broker: str = opt.BROKER,
    once: bool = typer.Option(False, "--once", help="Print one snapshot of the fleet and exit (scripts)."),
    timeout_s: float = typer.Option(
        10.0,
        "--timeout",
        help="Seconds to wait for the run's first status or metrics message; with --once, for the snapshot.",
    ),
    rows: int = typer.Option(50, "--rows", help="Devices listed at most (the caption counts them all)."),
    username: str | None = opt.USERNAME,
    password_file: Path | None = opt.PASSWORD_FILE,
    tls_ca: Path | None = opt.TLS_CA,
    tls_cert: Path | None = opt.TLS_CERT,
    tls_key: Path | None = opt.TLS_KEY,
) -> None:
    """Watch a run's fleet from any machine that reaches its broker: each device's state, when it was last
    seen, its round and staleness, what the server made of its updates, its bytes, and the quality curve.
    Runs until the run ends or Ctrl-C; --once prints one snapshot. The login must be a server identity
    (edgegan broker add-server NAME): devices may not read other devices' statuses.

    Example: edgegan status --broker mqtts://broker.local --tls-ca ca.crt --username server
    --password-file server.password --run demo
    """
    import asyncio
    import os
    import signal
    import time

    from edgegan import topics
    from edgegan.runtime.fleetview import FleetView, observe, render_fleet

    try:
        topics.check_name("run", run_name)
    except ValueError as error:
        fail(str(error))
    if not timeout_s > 0:
        fail(f"--timeout must be > 0, got {timeout_s}")
    if rows < 1:
        fail(f"--rows must be >= 1, got {rows}")
    address = broker_login(broker, username, password_file, tls_ca, tls_cert, tls_key)
    screen = Console()
    if not screen.is_terminal:
        screen = Console(width=max(screen.width, 140))  # a file or a pipe: room for every column
    view = FleetView(run=run_name)
    live = None if once else LiveFleet(screen, rows)

    async def follow() -> bool:
        stopped = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
        return await observe(
            address, view, once=once, timeout_s=timeout_s, stopped=stopped,
            on_tick=live.update if live else None, identifier=f"edgegan-status-{run_name}-{os.getpid()}",
        )  # fmt: skip

    try:
        heard = asyncio.run(follow())
    except (OSError, ExceptionGroup) as error:  # a refused login or certificate
        causes = error.exceptions if isinstance(error, ExceptionGroup) else [error]
        fail("; ".join(str(cause) for cause in causes), code=1)
    finally:
        if live is not None:
            live.stop()
    if not heard:
        reason = f" ({view.connection_error})" if view.connection_error else ""
        fail(
            f"nothing from run {run_name!r} on {address} within {timeout_s:g} s{reason}; check --broker and "
            f"--run, and that this login may read {topics.all_statuses(run_name)} and "
            f"{topics.metrics(run_name)} (a server identity: edgegan broker add-server NAME)",
            code=1,
        )
    if once:
        screen.print(render_fleet(view, time.time(), rows, width=screen.width))


def link_proxy(
    config_file: Path | None = opt.CONFIG,
    listen: str = typer.Option("mqtt://127.0.0.1:1884", help="Where devices connect: mqtt://HOST:PORT."),
    target: str = typer.Option("mqtt://127.0.0.1:1883", help="The real broker: mqtt://HOST:PORT."),
    delay_ms: float = typer.Option(0.0, help="Delay added to every chunk of bytes, each way."),
    bandwidth_kbps: float = typer.Option(0.0, help="Throughput cap each way (0 = none)."),
    reset_every: float = typer.Option(
        0.0, help="Abort each connection after about this many seconds (0 = never)."
    ),
    seed: int = typer.Option(0, help="Seed of the reset timing."),
    log_level: str = opt.LOG_LEVEL,
    log_format: str = opt.LOG_FORMAT,
) -> None:
    """A TCP proxy between devices and the broker that delays, throttles and resets the byte stream.

    Example: edgegan link-proxy --listen mqtt://127.0.0.1:1884 --target mqtt://127.0.0.1:1883 --reset-every 10
    then: edgegan device --broker mqtt://127.0.0.1:1884 ...
    """
    import asyncio
    import signal

    from edgegan.runtime.connection import parse_broker
    from edgegan.runtime.linkproxy import LinkProxy, ProxySettings

    setup_logging(log_level, log_format)
    try:
        settings = ProxySettings(
            listen=parse_broker(listen),
            target=parse_broker(target),
            delay_ms=delay_ms,
            bandwidth_kbps=bandwidth_kbps,
            reset_every_s=reset_every,
            seed=seed,
        )
    except ValueError as error:
        fail(str(error).replace("--broker", "--listen/--target"))
    proxy = LinkProxy(settings)

    async def serve():
        stopped = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
        return await proxy.serve(stopped)

    try:
        counters = asyncio.run(serve())
    except OSError as error:
        fail(f"cannot listen on {settings.listen}: {error.strerror}")
    report(f"link proxy stopped: {counters}")
