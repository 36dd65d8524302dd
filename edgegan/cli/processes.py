"""`edgegan server`, `edgegan device` and `edgegan aggregator`: one process of a run each, for users who
start them by hand on separate machines. Each builds its settings from flags and hands them to a runner
(`serve_and_report`, ...), which `edgegan run`'s children (edgegan/cli/child.py) call with theirs."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from edgegan.cli import options as opt
from edgegan.cli.common import broker_login, fail, fail_if_run_failed, quality_source, report, setup_logging
from edgegan.cli.options import default
from edgegan.config import resolve_fakes, resolve_run
from edgegan.runsetup import resolve_setup
from edgegan.runtime.device import DeviceSettings
from edgegan.runtime.server_settings import ServerSettings

try:  # typer >= 0.2x carries its own copy of click, as edgegan/configfile.py notes
    from typer._click.exceptions import MissingParameter
except ImportError:
    from click.exceptions import MissingParameter


def setup_or_fail(**values):
    """The run's set-up, `resolve_setup(...)` (edgegan/runsetup.py); a bad flag is a usage error."""
    try:
        return resolve_setup(**values)
    except ValueError as error:
        fail(str(error))


def required_without_data(ctx: typer.Context, param: typer.CallbackParam, value: int | None) -> int | None:
    """--index and --of are required unless --data gives the device its own data (--data is eager, so
    it is parsed first)."""
    if value is None and ctx.params.get("data") is None and not ctx.resilient_parsing:
        raise MissingParameter(
            ctx=ctx,
            param=param,
            message="Without --data PATH (the device's own data), --index and --of are required",
        )
    return value


def serve_and_report(settings: ServerSettings, setup, resume: bool, threads: int) -> None:
    """Runs the server to the end of the run, or until SIGTERM or SIGINT, and prints its closing line; a
    stopped server exits with 128 + the signal's number (edgegan/runtime/stopsignals.py says why)."""
    import torch

    from edgegan.data import DatasetError
    from edgegan.metrics import ClassifierMissingError
    from edgegan.runtime.serving import serve
    from edgegan.runtime.stopsignals import exit_code

    torch.set_num_threads(max(1, threads))
    try:
        summary = serve(settings, setup, resume=resume)
    except (DatasetError, ClassifierMissingError, ValueError) as error:
        fail(str(error))
    except (OSError, TimeoutError) as error:
        fail(str(error), code=1)
    except KeyboardInterrupt:  # before the event loop's handlers were set, or a second Ctrl-C
        fail("interrupted: nothing more was saved", code=130)
    if summary.get("stopped_by"):
        signum = signal.Signals[summary["stopped_by"]]
        report(
            f"stopped by {signum.name} after round {summary['stopped_at_round']} of {settings.rounds}: "
            f"checkpoint.pt, generator.pt and summary.json in {setup.out}; `edgegan server --resume` goes on"
        )
        raise typer.Exit(exit_code(signum))
    fail_if_run_failed(summary)
    report(
        f"done: {summary['rounds']} rounds in {summary['wall_time_s']:.1f} s; "
        f"initial {summary['initial']} -> final {summary['final']}; outputs in {setup.out}"
    )


def train_device_and_report(
    settings: DeviceSettings,
    setup,
    index: int | None,
    threads: int,
    *,
    data: Path | None = None,
    from_run: tuple[str, ...] = (),
) -> None:
    """Joins the run with partition `index` (or, with `data`, the device's own data at that path), trains
    until the server says stop, and prints the device's counters; the flags in `from_run` (left unset) it
    takes from the run's configuration."""
    import torch

    from edgegan.data import DatasetError
    from edgegan.runtime.device import run_device
    from edgegan.runtime.stopsignals import exit_code, signal_name

    torch.set_num_threads(max(1, threads))
    try:
        counters, stopped_by = run_device(settings, setup, index, data=data, from_run=from_run)
    except (DatasetError, ValueError) as error:
        fail(str(error))
    except OSError as error:  # the broker refused the login, or its certificate
        fail(str(error), code=1)
    except KeyboardInterrupt:  # before the event loop's handlers were set, or a second Ctrl-C
        fail(f"device {settings.device} interrupted", code=130)
    if stopped_by is not None:
        report(f"device {settings.device} stopped by {signal_name(stopped_by)}: {counters}")
        raise typer.Exit(exit_code(stopped_by))
    report(f"device {settings.device} stopped: {counters}")


