"""Options several commands take, each declared once: its flag, its help and its default. Where a settings
dataclass owns the default, it is read from there (`default`), not restated.

A command uses one as `tau: int = opt.TAU`; typer copies the option for every command it appears in.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import typer

from edgegan.algorithms.config import TrainConfig
from edgegan.cli.common import fail
from edgegan.config import default_help
from edgegan.runsetup import RunSetup
from edgegan.runtime.connection import FIRST_CONNECT_S
from edgegan.runtime.device import DeviceSettings
from edgegan.runtime.impairment import LinkImpairment
from edgegan.runtime.server_settings import ServerSettings
from edgegan.torchdevice import DEFAULT_TORCH_DEVICE


def default(settings: type, name: str) -> Any:
    """The default that the dataclass `settings` gives its field `name`."""
    field = next(field for field in dataclasses.fields(settings) if field.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise ValueError(f"{settings.__name__}.{name} has no default")


def recipe_option(name: str, text: str):
    """A training-recipe flag: left unset, it takes the data shape's documented default."""
    return typer.Option(None, help=f"{text} {default_help(name, True)}", show_default=False)


# The training recipe, for `simulate`, `server` and `run` alike: each left unset takes the data shape's
# documented default (edgegan/config.py). The server publishes the recipe with the run's configuration,
# and devices train with it.
LOSS = recipe_option("loss", "ns | hinge | wgan-gp.")
GP_WEIGHT = recipe_option("gp_weight", "WGAN-GP lambda.")
BATCH_SIZE = recipe_option("batch_size", "Real examples per device per D step.")
LOCAL_STEPS = recipe_option("local_steps", "D steps per device per round (FedGAN: GAN steps, its K).")
DEVICE_OPT = recipe_option("device_opt", "sgd | adam, the devices' optimiser.")
DEVICE_LR = recipe_option("device_lr", "Device learning rate.")
SERVER_OPT = recipe_option("server_opt", "none | sgd | adam on the mean device delta (FedOpt).")
SERVER_LR = recipe_option("server_lr", "Server optimiser rate.")
G_LR = recipe_option("g_lr", "Generator Adam rate.")
G_BETA1 = recipe_option("g_beta1", "Generator Adam beta1 (momentum).")
G_BATCH_SIZE = recipe_option("g_batch_size", "Generator batch.")
G_STEPS = recipe_option("g_steps", "G steps per G update.")
CRITIC_RATIO = recipe_option("critic_ratio", "Discriminator rounds per generator update.")
G_EMA = recipe_option("g_ema", "Decay per round of the generator average evaluated and saved; 0: off.")
D_WIDTH = recipe_option("d_width", "The discriminator's width; 0: --width.")
D_NORM = recipe_option("d_norm", "none | spectral: the discriminator's normalisation.")
# DP-SGD on the devices' discriminator steps (docs/privacy.md).
DP_CLIP = recipe_option("dp_clip", "DP-SGD: clip each real example's D gradient to this norm; 0: DP off.")
DP_NOISE = recipe_option("dp_noise", "DP-SGD: Gaussian noise std on the clipped sum, in units of --dp-clip.")
DP_DELTA = recipe_option("dp_delta", "DP-SGD: the delta each device's epsilon is stated at.")
DP_EPSILON = recipe_option(
    "dp_epsilon", "DP-SGD: each device's budget; past it a device stops contributing. 0: no budget."
)
# Central (user-level) DP at the server's fold (docs/privacy.md).
CENTRAL_DP_CLIP = recipe_option(
    "central_dp_clip", "Central DP: clip each device's change to the global D to this norm; 0: off."
)
CENTRAL_DP_NOISE = recipe_option(
    "central_dp_noise", "Central DP: Gaussian noise std on the clipped sum, in units of --central-dp-clip."
)


