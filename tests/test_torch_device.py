import pytest
import torch
from typer.testing import CliRunner

from edgegan.cli import app
from edgegan.config import resolve_train
from edgegan.simulate import SimConfig, simulate
from edgegan.torchdevice import resolve_torch_device

runner = CliRunner()
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here")
without_cuda = pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device")


def weights_after(tmp_path, name: str, **changes) -> dict[str, torch.Tensor]:
    settings = dict(
        algo="serial", dataset="ring8", devices=2, partition="iid", rounds=4, seed=0, out=tmp_path / name,
        train=resolve_train("ring8", {}), width=16, latent_dim=8, eval_every=4, eval_samples=200,
    )  # fmt: skip
    simulate(SimConfig(**{**settings, **changes}))
    return torch.load(tmp_path / name / "generator.pt", weights_only=True)["state_dict"]


def test_cpu_is_the_default_and_auto_picks_cuda_only_where_torch_sees_it():
    assert resolve_torch_device("cpu") == torch.device("cpu")
    assert resolve_torch_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ValueError, match="--torch-device must be one of auto | cpu | cuda, got 'gpu'"):
        resolve_torch_device("gpu")


@without_cuda
@pytest.mark.parametrize(
    "command",
    [
        ["simulate", "--dataset", "ring8", "--rounds", "1"],
        ["server", "--dataset", "ring8", "--rounds", "1"],
        ["run", "--dataset", "ring8", "--rounds", "1", "--devices", "1"],
        ["device", "--id", "pi-0", "--index", "0", "--of", "1"],
    ],
)
def test_cuda_without_a_cuda_device_is_a_one_line_error(tmp_path, command):
    result = runner.invoke(app, [*command, "--out" if command[0] != "device" else "--run", "x",
                                 "--torch-device", "cuda"])  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: --torch-device cuda: torch sees no CUDA device here (use cpu or auto)"
    )


@without_cuda
@pytest.mark.parametrize("algo", ["serial", "mdgan", "fedgan"])
def test_auto_without_cuda_trains_on_cpu_bit_for_bit(tmp_path, algo):
    cpu = weights_after(tmp_path, "cpu", algo=algo)
    auto = weights_after(tmp_path, "auto", algo=algo, torch_device="auto")
    assert all(torch.equal(cpu[name], auto[name]) for name in cpu)


@needs_cuda
@pytest.mark.parametrize("algo", ["serial", "parallel", "mdgan", "fedgan"])
def test_a_cuda_run_trains_and_writes_a_cpu_generator(tmp_path, algo):
    cpu = weights_after(tmp_path, "cpu", algo=algo)
    cuda = weights_after(tmp_path, "cuda", algo=algo, torch_device="cuda")
    assert all(tensor.device.type == "cpu" and torch.isfinite(tensor).all() for tensor in cuda.values())
    # Same recipe and the same CPU random draws, different kernels: close, not bit-identical.
    assert all(
        torch.allclose(cpu[name], cuda[name], atol=1e-2) for name in cpu if cpu[name].is_floating_point()
    )


@needs_cuda
def test_a_device_on_cuda_sends_its_update_as_cpu_tensors():
    from edgegan.algorithms.proposed import GlobalGan, LocalDiscriminator
    from edgegan.models import ModelSpec

    spec = ModelSpec((2,), latent_dim=8, width=16)
    train = resolve_train("ring8", {})
    server = GlobalGan(spec, train, 0, torch_device=torch.device("cuda"))
    device = LocalDiscriminator(
        spec=spec,
        cfg=train,
        data=torch.randn(64, 2),
        device_index=0,
        seed=0,
        torch_device=torch.device("cuda"),
    )
    generator_state, discriminator_state = server.snapshot()
    assert all(
        tensor.device.type == "cpu" for tensor in [*generator_state.values(), *discriminator_state.values()]
    )
    update = device.update(0, generator_state, discriminator_state)
    assert all(tensor.device.type == "cpu" for tensor in update.state.values())
    server.fold_discriminators([update], [1.0], 0)
    assert next(server.discriminator.parameters()).device.type == "cuda"
