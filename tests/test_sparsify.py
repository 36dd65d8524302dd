"""Top-k uplink sparsification with error feedback (edgegan/algorithms/sparsify.py) and its wire form
(`topk+int8+zstd`: a bit mask and the kept values, int8)."""

import pytest
import torch
from typer.testing import CliRunner

from edgegan import wire
from edgegan.algorithms.sparsify import UplinkResidual, top_k
from edgegan.cli import app
from edgegan.transfer import send_change


def test_top_k_keeps_the_largest_magnitudes_of_each_tensor_and_zeroes_the_rest():
    tensor = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.0], [0.05, 1.0, -3.0], [0.4, 0.0, 0.01]])
    kept = top_k(tensor, 0.25)  # ceil(0.25 * 12) = 3 entries
    assert kept.shape == tensor.shape
    assert torch.equal(kept.nonzero(), torch.tensor([[0, 1], [1, 0], [2, 2]]))
    assert torch.equal(kept[kept != 0], tensor[kept != 0])
    assert torch.equal(top_k(tensor, 1.0), tensor) and top_k(torch.ones(1), 0.01).sum() == 1


def test_error_feedback_loses_nothing_what_the_server_received_plus_the_residual_is_every_change():
    generator = torch.Generator().manual_seed(0)
    residual = UplinkResidual(density=0.1)
    total_change = {"w": torch.zeros(40, 30), "b": torch.zeros(30)}
    total_received = {name: torch.zeros_like(tensor) for name, tensor in total_change.items()}
    for round_index in range(20):
        change = {name: torch.randn(tensor.shape, generator=generator) * 0.01
                  for name, tensor in total_change.items()}  # fmt: skip
        _, received = send_change(round_index, change, "topk+int8+zstd", residual)
        received = wire.discriminator_state(received)
        for name in change:
            total_change[name] += change[name]
            total_received[name] += received[name]
            assert (received[name] != 0).sum() <= -(-received[name].numel() // 10)
    for name in total_change:
        assert torch.allclose(total_received[name] + residual.residual[name], total_change[name], atol=1e-5)


def test_a_sparse_update_is_smaller_than_the_dense_int8_one_and_decodes_with_exact_zeros():
    change = {"d.0.weight": torch.randn(64, 32, 4, 4) * 0.01, "d.0.bias": torch.randn(64) * 0.01}
    kept = {name: top_k(tensor, 0.1) for name, tensor in change.items()}

    def message(codec: str, tensors: dict) -> wire.Envelope:
        return wire.Envelope(kind="update", run="r", round=1, base_round=1, device="d", samples=5,
                             codec=codec, tensors=tensors, delta=True)  # fmt: skip

    sparse = wire.encode(message("topk+int8+zstd", kept))
    assert len(sparse) < 0.3 * len(wire.encode(message("int8+zstd", change)))
    decoded = wire.decode(sparse).tensors
    for name, tensor in kept.items():
        assert torch.equal(decoded[name] == 0, tensor == 0)
        assert torch.allclose(decoded[name], tensor, atol=(tensor.max() - tensor.min()).item() / 255)
    # Other kinds under the same codec travel dense int8 (a global model, say).
    glob = wire.Envelope(**{**message("topk+int8+zstd", change).__dict__, "kind": "global", "delta": False})
    assert not torch.equal(wire.decode(wire.encode(glob)).tensors["d.0.bias"] == 0, kept["d.0.bias"] == 0)


def test_a_sparse_tensor_with_a_mask_of_the_wrong_size_or_count_is_a_bad_tensor():
    item = wire.encode_tensor(top_k(torch.randn(100), 0.1), "int8", sparse=True)
    with pytest.raises(wire.WireError, match="bad-tensor"):
        wire.decode_tensor("w", item | {"mask": item["mask"][:-1]})
    with pytest.raises(wire.WireError, match="bad-shape"):  # more bits set than values sent
        wire.decode_tensor("w", item | {"mask": b"\xff" * len(item["mask"])})


def test_the_sparse_codec_is_the_proposed_methods_only():
    result = CliRunner().invoke(app, ["simulate", "--algo", "mdgan", "--dataset", "ring8", "--rounds", "1",
                                      "--codec", "topk+int8+zstd"])  # fmt: skip
    assert result.exit_code == 2 and result.stderr.strip() == (
        "error: --codec topk+int8+zstd sparsifies the proposed method's updates (serial, parallel), "
        "not mdgan's"
    )