def aggregate_and_report(
    settings, dataset: str, data_dir: Path | None, width: int, latent_dim: int, threads: int,
    *, d_width: int = 0,
) -> None:
    """Serves as one of the run's aggregators (of a model of `width` and `latent_dim` for `dataset`) until
    the server says stop, and prints its counters."""
    import torch

    from edgegan.data import DatasetError
    from edgegan.runtime.aggregator import run_aggregator

    torch.set_num_threads(max(1, threads))
    try:
        counters = run_aggregator(settings, dataset, data_dir, width, latent_dim, d_width=d_width)
    except (DatasetError, ValueError) as error:
        fail(str(error))
    except (OSError, RuntimeError) as error:
        fail(str(error), code=1)
    report(f"aggregator {settings.name} stopped: {counters.flat()}")


def server(
    config_file: Path | None = opt.CONFIG,
    run_name: str = opt.RUN_NAME,
    broker: str = opt.BROKER,
    devices: int = typer.Option(4, help="Fleet size N (the default quorum)."),
    quorum: int | None = opt.QUORUM,
    deadline_s: float = opt.DEADLINE_S,
    schedule: str = opt.SCHEDULE,
    tau: int = opt.TAU,
    staleness_weight: str = opt.STALENESS_WEIGHT,
    min_devices: int = opt.MIN_DEVICES,
    aggregators: int = opt.AGGREGATORS,
    aggregate: str = opt.AGGREGATE,
    loss: str | None = opt.LOSS,
    gp_weight: float | None = opt.GP_WEIGHT,
    batch_size: int | None = opt.BATCH_SIZE,
    local_steps: int | None = opt.LOCAL_STEPS,
    device_opt: str | None = opt.DEVICE_OPT,
    device_lr: float | None = opt.DEVICE_LR,
    server_opt: str | None = opt.SERVER_OPT,
    server_lr: float | None = opt.SERVER_LR,
    g_lr: float | None = opt.G_LR,
    g_batch_size: int | None = opt.G_BATCH_SIZE,
    g_steps: int | None = opt.G_STEPS,
    critic_ratio: int | None = opt.CRITIC_RATIO,
    g_ema: float | None = opt.G_EMA,
    g_beta1: float | None = opt.G_BETA1,
    d_width: int | None = opt.D_WIDTH,
    d_norm: str | None = opt.D_NORM,
    dp_clip: float | None = opt.DP_CLIP,
    dp_noise: float | None = opt.DP_NOISE,
    dp_delta: float | None = opt.DP_DELTA,
    dp_epsilon: float | None = opt.DP_EPSILON,
    central_dp_clip: float | None = opt.CENTRAL_DP_CLIP,
    central_dp_noise: float | None = opt.CENTRAL_DP_NOISE,
    preset: str | None = opt.PRESET,
    max_update_norm: str = opt.MAX_UPDATE_NORM,
    max_rejected_fraction: float = opt.MAX_REJECTED_FRACTION,
    quality_from: str = opt.QUALITY_FROM,
    features: str = opt.FEATURES,
    reference: Path | None = opt.REFERENCE_SET,
    checkpoint_every: int = typer.Option(
        default(ServerSettings, "checkpoint_every"),
        help="Rounds between checkpoints (and after each evaluation).",
    ),
    resume: bool = typer.Option(
        False, help="Go on from the run directory's checkpoint.pt (start afresh if there is none)."
    ),
    allow_devices: str = typer.Option(
        "",
        help="Comma-separated device names whose updates count; others are rejected. [default: any]",
        show_default=False,
    ),
    dataset: str = opt.DATASET,
    partition: str = opt.PARTITION,
    rounds: int | None = opt.ROUNDS,
    seed: int = opt.SEED,
    out: Path | None = typer.Option(
        None, help="Run directory. [default: runs/server-DATASET-sSEED]", show_default=False
    ),
    data_dir: Path | None = opt.DATA_DIR,
    width: int | None = opt.WIDTH,
    latent_dim: int | None = opt.LATENT_DIM,
    eval_every: int | None = opt.EVAL_EVERY,
    codec: str = opt.CODEC,
    fakes: str | None = opt.FAKES,
    keyframe_every: int = opt.KEYFRAME_EVERY,
    drop_rate: float = opt.DROP_RATE,
    delay_ms: float = opt.DELAY_MS,
    jitter_ms: float = opt.JITTER_MS,
    bandwidth_kbps: float = opt.BANDWIDTH_KBPS,
    threads: int = opt.THREADS,
    torch_device: str = opt.TORCH_DEVICE,
    log_level: str = opt.LOG_LEVEL,
    log_format: str = opt.LOG_FORMAT,
    username: str | None = opt.USERNAME,
    password_file: Path | None = opt.PASSWORD_FILE,
    tls_ca: Path | None = opt.TLS_CA,
    tls_cert: Path | None = opt.TLS_CERT,
    tls_key: Path | None = opt.TLS_KEY,
    connect_timeout_s: float = opt.CONNECT_TIMEOUT_S,
    signing_key: Path | None = opt.SIGNING_KEY,
    device_keys: Path | None = opt.DEVICE_KEYS,
) -> None:
    """Coordinate a run over MQTT: publish the global GAN, fold in the devices'
    discriminators, train the generator, and write the same outputs as `edgegan simulate`.

    Example: edgegan server --broker mqtt://127.0.0.1:1883 --run demo --devices 4 --rounds 200
    """
    from edgegan.runtime.impairment import LinkImpairment

    setup_logging(log_level, log_format)
    out = out or Path("runs") / f"server-{dataset}-s{seed}"
    setup = setup_or_fail(
        dataset=dataset, devices=devices, partition=partition, seed=seed, out=out, data_dir=data_dir,
        width=width, latent_dim=latent_dim, eval_every=eval_every, aggregate=aggregate,
        recipe=dict(
            loss=loss, gp_weight=gp_weight, batch_size=batch_size, local_steps=local_steps,
            device_opt=device_opt, device_lr=device_lr, server_opt=server_opt, server_lr=server_lr,
            g_lr=g_lr, g_batch_size=g_batch_size, g_steps=g_steps, critic_ratio=critic_ratio,
            g_ema=g_ema, g_beta1=g_beta1, d_width=d_width, d_norm=d_norm,
            dp_clip=dp_clip, dp_noise=dp_noise, dp_delta=dp_delta, dp_epsilon=dp_epsilon,
            central_dp_clip=central_dp_clip, central_dp_noise=central_dp_noise,
        ), features=features, schedule=schedule, preset=preset,
    )  # fmt: skip
    address = broker_login(broker, username, password_file, tls_ca, tls_cert, tls_key, connect_timeout_s)
    try:
        settings = ServerSettings(
            run=run_name,
            broker=address,
            rounds=resolve_run(dataset, "rounds", rounds),
            quorum=quorum or devices,
            deadline_s=deadline_s,
            min_devices=min_devices,
            codec=codec,
            keyframe_every=keyframe_every,
            seed=seed,
            schedule=schedule,
            tau=tau,
            staleness_weight=staleness_weight,
            aggregators=aggregators,
            max_update_norm=max_update_norm,
            max_rejected_fraction=max_rejected_fraction,
            checkpoint_every=checkpoint_every,
            quality_from=quality_source(quality_from, reference),
            reference=reference,
            allowed_devices=tuple(name.strip() for name in allow_devices.split(",") if name.strip()),
            impairment=LinkImpairment(
                drop_rate=drop_rate, delay_ms=delay_ms, jitter_ms=jitter_ms, bandwidth_kbps=bandwidth_kbps
            ),
            torch_device=torch_device,
            fakes=resolve_fakes(dataset, schedule, fakes),
            signing_key=signing_key,
            device_keys=device_keys,
        )
    except ValueError as error:
        fail(str(error))
    serve_and_report(settings, setup, resume, threads)


