"""The `edgegan` command: one thin command per user task. It parses, validates and calls the package."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgegan import __version__, logs
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
BrokerOpt = Annotated[
    str, typer.Option("--broker", help="MQTT broker: mqtt://HOST:PORT, or mqtts://HOST:PORT (TLS, 8883).")
]
UsernameOpt = Annotated[
    str | None,
    typer.Option("--username", help="MQTT login name. [default: none, anonymous]", show_default=False),
]
PasswordFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        help="File whose first line is the MQTT password (edgegan broker add-device writes one). "
        "[default: $EDGEGAN_PASSWORD]",
        show_default=False,
        envvar="EDGEGAN_PASSWORD_FILE",
    ),
]
TlsCaOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca", help="mqtts: CA certificate that signed the broker's. [default: the system's CAs]",
        show_default=False,
    ),
]  # fmt: skip
TlsCertOpt = Annotated[
    Path | None, typer.Option("--tls-cert", help="mqtts: client certificate, for brokers that ask for one.")
]
TlsKeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="mqtts: private key of --tls-cert.")]
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
StatusIntervalOpt = Annotated[
    float,
    typer.Option(
        "--status-interval",
        help="Seconds between a device's status messages while it trains (0: after every update).",
    ),
]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="Torch CPU threads.")]
LogLevelOpt = Annotated[
    str, typer.Option("--log-level", help="debug | info | warning | error.", envvar="EDGEGAN_LOG_LEVEL")
]
LogFormatOpt = Annotated[
    str,
    typer.Option(
        "--log-format", help="text (for people) | json (one object per line, for log collectors).",
        envvar="EDGEGAN_LOG_FORMAT",
    ),
]  # fmt: skip


def load_config_file(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """`--config FILE`: the file's values become the command's defaults (edgegan/configfile.py)."""
    from edgegan.configfile import ConfigFileError, apply_config

    try:
        return apply_config(ctx, value)
    except ConfigFileError as error:
        fail(str(error))


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file of this command's flag values (keys: the flags' names, in a [COMMAND] table or at "
        "the top level); flags given here win. `edgegan config show COMMAND --config FILE` shows the result.",
        is_eager=True, callback=load_config_file, show_default=False,
    ),
]  # fmt: skip
AggregatorsOpt = Annotated[
    int,
    typer.Option(
        "--aggregators",
        help="sync: aggregator processes that share the updates through an MQTT 5 shared subscription "
        "(K > 1 needs Mosquitto or another MQTT 5 broker; docs/scaling.md).",
    ),
]
AggregateOpt = Annotated[
    str,
    typer.Option(
        "--aggregate",
        help="How the server combines the devices' discriminators: mean (weighted by samples), median, "
        "trimmed:FRACTION (drop that share of the largest and smallest per coordinate) or clip:NORM (shorten "
        "each change to NORM first). median and trimmed resist a poisoned device; docs/reliability.md.",
    ),
]
MaxUpdateNormOpt = Annotated[
    float,
    typer.Option(
        "--max-update-norm",
        help="Reject an update whose change from the global discriminator is longer than this (L2); 0: no "
        "limit.",
    ),
]


def recipe_option(name: str, text: str):
    """A training-recipe flag: left unset, it takes the data shape's documented default."""
    return typer.Option(None, help=f"{text} {default_help(name, True)}", show_default=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """A one-line error a user can act on, and exit code 2 (a usage error) unless told otherwise; under
    --log-format json, a log record like every other line."""
    if logs.active_format() == "json":
        logging.getLogger("edgegan").error(message)
    else:
        print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def report(text: str) -> None:
    """A closing line for people; under --log-format json, a log record like every other line."""
    if logs.active_format() == "json":
        logging.getLogger("edgegan").info(text)
    else:
        console.print(text, highlight=False)


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
    config_file: ConfigOpt = None,
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
    aggregate: str | None = recipe_option("aggregate", "mean | median | trimmed:FRACTION | clip:NORM."),
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
    poison: str | None = typer.Option(
        None,
        help="Poison the last --poisoned devices' discriminators: scale:FACTOR or noise:STD (serial and "
        "parallel; to measure --aggregate).",
        show_default=False,
    ),
    poisoned: int = typer.Option(1, help="How many devices --poison poisons."),
    max_update_norm: MaxUpdateNormOpt = 0.0,
    quorum: int | None = typer.Option(
        None,
        help="--algo parallel: close each round once this many updates arrived, without the stragglers "
        "(played on an event clock with --device-speeds and the link). [default: --devices]",
        show_default=False,
    ),
    tau: TauOpt = 1,
) -> None:
    """Run one algorithm in one process on a simulated clock and write metrics, samples and weights.

    Example: edgegan simulate --algo serial --dataset ring8 --devices 4 --partition shards:2
    Parallel without waiting for the slowest device: edgegan simulate --algo parallel --devices 4
    --quorum 3 --tau 2 --device-speeds 0.25,0.5,0.75,1
    """
    import torch

    from edgegan.costmodel import LinkProfile
    from edgegan.data import DATASETS, DatasetError, PartitionSpecError
    from edgegan.metrics import ClassifierMissingError
    from edgegan.runsetup import prepare
    from edgegan.simulate import SimConfig
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
            poison=poison or "",
            poisoned=poisoned,
            max_update_norm=max_update_norm,
            quorum=devices if quorum is None else quorum,
            tau=tau,
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
    config_file: ConfigOpt = None,
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


