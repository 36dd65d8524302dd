"""`edgegan run`: a broker (embedded unless one is given), the server, K aggregators when asked for, and N
device processes, a live view of the fleet, and a clean stop at the end or on Ctrl-C.

The launcher only starts, watches and stops processes: training happens in the server, device and
aggregator processes. Each child gets its settings, built and validated once in the plan
(runtime/fleetplan.py), as one JSON document on its stdin, and runs what `edgegan server`, `edgegan device`
and `edgegan aggregator` run once they have parsed their flags (edgegan/cli/child.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgegan import wire
from edgegan.runsetup import RunSetup
from edgegan.runtime.broker import serve_broker
from edgegan.runtime.connection import BrokerAddress, BrokerUnreachable, unreachable_reason
from edgegan.runtime.fleetplan import ChildJob, FleetPlan, write_partitions
from edgegan.runtime.fleetview import FleetView, watch
from edgegan.runtime.ports import free_port

log = logging.getLogger("edgegan.run")

DEVICE_DATA = "device-data"  # under the run directory while the fleet runs

STOP_GRACE_S = 30.0
BROKER_START_S = 15.0
SERVER_STOP_S = 120.0  # a server told to stop: the round in hand, an evaluation and three files


async def wait_until_listening(address: BrokerAddress, timeout_s: float) -> None:
    """Returns once something accepts TCP connections at `address`; after `timeout_s`, BrokerUnreachable
    says what the last attempt met (refused, a name that does not resolve, no answer)."""
    last_error: OSError | None = None
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    _, writer = await asyncio.open_connection(address.host, address.port)
                    writer.close()
                    await writer.wait_closed()
                    return
                except OSError as error:
                    last_error = error
                    await asyncio.sleep(0.1)
    except TimeoutError:
        reason = unreachable_reason(address, last_error)
        raise BrokerUnreachable(f"no broker answers at {address} within {timeout_s:g} s: {reason}") from None


# Options `edgegan run` resolves itself (from its flags, its file or the environment) and passes to its
# children in their settings: a child must not read them again from the environment it inherits.
OPTION_ENVIRONMENT = ("EDGEGAN_LOG_LEVEL", "EDGEGAN_LOG_FORMAT", "EDGEGAN_PASSWORD_FILE")
CHILD_ENTRY = "edgegan.cli.child"


def child_command(job: ChildJob) -> list[str]:
    """The child's command line: its role and name only (for `ps`); its settings come on stdin."""
    return [sys.executable, "-m", CHILD_ENTRY, job.role, job.name]


def child_environment() -> dict[str, str]:
    environment = {name: value for name, value in os.environ.items() if name not in OPTION_ENVIRONMENT}
    return {**environment, "PYTHONUNBUFFERED": "1"}


async def start_child(job: ChildJob, logs: Path) -> asyncio.subprocess.Process:
    """Starts `job` with its output in logs/NAME.log and hands it its settings on stdin."""
    # A session of its own: Ctrl-C reaches the launcher only, which then stops the children in order.
    with open(logs / f"{job.name}.log", "wb") as handle:
        process = await asyncio.create_subprocess_exec(
            *child_command(job), stdin=asyncio.subprocess.PIPE, stdout=handle,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=child_environment(),
        )  # fmt: skip
    # A child that dies before it reads its settings says why in its log, and its exit code tells.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(job.document())
        await process.stdin.drain()
    process.stdin.close()
    return process


async def stop_child(process: asyncio.subprocess.Process, grace_s: float, terminate_s: float = 5.0) -> int:
    """Waits `grace_s` for a child to finish, then terminates it and waits `terminate_s`, then kills it."""
    for action in (None, process.terminate, process.kill):
        if action is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                action()
        wait_s = grace_s if action is None else terminate_s if action is process.terminate else 5.0
        try:
            return await asyncio.wait_for(process.wait(), timeout=wait_s)
        except TimeoutError:
            continue
    return await process.wait()


def largest_message_bound(setup: RunSetup) -> int:
    """Bytes that no honest message of the run exceeds: a global model with both networks in fp32 (keyframes
    and float64 partial sums of D are smaller), or a work message with D and its fake batches, twice over
    for envelopes and headroom, plus 1 MiB. The embedded broker of `edgegan run` closes a connection that
    sends a larger packet. Feature statistics other than the classifier's 64-d ones can be far larger
    (2048-d Inception: 34 MB of float64): for those, the decoder's own limit."""
    if setup.features != "classifier":
        return wire.MAX_PAYLOAD_BYTES + (1 << 20)
    from edgegan.data import load_dataset, sample_shape
    from edgegan.models import build_discriminator, build_generator, state_bytes

    shape = load_dataset(setup.dataset, setup.data_dir).sample_shape if setup.data_dir else None
    shape = shape or sample_shape(setup.dataset)
    spec = setup.train.model_spec(shape, setup.latent_dim, setup.width)
    networks = state_bytes(build_generator(spec)) + state_bytes(build_discriminator(spec))
    fakes = setup.train.local_steps * setup.train.batch_size * math.prod(shape) * 4
    return min(2 * (networks + fakes) + (1 << 20), wire.MAX_PAYLOAD_BYTES + (1 << 20))