def device(
    config_file: Path | None = opt.CONFIG,
    id: str | None = typer.Option(
        None,
        "--id",
        help="This device's name, its topic level. [default: --username, which it must equal]",
        show_default=False,
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="This device's own data: a folder of images or a .npy/.pt tensor file (docs/deployment.md); "
        "--index and --of are then not needed. [default: partition --index of the run's data set]",
        show_default=False,
        is_eager=True,  # read before --index and --of, whose check needs it
    ),
    index: int | None = typer.Option(
        None,
        help="Which partition of the data this device holds, 0 .. --of - 1 (with --data: only numbers "
        "its random stream). Required without --data.",
        show_default=False,
        callback=required_without_data,
    ),
    of: int | None = typer.Option(
        None,
        help="How many partitions the data is split into (the fleet size). Required without --data.",
        show_default=False,
        callback=required_without_data,
    ),
    run_name: str = opt.RUN_NAME,
    broker: str = opt.BROKER,
    dataset: str | None = opt.from_run(opt.DATASET),
    partition: str | None = opt.from_run(opt.PARTITION),
    seed: int | None = opt.from_run(opt.SEED),
    data_dir: Path | None = opt.DATA_DIR,
    width: int | None = opt.WIDTH,
    latent_dim: int | None = opt.LATENT_DIM,
    codec: str | None = opt.from_run(opt.CODEC),
    features: str = opt.FEATURES,
    device_speed: float = typer.Option(
        default(DeviceSettings, "speed"), help="Below 1 stretches each update to emulate a slower board."
    ),
    resend_s: float = opt.RESEND_S,
    status_interval: float = opt.STATUS_INTERVAL,
    drop_rate: float = opt.DROP_RATE,
    delay_ms: float = opt.DELAY_MS,
    jitter_ms: float = opt.JITTER_MS,
    bandwidth_kbps: float = opt.BANDWIDTH_KBPS,
    offline_every: float = opt.OFFLINE_EVERY,
    offline_for: float = opt.OFFLINE_FOR,
    threads: int = opt.THREADS,
    torch_device: str = opt.TORCH_DEVICE,
    log_level: str = opt.LOG_LEVEL,
    log_format: str = opt.LOG_FORMAT,
    username: str | None = opt.USERNAME,
    password_file: Path | None = opt.PASSWORD_FILE,
    tls_ca: Path | None = opt.TLS_CA,
    tls_cert: Path | None = opt.TLS_CERT,
    tls_key: Path | None = opt.TLS_KEY,
    connect_timeout_s: float = opt.CONNECT_TIMEOUT_S,
    server_key: str | None = opt.SERVER_KEY,
    update_key: Path | None = opt.UPDATE_KEY,
) -> None:
    """Join a run: train a local discriminator on this device's data against each global model.

    Example: edgegan device --id pi-0 --index 0 --of 4 --broker mqtt://192.168.1.10:1883 --run demo
    With a secured broker (broker/README.md): edgegan device --broker mqtts://broker.local --tls-ca ca.crt
    --username pi-0 --password-file pi-0.password --index 0 --of 4 --run demo
    """
    from edgegan import signing
    from edgegan.runtime.impairment import LinkImpairment

    setup_logging(log_level, log_format)
    id = id or username
    if id is None:
        fail("--id is required (or --username, which it defaults to)")
    address = broker_login(broker, username, password_file, tls_ca, tls_cert, tls_key, connect_timeout_s)
    # Flags left unset take the run's value; the others must agree with it (runtime/runconfig.py). Until the
    # run's configuration arrives, the set-up holds placeholders for them.
    given = {"dataset": dataset, "partition": partition, "devices": of, "seed": seed, "width": width,
             "latent_dim": latent_dim, "codec": codec}  # fmt: skip
    from_run = tuple(name for name, value in given.items() if value is None)
    setup = setup_or_fail(
        dataset=dataset or "mnist", devices=1 if of is None else of, partition=partition or "iid",
        seed=seed or 0, out=Path("runs") / "device", data_dir=data_dir, width=width, latent_dim=latent_dim,
        eval_every=1, features=features,
    )  # fmt: skip
    try:
        pinned = signing.parse_public_key(server_key).hex() if server_key is not None else None
        own_key = signing.load_update_key(update_key) if update_key is not None else None
        settings = DeviceSettings(
            run=run_name,
            device=id,
            broker=address,
            codec=codec or "fp32",
            speed=device_speed,
            resend_s=resend_s,
            seed=seed or 0,
            status_interval_s=status_interval,
            torch_device=torch_device,
            server_key=pinned,
            update_key=own_key,
            impairment=LinkImpairment(
                drop_rate=drop_rate,
                delay_ms=delay_ms,
                jitter_ms=jitter_ms,
                bandwidth_kbps=bandwidth_kbps,
                offline_every_s=offline_every,
                offline_for_s=offline_for,
            ),
        )
    except ValueError as error:
        fail(str(error))
    train_device_and_report(settings, setup, index, threads, data=data, from_run=from_run)


