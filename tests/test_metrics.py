"""Quality metrics: mode coverage on 2-D mixtures, the classifier-feature Fréchet distance, class coverage."""

from __future__ import annotations

import pytest
import torch

from edgegan.data import load_dataset
from edgegan.data.mixtures import RING8_STD, ring8_modes
from edgegan.metrics import (
    ClassifierMissingError,
    FeatureClassifier,
    FeatureStatistics,
    ImageQuality,
    class_scores,
    combined_statistics,
    feature_statistics,
    image_logits,
    load_classifier,
    point_quality,
    save_classifier,
    train_classifier,
)
from edgegan.metrics.classifier import accuracy


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


@pytest.fixture(scope="module")
def classifier():
    return load_classifier("mnist")


@pytest.fixture(scope="module")
def mnist_split(mnist):
    # A random split: the vendored test split's first and second halves come from different writers
    # (NIST SD-3 and SD-1), so a split by position scores a real distribution shift (Fréchet ~27).
    order = torch.randperm(len(mnist), generator=torch.Generator().manual_seed(0))
    return mnist.x[order[:5000]], mnist.x[order[5000:7000]]


@pytest.fixture(scope="module")
def image_quality(classifier, mnist_split):
    real, _ = mnist_split
    return ImageQuality(classifier, real)


def test_point_quality_counts_all_eight_modes_when_samples_sit_on_the_modes():
    modes = ring8_modes()
    samples = modes.repeat(100, 1)
    assert point_quality(samples, modes, RING8_STD) == {"modes": 8, "hq": 1.0, "dist": 0.0}


def test_point_quality_counts_one_mode_when_samples_collapse_onto_it():
    modes = ring8_modes()
    samples = modes[3] + RING8_STD * torch.randn(800, 2, generator=torch.Generator().manual_seed(0))
    result = point_quality(samples, modes, RING8_STD)
    assert result["modes"] == 1
    # In 2-D, P(|N(0, std^2 I)| <= 3 std) = 1 - exp(-4.5) = 0.989: true samples are not all high quality.
    assert 0.97 < result["hq"] < 1.0
    # The mean of a 2-D Rayleigh distance: std * sqrt(pi / 2) = 1.25 std.
    assert result["dist"] == pytest.approx(1.25 * RING8_STD, rel=0.1)


def test_point_quality_counts_no_modes_and_no_quality_for_far_away_noise():
    modes = ring8_modes()
    samples = 50.0 + torch.rand(800, 2, generator=torch.Generator().manual_seed(0))
    result = point_quality(samples, modes, RING8_STD)
    assert (result["modes"], result["hq"]) == (0, 0.0)
    assert result["dist"] > 45.0


def test_point_quality_ignores_a_mode_with_under_one_percent_of_the_samples():
    modes = ring8_modes()
    samples = torch.cat([modes[0].repeat(995, 1), modes[1].repeat(5, 1)])
    assert point_quality(samples, modes, RING8_STD)["modes"] == 1


def test_frechet_distance_of_held_out_real_mnist_is_small_and_of_uniform_noise_much_larger(
    image_quality, mnist_split
):
    _, held_out = mnist_split
    noise = torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_fid = image_quality(held_out)["fid"]
    noise_fid = image_quality(noise)["fid"]
    assert real_fid < 10
    assert noise_fid > 50 * real_fid


def test_image_quality_scores_each_call_alone_without_earlier_fakes(image_quality, mnist_split):
    _, held_out = mnist_split
    first = image_quality(held_out)
    image_quality(-torch.ones(2000, 1, 28, 28))
    assert image_quality(held_out) == first


def test_classes_of_real_mnist_is_ten_and_of_one_repeated_digit_is_one(image_quality, mnist_split, mnist):
    _, held_out = mnist_split
    assert image_quality(held_out)["classes"] == 10
    assert image_quality(mnist.x[:1].repeat(500, 1, 1, 1))["classes"] == 1


def test_inception_score_of_real_digits_beats_one_class_which_beats_noise(image_quality, mnist_split, mnist):
    _, held_out = mnist_split
    noise = torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real, one_class = image_quality(held_out), image_quality(mnist.x[mnist.y == 3][:500])
    three_classes = image_quality(mnist.x[mnist.y < 3][:1500])
    scores = [real["is"], three_classes["is"], one_class["is"], image_quality(noise)["is"]]
    assert scores == sorted(scores, reverse=True) and real["is"] > 8.5, scores
    # K balanced classes score about K (a little more where the classifier spreads its doubt elsewhere)
    assert 2.5 < three_classes["is"] < 3.5 and one_class["is"] < 1.2
    for quality in (real, one_class, three_classes):
        assert sum(quality["class_shares"]) == pytest.approx(1, abs=1e-3)
        assert len(quality["class_shares"]) == 10
    assert one_class["class_shares"][3] > 0.9 and max(real["class_shares"]) < 0.15


def test_class_scores_of_known_logits_are_the_textbook_inception_score():
    # Two equally likely classes, each image certain of its own: KL(p(y|x) || p(y)) = ln 2 for every image.
    certain = torch.tensor([[50.0, -50.0], [-50.0, 50.0]]).repeat(50, 1)
    assert class_scores(certain) == {"classes": 2, "is": pytest.approx(2.0), "class_shares": [0.5, 0.5]}
    # Images that cannot tell the classes apart carry no information: IS 1.
    assert class_scores(torch.zeros(10, 2))["is"] == pytest.approx(1.0)


