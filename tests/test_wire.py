import msgpack
import pytest
import torch

from edgegan import wire
from edgegan.models import ModelSpec, build_discriminator


def model_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return wire.discriminator_tensors(build_discriminator(ModelSpec((1, 28, 28), 16, 8)).state_dict())


def envelope(codec: str = "fp32", tensors=None) -> wire.Envelope:
    return wire.Envelope(
        kind="update",
        run="run-1",
        round=7,
        base_round=6,
        device="pi-3",
        samples=2500,
        codec=codec,
        tensors=tensors or model_tensors(),
        sent_at=1.5e9,
    )


def shapes(tensors):
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def test_fp32_round_trip_is_exact_and_keeps_every_field():
    sent = envelope()
    received = wire.decode(wire.encode(sent), shapes(sent.tensors))
    assert (received.kind, received.run, received.round, received.base_round) == ("update", "run-1", 7, 6)
    assert (received.device, received.samples, received.codec, received.sent_at) == (
        "pi-3",
        2500,
        "fp32",
        1.5e9,
    )
    for name, tensor in sent.tensors.items():
        assert torch.equal(received.tensors[name], tensor)


@pytest.mark.parametrize(
    "codec,tolerance", [("fp16", 1e-3), ("int8", 0.01), ("int8+zstd", 0.01), ("fp16+zstd", 1e-3)]
)
def test_lossy_codecs_stay_close_to_the_original(codec, tolerance):
    sent = envelope(codec)
    received = wire.decode(wire.encode(sent))
    for name, tensor in sent.tensors.items():
        spread = float(tensor.max() - tensor.min()) or 1.0
        assert (received.tensors[name] - tensor).abs().max().item() <= tolerance * spread + 1e-6


def test_int8_with_zstd_is_under_a_third_of_fp32():
    fp32 = len(wire.encode(envelope("fp32")))
    assert len(wire.encode(envelope("int8+zstd"))) < 0.3 * fp32


def test_unknown_codec_is_refused_when_encoding():
    with pytest.raises(ValueError, match="unknown codec"):
        wire.encode(envelope("bf16"))


def head(**changes) -> bytes:
    fields = msgpack.unpackb(wire.encode(envelope()), raw=False)
    fields.update(changes)
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"\xc1garbage", "not-msgpack"),
        (msgpack.packb([1, 2, 3]), "bad-envelope"),
        (head(v=99), "bad-version"),
        (head(kind="exploit"), "bad-kind"),
        (head(codec="fp64"), "bad-codec"),
        (head(round=-1), "bad-field"),
        (head(round="7"), "bad-field"),
        (head(samples=True), "bad-field"),
        (head(sent_at=float("nan")), "bad-field"),
        (head(tensors=b"\x00\x01"), "not-msgpack"),
        (head(codec="fp32+zstd"), "bad-compression"),
    ],
)
def test_malformed_envelopes_are_refused_with_a_reason(payload, reason):
    with pytest.raises(wire.WireError) as refused:
        wire.decode(payload)
    assert refused.value.reason == reason


def body(items) -> bytes:
    return head(tensors=msgpack.packb(items, use_bin_type=True))


@pytest.mark.parametrize(
    "items,reason",
    [
        ({"w": {"dtype": "fp64", "shape": [1], "data": b"\x00" * 8}}, "bad-dtype"),
        ({"w": {"dtype": "fp32", "shape": [2], "data": b"\x00" * 4}}, "bad-shape"),
        ({"w": {"dtype": "fp32", "shape": [-1], "data": b""}}, "bad-shape"),
        ({"w": {"dtype": "fp32", "shape": [1], "data": b"\x00\x00\xc0\x7f"}}, "non-finite"),
        ({"w": {"dtype": "int8", "shape": [1], "data": b"\x01"}}, "bad-tensor"),
        ({"w": [1, 2]}, "bad-tensor"),
    ],
)
def test_malformed_tensors_are_refused_with_a_reason(items, reason):
    with pytest.raises(wire.WireError) as refused:
        wire.decode(body(items))
    assert refused.value.reason == reason