def aggregator(
    config_file: Path | None = opt.CONFIG,
    name: str = typer.Option(..., "--name", help="This aggregator's name (its topic level, MQTT client id)."),
    run_name: str = opt.RUN_NAME,
    broker: str = opt.BROKER,
    dataset: str = opt.DATASET,
    data_dir: Path | None = opt.DATA_DIR,
    width: int | None = opt.WIDTH,
    latent_dim: int | None = opt.LATENT_DIM,
    d_width: int = typer.Option(0, help="The run's --d-width (0: --width): the shapes it checks."),
    threads: int = opt.THREADS,
    log_level: str = opt.LOG_LEVEL,
    log_format: str = opt.LOG_FORMAT,
    username: str | None = opt.USERNAME,
    password_file: Path | None = opt.PASSWORD_FILE,
    tls_ca: Path | None = opt.TLS_CA,
    tls_cert: Path | None = opt.TLS_CERT,
    tls_key: Path | None = opt.TLS_KEY,
    connect_timeout_s: float = opt.CONNECT_TIMEOUT_S,
    device_keys: Path | None = opt.DEVICE_KEYS,
) -> None:
    """Share a sync server's aggregation: sum the updates the broker hands this process (an MQTT 5 shared
    subscription) and report a partial sum per round. Start one per `edgegan server --aggregators K`.

    Example: edgegan aggregator --name agg-0 --broker mqtt://10.0.0.5:1883 --run demo --dataset mnist
    """
    from edgegan.runtime.aggregator import AggregatorSettings
    from edgegan.runtime.trust import DeviceKeys

    setup_logging(log_level, log_format)
    address = broker_login(broker, username, password_file, tls_ca, tls_cert, tls_key, connect_timeout_s)
    try:
        keys = DeviceKeys.load(device_keys) if device_keys is not None else None
        settings = AggregatorSettings(run=run_name, name=name, broker=address, device_keys=keys)
    except ValueError as error:
        fail(str(error))
    aggregate_and_report(
        settings, dataset, data_dir, resolve_run(dataset, "width", width),
        resolve_run(dataset, "latent_dim", latent_dim), threads, d_width=d_width,
    )  # fmt: skip