def test_image_logits_need_a_class_head(classifier, mnist):
    assert image_logits(classifier, mnist.x[:7]).shape == (7, 10)


def test_image_quality_rejects_fakes_of_the_wrong_shape(image_quality):
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)"):
        image_quality(torch.zeros(10, 3, 32, 32))


def test_a_diverged_generators_non_finite_samples_score_infinitely_far_without_reaching_lapack(
    image_quality, mnist_split
):
    """NaN features made MKL abort the process (a corrupted heap) in the matrix square root of fid."""
    fakes = mnist_split[1][:64].clone()
    fakes[3, 0, 5, 5] = float("nan")
    assert image_quality(fakes) == {"fid": float("inf"), "classes": 0}
    assert image_quality(torch.full_like(fakes, float("inf")))["fid"] == float("inf")
    assert image_quality(mnist_split[1][:64])["fid"] < float("inf")  # the scorer is not left broken


def test_missing_cifar10_classifier_names_the_expected_file_and_the_command(tmp_path):
    with pytest.raises(ClassifierMissingError) as raised:
        load_classifier("cifar10", tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "edgegan-classifiers" / "cifar10.pt") in message
    assert f"edgegan train-classifier --dataset cifar10 --data-dir {tmp_path}" in message


def test_saved_classifier_loads_back_from_the_data_dir(tmp_path):
    model = FeatureClassifier(channels=3, size=32)
    save_classifier(model, tmp_path / "edgegan-classifiers" / "cifar10.pt", {"holdout_accuracy": 0.5})
    loaded = load_classifier("cifar10", tmp_path)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.logits(images), model.eval().logits(images))
    assert loaded(images).shape == (4, loaded.num_features)
    assert loaded.metadata == {"holdout_accuracy": 0.5}


def test_shipped_mnist_classifier_classifies_vendored_mnist_at_97_percent(classifier, mnist):
    subset = torch.randperm(len(mnist), generator=torch.Generator().manual_seed(1))[:2000]
    assert accuracy(classifier, mnist.x[subset], mnist.y[subset]) >= 0.97


def test_train_classifier_is_deterministic_for_a_seed(mnist):
    small = mnist.subset(torch.arange(600))
    first, first_accuracy = train_classifier(small, epochs=1, seed=3, holdout=100)
    second, second_accuracy = train_classifier(small, epochs=1, seed=3, holdout=100)
    assert first_accuracy == second_accuracy
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name])


def test_unreadable_classifier_file_names_the_file_and_the_command_that_remakes_it(tmp_path):
    path = tmp_path / "edgegan-classifiers" / "fashion-mnist.pt"
    path.parent.mkdir()
    path.write_text("not a checkpoint")
    with pytest.raises(ClassifierMissingError) as raised:
        load_classifier("fashion-mnist", tmp_path)
    assert str(path) in str(raised.value)
    assert "edgegan train-classifier --dataset fashion-mnist" in str(raised.value)


def test_fid_against_summed_device_statistics_equals_fid_against_the_union_of_their_images(classifier, mnist):
    order = torch.randperm(len(mnist), generator=torch.Generator().manual_seed(3))
    slices = [mnist.x[order[start : start + 700]] for start in range(0, 2800, 700)]  # 4 disjoint devices
    fakes = mnist.x[order[5000:6000]]  # other real digits stand in for a generator's samples
    union = torch.cat(slices)
    direct = ImageQuality(classifier, union, num_real=len(union))(fakes)
    statistics = combined_statistics(feature_statistics(classifier, part) for part in slices)
    federated = ImageQuality.from_statistics(classifier, statistics)
    assert statistics.count == len(union)
    assert federated(fakes)["fid"] == pytest.approx(direct["fid"], abs=1e-3)
    assert federated(fakes)["classes"] == direct["classes"]  # and again: the real side survives a call


def test_image_quality_refuses_statistics_of_the_wrong_size_or_of_one_image(classifier, mnist):
    good = feature_statistics(classifier, mnist.x[:10])
    with pytest.raises(ValueError, match="shapes"):
        ImageQuality.from_statistics(classifier, FeatureStatistics(10, good.feature_sum[:8], good.outer_sum))
    with pytest.raises(ValueError, match="at least 2"):
        ImageQuality.from_statistics(classifier, FeatureStatistics(1, good.feature_sum, good.outer_sum))


def test_the_calibration_orders_real_flawed_collapsed_and_noise_images_as_a_reader_would(mnist):
    from typer.testing import CliRunner

    from edgegan.cli import app
    from edgegan.metrics import load_extractor
    from edgegan.metrics.calibration import calibrate

    extractor = load_extractor("classifier", dataset="mnist", data_dir=None, sample_shape=(1, 28, 28))
    references = calibrate(mnist, extractor, samples=1000, seed=0)
    fids = [reference.quality["fid"] for reference in references]
    scores = [reference.quality["is"] for reference in references]
    assert fids == sorted(fids) and scores == sorted(scores, reverse=True), (fids, scores)
    assert fids[0] < 10 and scores[0] > 9 and [r.quality["classes"] for r in references[-2:]] == [1, 1]
    result = CliRunner().invoke(app, ["evaluate", "--reference", "--samples", "500"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| ")]
    assert rows[0] == "| images | fid | classes | IS | class shares |" and len(rows) == 8
