"""The one place that knows the message format: a versioned msgpack envelope with tensor codecs.

Envelope (a msgpack map): v (format version), kind, run, round, base_round, device, samples, codec,
sent_at (unix seconds), tensors: {name: {dtype, shape, data[, scale, offset]}}. The body of `tensors`
is zstd-compressed as a whole when the codec ends in `+zstd`.

Codecs: `fp32` (exact), `fp16` (half precision), `int8` (per-tensor affine: q = round((x - lo) / scale),
x ~ lo + q * scale). Decoding validates every field; whatever fails raises `WireError` with a reason.

Kind `partial` (an aggregator's partial sum, docs/scaling.md) always travels as `fp64`, which no other kind
may use, and adds `weight`, `change_weight` and `devices`. Kind `stats` (a device's real-feature statistics
for the Fréchet distance, docs/protocol.md) travels as `fp64` too: `samples` is the count n >= 2 and the
tensors are `feature_sum` (d) and `outer_sum` (d x d), finite. An update names the digest of the global
it trained on (`trained_on`); the server's global, work and keyframe messages carry `signer` and `sig`
(edgegan/signing.py), both over `digest_of`: the head without those two keys. Claims and orders between
the server and its aggregators are small JSON maps, like status and metrics.

One file on purpose (about 550 lines): the format's rules (kinds, codecs, limits, validation) are read and
changed together, and splitting them would put one message's checks in two places.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch
import zstandard

FORMAT_VERSION = 1
# `work`: the global D and one device's fake batches, for a run whose server draws the fakes (--fakes server).
# `keyframe`: the whole global model, exact, for a device that missed a delta (edgegan/downlink.py).
KINDS = ("global", "work", "update", "samples", "feedback", "swap", "gan", "partial", "stats", "keyframe")
DOWNLINK_DELTA_KINDS = ("global", "work")  # kinds whose `delta` is a change from an earlier global model
BASE_CODECS = ("fp32", "fp16", "int8")
# `topk+int8+zstd`: int8 + zstd, and an update carries only the entries its device kept of each floating
# tensor (edgegan/algorithms/sparsify.py), as a bit mask and the kept values; every other message as int8.
SPARSE_PREFIX = "topk+"
SPARSE_CODECS = (f"{SPARSE_PREFIX}int8+zstd",)
CODECS = BASE_CODECS + tuple(f"{codec}+zstd" for codec in BASE_CODECS) + SPARSE_CODECS
# Partial sums are float64 so that merging shards loses nothing a float32 mean would keep; not a user codec.
PARTIAL_CODECS = ("fp64", "fp64+zstd")
FP64_KINDS = ("partial", "stats")  # sums that must add up without rounding; the only kinds that may be fp64
STATS_SUM, STATS_OUTER = "feature_sum", "outer_sum"
MIN_STATS_SAMPLES = 2  # a covariance needs two features
MAX_NAME_CHARS = 64
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
ZSTD_LEVEL = 3
MAX_JSON_BYTES = 64 * 1024
SIGNATURE_KEYS = ("signer", "sig")  # left out of the digest they sign
DIGEST_BYTES, SIGNER_BYTES, SIG_BYTES = 32, 32, 64  # SHA-256; an Ed25519 public key and signature


class WireError(ValueError):
    """A message that cannot be accepted; `reason` is a short stable label for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Envelope:
    kind: str
    run: str
    round: int
    base_round: int
    device: str
    samples: int
    codec: str
    tensors: dict[str, torch.Tensor]
    sent_at: float = field(default_factory=time.time)
    loss: float | None = None  # the sender's training loss, for the server's metrics
    delta: bool = False  # tensors are the change from the base round's model, not the model itself
    # Kind `partial` only: the total weight of the sums, the part of it whose tensors were changes (delta
    # updates), and the devices counted.
    weight: float | None = None
    change_weight: float = 0.0
    devices: tuple[str, ...] = ()
    trained_on: bytes | None = None  # kind `update`: the digest of the global model it was trained on
    signer: bytes | None = None  # a signed message's public key and signature (edgegan/signing.py)
    sig: bytes | None = None
    digest: bytes = field(default=b"", compare=False)  # set by `decode`: global, work, keyframe, signed


def is_lossy(codec: str) -> bool:
    return not codec.startswith("fp32")


def is_sparse(codec: str) -> bool:
    """Whether updates travel top-k sparse (with the device's error feedback) under this codec."""
    return codec.startswith(SPARSE_PREFIX)


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    return codec


