"""A server that holds no training data: with `--quality-from devices` or a public `--reference-set` it
never reads the data set (only its shape), and scores against what it was given."""

from pathlib import Path

import pytest
from torchvision.utils import save_image
from typer.testing import CliRunner

from edgegan import runsetup
from edgegan.algorithms.config import TrainConfig
from edgegan.cli import app
from edgegan.data import load_dataset, load_local
from edgegan.metrics import ImageQuality, load_classifier
from edgegan.models import ModelSpec, build_generator
from edgegan.runsetup import RunSetup, prepare


def setup_in(out: Path) -> RunSetup:
    return RunSetup(dataset="mnist", devices=4, partition="shards:2", seed=0, out=out, train=TrainConfig(),
                    width=8, latent_dim=8, eval_samples=500)  # fmt: skip


@pytest.fixture
def no_training_data(monkeypatch):
    """Any read of the training data set fails the test: the server must not need one."""

    def refuse(*args, **kwargs):
        raise AssertionError("the server read the training data set")

    monkeypatch.setattr(runsetup, "load_dataset", refuse)


def test_a_server_scoring_against_devices_knows_the_data_sets_shape_and_holds_none_of_it(
    tmp_path, no_training_data
):
    prepared = prepare(setup_in(tmp_path), quality_from="devices")
    assert len(prepared.dataset) == 0 and prepared.dataset.sample_shape == (1, 28, 28)
    assert prepared.parts == [] and prepared.probe.needs_statistics
    assert prepared.spec == ModelSpec((1, 28, 28), 8, 8)
    assert prepared.setup_lines[0] == "mnist: this process holds none of the data; 4 devices bring their own"


def test_a_server_given_a_public_reference_folder_scores_against_it_as_against_those_images(tmp_path):
    reference = load_dataset("mnist").x[-300:]  # the public set: not any device's images
    folder = tmp_path / "public"
    folder.mkdir()
    for number, image in enumerate(reference):
        save_image(image, folder / f"{number:03d}.png", normalize=True, value_range=(-1, 1))
    images = load_local(folder, sample_shape=(1, 28, 28)).x
    generator = build_generator(ModelSpec((1, 28, 28), 8, 8))

    def refuse(*args, **kwargs):
        raise AssertionError("the server read the training data set")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runsetup, "load_dataset", refuse)
        prepared = prepare(setup_in(tmp_path / "run"), quality_from="reference", reference=folder)
    quality, fakes = prepared.probe.measure(generator)
    direct = ImageQuality(load_classifier("mnist"), images)(fakes)
    assert quality == direct and quality["fid"] > 0
    assert "quality against the reference set 300 samples" in prepared.setup_lines[1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quality-from", "reference"], "--reference-set PATH goes with --quality-from reference"),
        (["--reference-set", "missing-folder"], "--reference-set missing-folder does not exist"),
        (["--quality-from", "devices", "--dataset", "ring8"], "needs an image data set"),
    ],
)
def test_a_server_given_a_bad_quality_source_says_so_in_one_line(tmp_path, flags, message):
    result = CliRunner().invoke(
        app, ["server", "--broker", "mqtt://127.0.0.1:1", "--out", str(tmp_path / "run"), *flags]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