def test_tensors_that_do_not_match_the_model_are_refused():
    sent = envelope()
    expected = shapes(sent.tensors)
    wrong_shape = dict(expected, **{"D.0.weight": (3, 3)})
    with pytest.raises(wire.WireError, match="bad-shape"):
        wire.decode(wire.encode(sent), wrong_shape)
    with pytest.raises(wire.WireError, match="bad-names"):
        wire.decode(wire.encode(sent), {**expected, "D.9.weight": (1,)})


def test_oversized_payload_is_refused_before_parsing():
    with pytest.raises(wire.WireError, match="oversized"):
        wire.decode(b"\x00" * (wire.MAX_PAYLOAD_BYTES + 1))


def test_the_delta_flag_round_trips_and_must_be_a_bool():
    sent = wire.Envelope(
        kind="update",
        run="r",
        round=1,
        base_round=1,
        device="d",
        samples=5,
        codec="int8",
        tensors=model_tensors(),
        sent_at=1.0,
        delta=True,
    )
    assert wire.decode(wire.encode(sent)).delta is True
    assert wire.decode(wire.encode(envelope())).delta is False
    with pytest.raises(wire.WireError, match="bad-field"):
        wire.decode(head(delta="yes"))


def stats_message(samples: int = 1200, dimension: int = 64) -> wire.Envelope:
    features = torch.randn(
        samples, dimension, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    return wire.stats_envelope(
        run="run-1", device="pi-3", samples=samples,
        feature_sum=features.sum(dim=0), outer_sum=features.t().mm(features),
    )  # fmt: skip


def reencoded(message: wire.Envelope, **changes) -> bytes:
    """`message` encoded after changes to its raw head (`samples`) or its tensors, as a sender could."""
    head = msgpack.unpackb(wire.encode(message), raw=False)
    body = msgpack.unpackb(head["tensors"], raw=False)
    for name, value in changes.items():
        if name == "samples":
            head["samples"] = value
        elif value is None:
            body.pop(name)
        else:
            body[name] = wire.encode_tensor(value, "fp64")
    head["tensors"] = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb(head, use_bin_type=True)


def test_feature_statistics_round_trip_bit_for_bit_in_float64():
    message = stats_message()
    decoded = wire.decode(wire.encode(message))
    feature_sum, outer_sum = wire.stats_tensors(decoded)
    assert decoded.kind == "stats" and decoded.samples == 1200 and decoded.device == "pi-3"
    assert feature_sum.dtype == torch.float64 and torch.equal(feature_sum, message.tensors["feature_sum"])
    assert torch.equal(outer_sum, message.tensors["outer_sum"])


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"samples": 1}, "bad-field"),
        ({"outer_sum": torch.zeros(64, 63, dtype=torch.float64)}, "bad-shape"),
        ({"feature_sum": torch.zeros(64, 1, dtype=torch.float64)}, "bad-shape"),
        ({"outer_sum": None}, "bad-names"),
        ({"feature_sum": torch.full((64,), float("nan"), dtype=torch.float64)}, "non-finite"),
        ({"outer_sum": torch.full((64, 64), float("inf"), dtype=torch.float64)}, "non-finite"),
    ],
)
def test_feature_statistics_of_wrong_shape_too_few_samples_or_non_finite_are_rejected(changes, reason):
    with pytest.raises(wire.WireError) as caught:
        wire.decode(reencoded(stats_message(), **changes))
    assert caught.value.reason == reason


def test_feature_statistics_travel_only_as_float64():
    message = stats_message()
    with pytest.raises(ValueError, match="fp64"):
        wire.encode(wire.Envelope(**{**message.__dict__, "codec": "fp32"}))
    head = msgpack.unpackb(wire.encode(message), raw=False)
    head["codec"] = "fp32"
    with pytest.raises(wire.WireError) as caught:
        wire.decode(msgpack.packb(head, use_bin_type=True))
    assert caught.value.reason == "bad-codec"