def encode_tensor(tensor: torch.Tensor, codec: str, *, sparse: bool = False) -> dict:
    """One tensor as a map; `sparse` (int8 only): its nonzero entries and a bit mask of where they are."""
    array = tensor.detach().cpu().contiguous()
    shape = list(array.shape)
    if not array.is_floating_point():
        return {"dtype": "int64", "shape": shape, "data": array.to(torch.int64).numpy().tobytes()}
    if sparse and codec == "int8":
        flat = array.float().flatten()
        mask = flat != 0
        item = encode_tensor(flat[mask], "int8")
        return item | {"shape": shape, "mask": np.packbits(mask.numpy()).tobytes()}
    if codec == "fp64":
        return {"dtype": "fp64", "shape": shape, "data": array.double().numpy().tobytes()}
    values = array.float().numpy()
    if codec == "fp16":
        return {"dtype": "fp16", "shape": shape, "data": values.astype(np.float16).tobytes()}
    if codec == "int8":
        low = float(values.min()) if values.size else 0.0
        high = float(values.max()) if values.size else 0.0
        scale = (high - low) / 255.0 or 1.0
        quantised = np.clip(np.rint((values - low) / scale), 0, 255).astype(np.uint8)
        return {"dtype": "int8", "shape": shape, "data": quantised.tobytes(), "scale": scale, "offset": low}
    return {"dtype": "fp32", "shape": shape, "data": values.astype(np.float32).tobytes()}


