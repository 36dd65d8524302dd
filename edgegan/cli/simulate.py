"""`edgegan simulate`: one algorithm in one process, on a simulated clock."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgegan.cli import options as opt
from edgegan.cli.common import console, fail, fail_if_run_failed, parse_numbers
from edgegan.cli.options import default, recipe_option
from edgegan.config import check_preset, default_help, resolve_fakes, resolve_run, resolve_train
from edgegan.costmodel import LinkProfile
from edgegan.figures import quality_text
from edgegan.runsetup import RunSetup
from edgegan.simulate import SimConfig


def simulate(
    config_file: Path | None = opt.CONFIG,
    algo: str = typer.Option("serial", help="serial | parallel | mdgan | fedgan | central."),
    dataset: str = opt.DATASET,
    devices: int = typer.Option(4, help="Number of simulated devices."),
    partition: str = opt.PARTITION,
    rounds: int | None = opt.ROUNDS,
    seed: int = opt.SEED,
    out: Path | None = typer.Option(
        None, help="Run directory. [default: runs/ALGO-DATASET-sSEED]", show_default=False
    ),
    data_dir: Path | None = opt.DATA_DIR,
    width: int | None = opt.WIDTH,
    latent_dim: int | None = opt.LATENT_DIM,
    loss: str | None = opt.LOSS,
    gp_weight: float | None = opt.GP_WEIGHT,
    batch_size: int | None = opt.BATCH_SIZE,
    local_steps: int | None = opt.LOCAL_STEPS,
    device_opt: str | None = opt.DEVICE_OPT,
    device_lr: float | None = opt.DEVICE_LR,
    server_opt: str | None = opt.SERVER_OPT,
    server_lr: float | None = opt.SERVER_LR,
    aggregate: str | None = recipe_option("aggregate", "mean | median | trimmed:FRACTION | clip:NORM."),
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
    mdgan_batches: int | None = typer.Option(
        None, help="MD-GAN's k fake batches per iteration. [default: ceil(ln N)]", show_default=False
    ),
    mdgan_swap_epochs: float | None = recipe_option(
        "mdgan_swap_epochs", "MD-GAN's E: swap every E local epochs."
    ),
    eval_every: int | None = opt.EVAL_EVERY,
    eval_samples: int = typer.Option(
        default(RunSetup, "eval_samples"), help="Generated samples per evaluation (fixed noise)."
    ),
    device_speeds: str | None = typer.Option(
        None,
        help="Speed factor per device, e.g. 1,1,1,0.25 (0.25 = four times slower). [default: all 1]",
        show_default=False,
    ),
    uplink_mbps: float = typer.Option(
        default(LinkProfile, "uplink_mbps"), help="Simulated device-to-server bandwidth."
    ),
    downlink_mbps: float = typer.Option(
        default(LinkProfile, "downlink_mbps"), help="Simulated server-to-device bandwidth."
    ),
    latency_ms: float = typer.Option(
        default(LinkProfile, "latency_ms"), help="Simulated one-way latency per message."
    ),
    codec: str = typer.Option(
        default(SimConfig, "codec"),
        help="Message codec: fp32 | fp16 | int8, each optionally +zstd. The proposed method's messages go "
        "through it as over MQTT; the baselines' are only counted.",
    ),
    threads: int | None = typer.Option(
        None, help=f"Torch CPU threads. {default_help('threads')}", show_default=False
    ),
    poison: str | None = typer.Option(
        None,
        help="Poison the last --poisoned devices' discriminators: scale:FACTOR or noise:STD (serial and "
        "parallel; to measure --aggregate).",
        show_default=False,
    ),
    poisoned: int = typer.Option(default(SimConfig, "poisoned"), help="How many devices --poison poisons."),
    max_update_norm: str = opt.MAX_UPDATE_NORM,
    max_rejected_fraction: float = opt.MAX_REJECTED_FRACTION,
    quorum: int | None = typer.Option(
        None,
        help="--algo parallel: close each round once this many updates arrived, without the stragglers "
        "(played on an event clock with --device-speeds and the link). [default: --devices]",
        show_default=False,
    ),
    tau: int = opt.TAU,
    features: str = opt.FEATURES,
    torch_device: str = opt.TORCH_DEVICE,
    fakes: str | None = opt.FAKES,
    keyframe_every: int = opt.KEYFRAME_EVERY,
) -> None:
    """Run one algorithm in one process on a simulated clock and write metrics, samples and weights.

    Example: edgegan simulate --algo serial --dataset ring8 --devices 4 --partition shards:2
    Parallel without waiting for the slowest device: edgegan simulate --algo parallel --devices 4
    --quorum 3 --tau 2 --device-speeds 0.25,0.5,0.75,1
    """
    import torch

    from edgegan.data import DatasetError, PartitionSpecError
    from edgegan.metrics import ClassifierMissingError
    from edgegan.runsetup import prepare
    from edgegan.simulate import simulate as run_simulation

    try:
        check_preset(preset, dataset)
        train = resolve_train(
            dataset,
            {
                "loss": loss,
                "gp_weight": gp_weight,
                "batch_size": batch_size,
                "local_steps": local_steps,
                "device_opt": device_opt,
                "device_lr": device_lr,
                "server_opt": server_opt,
                "server_lr": server_lr,
                "aggregate": aggregate,
                "g_lr": g_lr,
                "g_batch_size": g_batch_size,
                "g_steps": g_steps,
                "critic_ratio": critic_ratio,
                "g_ema": g_ema,
                "g_beta1": g_beta1,
                "d_width": d_width,
                "d_norm": d_norm,
                "dp_clip": dp_clip,
                "dp_noise": dp_noise,
                "dp_delta": dp_delta,
                "dp_epsilon": dp_epsilon,
                "central_dp_clip": central_dp_clip,
                "central_dp_noise": central_dp_noise,
                "mdgan_batches": mdgan_batches,
                "mdgan_swap_epochs": mdgan_swap_epochs,
            },
            schedule="parallel" if algo == "parallel" else "sync",
        )
        link = LinkProfile(uplink_mbps, downlink_mbps, latency_ms)
        config = SimConfig(
            algo=algo,
            dataset=dataset,
            devices=devices,
            partition=partition,
            rounds=resolve_run(dataset, "rounds", rounds),
            seed=seed,
            out=out or Path("runs") / f"{algo}-{dataset}-s{seed}",
            train=train,
            width=resolve_run(dataset, "width", width),
            latent_dim=resolve_run(dataset, "latent_dim", latent_dim),
            data_dir=data_dir,
            eval_every=resolve_run(dataset, "eval_every", eval_every),
            eval_samples=eval_samples,
            features=features,
            device_speeds=parse_numbers("--device-speeds", device_speeds, "1,1,1,0.25"),
            link=link,
            codec=codec,
            poison=poison or "",
            poisoned=poisoned,
            max_update_norm=max_update_norm,
            max_rejected_fraction=max_rejected_fraction,
            quorum=devices if quorum is None else quorum,
            tau=tau,
            torch_device=torch_device,
            fakes=resolve_fakes(dataset, algo, fakes),
            keyframe_every=keyframe_every,
        )
    except (ValueError, PartitionSpecError) as error:
        fail(str(error))
    thread_count = resolve_run(dataset, "threads", threads)
    if thread_count < 1:
        fail(f"--threads must be >= 1, got {thread_count}")
    torch.set_num_threads(thread_count)
    try:
        prepared = prepare(config.setup)
    except (DatasetError, ClassifierMissingError, PartitionSpecError, ValueError) as error:
        fail(str(error))

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(f"{algo} on {dataset}", total=config.rounds, status="")

        def on_round(report) -> None:
            status = f"sim {report.sim_time_s:,.1f} s"
            if report.quality:
                status += "  " + quality_text(report.quality)
                progress.update(task, status=status)
            progress.update(task, completed=report.round)

        def on_setup(lines: list[str]) -> None:
            for line in lines:
                progress.console.print(line, highlight=False)

        summary = run_simulation(config, prepared, on_setup=on_setup, on_round=on_round)
    fail_if_run_failed(summary)
    console.print(
        f"done: {summary['rounds']} rounds in {summary['wall_time_s']:.1f} s wall, "
        f"{summary['sim_time_s']:.1f} s simulated; initial {summary['initial']} -> final {summary['final']}",
        highlight=False,
    )
    console.print(
        f"outputs in {config.out}: metrics.csv, summary.json, samples/, generator.pt", highlight=False
    )
