"""The `edgegan` command: one thin command per user task. It parses, validates and calls the package."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgegan import __version__
from edgegan.config import default_help, resolve_run, resolve_train

app = typer.Typer(
    help="EdgeGAN: train one GAN across many edge devices whose data never leaves them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(stderr=True)


# Options shared by several commands, declared once.
DatasetOpt = Annotated[
    str, typer.Option("--dataset", help="mnist | fashion-mnist | cifar10 | ring8 | grid25.")
]
PartitionOpt = Annotated[
    str, typer.Option("--partition", help="iid | dirichlet:ALPHA | shards:K (K classes per device).")
]
RoundsOpt = Annotated[
    int | None,
    typer.Option("--rounds", help=f"Training rounds. {default_help('rounds')}", show_default=False),
]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seeds data split, initial weights and every random draw.")
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data set folder in torchvision's layout. [default: the shipped MNIST]",
                 show_default=False),
]  # fmt: skip
WidthOpt = Annotated[
    int | None, typer.Option("--width", help=f"Model width. {default_help('width')}", show_default=False)
]
LatentOpt = Annotated[
    int | None,
    typer.Option("--latent-dim", help=f"Noise size. {default_help('latent_dim')}", show_default=False),
]
EvalEveryOpt = Annotated[
    int | None,
    typer.Option(
        "--eval-every", help=f"Rounds between evaluations. {default_help('eval_every')}", show_default=False
    ),
]
BrokerOpt = Annotated[str, typer.Option("--broker", help="MQTT broker, mqtt://HOST:PORT.")]
RunNameOpt = Annotated[
    str, typer.Option("--run", help="Run name: the topic prefix edgegan/RUN/ all processes share.")
]
QuorumOpt = Annotated[
    int | None,
    typer.Option("--quorum", help="Updates that close a round. [default: --devices]", show_default=False),
]
DeadlineOpt = Annotated[float, typer.Option("--deadline-s", help="Seconds a round waits for its quorum.")]
MinDevicesOpt = Annotated[
    int, typer.Option("--min-devices", help="Updates needed to close a round at its deadline.")
]
ScheduleOpt = Annotated[
    str,
    typer.Option(
        "--schedule",
        help="sync (wait for the quorum, then update G) | parallel (update G while devices train).",
    ),
]
TauOpt = Annotated[
    int,
    typer.Option(
        "--tau", help="parallel: fold in updates at most this many rounds stale (the paper's schedule: 1)."
    ),
]
StalenessOpt = Annotated[
    str,
    typer.Option(
        "--staleness-weight", help="parallel: discount of stale updates, constant | inverse | exp:LAMBDA."
    ),
]
CodecOpt = Annotated[
    str, typer.Option("--codec", help="Message codec: fp32 | fp16 | int8, each optionally +zstd.")
]
DropRateOpt = Annotated[
    float, typer.Option("--drop-rate", help="Emulated link: probability that a message is lost.")
]
DelayOpt = Annotated[float, typer.Option("--delay-ms", help="Emulated link: delay added to every message.")]
JitterOpt = Annotated[
    float, typer.Option("--jitter-ms", help="Emulated link: uniform jitter of +/- this around the delay.")
]
BandwidthOpt = Annotated[
    float, typer.Option("--bandwidth-kbps", help="Emulated link: throughput cap (0 = none).")
]
OfflineEveryOpt = Annotated[
    float,
    typer.Option("--offline-every", help="Disconnect from the broker every this many seconds (0 = never)."),
]
OfflineForOpt = Annotated[float, typer.Option("--offline-for", help="Seconds each disconnection lasts.")]
ResendOpt = Annotated[
    float,
    typer.Option(
        "--resend-s", help="Devices resend their last update after this long without a newer model."
    ),
]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="Torch CPU threads.")]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="debug | info | warning | error.")]


def recipe_option(name: str, text: str):
    """A training-recipe flag: left unset, it takes the data shape's documented default."""
    return typer.Option(None, help=f"{text} {default_help(name, True)}", show_default=False)