def broker_login(
    url: str, username: str | None, password_file: Path | None, tls_ca: Path | None, tls_cert: Path | None,
    tls_key: Path | None,
):  # fmt: skip
    """The broker address of --broker with its login and TLS files, checked; a bad flag is a usage error."""
    from edgegan.runtime.connection import parse_broker, with_login

    try:
        return with_login(parse_broker(url), username, password_file, tls_ca, tls_cert, tls_key)
    except ValueError as error:
        fail(str(error))


def setup_logging(level: str, log_format: str) -> None:
    try:
        logs.setup_logging(level, log_format)
    except ValueError as error:
        fail(str(error))


def runtime_setup(
    dataset: str, devices: int, partition: str, seed: int, out: Path | None, data_dir: Path | None,
    width: int | None, latent_dim: int | None, eval_every: int | None, name: str, aggregate: str = "mean",
):  # fmt: skip
    """The run's set-up, built as the simulator builds it, so that server, devices and simulator agree on
    data and model."""
    from edgegan.data import DATASETS
    from edgegan.runsetup import RunSetup

    if dataset not in DATASETS:
        fail(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    try:
        return RunSetup(
            dataset=dataset, devices=devices, partition=partition, seed=seed,
            out=out or Path("runs") / f"{name}-{dataset}-s{seed}",
            train=resolve_train(dataset, {"aggregate": aggregate}),
            width=resolve_run(dataset, "width", width),
            latent_dim=resolve_run(dataset, "latent_dim", latent_dim),
            data_dir=data_dir, eval_every=resolve_run(dataset, "eval_every", eval_every),
        )  # fmt: skip
    except ValueError as error:
        fail(str(error))


@app.command()
def server(
    config_file: ConfigOpt = None,
    run_name: RunNameOpt = "edgegan",
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    devices: int = typer.Option(4, help="Fleet size N (the default quorum)."),
    quorum: QuorumOpt = None,
    deadline_s: DeadlineOpt = 60.0,
    schedule: ScheduleOpt = "sync",
    tau: TauOpt = 1,
    staleness_weight: StalenessOpt = "constant",
    min_devices: MinDevicesOpt = 1,
    aggregators: AggregatorsOpt = 1,
    aggregate: AggregateOpt = "mean",
    max_update_norm: MaxUpdateNormOpt = 0.0,
    checkpoint_every: int = typer.Option(50, help="Rounds between checkpoints (and after each evaluation)."),
    resume: bool = typer.Option(
        False, help="Go on from the run directory's checkpoint.pt (start afresh if there is none)."
    ),
    allow_devices: str = typer.Option(
        "",
        help="Comma-separated device names whose updates count; others are rejected. [default: any]",
        show_default=False,
    ),
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
    log_format: LogFormatOpt = "text",
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Coordinate a run over MQTT: publish the global GAN, fold in the devices'
    discriminators, train the generator, and write the same outputs as `edgegan simulate`.

    Example: edgegan server --broker mqtt://127.0.0.1:1883 --run demo --devices 4 --rounds 200
    """
    import torch

    from edgegan.data import DatasetError
    from edgegan.metrics import ClassifierMissingError
    from edgegan.runtime.impairment import LinkImpairment
    from edgegan.runtime.server import serve
    from edgegan.runtime.server_settings import ServerSettings

    setup_logging(log_level, log_format)
    setup = runtime_setup(
        dataset, devices, partition, seed, out, data_dir, width, latent_dim, eval_every, "server", aggregate
    )
    address = broker_login(broker, username, password_file, tls_ca, tls_cert, tls_key)
    try:
        settings = ServerSettings(
            run=run_name, broker=address, rounds=resolve_run(dataset, "rounds", rounds),
            quorum=quorum or devices,
            deadline_s=deadline_s, min_devices=min_devices, codec=codec, seed=seed, schedule=schedule,
            tau=tau, staleness_weight=staleness_weight, aggregators=aggregators,
            max_update_norm=max_update_norm, checkpoint_every=checkpoint_every,
            allowed_devices=tuple(name.strip() for name in allow_devices.split(",") if name.strip()),
            impairment=LinkImpairment(
                drop_rate=drop_rate, delay_ms=delay_ms, jitter_ms=jitter_ms, bandwidth_kbps=bandwidth_kbps
            ),
        )  # fmt: skip
        if aggregators > 1 and aggregate != "mean":
            raise ValueError("--aggregators > 1 sums updates in shards: --aggregate mean only")
    except ValueError as error:
        fail(str(error))
    torch.set_num_threads(max(1, threads))
    try:
        summary = serve(settings, setup, resume=resume)
    except (DatasetError, ClassifierMissingError, ValueError) as error:
        fail(str(error))
    except (OSError, TimeoutError) as error:
        fail(str(error), code=1)
    report(
        f"done: {summary['rounds']} rounds in {summary['wall_time_s']:.1f} s; "
        f"initial {summary['initial']} -> final {summary['final']}; outputs in {setup.out}"
    )


@app.command()
def device(
    config_file: ConfigOpt = None,
    id: str | None = typer.Option(
        None,
        "--id",
        help="This device's name, its topic level. [default: --username, which it must equal]",
        show_default=False,
    ),
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
    status_interval: StatusIntervalOpt = 1.0,
    drop_rate: DropRateOpt = 0.0,
    delay_ms: DelayOpt = 0.0,
    jitter_ms: JitterOpt = 0.0,
    bandwidth_kbps: BandwidthOpt = 0.0,
    offline_every: OfflineEveryOpt = 0.0,
    offline_for: OfflineForOpt = 0.0,
    threads: ThreadsOpt = 1,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Join a run: train a local discriminator on this device's data against each global model.

    Example: edgegan device --id pi-0 --index 0 --of 4 --broker mqtt://192.168.1.10:1883 --run demo
    With a secured broker (broker/README.md): edgegan device --broker mqtts://broker.local --tls-ca ca.crt
    --username pi-0 --password-file pi-0.password --index 0 --of 4 --run demo
    """
    import torch

    from edgegan.data import DatasetError
    from edgegan.runtime.device import DeviceSettings, run_device
    from edgegan.runtime.impairment import LinkImpairment

    setup_logging(log_level, log_format)
    # The broker's ACL lets a login publish only on update/LOGIN and status/LOGIN (broker/acl).
    id = id or username
    if id is None:
        fail("--id is required (or --username, which it defaults to)")
    if username is not None and id != username:
        fail(f"--id {id!r} must equal --username {username!r}: the broker lets a device publish only on "
             "the topics named after its login")  # fmt: skip
    address = broker_login(broker, username, password_file, tls_ca, tls_cert, tls_key)
    setup = runtime_setup(dataset, of, partition, seed, None, data_dir, width, latent_dim, 1, "device")
    try:
        settings = DeviceSettings(
            run=run_name, device=id, broker=address, codec=codec, speed=device_speed,
            resend_s=resend_s, seed=seed, status_interval_s=status_interval, impairment=LinkImpairment(
                drop_rate=drop_rate, delay_ms=delay_ms, jitter_ms=jitter_ms, bandwidth_kbps=bandwidth_kbps,
                offline_every_s=offline_every, offline_for_s=offline_for,
            ),
        )  # fmt: skip
    except ValueError as error:
        fail(str(error))
    torch.set_num_threads(max(1, threads))
    try:
        counters = run_device(settings, setup, index)
    except (DatasetError, ValueError) as error:
        fail(str(error))
    except OSError as error:  # the broker refused the login, or its certificate
        fail(str(error), code=1)
    report(f"device {id} stopped: {counters}")


@app.command()
def aggregator(
    config_file: ConfigOpt = None,
    name: str = typer.Option(..., "--name", help="This aggregator's name (its topic level, MQTT client id)."),
    run_name: RunNameOpt = "edgegan",
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    dataset: DatasetOpt = "mnist",
    data_dir: DataDirOpt = None,
    width: WidthOpt = None,
    latent_dim: LatentOpt = None,
    threads: ThreadsOpt = 1,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Share a sync server's aggregation: sum the updates the broker hands this process (an MQTT 5 shared
    subscription) and report a partial sum per round. Start one per `edgegan server --aggregators K`.

    Example: edgegan aggregator --name agg-0 --broker mqtt://10.0.0.5:1883 --run demo --dataset mnist
    """
    import torch

    from edgegan.data import DATASETS, DatasetError
    from edgegan.runtime.aggregator import AggregatorSettings, run_aggregator

    setup_logging(log_level, log_format)
    if dataset not in DATASETS:
        fail(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    address = broker_login(broker, username, password_file, tls_ca, tls_cert, tls_key)
    try:
        settings = AggregatorSettings(run=run_name, name=name, broker=address)
    except ValueError as error:
        fail(str(error))
    torch.set_num_threads(max(1, threads))
    try:
        counters = run_aggregator(
            settings, dataset, data_dir, resolve_run(dataset, "width", width),
            resolve_run(dataset, "latent_dim", latent_dim),
        )  # fmt: skip
    except DatasetError as error:
        fail(str(error))
    except (OSError, RuntimeError) as error:
        fail(str(error), code=1)
    report(f"aggregator {name} stopped: {counters.flat()}")


broker_app = typer.Typer(
    help="The embedded MQTT broker, and the logins of a broker's devices and servers.",
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(broker_app, name="broker")

HostOpt = Annotated[
    str,
    typer.Option("--host", help="Interface to listen on; beyond loopback needs --passwd, --acl and TLS."),
]
PortOpt = Annotated[int, typer.Option("--port", help="TCP port.")]
PasswdOpt = Annotated[
    Path | None,
    typer.Option(
        "--passwd", help="Mosquitto password file to check logins against. [default: anonymous, loopback]",
        show_default=False,
    ),
]  # fmt: skip
AclOpt = Annotated[
    Path | None,
    typer.Option("--acl", help="Mosquitto ACL file (broker/acl) that says who may publish and read what."),
]
BrokerCertOpt = Annotated[
    Path | None, typer.Option("--tls-cert", help="Serve TLS with this certificate (edgegan certs).")
]
BrokerKeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="Private key of --tls-cert.")]
BrokerCaOpt = Annotated[
    Path | None, typer.Option("--tls-ca", help="Verify client certificates signed by this CA, if sent.")
]
PasswdFileOpt = Annotated[
    Path, typer.Option("--passwd", help="The broker's password file (Mosquitto's password_file).")
]
AclFileOpt = Annotated[Path, typer.Option("--acl", help="The broker's ACL file (Mosquitto's acl_file).")]
SecretsDirOpt = Annotated[
    Path, typer.Option("--secrets-dir", help="Where NAME.password (mode 0600) is written.")
]


@broker_app.callback(invoke_without_command=True)
def broker(
    context: typer.Context,
    config_file: ConfigOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 1883,
    passwd: PasswdOpt = None,
    acl: AclOpt = None,
    tls_cert: BrokerCertOpt = None,
    tls_key: BrokerKeyOpt = None,
    tls_ca: BrokerCaOpt = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run the embedded pure-Python MQTT broker (amqtt) for runs without Mosquitto (as `broker start`), or
    manage a broker's logins: add-device, add-server, remove.

    Example: edgegan broker --port 1884
    """
    if context.invoked_subcommand is None:
        serve_embedded_broker(host, port, passwd, acl, tls_cert, tls_key, tls_ca, log_level, log_format)


@broker_app.command("start")
def broker_start(
    config_file: ConfigOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 1883,
    passwd: PasswdOpt = None,
    acl: AclOpt = None,
    tls_cert: BrokerCertOpt = None,
    tls_key: BrokerKeyOpt = None,
    tls_ca: BrokerCaOpt = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run the embedded broker: anonymous on loopback, or with --passwd and --acl the same logins and topic
    permissions as Mosquitto with broker/mosquitto.conf.

    Example: edgegan broker start --host 0.0.0.0 --port 8883 --passwd broker/passwd --acl broker/acl
    --tls-cert broker/certs/server.crt --tls-key broker/certs/server.key
    """
    serve_embedded_broker(host, port, passwd, acl, tls_cert, tls_key, tls_ca, log_level, log_format)


def serve_embedded_broker(
    host: str, port: int, passwd: Path | None, acl: Path | None, tls_cert: Path | None,
    tls_key: Path | None, tls_ca: Path | None, log_level: str, log_format: str,
) -> None:  # fmt: skip
    import asyncio
    import signal

    from edgegan.runtime.broker import BrokerSecurity, check_security, serve_broker

    setup_logging(log_level, log_format)
    security = BrokerSecurity(
        password_file=passwd, acl_file=acl, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca
    )
    try:
        check_security(host, security)
    except ValueError as error:
        fail(str(error))

    async def serve() -> None:
        stopped = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
        await serve_broker(host, port, stopped, security=security)

    try:
        asyncio.run(serve())
    except OSError as error:
        fail(f"cannot listen on {host}:{port}: {error.strerror}")


def add_identity(role: str, name: str, passwd: Path, acl: Path, secrets_dir: Path) -> None:
    from edgegan import topics
    from edgegan.runtime import credentials

    try:
        topics.check_name(role, name)
        servers = credentials.server_identities(acl)
        if role == "device" and name in servers:
            fail(f"{name} is a server identity in {acl}; a device needs a name of its own")
        secret = credentials.new_secret()
        secret_path = secrets_dir / f"{name}.password"
        credentials.write_secret(secret_path, secret)
        replaced = credentials.set_password(passwd, name, secret)
        acl_changed = credentials.add_server(acl, name) if role == "server" else False
    except (ValueError, OSError) as error:
        fail(str(error))
    console.print(
        f"{'new password for' if replaced else 'added'} {role} {name!r} in {passwd}"
        + (f"; gave it the server's topics in {acl}" if acl_changed else ""),
        highlight=False,
    )
    console.print(
        f"its password is in {secret_path} (mode 0600): copy it to the {role}, then", highlight=False
    )
    flag = "" if role == "server" else " (its --id defaults to the login)"
    console.print(f"  edgegan {role} --username {name} --password-file {secret_path.name} ...{flag}",
                  highlight=False)  # fmt: skip
    console.print(
        "reload the broker so that it reads the change: kill -HUP <mosquitto pid> "
        "(Docker: docker kill --signal=HUP CONTAINER)",
        highlight=False,
    )


@broker_app.command("add-device")
def broker_add_device(
    config_file: ConfigOpt = None,
    name: str = typer.Argument(..., help="The device's name: its MQTT login and its --id."),
    passwd: PasswdFileOpt = Path("broker/passwd"),
    acl: AclFileOpt = Path("broker/acl"),
    secrets_dir: SecretsDirOpt = Path("secrets"),
) -> None:
    """Give a device a login (a new random password; again for an existing device: rotate it). The ACL's
    patterns already let every login publish on its own update and status topics.

    Example: edgegan broker add-device pi-0
    """
    add_identity("device", name, passwd, acl, secrets_dir)


@broker_app.command("add-server")
def broker_add_server(
    config_file: ConfigOpt = None,
    name: str = typer.Argument("server", help="The server's MQTT login."),
    passwd: PasswdFileOpt = Path("broker/passwd"),
    acl: AclFileOpt = Path("broker/acl"),
    secrets_dir: SecretsDirOpt = Path("secrets"),
) -> None:
    """Give a server (or the live view of `edgegan run`, or an aggregator) a login, and the server's topics
    in the ACL; again for an existing one: rotate its password.

    Example: edgegan broker add-server server
    """
    add_identity("server", name, passwd, acl, secrets_dir)


@broker_app.command("remove")
def broker_remove(
    config_file: ConfigOpt = None,
    name: str = typer.Argument(..., help="The login to remove."),
    passwd: PasswdFileOpt = Path("broker/passwd"),
) -> None:
    """Remove a login from the password file (reload the broker afterwards).

    Example: edgegan broker remove pi-0
    """
    from edgegan.runtime import credentials

    try:
        removed = credentials.remove_user(passwd, name)
    except OSError as error:
        fail(f"cannot rewrite {passwd}: {error.strerror}")
    if not removed:
        fail(f"{name} has no login in {passwd}")
    console.print(f"removed {name} from {passwd}; reload the broker (kill -HUP) to apply it", highlight=False)


@app.command()
def certs(
    config_file: ConfigOpt = None,
    out: Path = typer.Option(Path("broker/certs"), help="Folder for ca.crt, server.crt/.key and clients'."),
    hosts: str = typer.Option(
        "localhost,127.0.0.1,::1",
        help="Comma-separated names and addresses that devices use to reach the broker (the server "
        "certificate is valid for exactly these).",
    ),
    client: list[str] = typer.Option(
        [], "--client", help="Also issue NAME.crt/NAME.key with common name NAME (repeatable)."
    ),
) -> None:
    """Make a development CA, a broker certificate and client certificates, so that TLS works out of the box.
    An existing ca.crt/ca.key in --out is reused. Key files are written with mode 0600.

    Example: edgegan certs --out broker/certs --hosts broker.local,192.168.1.10 --client pi-0
    """
    from edgegan.runtime.certs import make_development_pki

    try:
        issued = make_development_pki(
            out, [host.strip() for host in hosts.split(",") if host.strip()], client
        )
    except (ValueError, OSError) as error:
        fail(str(error))
    for item in issued:
        console.print(f"{item.name}: {item.certificate}  (key {item.key}, mode 0600)", highlight=False)
    console.print(
        "the broker needs ca.crt, server.crt and server.key (broker/mosquitto.conf); clients need ca.crt "
        "(--tls-ca). ca.key signs new certificates: keep it off the broker and the devices.",
        highlight=False,
    )


@app.command()
def run(
    config_file: ConfigOpt = None,
    devices: int = typer.Option(4, help="Number of device processes."),
    broker: str | None = typer.Option(
        None,
        help="Use this broker (mqtt://HOST:PORT or mqtts://HOST:PORT). [default: start the embedded broker]",
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
    status_interval: StatusIntervalOpt = 1.0,
    aggregators: AggregatorsOpt = 1,
    aggregate: AggregateOpt = "mean",
    max_update_norm: MaxUpdateNormOpt = 0.0,
    username: Annotated[
        str | None,
        typer.Option(
            "--username", help="--broker: the server's MQTT login (also the live view's).", show_default=False
        ),
    ] = None,
    password_file: PasswordFileOpt = None,
    device_secrets: Path | None = typer.Option(
        None,
        help="--broker: folder of device-I.password files; device I logs in as device-I "
        "(edgegan broker add-device device-I).",
        show_default=False,
    ),
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """The main job: broker, server and N devices as separate processes talking only over MQTT, with a live
    view; writes the same outputs as `edgegan simulate` plus per-device counters.

    Example: edgegan run --devices 4 --dataset mnist
    """
    import asyncio

    from edgegan.runtime.connection import parse_broker
    from edgegan.runtime.impairment import LinkImpairment
    from edgegan.runtime.launcher import FleetPlan, run_fleet

    setup_logging(log_level, log_format)
    config = runtime_setup(
        dataset, devices, partition, seed, out, data_dir, width, latent_dim, eval_every, "run", aggregate
    )
    rounds = resolve_run(dataset, "rounds", rounds)
    speeds = parse_speeds(device_speeds) or (1.0,) * devices
    if len(speeds) != devices or not all(0 < speed <= 1 for speed in speeds):
        fail(f"--device-speeds needs {devices} factors in (0, 1], got {device_speeds!r}")
    try:
        from edgegan import topics
        from edgegan.runtime.device import DeviceSettings
        from edgegan.runtime.server_settings import ServerSettings

        ServerSettings(
            run=run_name, broker=parse_broker(broker or "mqtt://127.0.0.1:1883"), rounds=rounds,
            quorum=quorum or devices, deadline_s=deadline_s, min_devices=min_devices, codec=codec,
            schedule=schedule, tau=tau, staleness_weight=staleness_weight, aggregators=aggregators,
            max_update_norm=max_update_norm,
        )  # fmt: skip
        topics.check_name("run", run_name)
        DeviceSettings(
            run=run_name, device="device-0", broker=parse_broker(broker or "mqtt://127.0.0.1:1883"),
            codec=codec, resend_s=resend_s, status_interval_s=status_interval,
        )  # fmt: skip
        if aggregators > 1 and aggregate != "mean":
            raise ValueError("--aggregators > 1 sums updates in shards: --aggregate mean only")
    except ValueError as error:
        fail(str(error))
    logins = {"--username": username, "--password-file": password_file, "--device-secrets": device_secrets,
              "--tls-ca": tls_ca, "--tls-cert": tls_cert, "--tls-key": tls_key}  # fmt: skip
    given = [flag for flag, value in logins.items() if value is not None]
    if given and broker is None:
        fail(f"{', '.join(given)} need --broker: the embedded broker is anonymous and loopback only")
    address = broker_login(broker, username, password_file, tls_ca, tls_cert, tls_key) if broker else None
    if username is not None and device_secrets is None:
        fail("with --username every device needs a login too: --device-secrets DIR holding device-0.password "
             "... (edgegan broker add-device device-0 --secrets-dir DIR)")  # fmt: skip
    if (username is not None or device_secrets is not None) and aggregators > 1:
        fail("aggregator processes do not take a login yet; use --aggregators 1 with a secured broker")
    server_login, device_logins = fleet_logins(devices, logins)
    if aggregators > 1 and address is None:
        fail(
            f"--aggregators {aggregators} needs MQTT 5 shared subscriptions, which the embedded broker "
            "(amqtt) lacks; run Mosquitto >= 2.0 (mosquitto -c broker/mosquitto-dev.conf) and pass "
            "--broker mqtt://127.0.0.1:1883"
        )
    shared = [
        "--dataset", dataset, "--partition", partition, "--seed", str(seed), "--codec", codec,
        "--width", str(config.width), "--latent-dim", str(config.latent_dim),
    ]  # fmt: skip
    if data_dir is not None:
        shared += ["--data-dir", str(data_dir)]
    server_args = [*shared, "--devices", str(devices), "--rounds", str(rounds),
                   "--eval-every", str(config.eval_every), "--quorum", str(quorum or devices),
                   "--deadline-s", str(deadline_s), "--min-devices", str(min_devices),
                   "--schedule", schedule, "--tau", str(tau),
                   "--staleness-weight", staleness_weight, "--aggregators", str(aggregators),
                   "--aggregate", aggregate, "--max-update-norm", str(max_update_norm),
                   "--allow-devices", ",".join(f"device-{index}" for index in range(devices)),
                   *server_login]  # fmt: skip
    model = ["--dataset", dataset, "--width", str(config.width), "--latent-dim", str(config.latent_dim)]
    model += ["--data-dir", str(data_dir)] if data_dir is not None else []
    aggregator_args = [(*model, "--name", f"aggregator-{index}") for index in range(aggregators)]
    try:
        impairment = LinkImpairment(
            drop_rate=drop_rate, delay_ms=delay_ms, jitter_ms=jitter_ms, bandwidth_kbps=bandwidth_kbps,
                offline_every_s=offline_every, offline_for_s=offline_for,
        )
        impaired = parse_indices(impair_devices, devices) if impair_devices else list(range(devices))
    except ValueError as error:
        fail(str(error))
    device_args = [
        (*shared, "--id", f"device-{index}", "--index", str(index), "--of", str(devices),
         "--device-speed", str(speeds[index]), "--resend-s", str(resend_s),
         "--status-interval", str(status_interval),
         *(impairment.flags() if index in impaired else []), *device_logins[index])
        for index in range(devices)
    ]  # fmt: skip
    plan = FleetPlan(
        run_name, devices, rounds, config.out, address, tuple(server_args), tuple(device_args),
        tuple(aggregator_args) if aggregators > 1 else (),
        log_flags=("--log-level", log_level, "--log-format", log_format),
    )  # fmt: skip
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


def fleet_logins(devices: int, logins: dict[str, Path | str | None]) -> tuple[list[str], list[list[str]]]:
    """The login and TLS flags of `edgegan run`'s server and of each device: device I logs in as device-I
    with the password in --device-secrets/device-I.password; all share the TLS files."""
    tls_files = [item for flag in ("--tls-ca", "--tls-cert", "--tls-key") if logins[flag] is not None
                 for item in (flag, str(logins[flag]))]  # fmt: skip
    server = [item for flag in ("--username", "--password-file") if logins[flag] is not None
              for item in (flag, str(logins[flag]))]  # fmt: skip
    secrets_dir = logins["--device-secrets"]
    device_logins = []
    for index in range(devices):
        login = []
        if secrets_dir is not None:
            secret = Path(secrets_dir) / f"device-{index}.password"
            if not secret.is_file():
                fail(f"--device-secrets has no {secret.name}: edgegan broker add-device device-{index} "
                     f"--secrets-dir {secrets_dir}")  # fmt: skip
            login = ["--username", f"device-{index}", "--password-file", str(secret)]
        device_logins.append([*login, *tls_files])
    return [*server, *tls_files], device_logins


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
    """A rich Live view of a FleetView (edgegan/runtime/fleetview.py), redrawn on every update."""

    def __init__(self, target: Console = console, rows: int | None = None) -> None:
        from rich.live import Live

        from edgegan.runtime.fleetview import DEFAULT_ROWS

        self.live = Live(console=target, refresh_per_second=4, transient=False)
        self.rows = rows or DEFAULT_ROWS
        self.started = False

    def update(self, view) -> None:
        import time

        from edgegan.runtime.fleetview import render_fleet

        if not self.started:
            self.live.start()
            self.started = True
        self.live.update(render_fleet(view, time.time(), self.rows))

    def stop(self) -> None:
        if self.started:
            self.live.stop()
            self.started = False


@app.command()
def status(
    config_file: ConfigOpt = None,
    run_name: RunNameOpt = "edgegan",
    broker: BrokerOpt = "mqtt://127.0.0.1:1883",
    once: bool = typer.Option(False, "--once", help="Print one snapshot of the fleet and exit (scripts)."),
    timeout_s: float = typer.Option(
        10.0,
        "--timeout",
        help="Seconds to wait for the run's first status or metrics message; with --once, for the snapshot.",
    ),
    rows: int = typer.Option(50, "--rows", help="Devices listed at most (the caption counts them all)."),
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
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
        screen.print(render_fleet(view, time.time(), rows))


config_app = typer.Typer(
    help="The configuration a command would run with.", add_completion=False, rich_markup_mode=None
)
app.add_typer(config_app, name="config")


@config_app.command(
    "show",
    # Everything after COMMAND is COMMAND's, --config and --help included.
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "allow_interspersed_args": False,
    },
)
def config_show(
    ctx: typer.Context,
    command: str = typer.Argument(
        ...,
        metavar="COMMAND [FLAGS]...",
        help="The command, then its flags as you would give them: device --config pi-0.toml --index 1.",
    ),
) -> None:
    """Print every option of COMMAND with the value it would run with and where that value comes from:
    command line, environment, config file, or default. Passwords are never shown.

    Example: edgegan config show device --config /etc/edgegan/pi-0.toml
    """
    from rich.table import Table

    from edgegan.configfile import command_path, effective_settings, parse_command

    try:
        parsed = parse_command(ctx.find_root(), command, ctx.args)
    except ValueError as error:
        fail(str(error))
    name = command_path(parsed).replace(".", " ")
    table = Table(title=f"edgegan {name}", title_justify="left")
    for column in ("option", "value", "source"):
        table.add_column(column)
    for flag, value, source in effective_settings(parsed):
        table.add_row(flag, "—" if value is None else str(value), source)
    Console(width=max(120, Console().width)).print(table)


@app.command("link-proxy")
def link_proxy(
    config_file: ConfigOpt = None,
    listen: str = typer.Option("mqtt://127.0.0.1:1884", help="Where devices connect: mqtt://HOST:PORT."),
    target: str = typer.Option("mqtt://127.0.0.1:1883", help="The real broker: mqtt://HOST:PORT."),
    delay_ms: float = typer.Option(0.0, help="Delay added to every chunk of bytes, each way."),
    bandwidth_kbps: float = typer.Option(0.0, help="Throughput cap each way (0 = none)."),
    reset_every: float = typer.Option(
        0.0, help="Abort each connection after about this many seconds (0 = never)."
    ),
    seed: int = typer.Option(0, help="Seed of the reset timing."),
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
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
            listen=parse_broker(listen), target=parse_broker(target), delay_ms=delay_ms,
            bandwidth_kbps=bandwidth_kbps, reset_every_s=reset_every, seed=seed,
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
    report(f"link proxy stopped: {counters}")


@app.command()
def plot(
    config_file: ConfigOpt = None,
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
    config_file: ConfigOpt = None,
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
    config_file: ConfigOpt = None,
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
    from edgegan.runsetup import QualityProbe

    generator, spec, dataset_name = load_checkpoint(checkpoint)
    try:
        dataset = load_dataset(dataset_name, data_dir)
        probe = QualityProbe(
            dataset=dataset, latent_dim=spec.latent_dim, samples=samples, seed=seed, data_dir=data_dir
        )
    except (DatasetError, ClassifierMissingError) as error:
        fail(str(error))
    quality, _ = probe.measure(generator)
    print(json.dumps({"dataset": dataset_name, "samples": samples, **quality}))