async def run_fleet(plan: FleetPlan, on_tick: Callable[[FleetView], None] | None = None) -> dict:
    """Runs the whole fleet to the end of the run; returns the server's summary plus device counters."""
    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    view = FleetView(run=plan.run, devices=len(plan.devices), rounds=plan.rounds)
    stopped = asyncio.Event()
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    loop.add_signal_handler(signal.SIGTERM, interrupted.set)
    try:
        async with asyncio.TaskGroup() as group:
            address = plan.server.broker
            if plan.embedded_broker:
                address = BrokerAddress(host="127.0.0.1", port=free_port())
                ready = asyncio.Event()
                limit = await asyncio.to_thread(largest_message_bound, plan.setup)
                group.create_task(
                    serve_broker(address.host, address.port, stopped, ready, max_packet_bytes=limit)
                )
                await asyncio.wait_for(ready.wait(), BROKER_START_S)
            else:
                await wait_until_listening(address, BROKER_START_S)
            watcher = group.create_task(watch(address, view, stopped))
            # Each device gets its part of the data as a file of its own, read as a board reads its data.
            device_data = await asyncio.to_thread(write_partitions, plan.setup, plan.out / DEVICE_DATA)
            aggregator_jobs, server_job, device_jobs = plan.jobs(address, device_data)
            # Aggregators first: the server waits for them before it publishes round 0.
            aggregators = [await start_child(job, logs) for job in aggregator_jobs]
            server = await start_child(server_job, logs)
            devices = [await start_child(job, logs) for job in device_jobs]
            ticker = group.create_task(tick(view, on_tick, stopped))
            finished = group.create_task(server.wait())
            interrupt = group.create_task(interrupted.wait())
            await asyncio.wait({finished, interrupt}, return_when=asyncio.FIRST_COMPLETED)
            if interrupted.is_set():
                log.warning("interrupted: stopping the server and the devices")
                # SIGTERM: the server finishes a round being folded or evaluated, then writes its
                # checkpoint, generator and summary; killed only if that takes longer than this.
                await stop_child(server, 0.0, terminate_s=SERVER_STOP_S)
            interrupt.cancel()
            server_code = await server.wait()
            # After a normal end the server has told the devices to stop; after Ctrl-C nobody has.
            grace_s = 0.0 if interrupted.is_set() else STOP_GRACE_S
            device_codes = [await stop_child(process, grace_s) for process in devices]
            aggregator_codes = [await stop_child(process, grace_s) for process in aggregators]
            await asyncio.sleep(0.3)  # let the last retained statuses reach the watcher
            stopped.set()
            watcher.cancel()
            ticker.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        shutil.rmtree(plan.out / DEVICE_DATA, ignore_errors=True)  # copies of the data set: not an output
    return finish_outputs(plan, view, server_code, device_codes, interrupted.is_set(), aggregator_codes)


async def tick(view: FleetView, on_tick: Callable[[FleetView], None] | None, stopped: asyncio.Event) -> None:
    while not stopped.is_set() and on_tick is not None:
        on_tick(view)
        await asyncio.sleep(0.25)


def finish_outputs(
    plan: FleetPlan,
    view: FleetView,
    server_code: int,
    device_codes: list[int],
    interrupted: bool,
    aggregator_codes: Sequence[int] = (),
):
    """Adds per-device counters to the server's summary (and writes them to devices.json)."""
    summary_path = plan.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    # Each device's own counters, and what the server made of its updates (accepted, late, stale, ...).
    server_view = summary.get("updates_by_device", {})
    counters = {
        name: {**status, "at_server": server_view.get(name, {})}
        for name, status in sorted(view.statuses.items())
    }
    (plan.out / "devices.json").write_text(json.dumps(counters, indent=2) + "\n")
    # DP-SGD: each device's own last word on its epsilon (its final status), over the server's last read.
    epsilons = {name: status["epsilon"] for name, status in counters.items() if "epsilon" in status}
    if epsilons:
        summary["privacy"] = epsilons
    summary.update(
        {
            "device_counters": counters,
            "server_exit_code": server_code,
            "device_exit_codes": device_codes,
            "interrupted": interrupted,
        }
    )
    if plan.aggregators:
        summary["aggregator_exit_codes"] = list(aggregator_codes)
    summary_path.write_text(json.dumps(wire.finite_or_null(summary), indent=2) + "\n")
    return summary