def fail(message: str) -> None:
    """A one-line error a user can act on, and exit code 2 (a usage error)."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


def version_callback(value: bool) -> None:
    if value:
        print(f"edgegan {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """EdgeGAN: train one GAN across many edge devices whose data never leaves them."""


def parse_speeds(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        fail(f"--device-speeds takes comma-separated numbers such as 1,1,1,0.25, got {text!r}")
    return ()


@app.command()
def simulate(
    algo: str = typer.Option("serial", help="serial | parallel | mdgan | fedgan | central."),
    dataset: DatasetOpt = "mnist",
    devices: int = typer.Option(4, help="Number of simulated devices."),
    partition: PartitionOpt = "iid",
    rounds: RoundsOpt = None,
    seed: SeedOpt = 0,
    out: Path | None = typer.Option(
        None, help="Run directory. [default: runs/ALGO-DATASET-sSEED]", show_default=False
    ),
    data_dir: DataDirOpt = None,
    width: WidthOpt = None,
    latent_dim: LatentOpt = None,
    loss: str | None = recipe_option("loss", "ns | hinge | wgan-gp."),
    gp_weight: float | None = recipe_option("gp_weight", "WGAN-GP lambda."),
    batch_size: int | None = recipe_option("batch_size", "Real examples per device per D step."),
    local_steps: int | None = recipe_option(
        "local_steps", "D steps per device per round (FedGAN: GAN steps, its K)."
    ),
    device_opt: str | None = recipe_option("device_opt", "sgd | adam, the devices' optimiser."),
    device_lr: float | None = recipe_option("device_lr", "Device learning rate."),
    server_opt: str | None = recipe_option(
        "server_opt", "none | sgd | adam on the mean device delta (FedOpt)."
    ),
    server_lr: float | None = recipe_option("server_lr", "Server optimiser rate."),
    aggregate: str | None = recipe_option("aggregate", "mean | median | trimmed:FRACTION."),
    g_lr: float | None = recipe_option("g_lr", "Generator Adam rate."),
    g_batch_size: int | None = recipe_option("g_batch_size", "Generator batch."),
    g_steps: int | None = recipe_option("g_steps", "G steps per G update."),
    critic_ratio: int | None = recipe_option("critic_ratio", "Discriminator rounds per generator update."),
    mdgan_batches: int | None = typer.Option(
        None, help="MD-GAN's k fake batches per iteration. [default: ceil(ln N)]", show_default=False
    ),
    mdgan_swap_epochs: float | None = recipe_option(
        "mdgan_swap_epochs", "MD-GAN's E: swap every E local epochs."
    ),
    eval_every: EvalEveryOpt = None,
    eval_samples: int = typer.Option(2500, help="Generated samples per evaluation (fixed noise)."),
    device_speeds: str | None = typer.Option(
        None,
        help="Speed factor per device, e.g. 1,1,1,0.25 (0.25 = four times slower). [default: all 1]",
        show_default=False,
    ),
    uplink_mbps: float = typer.Option(100.0, help="Simulated device-to-server bandwidth."),
    downlink_mbps: float = typer.Option(100.0, help="Simulated server-to-device bandwidth."),
    latency_ms: float = typer.Option(1.0, help="Simulated one-way latency per message."),
    codec: str = typer.Option(
        "fp32",
        help="Message codec: fp32 | fp16 | int8, each optionally +zstd. The proposed method's messages go "
        "through it as over MQTT; the baselines' are only counted.",
    ),
    threads: int | None = typer.Option(
        None, help=f"Torch CPU threads. {default_help('threads')}", show_default=False
    ),
) -> None:
    """Run one algorithm in one process on a simulated clock and write metrics, samples and weights.

    Example: edgegan simulate --algo serial --dataset ring8 --devices 4 --partition shards:2
    """
    import torch

    from edgegan.costmodel import LinkProfile
    from edgegan.data import DATASETS, DatasetError, PartitionSpecError
    from edgegan.metrics import ClassifierMissingError
    from edgegan.simulate import SimConfig, prepare
    from edgegan.simulate import simulate as run_simulation

    if dataset not in DATASETS:
        fail(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    try:
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
                "mdgan_batches": mdgan_batches,
                "mdgan_swap_epochs": mdgan_swap_epochs,
            },
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
            device_speeds=parse_speeds(device_speeds),
            link=link,
            codec=codec,
        )
    except (ValueError, PartitionSpecError) as error:
        fail(str(error))
    thread_count = resolve_run(dataset, "threads", threads)
    if thread_count < 1:
        fail(f"--threads must be >= 1, got {thread_count}")
    torch.set_num_threads(thread_count)
    try:
        prepared = prepare(config)
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
                status += "  " + "  ".join(f"{key} {value:.3g}" for key, value in report.quality.items())
                progress.update(task, status=status)
            progress.update(task, completed=report.round)

        def on_setup(lines: list[str]) -> None:
            for line in lines:
                progress.console.print(line, highlight=False)

        summary = run_simulation(config, prepared, on_setup=on_setup, on_round=on_round)
    console.print(
        f"done: {summary['rounds']} rounds in {summary['wall_time_s']:.1f} s wall, "
        f"{summary['sim_time_s']:.1f} s simulated; initial {summary['initial']} -> final {summary['final']}",
        highlight=False,
    )
    console.print(
        f"outputs in {config.out}: metrics.csv, summary.json, samples/, generator.pt", highlight=False
    )


@app.command("train-classifier")
def train_classifier(
    dataset: str = typer.Option("mnist", help="mnist | fashion-mnist | cifar10."),
    data_dir: Path | None = typer.Option(
        None, help="Where the data set lives. [default: shipped MNIST]", show_default=False
    ),
    epochs: int = typer.Option(8, help="Training epochs."),
    seed: int = typer.Option(0, help="Seed of the split and the initial weights."),
    out: Path | None = typer.Option(
        None,
        help="Weights file. [default: DATA_DIR/edgegan-classifiers/DATASET.pt, or the package's own for "
        "the shipped MNIST]",
        show_default=False,
    ),
) -> None:
    """Train the small classifier whose features the `fid` metric uses, and save its weights.

    Example: edgegan train-classifier --dataset fashion-mnist --data-dir ~/data
    """
    from edgegan.data import IMAGE_DATASETS, DatasetError, load_dataset
    from edgegan.metrics.classifier import ClassifierMissingError, default_weights_path, train_and_save

    if dataset not in IMAGE_DATASETS:
        fail(f"--dataset must be one of {', '.join(IMAGE_DATASETS)}, got {dataset!r}")
    if epochs < 1:
        fail(f"--epochs must be >= 1, got {epochs}")
    try:
        target = out or default_weights_path(dataset, data_dir)
        data = load_dataset(dataset, data_dir)
    except (DatasetError, ClassifierMissingError) as error:
        fail(str(error))
    accuracy = train_and_save(data, data_dir, target, epochs, seed)
    console.print(f"held-out accuracy {accuracy:.4f}; weights in {target}", highlight=False)


def setup_logging(level: str) -> None:
    import logging

    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        fail(f"--log-level must be one of debug, info, warning, error, got {level!r}")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def runtime_config(
    dataset: str, devices: int, partition: str, rounds: int | None, seed: int, out: Path | None,
    data_dir: Path | None, width: int | None, latent_dim: int | None, eval_every: int | None, name: str,
):  # fmt: skip
    """The simulator's settings, shared so that server, devices and simulator agree on data and model."""
    from edgegan.data import DATASETS
    from edgegan.simulate import SimConfig

    if dataset not in DATASETS:
        fail(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    try:
        return SimConfig(
            algo="serial", dataset=dataset, devices=devices, partition=partition,
            rounds=resolve_run(dataset, "rounds", rounds), seed=seed,
            out=out or Path("runs") / f"{name}-{dataset}-s{seed}", train=resolve_train(dataset, {}),
            width=resolve_run(dataset, "width", width),
            latent_dim=resolve_run(dataset, "latent_dim", latent_dim),
            data_dir=data_dir, eval_every=resolve_run(dataset, "eval_every", eval_every),
        )  # fmt: skip
    except ValueError as error:
        fail(str(error))


@app.command()
def server(
    run_name: RunNameOpt = "edgegan",
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    devices: int = typer.Option(4, help="Fleet size N (the default quorum)."),
    quorum: QuorumOpt = None,
    deadline_s: DeadlineOpt = 60.0,
    schedule: ScheduleOpt = "sync",
    tau: TauOpt = 1,
    staleness_weight: StalenessOpt = "constant",
    min_devices: MinDevicesOpt = 1,
    dataset: DatasetOpt = "mnist",
    partition: PartitionOpt = "iid",
    rounds: RoundsOpt = None,
    seed: SeedOpt = 0,
    out: Path | None = typer.Option(
        None, help="Run directory. [default: runs/server-DATASET-sSEED]", show_default=False
    ),
    data_dir: DataDirOpt = None,
    width: WidthOpt = None,
    latent_dim: LatentOpt = None,
    eval_every: EvalEveryOpt = None,
    codec: CodecOpt = "fp32",
    drop_rate: DropRateOpt = 0.0,
    delay_ms: DelayOpt = 0.0,
    jitter_ms: JitterOpt = 0.0,
    bandwidth_kbps: BandwidthOpt = 0.0,
    threads: ThreadsOpt = 1,
    log_level: LogLevelOpt = "info",
) -> None:
    """Coordinate a run over MQTT: publish the global GAN, fold in the devices'
    discriminators, train the generator, and write the same outputs as `edgegan simulate`.

    Example: edgegan server --broker mqtt://127.0.0.1:1883 --run demo --devices 4 --rounds 200
    """
    import torch

    from edgegan.data import DatasetError
    from edgegan.metrics import ClassifierMissingError
    from edgegan.runtime.connection import parse_broker
    from edgegan.runtime.impairment import LinkImpairment
    from edgegan.runtime.server import ServerSettings, serve

    setup_logging(log_level)
    config = runtime_config(
        dataset, devices, partition, rounds, seed, out, data_dir, width, latent_dim, eval_every, "server"
    )
    try:
        settings = ServerSettings(
            run=run_name, broker=parse_broker(broker), rounds=config.rounds, quorum=quorum or devices,
            deadline_s=deadline_s, min_devices=min_devices, codec=codec, seed=seed, schedule=schedule,
            tau=tau, staleness_weight=staleness_weight,
            impairment=LinkImpairment(drop_rate, delay_ms, jitter_ms, bandwidth_kbps),
        )  # fmt: skip
    except ValueError as error:
        fail(str(error))
    torch.set_num_threads(max(1, threads))
    try:
        summary = serve(settings, config)
    except (DatasetError, ClassifierMissingError) as error:
        fail(str(error))
    except (OSError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(1) from None
    console.print(
        f"done: {summary['rounds']} rounds in {summary['wall_time_s']:.1f} s; "
        f"initial {summary['initial']} -> final {summary['final']}; outputs in {config.out}",
        highlight=False,
    )


@app.command()
def device(
    id: str = typer.Option(..., "--id", help="This device's name (its topic level and MQTT client id)."),
    index: int = typer.Option(..., help="Which partition of the data this device holds, 0 .. --of - 1."),
    of: int = typer.Option(..., help="How many partitions the data is split into (the fleet size)."),
    run_name: RunNameOpt = "edgegan",
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    dataset: DatasetOpt = "mnist",
    partition: PartitionOpt = "iid",
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
    width: WidthOpt = None,
    latent_dim: LatentOpt = None,
    codec: CodecOpt = "fp32",
    device_speed: float = typer.Option(1.0, help="Below 1 stretches each update to emulate a slower board."),
    resend_s: ResendOpt = 5.0,
    drop_rate: DropRateOpt = 0.0,
    delay_ms: DelayOpt = 0.0,
    jitter_ms: JitterOpt = 0.0,
    bandwidth_kbps: BandwidthOpt = 0.0,
    offline_every: OfflineEveryOpt = 0.0,
    offline_for: OfflineForOpt = 0.0,
    threads: ThreadsOpt = 1,
    log_level: LogLevelOpt = "info",
) -> None:
    """Join a run: train a local discriminator on this device's data against each global model.

    Example: edgegan device --id pi-0 --index 0 --of 4 --broker mqtt://192.168.1.10:1883 --run demo
    """
    import torch

    from edgegan.data import DatasetError
    from edgegan.runtime.connection import parse_broker
    from edgegan.runtime.device import DeviceSettings, run_device
    from edgegan.runtime.impairment import LinkImpairment

    setup_logging(log_level)
    config = runtime_config(dataset, of, partition, 1, seed, None, data_dir, width, latent_dim, 1, "device")
    try:
        settings = DeviceSettings(
            run=run_name, device=id, broker=parse_broker(broker), codec=codec, speed=device_speed,
            resend_s=resend_s, seed=seed, impairment=LinkImpairment(
                drop_rate, delay_ms, jitter_ms, bandwidth_kbps, offline_every, offline_for
            ),
        )  # fmt: skip
    except ValueError as error:
        fail(str(error))
    torch.set_num_threads(max(1, threads))
    try:
        counters = run_device(settings, config, index)
    except (DatasetError, ValueError) as error:
        fail(str(error))
    console.print(f"device {id} stopped: {counters}", highlight=False)


@app.command()
def broker(
    host: str = typer.Option(
        "127.0.0.1", help="Interface to listen on; the embedded broker accepts only loopback."
    ),
    port: int = typer.Option(1883, help="TCP port."),
    log_level: str = typer.Option("info", help="debug | info | warning | error."),
) -> None:
    """Run the embedded pure-Python MQTT broker (amqtt) for local runs without Mosquitto.

    Example: edgegan broker --port 1884
    """
    import asyncio
    import signal

    from edgegan.runtime.broker import check_loopback, serve_broker

    setup_logging(log_level)
    try:
        check_loopback(host)
    except ValueError as error:
        fail(str(error))

    async def serve() -> None:
        stopped = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
        await serve_broker(host, port, stopped)

    try:
        asyncio.run(serve())
    except OSError as error:
        fail(f"cannot listen on {host}:{port}: {error.strerror}")


@app.command()
def run(
    devices: int = typer.Option(4, help="Number of device processes."),
    broker: str | None = typer.Option(
        None,
        help="Use this broker (mqtt://HOST:PORT). [default: start the embedded broker]",
        show_default=False,
    ),
    run_name: RunNameOpt = "edgegan",
    dataset: DatasetOpt = "mnist",
    partition: PartitionOpt = "iid",
    rounds: RoundsOpt = None,
    seed: SeedOpt = 0,
    out: Path | None = typer.Option(
        None, help="Run directory. [default: runs/run-DATASET-sSEED]", show_default=False
    ),
    data_dir: DataDirOpt = None,
    width: WidthOpt = None,
    latent_dim: LatentOpt = None,
    eval_every: EvalEveryOpt = None,
    quorum: QuorumOpt = None,
    deadline_s: DeadlineOpt = 60.0,
    schedule: ScheduleOpt = "sync",
    tau: TauOpt = 1,
    staleness_weight: StalenessOpt = "constant",
    min_devices: MinDevicesOpt = 1,
    codec: CodecOpt = "fp32",
    device_speeds: str | None = typer.Option(
        None, help="Speed factor per device, e.g. 1,1,1,0.25. [default: all 1]", show_default=False
    ),
    drop_rate: DropRateOpt = 0.0,
    delay_ms: DelayOpt = 0.0,
    jitter_ms: JitterOpt = 0.0,
    bandwidth_kbps: BandwidthOpt = 0.0,
    offline_every: OfflineEveryOpt = 0.0,
    offline_for: OfflineForOpt = 0.0,
    impair_devices: str | None = typer.Option(
        None,
        help="Apply the emulated-link flags only to these device indices, e.g. 0,2. [default: all]",
        show_default=False,
    ),
    resend_s: ResendOpt = 5.0,
) -> None:
    """The main job: broker, server and N devices as separate processes talking only over MQTT, with a live
    view; writes the same outputs as `edgegan simulate` plus per-device counters.

    Example: edgegan run --devices 4 --dataset mnist
    """
    import asyncio

    from edgegan.runtime.connection import parse_broker
    from edgegan.runtime.impairment import LinkImpairment
    from edgegan.runtime.launcher import FleetPlan, run_fleet

    config = runtime_config(
        dataset, devices, partition, rounds, seed, out, data_dir, width, latent_dim, eval_every, "run"
    )
    speeds = parse_speeds(device_speeds) or (1.0,) * devices
    if len(speeds) != devices or not all(0 < speed <= 1 for speed in speeds):
        fail(f"--device-speeds needs {devices} factors in (0, 1], got {device_speeds!r}")
    try:
        from edgegan import topics
        from edgegan.runtime.server import ServerSettings

        ServerSettings(
            run=run_name, broker=parse_broker(broker or "mqtt://127.0.0.1:1883"), rounds=config.rounds,
            quorum=quorum or devices, deadline_s=deadline_s, min_devices=min_devices, codec=codec,
            schedule=schedule, tau=tau, staleness_weight=staleness_weight,
        )  # fmt: skip
        topics.check_name("run", run_name)
        address = parse_broker(broker) if broker else None
    except ValueError as error:
        fail(str(error))
    shared = [
        "--dataset", dataset, "--partition", partition, "--seed", str(seed), "--codec", codec,
        "--width", str(config.width), "--latent-dim", str(config.latent_dim),
    ]  # fmt: skip
    if data_dir is not None:
        shared += ["--data-dir", str(data_dir)]
    server_args = [*shared, "--devices", str(devices), "--rounds", str(config.rounds),
                   "--eval-every", str(config.eval_every), "--quorum", str(quorum or devices),
                   "--deadline-s", str(deadline_s), "--min-devices", str(min_devices),
                   "--schedule", schedule, "--tau", str(tau),
                   "--staleness-weight", staleness_weight]  # fmt: skip
    try:
        impairment = LinkImpairment(
            drop_rate, delay_ms, jitter_ms, bandwidth_kbps, offline_every, offline_for
        )
        impaired = parse_indices(impair_devices, devices) if impair_devices else list(range(devices))
    except ValueError as error:
        fail(str(error))
    device_args = [
        (*shared, "--id", f"device-{index}", "--index", str(index), "--of", str(devices),
         "--device-speed", str(speeds[index]), "--resend-s", str(resend_s),
         *(impairment.flags() if index in impaired else []))
        for index in range(devices)
    ]  # fmt: skip
    plan = FleetPlan(
        run_name, devices, config.rounds, config.out, address, tuple(server_args), tuple(device_args)
    )
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
        print("error: interrupted; partial outputs in " + str(config.out), file=sys.stderr)
        raise typer.Exit(130)
    if summary.get("server_exit_code") != 0:
        print(f"error: the server failed; see {config.out / 'logs' / 'server.log'}", file=sys.stderr)
        raise typer.Exit(1)
    console.print(
        f"done: {summary['rounds']} rounds in {summary['wall_time_s']:.1f} s; "
        f"initial {summary['initial']} -> final {summary['final']}; outputs in {config.out} "
        "(metrics.csv, summary.json, samples/, generator.pt, devices.json, logs/)",
        highlight=False,
    )


def parse_indices(text: str, count: int) -> list[int]:
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--impair-devices takes comma-separated device indices such as 0,2, got {text!r}"
        ) from None
    if any(not 0 <= index < count for index in indices):
        raise ValueError(f"--impair-devices indices must be between 0 and {count - 1}, got {text!r}")
    return indices


class LiveFleet:
    """A rich Live table of the fleet, refreshed from the launcher's FleetView."""

    def __init__(self) -> None:
        from rich.live import Live

        self.live = Live(console=console, refresh_per_second=4, transient=False)
        self.started = False

    def update(self, view) -> None:
        if not self.started:
            self.live.start()
            self.started = True
        self.live.update(self.render(view))

    def stop(self) -> None:
        if self.started:
            self.live.stop()

    @staticmethod
    def render(view):
        from rich.table import Table

        metrics = view.metrics
        table = Table(title=f"edgegan run {view.run}")
        for column in ("device", "state", "round", "updates", "rejected", "MB up", "MB down"):
            table.add_column(column)
        for name, status in sorted(view.statuses.items()):
            table.add_row(
                name,
                status.get("state", "?"),
                str(status.get("round", "")),
                str(status.get("updates_sent", "")),
                str(status.get("rejected", "")),
                f"{status.get('bytes_up', 0) / 1e6:.1f}",
                f"{status.get('bytes_down', 0) / 1e6:.1f}",
            )
        quality = metrics.get("quality") or {}
        shown = ", ".join(f"{key} {value:.3g}" for key, value in quality.items() if value is not None)
        rejected = sum((metrics.get("rejected") or {}).values())
        dropped = sum(
            status.get("updates_dropped", 0) + status.get("globals_dropped", 0)
            for status in view.statuses.values()
        )
        table.caption = (
            f"round {metrics.get('round', 0)}/{view.rounds} · online {view.online}/{view.devices} · "
            f"{shown} · up {metrics.get('bytes_up', 0) / 1e6:.1f} MB, "
            f"down {metrics.get('bytes_down', 0) / 1e6:.1f} MB · "
            f"late {metrics.get('late', 0)}, stale {metrics.get('stale', 0)}, rejected {rejected}, "
            f"lost on links {dropped}"
        )
        return table


@app.command("link-proxy")
def link_proxy(
    listen: str = typer.Option("mqtt://127.0.0.1:1884", help="Where devices connect: mqtt://HOST:PORT."),
    target: str = typer.Option("mqtt://127.0.0.1:1883", help="The real broker: mqtt://HOST:PORT."),
    delay_ms: float = typer.Option(0.0, help="Delay added to every chunk of bytes, each way."),
    bandwidth_kbps: float = typer.Option(0.0, help="Throughput cap each way (0 = none)."),
    reset_every: float = typer.Option(
        0.0, help="Abort each connection after about this many seconds (0 = never)."
    ),
    seed: int = typer.Option(0, help="Seed of the reset timing."),
    log_level: str = typer.Option("info", help="debug | info | warning | error."),
) -> None:
    """A TCP proxy between devices and the broker that delays, throttles and resets the byte stream.

    Example: edgegan link-proxy --listen mqtt://127.0.0.1:1884 --target mqtt://127.0.0.1:1883 --reset-every 10
    then: edgegan device --broker mqtt://127.0.0.1:1884 ...
    """
    import asyncio
    import signal

    from edgegan.runtime.connection import parse_broker
    from edgegan.runtime.linkproxy import LinkProxy, ProxySettings

    setup_logging(log_level)
    try:
        settings = ProxySettings(
            parse_broker(listen), parse_broker(target), delay_ms, bandwidth_kbps,
            reset_every, seed,
        )  # fmt: skip
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
    console.print(f"link proxy stopped: {counters}", highlight=False)


@app.command()
def plot(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (each with metrics.csv)."),
    out: Path = typer.Option(Path("runs/plot.png"), help="PNG file to write."),
) -> None:
    """Plot quality against time and against bytes for several runs, one legend line per run.

    Example: edgegan plot runs/sync runs/parallel --out compare.png
    """
    from edgegan.plots import plot_runs

    try:
        plot_runs(run_dirs, out)
    except (ValueError, OSError) as error:
        fail(str(error))
    console.print(f"wrote {out}", highlight=False)


def load_checkpoint(checkpoint: Path):
    """The generator and its data set name from a run's generator.pt."""
    import torch

    from edgegan.models import ModelSpec, build_generator

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        spec = ModelSpec(
            tuple(saved["spec"]["sample_shape"]), saved["spec"]["latent_dim"], saved["spec"]["width"]
        )
        generator = build_generator(spec)
        generator.load_state_dict(saved["state_dict"])
    except Exception as error:  # torch.load raises many unrelated types on a wrong or damaged file
        fail(f"{checkpoint} is not an edgegan generator checkpoint ({str(error)[:120]})")
    if not isinstance(saved.get("dataset"), str):
        fail(f"{checkpoint} does not say which data set it was trained on (written by an older edgegan)")
    return generator.eval(), spec, saved["dataset"]


@app.command()
def sample(
    checkpoint: Path = typer.Argument(..., help="A run's generator.pt."),
    n: int = typer.Option(64, "--n", help="Number of samples."),
    out: Path = typer.Option(Path("samples.png"), help="PNG file to write."),
    seed: int = typer.Option(0, help="Seed of the noise."),
) -> None:
    """Draw samples from a trained generator into an image grid (or a scatter for 2-D data).

    Example: edgegan sample runs/demo-mnist/generator.pt --n 64 --out grid.png
    """
    import torch

    from edgegan.data import DatasetError, load_dataset
    from edgegan.samples import save_samples

    if n < 1:
        fail(f"--n must be >= 1, got {n}")
    generator, spec, dataset_name = load_checkpoint(checkpoint)
    try:
        dataset = load_dataset(dataset_name) if not spec.is_image else None
    except DatasetError as error:
        fail(str(error))
    with torch.no_grad():
        fakes = generator(torch.randn(n, spec.latent_dim, generator=torch.Generator().manual_seed(seed)))
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.is_image:
        from torchvision.utils import save_image

        save_image(fakes.add(1).div(2).clamp(0, 1), out, nrow=max(1, int(n**0.5)))
    else:
        save_samples(fakes, dataset, out, title=f"{n} samples")
    console.print(f"wrote {out}", highlight=False)


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A run's generator.pt."),
    data_dir: DataDirOpt = None,
    samples: int = typer.Option(2500, help="Generated samples to score."),
    seed: int = typer.Option(0, help="Seed of the evaluation noise."),
) -> None:
    """Score a trained generator: fid and classes for images, modes and hq for 2-D data (JSON on stdout).

    Example: edgegan evaluate runs/demo-mnist/generator.pt
    """
    import json

    from edgegan.data import DatasetError, load_dataset
    from edgegan.metrics import ClassifierMissingError
    from edgegan.simulate import QualityProbe

    generator, spec, dataset_name = load_checkpoint(checkpoint)
    try:
        dataset = load_dataset(dataset_name, data_dir)
        probe = QualityProbe(dataset, spec.latent_dim, samples, seed, data_dir)
    except (DatasetError, ClassifierMissingError) as error:
        fail(str(error))
    quality, _ = probe.measure(generator)
    print(json.dumps({"dataset": dataset_name, "samples": samples, **quality}))
