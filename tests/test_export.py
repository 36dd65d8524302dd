import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from typer.testing import CliRunner

from edgegan.cli import app
from edgegan.export import ONNX_TOLERANCE
from edgegan.models import ModelSpec, build_generator

runner = CliRunner()
SPEC = ModelSpec((1, 28, 28), latent_dim=8, width=8)

# Runs in a fresh interpreter without edgegan on its path: what a user's program would do.
LOAD_WITHOUT_EDGEGAN = """
import json, sys, torch
extra = {"edgegan.json": ""}
module = torch.jit.load(sys.argv[1], _extra_files=extra)
noise = torch.load(sys.argv[2])
torch.save(module(noise).detach(), sys.argv[3])
print(json.dumps({"card": json.loads(extra["edgegan.json"]), "edgegan": "edgegan" in sys.modules}))
"""


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as a finished run leaves it, with a tiny untrained generator whose batch norm
    statistics are not the defaults (so a file that dropped them would differ)."""
    torch.manual_seed(0)
    generator = build_generator(SPEC)
    generator.train()
    with torch.no_grad():
        generator(torch.randn(16, SPEC.latent_dim))
    run = tmp_path / "run"
    run.mkdir()
    torch.save(
        {"spec": asdict(SPEC), "dataset": "mnist", "state_dict": generator.state_dict()}, run / "generator.pt"
    )
    return run, generator.eval()


def noise(count: int) -> torch.Tensor:
    return torch.randn(count, SPEC.latent_dim, generator=torch.Generator().manual_seed(7))


def test_torchscript_export_loads_with_torch_alone_and_gives_the_generators_output(run_dir, tmp_path):
    run, generator = run_dir
    result = runner.invoke(app, ["export", str(run)])
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1
    assert "generator.ts" in line and "(N, 8)" in line and "(N, 1, 28, 28)" in line and "[-1, 1]" in line
    z = noise(5)
    torch.save(z, tmp_path / "noise.pt")
    loaded = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITHOUT_EDGEGAN, str(run / "generator.ts"),
         str(tmp_path / "noise.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    report = json.loads(loaded.stdout)
    assert report["edgegan"] is False
    assert report["card"] == {
        "latent_dim": 8, "output_shape": [1, 28, 28], "output_range": [-1.0, 1.0], "dataset": "mnist",
        "source": str(run / "generator.pt"), "input_name": "noise", "output_name": "samples",
    }  # fmt: skip
    with torch.no_grad():  # another process may split the sums over other threads: equal to float rounding
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), generator(z), atol=1e-6, rtol=0)


def test_onnx_export_passes_the_checker_and_onnxruntime_matches_torch_at_any_batch(run_dir, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    run, generator = run_dir
    out = tmp_path / "elsewhere" / "g.onnx"
    result = runner.invoke(app, ["export", str(run), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 1 and str(out) in result.output
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    props = {entry.key: entry.value for entry in model.metadata_props}
    card = json.loads(props["edgegan.json"])
    assert card["latent_dim"] == 8 and card["output_shape"] == [1, 28, 28] and card["dataset"] == "mnist"
    assert props["edgegan.output_range"] == "[-1.0, 1.0]" and props["edgegan.source"] == card["source"]
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for count in (1, 7):  # the batch axis is dynamic
        z = noise(count)
        (theirs,) = session.run(["samples"], {"noise": z.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(theirs), generator(z), atol=ONNX_TOLERANCE, rtol=0)


def test_a_mid_run_server_checkpoint_exports_too(run_dir):
    run, generator = run_dir
    saved = torch.load(run / "generator.pt", weights_only=True)
    (run / "generator.pt").unlink()
    server_checkpoint = {"rounds_done": 3, "spec": saved["spec"], "dataset": "mnist",
                         "generator": saved["state_dict"]}  # fmt: skip
    torch.save(server_checkpoint, run / "checkpoint.pt")
    result = runner.invoke(app, ["export", str(run)])
    assert result.exit_code == 0, result.output
    assert "checkpoint.pt" in result.output and (run / "generator.ts").is_file()


@pytest.mark.parametrize(
    ("make_args", "named"),
    [
        (lambda run: [str(run.parent / "missing")], "no such run"),
        (lambda run: [str(run.parent)], "holds no generator.pt or checkpoint.pt"),
        (lambda run: [str(run / "junk.pt")], "is not an edgegan generator checkpoint"),
        (lambda run: [str(run), "--format", "tflite"], "--format must be one of torchscript | onnx"),
    ],
)
def test_bad_exports_give_a_one_line_error_and_exit_code_2(run_dir, make_args, named):
    run, _ = run_dir
    (run / "junk.pt").write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["export", *make_args(run)])
    assert result.exit_code == 2
    assert named in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_onnx_without_the_onnx_package_says_how_to_install_it(run_dir, monkeypatch):
    run, _ = run_dir
    monkeypatch.setitem(sys.modules, "onnx", None)  # an import of it now fails as if not installed
    result = runner.invoke(app, ["export", str(run), "--format", "onnx"])
    assert result.exit_code == 2
    expected = "error: --format onnx needs the onnx package: pip install 'edgegan[export]'"
    assert result.output.strip() == expected