def decode_sparse(name: str, item: dict, shape: list[int]) -> torch.Tensor:
    """A sparse int8 tensor (`encode_tensor(..., sparse=True)`): zeros but where its mask says."""
    mask_bytes, count = item["mask"], math.prod(shape)
    mask_size = -(-count // 8)
    if item["dtype"] != "int8" or not isinstance(mask_bytes, bytes) or len(mask_bytes) != mask_size:
        raise WireError("bad-tensor", f"{name}: a sparse tensor is int8 with a mask of {mask_size} bytes")
    bits = np.unpackbits(np.frombuffer(mask_bytes, dtype=np.uint8), count=count)
    mask = torch.from_numpy(bits.astype(bool))
    dense_item = {key: value for key, value in item.items() if key != "mask"}
    values = decode_tensor(name, dense_item | {"shape": [int(mask.sum())]})
    dense = torch.zeros(count, dtype=torch.float32)
    dense[mask] = values
    return dense.view(shape)


NUMPY_TYPES = {
    "fp32": np.float32,
    "fp16": np.float16,
    "int8": np.uint8,
    "int64": np.int64,
    "fp64": np.float64,
}


def decode_tensor(name: str, item: object, float_dtype: str | None = None) -> torch.Tensor:
    """One tensor; `float_dtype`, when given, is the only floating dtype allowed (fp64 in partial sums,
    and fp64 nowhere else)."""
    if not isinstance(item, dict):
        raise WireError("bad-tensor", f"{name} is not a map")
    dtype, shape, data = item.get("dtype"), item.get("shape"), item.get("data")
    if dtype not in NUMPY_TYPES or (dtype != "int64" and (dtype == "fp64") != (float_dtype == "fp64")):
        raise WireError("bad-dtype", f"{name} has dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        raise WireError("bad-shape", f"{name} has shape {shape!r}")
    if not isinstance(data, bytes):
        raise WireError("bad-tensor", f"{name} carries no bytes")
    numpy_type = NUMPY_TYPES[dtype]
    if "mask" in item:
        return decode_sparse(name, item, shape)
    expected = math.prod(shape) * np.dtype(numpy_type).itemsize
    if len(data) != expected:
        raise WireError("bad-shape", f"{name} has {len(data)} bytes for shape {shape} ({expected} expected)")
    values = np.frombuffer(data, dtype=numpy_type).reshape(shape)
    if dtype == "int64":
        return torch.from_numpy(values.copy())
    if dtype == "fp64":
        tensor = torch.from_numpy(values.copy())
        if not torch.isfinite(tensor).all():
            raise WireError("non-finite", f"{name} holds NaN or infinite values")
        return tensor
    if dtype == "int8":
        scale, offset = item.get("scale"), item.get("offset")
        if not isinstance(scale, float) or not isinstance(offset, float):
            raise WireError("bad-tensor", f"{name} lacks its int8 scale and offset")
        values = values.astype(np.float32) * np.float32(scale) + np.float32(offset)
    tensor = torch.from_numpy(values.astype(np.float32))
    if not torch.isfinite(tensor).all():
        raise WireError("non-finite", f"{name} holds NaN or infinite values")
    return tensor


def encode(envelope: Envelope) -> bytes:
    return msgpack.packb(envelope_head(envelope), use_bin_type=True)


def digest_of(head: Mapping) -> bytes:
    """SHA-256 of a head without its signature keys: what a signature covers and `trained_on` names."""
    unsigned = {key: value for key, value in head.items() if key not in SIGNATURE_KEYS}
    return hashlib.sha256(msgpack.packb(unsigned, use_bin_type=True)).digest()


def encode_signed(envelope: Envelope, sign: Callable[[bytes], tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """(the message, its digest), signed by `sign(digest) -> (signer, sig)`: the keys come last."""
    head = envelope_head(envelope)
    digest = digest_of(head)
    signer, sig = sign(digest)
    head |= {"signer": signer, "sig": sig}
    return msgpack.packb(head, use_bin_type=True), digest


def encode_as_sent(envelope: Envelope) -> bytes:
    """For runners that only count bytes (the simulator): the message as long as the MQTT runtime's, with
    placeholders for the signature of a downlinked model and the binding of an update."""
    if envelope.kind == "update":
        return encode(Envelope(**{**envelope.__dict__, "trained_on": bytes(DIGEST_BYTES)}))
    if envelope.kind in (*DOWNLINK_DELTA_KINDS, "keyframe"):
        return encode_signed(envelope, lambda _: (bytes(SIGNER_BYTES), bytes(SIG_BYTES)))[0]
    return encode(envelope)


def rebind(update: bytes, trained_on: bytes) -> bytes:
    """An encoded update bound to another global model without re-encoding it (a load generator's
    pre-encoded updates): `trained_on` is the head's last field, so its bytes end the message. Unsigned
    updates only: a device's signature (`--update-key`) comes after it and covers it."""
    if len(trained_on) != DIGEST_BYTES:
        raise ValueError(f"a digest is {DIGEST_BYTES} bytes")
    return update[:-DIGEST_BYTES] + trained_on


def envelope_head(envelope: Envelope) -> dict:
    if envelope.kind == "partial":
        if envelope.codec not in PARTIAL_CODECS or envelope.weight is None:
            raise ValueError("a partial sum travels as fp64 or fp64+zstd and carries its weight")
    elif envelope.kind == "stats":
        if envelope.codec not in PARTIAL_CODECS:
            raise ValueError("feature statistics travel as fp64 or fp64+zstd")
    else:
        check_codec(envelope.codec)
    sparse = is_sparse(envelope.codec) and envelope.kind == "update"
    base_codec, _, compression = envelope.codec.removeprefix(SPARSE_PREFIX).partition("+")
    body = msgpack.packb(
        {name: encode_tensor(tensor, base_codec, sparse=sparse) for name, tensor in envelope.tensors.items()},
        use_bin_type=True,
    )
    if compression == "zstd":
        body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(body)
    head = {
        "v": FORMAT_VERSION,
        "kind": envelope.kind,
        "run": envelope.run,
        "round": envelope.round,
        "base_round": envelope.base_round,
        "device": envelope.device,
        "samples": envelope.samples,
        "codec": envelope.codec,
        "sent_at": float(envelope.sent_at),
        "loss": envelope.loss,
        "delta": envelope.delta,
        "tensors": body,
    }
    if envelope.kind == "partial":
        head |= {
            "weight": float(envelope.weight),
            "change_weight": float(envelope.change_weight),
            "devices": list(envelope.devices),
        }
    if envelope.trained_on is not None:
        head["trained_on"] = envelope.trained_on
    return head


def decode(payload: bytes, expected_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Envelope:
    """Parses and validates a message; `expected_shapes` pins tensor names and shapes to the model's."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError("oversized", f"{len(payload)} bytes")
    try:
        head = msgpack.unpackb(payload, raw=False, max_bin_len=MAX_PAYLOAD_BYTES)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise WireError("not-msgpack", str(error)[:80]) from None
    if not isinstance(head, dict):
        raise WireError("bad-envelope", "not a map")
    if head.get("v") != FORMAT_VERSION:
        raise WireError("bad-version", f"version {head.get('v')!r}, this build speaks {FORMAT_VERSION}")
    kind, codec = head.get("kind"), head.get("codec")
    if kind not in KINDS:
        raise WireError("bad-kind", f"kind {kind!r}")
    if codec not in (PARTIAL_CODECS if kind in FP64_KINDS else CODECS):
        raise WireError("bad-codec", f"codec {codec!r} for kind {kind}")
    for key, types in (("run", str), ("device", str), ("round", int), ("base_round", int), ("samples", int)):
        if not isinstance(head.get(key), types) or isinstance(head.get(key), bool):
            raise WireError("bad-field", f"{key} is {head.get(key)!r}")
    if head["round"] < 0 or head["base_round"] < 0 or head["samples"] < 0:
        raise WireError("bad-field", "negative round, base_round or samples")
    sent_at = head.get("sent_at")
    if not isinstance(sent_at, float | int) or not math.isfinite(sent_at):
        raise WireError("bad-field", f"sent_at is {sent_at!r}")
    loss = head.get("loss")
    if loss is not None and not isinstance(loss, float):
        raise WireError("bad-field", f"loss is {loss!r}")
    delta = head.get("delta", False)
    if not isinstance(delta, bool):
        raise WireError("bad-field", f"delta is {delta!r}")
    if delta and kind in DOWNLINK_DELTA_KINDS and head["base_round"] >= head["round"]:
        # A downlink delta is the change from an earlier version: without one it cannot be applied.
        raise WireError("no-base", f"a delta for round {head['round']} from base {head['base_round']}")
    if delta and kind == "keyframe":
        raise WireError("bad-field", "a keyframe carries the model, not changes")
    weight, change_weight, devices = check_partial_fields(head) if kind == "partial" else (None, 0.0, ())
    # Absent in older messages and in unsigned ones: the receiver's policy decides (runtime/trust.py).
    for key, size in (("trained_on", DIGEST_BYTES), ("signer", SIGNER_BYTES), ("sig", SIG_BYTES)):
        if head.get(key) is not None and (not isinstance(head[key], bytes) or len(head[key]) != size):
            raise WireError("bad-field", f"{key} is not {size} bytes")
    body = head.get("tensors")
    if not isinstance(body, bytes):
        raise WireError("bad-envelope", "tensors are not bytes")
    if codec.endswith("+zstd"):
        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_PAYLOAD_BYTES)
        except zstandard.ZstdError as error:
            raise WireError("bad-compression", str(error)[:80]) from None
    try:
        items = msgpack.unpackb(body, raw=False, max_bin_len=MAX_PAYLOAD_BYTES)
    except Exception as error:
        raise WireError("not-msgpack", f"tensor body: {str(error)[:80]}") from None
    if not isinstance(items, dict) or not all(isinstance(name, str) for name in items):
        raise WireError("bad-envelope", "tensors are not a map of names")
    float_dtype = "fp64" if kind in FP64_KINDS else None
    tensors = {name: decode_tensor(name, item, float_dtype) for name, item in items.items()}
    if kind == "stats":
        check_stats(tensors, head["samples"])
    if expected_shapes is not None:
        check_shapes(tensors, expected_shapes, changes_only=delta and kind in DOWNLINK_DELTA_KINDS)
    return Envelope(
        kind=kind,
        run=head["run"],
        round=head["round"],
        base_round=head["base_round"],
        device=head["device"],
        samples=head["samples"],
        codec=codec,
        tensors=tensors,
        sent_at=float(sent_at),
        loss=loss,
        delta=delta,
        weight=weight,
        change_weight=change_weight,
        devices=devices,
        trained_on=head.get("trained_on"),
        signer=head.get("signer"),
        sig=head.get("sig"),
        # Downlinked models always (updates name it), a signed update for its signature (--device-keys).
        digest=digest_of(head) if kind in (*DOWNLINK_DELTA_KINDS, "keyframe") or "sig" in head else b"",
    )


def check_partial_fields(head: Mapping) -> tuple[float, float, tuple[str, ...]]:
    """weight > 0, 0 <= change_weight <= weight, and devices: distinct names, at least one."""
    weight, change_weight, devices = head.get("weight"), head.get("change_weight"), head.get("devices")
    if not isinstance(weight, float) or not math.isfinite(weight) or weight <= 0:
        raise WireError("bad-field", f"weight is {weight!r}")
    if not isinstance(change_weight, float) or not 0 <= change_weight <= weight:
        raise WireError("bad-field", f"change_weight is {change_weight!r}")
    if (
        not isinstance(devices, list)
        or not devices
        or not all(isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS for name in devices)
        or len(set(devices)) != len(devices)
    ):
        raise WireError("bad-field", "devices must be distinct names, at least one")
    if head.get("samples", 0) < 1:
        raise WireError("bad-field", "a partial sum must count at least one sample")
    return weight, change_weight, tuple(devices)


def check_stats(tensors: Mapping[str, torch.Tensor], samples: int) -> None:
    """Feature statistics: `feature_sum` (d) and `outer_sum` (d x d), of at least two features."""
    if set(tensors) != {STATS_SUM, STATS_OUTER}:
        raise WireError(
            "bad-names", f"statistics carry {sorted(tensors)[:3]}, not {STATS_SUM} and {STATS_OUTER}"
        )
    feature_sum, outer_sum = tensors[STATS_SUM], tensors[STATS_OUTER]
    dimension = feature_sum.shape[0] if feature_sum.dim() == 1 else -1
    if dimension < 1 or tuple(outer_sum.shape) != (dimension, dimension):
        raise WireError(
            "bad-shape", f"statistics of shapes {tuple(feature_sum.shape)} and {tuple(outer_sum.shape)}"
        )
    if samples < MIN_STATS_SAMPLES:
        raise WireError("bad-field", f"statistics of {samples} samples; at least {MIN_STATS_SAMPLES}")


def stats_envelope(
    *, run: str, device: str, samples: int, feature_sum: torch.Tensor, outer_sum: torch.Tensor
) -> Envelope:
    """A device's real-feature statistics as a message (kind `stats`, exact float64)."""
    return Envelope(
        kind="stats", run=run, round=0, base_round=0, device=device, samples=samples, codec="fp64",
        tensors={STATS_SUM: feature_sum, STATS_OUTER: outer_sum},
    )  # fmt: skip


def stats_tensors(envelope: Envelope) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature_sum, outer_sum) of a decoded `stats` message."""
    return envelope.tensors[STATS_SUM], envelope.tensors[STATS_OUTER]


def check_shapes(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    changes_only: bool = False,
) -> None:
    """Exactly the expected names and shapes; `changes_only` (a downlink delta): model tensors that did not
    change may be left out, fake batches may not."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if changes_only:
        missing = [name for name in missing if name.startswith(FAKES + ".")]
    if missing or extra:
        raise WireError("bad-names", f"missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise WireError("bad-shape", f"{name} is {tuple(tensor.shape)}, expected {tuple(expected[name])}")


# Tensor names inside a message: `G.<name>` for the generator's, `D.<name>` for the discriminator's. Only
# this module spells the prefixes; everyone else names a model's part with the functions below.
GENERATOR, DISCRIMINATOR = "G", "D"
FAKES = "F"  # `F.0`, `F.1`...: a device's fake batches in step order (kind `work`)


def prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names a model's tensors inside one message: `G.0.weight`, `D.0.weight`."""
    return {f"{prefix}.{name}": tensor for name, tensor in state.items()}


def unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {name[start:]: tensor for name, tensor in tensors.items() if name.startswith(prefix + ".")}


def global_tensors(
    generator: Mapping[str, torch.Tensor], discriminator: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A whole GAN as one message's tensors (the global model; FedGAN's local GANs)."""
    return prefixed(GENERATOR, generator) | prefixed(DISCRIMINATOR, discriminator)


def generator_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return prefixed(GENERATOR, state)


def discriminator_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return prefixed(DISCRIMINATOR, state)


def fake_tensors(batches: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A device's fake batches (one per local step) as message tensors; they travel in the message's codec."""
    return {f"{FAKES}.{step}": batch for step, batch in enumerate(batches)}


def fake_batches(tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The fake batches of a `work` message, in step order."""
    batches = unprefixed(FAKES, tensors)
    return [batches[str(step)] for step in range(len(batches))]


def generator_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The generator's part of a message's tensors, named as in its state dict."""
    return unprefixed(GENERATOR, tensors)


def discriminator_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The discriminator's part of a message's tensors, named as in its state dict."""
    return unprefixed(DISCRIMINATOR, tensors)


def tensor_shapes(
    *,
    generator: Mapping[str, torch.Tensor] | None = None,
    discriminator: Mapping[str, torch.Tensor] | None = None,
    fakes: tuple[int, tuple[int, ...]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """The message tensor names and shapes `decode` must find, for the given model states (and `fakes`:
    that many fake batches of that shape)."""
    shapes = {}
    if fakes is not None:
        count, shape = fakes
        shapes |= {f"{FAKES}.{step}": tuple(shape) for step in range(count)}
    for prefix, state in ((GENERATOR, generator), (DISCRIMINATOR, discriminator)):
        shapes |= {name: tuple(tensor.shape) for name, tensor in prefixed(prefix, state or {}).items()}
    return shapes


# Status and metrics messages are small JSON maps, readable with `mosquitto_sub -v -t 'edgegan/#'`.
# waiting: a device that has not seen its run's configuration yet; incompatible: one that cannot join it
# (its status then names the field: runtime/runconfig.py).
STATUS_STATES = ("online", "offline", "waiting", "incompatible")


def finite_or_null(value):
    """JSON has no NaN: a figure that could not be measured (a diverged generator) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value


def encode_json(fields: Mapping[str, object]) -> bytes:
    return json.dumps(finite_or_null(fields), separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def decode_json(payload: bytes, required: Mapping[str, type | tuple[type, ...]]) -> dict:
    """A JSON map with at least the `required` keys of the given types, else WireError."""
    if len(payload) > MAX_JSON_BYTES:
        raise WireError("oversized", f"{len(payload)} bytes of JSON")
    try:
        fields = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireError("not-json", str(error)[:80]) from None
    if not isinstance(fields, dict):
        raise WireError("bad-envelope", "not a JSON map")
    for key, types in required.items():
        value = fields.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            raise WireError("bad-field", f"{key} is {value!r}")
    return fields


def encode_status(state: str, **counters: int | float | str) -> bytes:
    if state not in STATUS_STATES:
        raise ValueError(f"status state must be one of {STATUS_STATES}")
    return encode_json({"state": state, **counters})


def decode_status(payload: bytes) -> dict:
    fields = decode_json(payload, {"state": str})
    if fields["state"] not in STATUS_STATES:
        raise WireError("bad-field", f"state is {fields['state']!r}")
    return fields


def decode_metrics(payload: bytes) -> dict:
    return decode_json(payload, {"round": int, "rounds": int})


# Claims (aggregator -> server) and orders (server -> aggregator) of sharded aggregation, docs/protocol.md.
def encode_claim(device: str, round: int, samples: int, payload_bytes: int, loss: float | None) -> bytes:
    """An aggregator holds `device`'s decoded update for `round` and asks whether to add it."""
    return encode_json(
        {"device": device, "round": round, "samples": samples, "bytes": payload_bytes, "loss": loss}
    )


def encode_rejection(device: str, reason: str) -> bytes:
    """An aggregator refused an update (a WireError reason), so that the server counts it."""
    return encode_json({"device": device, "rejected": reason})


def decode_claim(payload: bytes) -> dict:
    """A claim or a rejection; `loss` is a float or None, the counts are >= 0 (samples >= 1)."""
    fields = decode_json(payload, {"device": str})
    if "rejected" in fields:
        if not isinstance(fields["rejected"], str) or not 0 < len(fields["rejected"]) <= MAX_NAME_CHARS:
            raise WireError("bad-field", f"rejected is {fields['rejected']!r}")
        return fields
    decode_json(payload, {"round": int, "samples": int, "bytes": int})
    if fields["round"] < 0 or fields["samples"] < 1 or fields["bytes"] < 0:
        raise WireError("bad-field", "negative round or bytes, or no samples")
    loss = fields.get("loss")
    if isinstance(loss, bool) or not isinstance(loss, float | int | None):
        raise WireError("bad-field", f"loss is {loss!r}")
    fields["loss"] = None if loss is None else float(loss)
    return fields


def encode_verdict(round: int, device: str, accept: bool) -> bytes:
    """Add (accept) or drop the update `device` sent for `round`."""
    return encode_json({"round": round, "device": device, "accept": accept})


def encode_close(round: int, granted: int) -> bytes:
    """`round` is closed: send its partial sum, which must count the `granted` updates accepted."""
    return encode_json({"round": round, "close": granted})


def decode_order(payload: bytes) -> dict:
    """A verdict ({round, device, accept}) or a close ({round, close})."""
    fields = decode_json(payload, {"round": int})
    if fields["round"] < 0:
        raise WireError("bad-field", f"round is {fields['round']}")
    if "close" in fields:
        decode_json(payload, {"close": int})
        if fields["close"] < 0:
            raise WireError("bad-field", f"close is {fields['close']}")
        return fields
    decode_json(payload, {"device": str})
    if not isinstance(fields.get("accept"), bool):
        raise WireError("bad-field", f"accept is {fields.get('accept')!r}")
    return fields
