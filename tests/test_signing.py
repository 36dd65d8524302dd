import os
import stat

import msgpack
import pytest
import torch

from edgegan import signing, wire


def global_envelope(round_index: int = 3, sent_at: float = 1.7e9) -> wire.Envelope:
    torch.manual_seed(0)
    tensors = {"G.0.weight": torch.randn(4, 3), "D.0.weight": torch.randn(2, 4)}
    return wire.Envelope(
        kind="global", run="run-1", round=round_index, base_round=round_index, device="server", samples=0,
        codec="fp32", tensors=tensors, sent_at=sent_at,
    )  # fmt: skip


@pytest.fixture
def signer() -> signing.Signer:
    return signing.Signer(signing.generate_key())


def test_a_signed_global_verifies_with_its_key_and_names_its_digest(signer):
    payload, digest = signer.sign(global_envelope())
    received = wire.decode(payload)
    assert received.digest == digest and received.signer == signer.public_key
    assert signing.verify(received, public_key=signer.public_key) is None
    assert torch.equal(received.tensors["G.0.weight"], global_envelope().tensors["G.0.weight"])


def test_a_tampered_tensor_breaks_the_signature(signer):
    payload, _ = signer.sign(global_envelope())
    head = msgpack.unpackb(payload, raw=False)
    body = msgpack.unpackb(head["tensors"], raw=False)
    data = bytearray(body["G.0.weight"]["data"])
    data[0] ^= 1
    body["G.0.weight"]["data"] = bytes(data)
    head["tensors"] = msgpack.packb(body, use_bin_type=True)
    tampered = wire.decode(msgpack.packb(head, use_bin_type=True))
    assert signing.verify(tampered, public_key=signer.public_key) == signing.BAD_SIGNATURE


def test_a_tampered_round_breaks_the_signature(signer):
    payload, _ = signer.sign(global_envelope())
    head = msgpack.unpackb(payload, raw=False)
    head["round"] = head["base_round"] = 99
    tampered = wire.decode(msgpack.packb(head, use_bin_type=True))
    assert signing.verify(tampered, public_key=signer.public_key) == signing.BAD_SIGNATURE


def test_a_model_signed_by_another_key_is_refused_even_naming_the_trusted_signer(signer):
    other = signing.Signer(signing.generate_key())
    payload, _ = other.sign(global_envelope())
    assert signing.verify(wire.decode(payload), public_key=signer.public_key) == signing.WRONG_KEY
    head = msgpack.unpackb(payload, raw=False)
    head["signer"] = signer.public_key  # claims to be the server; the signature is still the other key's
    forged = wire.decode(msgpack.packb(head, use_bin_type=True))
    assert signing.verify(forged, public_key=signer.public_key) == signing.BAD_SIGNATURE


def test_an_unsigned_global_still_decodes_and_is_refused(signer):
    received = wire.decode(wire.encode(global_envelope()))
    assert received.sig is None and received.signer is None
    assert signing.verify(received, public_key=signer.public_key) == signing.UNSIGNED


def test_the_digest_is_stable_and_names_the_message_not_the_signature(signer):
    payload, digest = signer.sign(global_envelope())
    again, digest_again = signing.Signer(signer.key).sign(global_envelope())
    assert digest == digest_again == signing.digest(payload) == signing.digest(again)
    # The digest of the unsigned message is the same: the signature keys are left out of it.
    assert signing.digest(wire.encode(global_envelope())) == digest
    assert signing.digest(wire.encode(global_envelope(sent_at=1.8e9))) != digest
    assert len(digest) == wire.DIGEST_BYTES


def test_an_update_carries_trained_on_and_older_updates_decode_without_it():
    update = wire.Envelope(
        kind="update", run="run-1", round=3, base_round=3, device="pi-0", samples=10, codec="fp32",
        tensors={"D.0.weight": torch.zeros(2)}, trained_on=b"\x01" * 32,
    )  # fmt: skip
    assert wire.decode(wire.encode(update)).trained_on == b"\x01" * 32
    older = wire.encode(wire.Envelope(**{**update.__dict__, "trained_on": None}))
    assert "trained_on" not in msgpack.unpackb(older, raw=False)
    assert wire.decode(older).trained_on is None


def test_a_signature_field_of_the_wrong_size_is_a_wire_error(signer):
    head = msgpack.unpackb(signer.sign(global_envelope())[0], raw=False)
    head["sig"] = b"short"
    with pytest.raises(wire.WireError) as error:
        wire.decode(msgpack.packb(head, use_bin_type=True))
    assert error.value.reason == "bad-field"


def test_a_key_is_created_owner_only_reused_and_read_as_pem_or_raw(tmp_path):
    path = tmp_path / "run" / signing.KEY_FILE
    key, created = signing.load_or_create(path)
    assert created and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, created_again = signing.load_or_create(path)
    assert not created_again and signing.public_bytes(again) == signing.public_bytes(key)
    raw = tmp_path / "raw.key"
    raw.write_bytes(key.private_bytes_raw())
    assert signing.public_bytes(signing.load_key(raw)) == signing.public_bytes(key)
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(ValueError, match="not an unencrypted Ed25519 key"):
        signing.load_key(tmp_path / "bad.key")


def test_a_server_key_is_given_as_hex_a_hex_file_or_a_pem_file(tmp_path):
    key = signing.generate_key()
    public = signing.public_bytes(key)
    assert signing.parse_public_key(public.hex()) == public
    hex_file = tmp_path / "server.pub"
    hex_file.write_text(public.hex() + "\n")
    assert signing.parse_public_key(str(hex_file)) == public
    pem = tmp_path / "server-signing.key"
    signing.save_key(key, pem)
    assert signing.parse_public_key(str(pem)) == public
    with pytest.raises(ValueError, match="neither 64 hex digits nor a readable file"):
        signing.parse_public_key("zz")


def test_a_pre_encoded_update_rebound_to_another_global_decodes_with_that_digest():
    update = wire.Envelope(
        kind="update", run="run-1", round=3, base_round=3, device="pi-0", samples=10, codec="fp32+zstd",
        tensors={"D.0.weight": torch.ones(4)}, trained_on=bytes(32), loss=0.5,
    )  # fmt: skip
    rebound = wire.decode(wire.rebind(wire.encode(update), b"\x05" * 32))
    assert rebound.trained_on == b"\x05" * 32 and rebound == wire.Envelope(
        **{**update.__dict__, "trained_on": b"\x05" * 32, "tensors": rebound.tensors}
    )
