"""The run's configuration, as the server publishes it (retained, on `topics.run_config(run)`) and every
device joins it: the data set and its split, the model, the training recipe, the codec, the schedule and
the seed. A device brings its identity, its login and its data; whatever else it was told on its command
line must agree with this, and a device that cannot join says which field stands in the way.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from edgegan import wire
from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.proposed import FAKES

RUN_CONFIG_VERSION = 1
# What fid is measured against: the server's copy of the data set, the devices' feature statistics, or a
# public reference set given to the server. With the last two the server holds no training data.
QUALITY_SOURCES = ("data", "devices", "reference")
# The feature extractor fid is measured in (edgegan/metrics/extractors.py names each the same way): a
# TorchScript file goes by its sha256, not its path, since every device keeps its own copy.
RUN_FEATURES = re.compile(r"classifier|inception|torchscript:[0-9a-f]{64}")
SERVER_KEY = re.compile(r"(?:[0-9a-f]{64})?")  # hex of a 32-byte public key, or "" for none
# What a device may have been told on its command line, as the run's configuration names it.
DEVICE_FLAGS = {
    "dataset": "--dataset",
    "partition": "--partition",
    "devices": "--of",
    "seed": "--seed",
    "width": "--width",
    "latent_dim": "--latent-dim",
    "codec": "--codec",
}


class RunIncompatible(ValueError):
    """This device cannot join the run; `field` names what stands in the way (for its status message)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"cannot join the run: {field}: {detail}")
        self.field = field


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    dataset: str
    partition: str
    devices: int
    seed: int
    sample_shape: tuple[int, ...]
    width: int
    latent_dim: int
    codec: str
    schedule: str
    train: TrainConfig
    # "devices": the server scores against the devices' feature statistics, which they then send once.
    quality_from: str = "data"
    features: str = "classifier"  # one of RUN_FEATURES; configs from before the field decode as this
    # "server": devices get D and their fake batches on topics.work, build no generator (docs/protocol.md);
    # configs from before the field decode as "device".
    fakes: str = "device"
    # The server's Ed25519 public key (64 hex digits) that signs its models: what a device without
    # --server-key trusts on first use (runtime/trust.py). Configs from before the field decode as "".
    server_key: str = ""

    def encode(self) -> bytes:
        return wire.encode_json({"v": RUN_CONFIG_VERSION, **asdict(self)})

    @classmethod
    def decode(cls, payload: bytes) -> RunConfig:
        """Raises WireError (reason bad-field, naming the field) for anything but a config of this version."""
        required = {"v": int, "dataset": str, "partition": str, "devices": int, "seed": int,
                    "sample_shape": list, "width": int, "latent_dim": int, "codec": str, "schedule": str,
                    "train": dict}  # fmt: skip
        fields = wire.decode_json(payload, required)
        if fields["v"] != RUN_CONFIG_VERSION:
            raise wire.WireError("bad-version", f"run configuration version {fields['v']}")
        shape = fields["sample_shape"]
        if not shape or not all(isinstance(size, int) and not isinstance(size, bool) and size > 0
                                for size in shape):  # fmt: skip
            raise wire.WireError("bad-field", f"sample_shape is {shape!r}")
        known = {item.name for item in dataclasses.fields(TrainConfig)}
        try:
            wire.check_codec(fields["codec"])
            train = TrainConfig(**{key: value for key, value in fields["train"].items() if key in known})
        except (TypeError, ValueError) as error:
            raise wire.WireError("bad-field", str(error)) from None
        quality_from = fields.get("quality_from", "data")
        if quality_from not in QUALITY_SOURCES:
            raise wire.WireError("bad-field", f"quality_from is {quality_from!r}")
        features = fields.get("features", "classifier")
        if not isinstance(features, str) or not RUN_FEATURES.fullmatch(features):
            raise wire.WireError("bad-field", f"features is {features!r}")
        fakes = fields.get("fakes", "device")
        if fakes not in FAKES:
            raise wire.WireError("bad-field", f"fakes is {fakes!r}")
        server_key = fields.get("server_key", "")
        if not isinstance(server_key, str) or not SERVER_KEY.fullmatch(server_key):
            raise wire.WireError("bad-field", "server_key is not 64 hex digits")
        values = {name: fields[name] for name in required if name not in ("v", "sample_shape", "train")}
        return cls(**values, sample_shape=tuple(shape), train=train, quality_from=quality_from,
                   features=features, fakes=fakes, server_key=server_key)  # fmt: skip

    def conflicts(self, given: Mapping[str, object]) -> RunIncompatible | None:
        """The first of a device's own flags (`given`, as named in DEVICE_FLAGS) that disagrees with the
        run, or None: the device takes the run's value for every flag it was not given."""
        for name, value in given.items():
            if value is not None and value != getattr(self, name):
                ours, theirs = f"{DEVICE_FLAGS[name]} {value!r}", repr(getattr(self, name))
                return RunIncompatible(name, f"the run has {theirs}, this device was given {ours}")
        return None