def apply_preset(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """`--preset NAME`: its values become the command's defaults; the config file and flags still win."""
    from edgegan.config import preset_values

    if value is None or ctx.resilient_parsing:
        return value
    try:
        values = preset_values(value)
    except ValueError as error:
        fail(str(error))
    ctx.default_map = {**values, **(ctx.default_map or {})}
    return value


PRESET = typer.Option(
    None, "--preset", is_eager=True, callback=apply_preset, show_default=False,
    help="quality: a wider, spectrally normalised discriminator and 3,500 rounds (images; about 2.5x the "
    "default run's time, docs/algorithms.md). Flags and --config win over it.",
)  # fmt: skip


def load_config_file(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """`--config FILE`: the file's values become the command's defaults (edgegan/configfile.py)."""
    from edgegan.configfile import ConfigFileError, apply_config

    try:
        return apply_config(ctx, value)
    except ConfigFileError as error:
        fail(str(error))


LOCAL_BROKER = "mqtt://127.0.0.1:1883"

CONFIG = typer.Option(
    None, "--config",
    help="TOML file of this command's flag values (keys: the flags' names, in a [COMMAND] table or at "
    "the top level); flags given here win. `edgegan config show COMMAND --config FILE` shows the result.",
    is_eager=True, callback=load_config_file, show_default=False,
)  # fmt: skip

# The run's set-up (edgegan/runsetup.py): left unset, the data shape's defaults (edgegan/config.py).
DATASET = typer.Option("mnist", "--dataset", help="mnist | fashion-mnist | cifar10 | ring8 | grid25.")
PARTITION = typer.Option(
    "iid", "--partition", help="iid | dirichlet:ALPHA | shards:K (K classes per device)."
)
ROUNDS = typer.Option(None, "--rounds", help=f"Training rounds. {default_help('rounds')}", show_default=False)
SEED = typer.Option(0, "--seed", help="Seeds data split, initial weights and every random draw.")
DATA_DIR = typer.Option(
    None, "--data-dir", help="Data set folder in torchvision's layout. [default: the shipped MNIST]",
    show_default=False,
)  # fmt: skip
WIDTH = typer.Option(None, "--width", help=f"Model width. {default_help('width')}", show_default=False)
LATENT_DIM = typer.Option(
    None, "--latent-dim", help=f"Noise size. {default_help('latent_dim')}", show_default=False
)
EVAL_EVERY = typer.Option(
    None, "--eval-every", help=f"Rounds between evaluations. {default_help('eval_every')}", show_default=False
)

# The broker and this process's login to it (edgegan/runtime/connection.py).
BROKER = typer.Option(
    LOCAL_BROKER, "--broker", help="MQTT broker: mqtt://HOST:PORT, or mqtts://HOST:PORT (TLS, 8883)."
)
USERNAME = typer.Option(
    None, "--username", help="MQTT login name. [default: none, anonymous]", show_default=False
)
PASSWORD_FILE = typer.Option(
    None, "--password-file",
    help="File whose first line is the MQTT password (edgegan broker add-device writes one). "
    "[default: $EDGEGAN_PASSWORD]",
    show_default=False, envvar="EDGEGAN_PASSWORD_FILE",
)  # fmt: skip
SERVER_KEY = typer.Option(
    None, "--server-key",
    help="The server's Ed25519 public key: 64 hex digits, or a file of them or a PEM key (edgegan broker "
    "add-device --server-key writes NAME.server-key). Only models it signed are trained on. [default: the "
    "key the run's configuration names, trusted on first use]",
    show_default=False,
)  # fmt: skip
UPDATE_KEY = typer.Option(
    None, "--update-key",
    help="This device's Ed25519 private key (edgegan broker add-device writes NAME.update-key): it signs "
    "every update, for a server that checks them with --device-keys. [default: updates unsigned]",
    show_default=False,
)  # fmt: skip
DEVICE_KEYS = typer.Option(
    None, "--device-keys",
    help="A file of 'DEVICE PUBLIC-KEY-HEX' lines (edgegan broker add-device writes SECRETS/device-keys): "
    "an update counts only when its device's key signed it. [default: updates need no signature]",
    show_default=False,
)  # fmt: skip
SIGNING_KEY = typer.Option(
    None, "--signing-key",
    help="The server's Ed25519 private key (PEM or 32 raw bytes) that signs its models; made if missing. "
    "[default: RUN_DIR/server-signing.key]",
    show_default=False,
)  # fmt: skip
TLS_CA = typer.Option(
    None, "--tls-ca", help="mqtts: CA certificate that signed the broker's. [default: the system's CAs]",
    show_default=False,
)  # fmt: skip
TLS_CERT = typer.Option(None, "--tls-cert", help="mqtts: client certificate, for brokers that ask for one.")
TLS_KEY = typer.Option(None, "--tls-key", help="mqtts: private key of --tls-cert.")
CONNECT_TIMEOUT_S = typer.Option(
    FIRST_CONNECT_S, "--connect-timeout-s",
    help="Seconds the first connection to the broker may take, retries included; then the process says "
    "why (refused, TLS, login, name) and exits 1. Once connected, a lost broker is retried patiently.",
)  # fmt: skip
RUN_NAME = typer.Option(
    "edgegan", "--run", help="Run name: the topic prefix edgegan/RUN/ all processes share."
)

# The server's rounds (ServerSettings, edgegan/runtime/server_settings.py).
QUORUM = typer.Option(
    None, "--quorum", help="Updates that close a round. [default: --devices]", show_default=False
)
DEADLINE_S = typer.Option(60.0, "--deadline-s", help="Seconds a round waits for its quorum.")
MIN_DEVICES = typer.Option(1, "--min-devices", help="Updates needed to close a round at its deadline.")
SCHEDULE = typer.Option(
    default(ServerSettings, "schedule"), "--schedule",
    help="sync (wait for the quorum, then update G) | parallel (update G while devices train).",
)  # fmt: skip
TAU = typer.Option(
    default(ServerSettings, "tau"), "--tau",
    help="parallel: fold in updates at most this many rounds stale (the paper's schedule: 1).",
)  # fmt: skip
STALENESS_WEIGHT = typer.Option(
    default(ServerSettings, "staleness_weight"), "--staleness-weight",
    help="parallel: discount of stale updates, constant | inverse | exp:LAMBDA.",
)  # fmt: skip
AGGREGATORS = typer.Option(
    default(ServerSettings, "aggregators"), "--aggregators",
    help="sync: aggregator processes that share the updates through an MQTT 5 shared subscription "
    "(K > 1 needs Mosquitto or another MQTT 5 broker; docs/scaling.md).",
)  # fmt: skip
AGGREGATE = typer.Option(
    default(TrainConfig, "aggregate"), "--aggregate",
    help="How the server combines the devices' discriminators: mean (weighted by samples), median, "
    "trimmed:FRACTION (drop that share of the largest and smallest per coordinate) or clip:NORM (shorten "
    "each change to NORM first). median and trimmed resist a poisoned device; docs/reliability.md.",
)  # fmt: skip
MAX_UPDATE_NORM = typer.Option(
    default(ServerSettings, "max_update_norm"), "--max-update-norm",
    help="Reject an update whose change from the global discriminator is longer (L2) than this: auto "
    "(twice the global discriminator's own length), a number, or 0 for no limit. serial and parallel "
    "only (auto does not apply to the others).",
)  # fmt: skip
MAX_REJECTED_FRACTION = typer.Option(
    default(ServerSettings, "max_rejected_fraction"), "--max-rejected-fraction",
    help="Stop the run (exit code 3, checkpoint and summary saved) once more than this share of its "
    "updates were rejected, after 20 rounds and 4 updates per device; 1: never. A diverged run (non-finite "
    "weights) stops the same way.",
)  # fmt: skip
QUALITY_FROM = typer.Option(
    default(ServerSettings, "quality_from"), "--quality-from",
    help="What fid is measured against: data (the server's copy of the data set), devices (feature "
    "statistics each device sends of its own images: docs/protocol.md) or reference (a public set of "
    "images, --reference-set). With devices or reference the server reads no training data.",
)  # fmt: skip
REFERENCE_SET = typer.Option(
    None, "--reference-set",
    help="A public set of images to measure fid against (a folder of images or a .npy/.pt file, read as a "
    "device reads --data); implies --quality-from reference.", show_default=False,
)  # fmt: skip
FEATURES = typer.Option(
    default(RunSetup, "features"), "--features",
    help="The feature extractor fid is measured in: classifier (the data set's, with the classes score), "
    "torchscript:PATH (your TorchScript module of [-1, 1] images to (N, d) features; a device gives its "
    "own copy, checked by sha256) or inception (needs torch-fidelity and its weights). docs/protocol.md.",
)  # fmt: skip
CODEC = typer.Option(
    default(ServerSettings, "codec"),
    "--codec",
    help="Message codec: fp32 | fp16 | int8, each optionally +zstd; or topk+int8+zstd: int8+zstd, with "
    "each update only the largest 10% of its change and the rest fed back on the device (serial, parallel).",
)
KEYFRAME_EVERY = typer.Option(
    default(ServerSettings, "keyframe_every"), "--keyframe-every",
    help="With a lossy codec the global model goes down as deltas with error feedback; every this many "
    "rounds it goes whole and exact (a keyframe), as for a device that missed one (docs/protocol.md).",
)  # fmt: skip
FAKES = typer.Option(
    None, "--fakes", show_default=False,
    help="Who draws a device's fake batches from the global G: device (it is sent G + D) | server (it is "
    "sent D and its own fake batches, in the codec's precision, and never holds G). Same numbers either "
    "way (docs/algorithms.md); serial/parallel (sync/parallel) only. "
    f"{default_help('fakes')}; device for the baselines",
)  # fmt: skip

# The emulated link (LinkImpairment, edgegan/runtime/impairment.py).
DROP_RATE = typer.Option(
    default(LinkImpairment, "drop_rate"),
    "--drop-rate",
    help="Emulated link: probability that a message is lost.",
)
DELAY_MS = typer.Option(
    default(LinkImpairment, "delay_ms"), "--delay-ms", help="Emulated link: delay added to every message."
)
JITTER_MS = typer.Option(
    default(LinkImpairment, "jitter_ms"), "--jitter-ms",
    help="Emulated link: uniform jitter of +/- this around the delay.",
)  # fmt: skip
BANDWIDTH_KBPS = typer.Option(
    default(LinkImpairment, "bandwidth_kbps"), "--bandwidth-kbps",
    help="Emulated link: throughput cap (0 = none).",
)  # fmt: skip
OFFLINE_EVERY = typer.Option(
    default(LinkImpairment, "offline_every_s"), "--offline-every",
    help="Disconnect from the broker every this many seconds (0 = never).",
)  # fmt: skip
OFFLINE_FOR = typer.Option(
    default(LinkImpairment, "offline_for_s"), "--offline-for", help="Seconds each disconnection lasts."
)

# A device's behaviour (DeviceSettings, edgegan/runtime/device.py).
RESEND_S = typer.Option(
    default(DeviceSettings, "resend_s"), "--resend-s",
    help="Devices resend their last update after this long without a newer model.",
)  # fmt: skip
STATUS_INTERVAL = typer.Option(
    default(DeviceSettings, "status_interval_s"), "--status-interval",
    help="Seconds between a device's status messages while it trains (0: after every update).",
)  # fmt: skip

# The process itself.
THREADS = typer.Option(1, "--threads", help="Torch CPU threads.")
TORCH_DEVICE = typer.Option(
    DEFAULT_TORCH_DEVICE, "--torch-device",
    help="Where the networks train: cpu (the tested default), cuda, or auto (cuda where torch sees one). "
    "Messages, aggregation and random draws stay on CPU; a CUDA run is not bit-identical to a CPU run.",
)  # fmt: skip
LOG_LEVEL = typer.Option(
    "info", "--log-level", help="debug | info | warning | error.", envvar="EDGEGAN_LOG_LEVEL"
)
LOG_FORMAT = typer.Option(
    "text", "--log-format", help="text (for people) | json (one object per line, for log collectors).",
    envvar="EDGEGAN_LOG_FORMAT",
)  # fmt: skip


def from_run(option: typer.models.OptionInfo) -> typer.models.OptionInfo:
    """`option` for a device, which takes the run's value when the flag is not given (a given value must
    agree with the run: runtime/runconfig.py)."""
    device_option = copy.copy(option)
    device_option.default = None
    device_option.show_default = False
    device_option.help = f"{option.help} [default: the run's, from the server]"
    return device_option
