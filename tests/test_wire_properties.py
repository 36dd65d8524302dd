"""Property tests: whatever bytes arrive, the decoder returns an envelope or raises WireError."""

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgegan import wire

SHAPES = {"D.w": (3, 4), "D.b": (4,)}


def valid_payload(codec: str = "fp32") -> bytes:
    tensors = {"D.w": torch.arange(12.0).reshape(3, 4) / 7, "D.b": torch.ones(4)}
    return wire.encode(
        wire.Envelope(
            kind="update",
            run="run",
            round=2,
            base_round=1,
            device="dev",
            samples=10,
            codec=codec,
            tensors=tensors,
            sent_at=1.0,
        )
    )


def decode_or_refuse(payload: bytes) -> None:
    try:
        envelope = wire.decode(payload, SHAPES)
    except wire.WireError:
        return
    assert set(envelope.tensors) == set(SHAPES)
    assert all(torch.isfinite(tensor).all() for tensor in envelope.tensors.values())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_decoded_or_refused(payload):
    decode_or_refuse(payload)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(wire.CODECS), st.data())
def test_mutated_valid_envelopes_are_decoded_or_refused(codec, data):
    payload = bytearray(valid_payload(codec))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    decode_or_refuse(bytes(payload[:cut]) if data.draw(st.booleans()) else bytes(payload))


# Values msgpack can carry (integers within 64 bits).
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=16),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "v",
                "kind",
                "run",
                "round",
                "base_round",
                "device",
                "samples",
                "codec",
                "sent_at",
                "loss",
                "delta",
                "tensors",
            ]
        ),
        scalars,
    )
)
def test_envelopes_with_fields_of_any_type_are_decoded_or_refused(changes):
    fields = msgpack.unpackb(valid_payload(), raw=False)
    fields.update(changes)
    decode_or_refuse(msgpack.packb(fields, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=6),
        st.dictionaries(st.sampled_from(["dtype", "shape", "data", "scale", "offset"]), scalars),
    )
)
def test_tensor_maps_of_any_shape_are_decoded_or_refused(items):
    fields = msgpack.unpackb(valid_payload(), raw=False)
    fields["tensors"] = msgpack.packb(items, use_bin_type=True)
    decode_or_refuse(msgpack.packb(fields, use_bin_type=True))
