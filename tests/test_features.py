"""The feature extractor of fid is selectable (edgegan/metrics/extractors.py) and the same for everyone in a
run: a user's TorchScript module, scripted here from a tiny network and saved as a real file."""

import csv
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from edgegan import wire
from edgegan.algorithms.config import TrainConfig
from edgegan.data import load_dataset
from edgegan.metrics import (
    ImageQuality,
    combined_statistics,
    feature_statistics,
    file_digest,
    load_extractor,
)
from edgegan.runtime.featurestats import checked_join, features_for_run, measure_statistics
from edgegan.runtime.runconfig import RunConfig, RunIncompatible

MNIST_SHAPE = (1, 28, 28)
# torch >= 2.9 deprecates TorchScript in favour of torch.export; users still ship .pt TorchScript files.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


class TinyFeatures(nn.Module):
    """A 4-channel convolution pooled to 2 x 2: 16-d features, no class head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(images)), 2)
        return torch.flatten(pooled, 1)


class FlatOutput(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.sum(dim=(1, 2, 3))


def script(module: nn.Module, path, seed: int = 0):
    torch.manual_seed(seed)
    torch.jit.script(module).save(str(path))
    return path


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


@pytest.fixture
def tiny(tmp_path):
    return script(TinyFeatures(), tmp_path / "tiny.pt")


def torchscript(path):
    return load_extractor(f"torchscript:{path}", dataset="mnist", data_dir=None, sample_shape=MNIST_SHAPE)


def run_config(**changes) -> RunConfig:
    fields = dict(
        dataset="mnist", partition="iid", devices=3, seed=0, sample_shape=MNIST_SHAPE, width=32, latent_dim=8,
        codec="fp32", schedule="sync", train=TrainConfig(), quality_from="devices",
    )  # fmt: skip
    return RunConfig(**fields | changes)


def test_fid_from_federated_statistics_equals_fid_against_the_union_with_a_torchscript_extractor(tiny, mnist):
    extractor = torchscript(tiny)
    assert extractor.num_features == 16 and extractor.name == f"torchscript:{file_digest(tiny)}"
    order = torch.randperm(len(mnist), generator=torch.Generator().manual_seed(1))
    parts = [mnist.x[order[start : start + 600]] for start in range(0, 1800, 600)]  # 3 devices
    fakes = mnist.x[order[4000:4500]]
    union = torch.cat(parts)
    direct = ImageQuality(extractor, union, num_real=len(union))(fakes)
    statistics = combined_statistics(feature_statistics(extractor, part) for part in parts)
    federated = ImageQuality.from_statistics(extractor, statistics)(fakes)
    assert federated["fid"] == pytest.approx(direct["fid"], abs=1e-3)
    assert set(direct) == set(federated) == {"fid"}  # no class head: no classes score


def test_a_device_measures_the_runs_torchscript_statistics_with_its_own_copy(tiny, mnist, tmp_path):
    copy = tmp_path / "elsewhere" / "my-copy.pt"
    copy.parent.mkdir()
    copy.write_bytes(tiny.read_bytes())
    config = run_config(features=f"torchscript:{file_digest(tiny)}")
    assert features_for_run(config, str(copy)) == f"torchscript:{copy}"  # a bare PATH is its copy too
    payload = measure_statistics(
        config, mnist.x[:300], run="r", device="d", data_dir=None, features=f"torchscript:{copy}"
    )
    envelope = wire.decode(payload, {wire.STATS_SUM: (16,), wire.STATS_OUTER: (16, 16)})
    feature_sum, outer_sum = wire.stats_tensors(envelope)
    extractor = torchscript(tiny)
    assert torch.equal(feature_sum, feature_statistics(extractor, mnist.x[:300]).feature_sum)
    assert envelope.samples == 300 and outer_sum.shape == (16, 16)


def test_a_device_whose_torchscript_file_differs_from_the_runs_refuses_naming_features(tiny, tmp_path):
    other = script(TinyFeatures(), tmp_path / "other.pt", seed=1)
    config = run_config(features=f"torchscript:{file_digest(tiny)}")
    missing = tmp_path / "missing.pt"
    for given in (f"torchscript:{other}", f"torchscript:{missing}", "classifier", "inception"):
        with pytest.raises(RunIncompatible) as raised:
            features_for_run(config, given)
        assert raised.value.field == "features" and "\n" not in str(raised.value)
    joined = []
    join = checked_join(joined.append, features=f"torchscript:{other}")
    with pytest.raises(RunIncompatible, match="sha256"):
        join(config)
    assert joined == []  # refused before it loaded any data


def test_a_device_left_at_the_default_takes_a_classifier_or_inception_run_as_it_is():
    assert features_for_run(run_config(), "classifier") == "classifier"
    assert features_for_run(run_config(features="inception"), "classifier") == "inception"
    with pytest.raises(RunIncompatible, match="inception"):
        features_for_run(run_config(), "inception")


@pytest.mark.parametrize(
    "content,named",
    [(b"not a torchscript file", "not a readable TorchScript file"), (None, "(N, d) features")],
)
def test_a_bad_torchscript_file_or_one_of_the_wrong_output_is_a_one_line_error_naming_it(tmp_path, content,
                                                                                      named):  # fmt: skip
    path = tmp_path / "bad.pt"
    if content is None:
        script(FlatOutput(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        torchscript(path)
    message = str(raised.value)
    assert str(path) in message and named in message and "\n" not in message


def test_an_unknown_features_spec_names_the_allowed_ones():
    with pytest.raises(ValueError, match="classifier, torchscript:PATH or inception"):
        load_extractor("resnet", dataset="mnist", data_dir=None, sample_shape=MNIST_SHAPE)


def test_the_run_configuration_carries_the_extractor_and_older_configurations_mean_the_classifier():
    config = run_config(features="torchscript:" + "ab" * 32)
    assert RunConfig.decode(config.encode()) == config
    old = json.loads(config.encode())
    del old["features"]
    assert RunConfig.decode(json.dumps(old).encode()).features == "classifier"
    for bad in ("resnet", "torchscript:/boards/pi-0/tiny.pt", 3):
        with pytest.raises(wire.WireError) as raised:
            RunConfig.decode(json.dumps(old | {"features": bad}).encode())
        assert raised.value.reason == "bad-field" and "features" in str(raised.value)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity installed")
def test_inception_without_torch_fidelity_says_what_to_install_and_fetch():
    with pytest.raises(ValueError) as raised:
        load_extractor("inception", dataset="mnist", data_dir=None, sample_shape=MNIST_SHAPE)
    message = str(raised.value)
    assert "pip install torch-fidelity" in message and "weights-inception" in message and "\n" not in message


def test_inception_features_of_grey_images_are_2048_d():
    pytest.importorskip("torch_fidelity")
    from edgegan.metrics.extractors import inception_weights_path

    if not inception_weights_path().is_file():
        pytest.skip(f"no Inception weights at {inception_weights_path()}")
    extractor = load_extractor("inception", dataset="mnist", data_dir=None, sample_shape=MNIST_SHAPE)
    assert extractor(torch.zeros(2, *MNIST_SHAPE)).shape == (2, 2048) and extractor.logits(None) is None


def test_simulate_with_a_torchscript_extractor_writes_fid_and_no_classes(tiny, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "edgegan", "simulate", "--dataset", "mnist", "--devices", "2", "--rounds", "2",
         "--eval-every", "1", "--eval-samples", "100", "--width", "8", "--latent-dim", "8",
         "--features", f"torchscript:{tiny}", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [row["round"] for row in rows] == ["0", "1", "2"]
    assert all(float(row["fid"]) >= 0 and row["classes"] == "" for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final"]) == {"fid"} and summary["features"] == f"torchscript:{file_digest(tiny)}"
    scored = subprocess.run(
        [sys.executable, "-m", "edgegan", "evaluate", str(out / "generator.pt"), "--samples", "500",
         "--features", f"torchscript:{tiny}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    assert set(json.loads(scored.stdout)) == {"dataset", "samples", "fid"}


def test_over_mosquitto_devices_measure_with_their_own_copies_and_a_wrong_copy_is_refused(
    broker, tmp_path, tiny
):
    """`edgegan server --features torchscript:PATH --quality-from devices`: each device gives its own copy
    (`--features PATH`); the server's fid equals fid against the union in the same features, and a device
    whose file is another is refused with one line naming features."""
    from test_runtime_mqtt import edgegan, finish

    from edgegan.data import parse_partition, partition_indices
    from edgegan.models import ModelSpec, build_generator
    from edgegan.runsetup import QualityProbe

    url, _ = broker
    devices, run, out = 2, "features", tmp_path / "server"
    small = ["--dataset", "mnist", "--partition", "iid", "--width", "8", "--latent-dim", "8"]
    server = edgegan(
        "server", "--broker", url, "--run", run, "--devices", str(devices), "--rounds", "2", "--eval-every",
        "2", "--deadline-s", "30", "--out", str(out), "--quality-from", "devices",
        "--features", f"torchscript:{tiny}", *small,
    )  # fmt: skip
    try:
        wrong = script(TinyFeatures(), tmp_path / "wrong.pt", seed=1)
        refused = edgegan("device", "--broker", url, "--run", run, "--id", "device-9", "--index", "0",
                          "--of", str(devices), "--features", str(wrong), *small)  # fmt: skip
        output, _ = refused.communicate(timeout=120)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert refused.returncode == 2 and len(errors) == 1 and "features" in errors[0], output
        agents = []
        for index in range(devices):
            copy = tmp_path / f"board-{index}" / "features.pt"
            copy.parent.mkdir()
            copy.write_bytes(tiny.read_bytes())
            agents.append(edgegan("device", "--broker", url, "--run", run, "--id", f"device-{index}",
                                  "--index", str(index), "--of", str(devices), "--features", str(copy),
                                  *small))  # fmt: skip
        finish(server, timeout_s=240)
        for agent in agents:
            finish(agent)
    finally:
        if server.poll() is None:
            server.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quality_devices"] == devices and summary["features"] == f"torchscript:{file_digest(tiny)}"
    dataset = load_dataset("mnist")
    union = torch.cat(
        [dataset.x[part] for part in partition_indices(dataset.y, devices, parse_partition("iid"), 0)]
    )
    generator = build_generator(ModelSpec(MNIST_SHAPE, 8, 8))
    generator.load_state_dict(torch.load(out / "generator.pt", weights_only=True)["state_dict"])
    probe = QualityProbe(dataset=dataset, latent_dim=8, samples=2500, seed=0, data_dir=None,
                         features=f"torchscript:{tiny}")  # fmt: skip
    direct = ImageQuality(probe.extractor, union, num_real=len(union))(probe.samples(generator))
    assert set(summary["final"]) == {"fid"}
    assert summary["final"]["fid"] == pytest.approx(direct["fid"], abs=1e-3)
