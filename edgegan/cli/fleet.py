"""`edgegan run`: the whole fleet on this machine, as separate processes talking only over MQTT. The plan
(edgegan/runtime/fleetplan.py) and the launcher (edgegan/runtime/launcher.py) do the work; this command
builds the settings from its flags, shows the live view and turns the outcome into an exit code."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from edgegan.cli import options as opt
from edgegan.cli.common import (
    RUN_FAILED_EXIT,
    LiveFleet,
    console,
    fail,
    fail_if_run_failed,
    parse_numbers,
    quality_source,
    setup_logging,
)
from edgegan.cli.processes import setup_or_fail
from edgegan.config import resolve_fakes, resolve_run


def run(
    config_file: Path | None = opt.CONFIG,
    devices: int = typer.Option(4, help="Number of device processes."),
    broker: str | None = typer.Option(
        None,
        help="Use this broker (mqtt://HOST:PORT or mqtts://HOST:PORT). [default: start the embedded broker]",
        show_default=False,
    ),
    device_broker: str | None = typer.Option(
        None,
        help="--broker: the devices' address, where it differs from the server's (the shipped Mosquitto's "
        "boards' listener, mqtts://HOST:8883, beside its servers' mqtts://HOST:8884). [default: --broker]",
        show_default=False,
    ),
    run_name: str = opt.RUN_NAME,
    dataset: str = opt.DATASET,
    partition: str = opt.PARTITION,
    rounds: int | None = opt.ROUNDS,
    seed: int = opt.SEED,
    out: Path | None = typer.Option(
        None, help="Run directory. [default: runs/run-DATASET-sSEED]", show_default=False
    ),
    data_dir: Path | None = opt.DATA_DIR,
    width: int | None = opt.WIDTH,
    latent_dim: int | None = opt.LATENT_DIM,
    eval_every: int | None = opt.EVAL_EVERY,
    quorum: int | None = opt.QUORUM,
    deadline_s: float = opt.DEADLINE_S,
    schedule: str = opt.SCHEDULE,
    tau: int = opt.TAU,
    staleness_weight: str = opt.STALENESS_WEIGHT,
    min_devices: int = opt.MIN_DEVICES,
    codec: str = opt.CODEC,
    keyframe_every: int = opt.KEYFRAME_EVERY,
    fakes: str | None = opt.FAKES,
    device_speeds: str | None = typer.Option(
        None, help="Speed factor per device, e.g. 1,1,1,0.25. [default: all 1]", show_default=False
    ),
    drop_rate: float = opt.DROP_RATE,
    delay_ms: float = opt.DELAY_MS,
    jitter_ms: float = opt.JITTER_MS,
    bandwidth_kbps: float = opt.BANDWIDTH_KBPS,
    offline_every: float = opt.OFFLINE_EVERY,
    offline_for: float = opt.OFFLINE_FOR,
    impair_devices: str | None = typer.Option(
        None,
        help="Apply the emulated-link flags only to these device indices, e.g. 0,2. [default: all]",
        show_default=False,
    ),
    resend_s: float = opt.RESEND_S,
    status_interval: float = opt.STATUS_INTERVAL,
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
    torch_device: str = opt.TORCH_DEVICE,
    quality_from: str = opt.QUALITY_FROM,
    features: str = opt.FEATURES,
    reference: Path | None = opt.REFERENCE_SET,
    username: str | None = typer.Option(
        None,
        "--username",
        help="--broker: the server's MQTT login (also the live view's).",
        show_default=False,
    ),  # fmt: skip
    password_file: Path | None = opt.PASSWORD_FILE,
    device_secrets: Path | None = typer.Option(
        None,
        help="--broker: folder of device-I.password files; device I logs in as device-I "
        "(edgegan broker add-device device-I).",
        show_default=False,
    ),
    tls_ca: Path | None = opt.TLS_CA,
    tls_cert: Path | None = opt.TLS_CERT,
    tls_key: Path | None = opt.TLS_KEY,
    log_level: str = opt.LOG_LEVEL,
    log_format: str = opt.LOG_FORMAT,
) -> None:
    """The main job: broker, server and N devices as separate processes talking only over MQTT, with a live
    view; writes the same outputs as `edgegan simulate` plus per-device counters.

    Example: edgegan run --devices 4 --dataset mnist
    """
    import asyncio

    from edgegan.runtime.device import DeviceSettings
    from edgegan.runtime.fleetplan import EMBEDDED_BROKER, FleetLogin, plan_fleet
    from edgegan.runtime.impairment import LinkImpairment
    from edgegan.runtime.launcher import run_fleet
    from edgegan.runtime.server_settings import ServerSettings

    setup_logging(log_level, log_format)
    out = out or Path("runs") / f"run-{dataset}-s{seed}"
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
    speeds = parse_numbers("--device-speeds", device_speeds, "1,1,1,0.25")
    impaired = parse_numbers("--impair-devices", impair_devices, "0,2", int) if impair_devices else None
    try:
        # Built on the embedded broker's address: the plan gives each process its own address and login.
        server = ServerSettings(
            run=run_name, broker=EMBEDDED_BROKER, rounds=resolve_run(dataset, "rounds", rounds),
            quorum=quorum or devices, deadline_s=deadline_s, min_devices=min_devices, codec=codec, seed=seed,
            schedule=schedule, tau=tau, staleness_weight=staleness_weight, aggregators=aggregators,
            max_update_norm=max_update_norm, max_rejected_fraction=max_rejected_fraction,
            quality_from=quality_source(quality_from, reference),
            reference=reference, fakes=resolve_fakes(dataset, schedule, fakes), torch_device=torch_device,
            keyframe_every=keyframe_every,
        )  # fmt: skip
        device = DeviceSettings(
            run=run_name, device="device-0", broker=EMBEDDED_BROKER, codec=codec, resend_s=resend_s,
            seed=seed, status_interval_s=status_interval, torch_device=torch_device,
        )  # fmt: skip
        plan = plan_fleet(
            setup,
            server,
            device,
            broker=broker,
            device_broker=device_broker,
            speeds=speeds,
            impaired=impaired,
            login=FleetLogin(
                username=username,
                password_file=password_file,
                device_secrets=device_secrets,
                tls_ca=tls_ca,
                tls_cert=tls_cert,
                tls_key=tls_key,
            ),
            impairment=LinkImpairment(
                drop_rate=drop_rate,
                delay_ms=delay_ms,
                jitter_ms=jitter_ms,
                bandwidth_kbps=bandwidth_kbps,
                offline_every_s=offline_every,
                offline_for_s=offline_for,
            ),
            log_level=log_level,
            log_format=log_format,
        )
    except ValueError as error:
        fail(str(error))
    live = LiveFleet()
    try:
        summary = asyncio.run(run_fleet(plan, on_tick=live.update))
    except (OSError, RuntimeError, TimeoutError, ExceptionGroup) as error:
        live.stop()
        causes = error.exceptions if isinstance(error, ExceptionGroup) else [error]
        print(f"error: {'; '.join(str(cause) for cause in causes)}", file=sys.stderr)
        raise typer.Exit(1) from None
    finally:
        live.stop()
        console.print()
    if summary.get("interrupted"):
        print("error: interrupted; partial outputs in " + str(out), file=sys.stderr)
        raise typer.Exit(130)
    if summary.get("server_exit_code") == RUN_FAILED_EXIT:
        fail_if_run_failed(summary)
    if summary.get("server_exit_code") != 0:
        print(f"error: the server failed; see {out / 'logs' / 'server.log'}", file=sys.stderr)
        raise typer.Exit(1)
    console.print(
        f"done: {summary['rounds']} rounds in {summary['wall_time_s']:.1f} s; "
        f"initial {summary['initial']} -> final {summary['final']}; outputs in {out} "
        "(metrics.csv, summary.json, samples/, generator.pt, devices.json, logs/)",
        highlight=False,
    )
