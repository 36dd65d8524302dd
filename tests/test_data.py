"""The data package: vendored MNIST, user data dirs in torchvision's layouts, 2-D mixtures, partitioning.

Every user data set here is a handful of examples written by the test itself in the on-disk format
torchvision uses, so the whole file runs in seconds and needs no download.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import shutil
import struct
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from edgegan.data import (
    DATASETS,
    DatasetError,
    PartitionSpec,
    PartitionSpecError,
    load_dataset,
    parse_partition,
    partition_indices,
)
from edgegan.data.images import load_vendored_mnist
from edgegan.data.mixtures import GRID25_SPACING, GRID25_STD, RING8_RADIUS, RING8_STD, make_mixture

IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
IMAGE_FILE = "train-images-idx3-ubyte"
LABEL_FILE = "train-labels-idx1-ubyte"
CIFAR_BATCHES = [f"data_batch_{number}" for number in range(1, 6)]


# --- helpers that write torchvision's on-disk formats --------------------------------------------------


def idx_images_bytes(images: np.ndarray) -> bytes:
    """IDX3 of uint8 images: magic 0x00000803, then count, rows, columns, all big-endian."""
    count, rows, columns = images.shape
    return struct.pack(">IIII", 0x00000803, count, rows, columns) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray) -> bytes:
    """IDX1 of uint8 labels: magic 0x00000801, then count, big-endian."""
    return struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()


def tiny_digits() -> tuple[np.ndarray, np.ndarray]:
    """Three 28 x 28 images (black, white, a known gradient) labelled 3, 0, 9."""
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[1] = 255
    images[2] = (np.arange(28 * 28) % 256).reshape(28, 28)
    return images, np.array([3, 0, 9], dtype=np.uint8)


def write_idx_dir(data_dir: Path, dataset: str, images: np.ndarray, labels: np.ndarray) -> Path:
    raw = data_dir / IDX_FOLDERS[dataset] / "raw"
    raw.mkdir(parents=True)
    (raw / IMAGE_FILE).write_bytes(idx_images_bytes(images))
    (raw / LABEL_FILE).write_bytes(idx_labels_bytes(labels))
    return raw


def md5_bytes(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()


def cifar_batch(first_label: int) -> tuple[np.ndarray, list[int]]:
    """Two 32 x 32 images in CIFAR's row layout (1024 red, 1024 green, 1024 blue values per image).

    Image 0 is pure red with one green pixel at row 1, column 2; image 1 is mid-grey.
    """
    data = np.zeros((2, 3 * 32 * 32), dtype=np.uint8)
    data[0, :1024] = 255
    data[0, 1024 + 1 * 32 + 2] = 255
    data[1] = 128
    return data, [first_label, (first_label + 1) % 10]


def write_cifar_dir(data_dir: Path, batches: list[str] = CIFAR_BATCHES) -> dict[str, str]:
    """Writes tiny CIFAR-10 pickles in `data_dir/cifar-10-batches-py`; returns each file's md5."""
    folder = data_dir / CIFAR10.base_folder
    folder.mkdir(parents=True)
    digests = {}
    for number, name in enumerate(CIFAR_BATCHES):
        if name not in batches:
            continue
        data, labels = cifar_batch(first_label=2 * number)
        payload = pickle.dumps({"batch_label": name, "data": data, "labels": labels, "filenames": []})
        (folder / name).write_bytes(payload)
        digests[name] = md5_bytes(payload)
    meta = pickle.dumps({"label_names": [f"class{index}" for index in range(10)], "num_vis": 3072})
    (folder / "batches.meta").write_bytes(meta)
    digests["batches.meta"] = md5_bytes(meta)
    return digests


def trust_cifar_digests(monkeypatch: pytest.MonkeyPatch, digests: dict[str, str]) -> None:
    """Points the loader's md5 table (torchvision's own) at the tiny files' digests."""
    monkeypatch.setattr(
        CIFAR10, "train_list", [[name, digests.get(name, "0" * 32)] for name in CIFAR_BATCHES]
    )
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": digests["batches.meta"]})


# --- vendored MNIST -------------------------------------------------------------------------------------


def vendored_mnist_folder() -> Path:
    return Path(str(resources.files("edgegan.data") / "mnist"))


def test_vendored_mnist_loads_ten_thousand_images_in_unit_range_with_every_digit():
    mnist = load_dataset("mnist")
    assert mnist.name == "mnist"
    assert mnist.x.shape == (10_000, 1, 28, 28)
    assert mnist.x.dtype == torch.float32
    assert mnist.x.min() == -1.0 and mnist.x.max() == 1.0
    assert mnist.y.shape == (10_000,)
    assert sorted(mnist.y.unique().tolist()) == list(range(10))
    assert mnist.num_classes == 10 and mnist.is_image and mnist.sample_shape == (1, 28, 28)


def test_vendored_mnist_copy_with_one_flipped_byte_is_refused_as_corrupt(tmp_path):
    copy = tmp_path / "mnist"
    shutil.copytree(vendored_mnist_folder(), copy)
    labels = copy / "t10k-labels-idx1-ubyte.gz"
    labels.chmod(0o644)  # the package ships its files read-only
    payload = bytearray(labels.read_bytes())
    payload[-10] ^= 0xFF
    labels.write_bytes(bytes(payload))
    with pytest.raises(DatasetError, match="corrupt") as refusal:
        load_vendored_mnist(copy)
    assert str(labels) in str(refusal.value)


def test_vendored_mnist_copy_missing_a_file_is_refused_naming_it(tmp_path):
    copy = tmp_path / "mnist"
    shutil.copytree(vendored_mnist_folder(), copy)
    (copy / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="missing") as refusal:
        load_vendored_mnist(copy)
    assert str(copy / "t10k-images-idx3-ubyte.gz") in str(refusal.value)


# --- IDX data dirs (MNIST, Fashion-MNIST) ---------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_plain_idx_files_in_torchvision_layout_load_with_their_pixels_and_labels(tmp_path, dataset):
    images, labels = tiny_digits()
    write_idx_dir(tmp_path, dataset, images, labels)
    loaded = load_dataset(dataset, data_dir=tmp_path)
    assert loaded.name == dataset and loaded.num_classes == 10
    assert loaded.x.shape == (3, 1, 28, 28) and loaded.x.dtype == torch.float32
    assert torch.all(loaded.x[0] == -1.0)
    assert torch.all(loaded.x[1] == 1.0)
    expected = torch.from_numpy(images[2]).float() / 127.5 - 1.0
    assert torch.allclose(loaded.x[2, 0], expected)
    assert loaded.x[2, 0, 1, 2].item() == pytest.approx((28 + 2) / 127.5 - 1.0)
    assert loaded.y.tolist() == [3, 0, 9] and loaded.y.dtype == torch.long


def test_mnist_with_data_dir_reads_the_data_dir_instead_of_the_vendored_split(tmp_path):
    images, labels = tiny_digits()
    write_idx_dir(tmp_path, "mnist", images, labels)
    assert len(load_dataset("mnist", data_dir=tmp_path)) == 3


def test_gzip_idx_file_that_is_not_the_published_one_is_refused_naming_the_file(tmp_path):
    images, labels = tiny_digits()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gz_images = raw / f"{IMAGE_FILE}.gz"
    gz_images.write_bytes(gzip.compress(idx_images_bytes(images)))
    (raw / f"{LABEL_FILE}.gz").write_bytes(gzip.compress(idx_labels_bytes(labels)))
    with pytest.raises(DatasetError, match="md5 mismatch") as refusal:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(gz_images) in str(refusal.value)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_empty_data_dir_names_the_idx_files_expected_and_the_folder(tmp_path, dataset):
    with pytest.raises(DatasetError) as refusal:
        load_dataset(dataset, data_dir=tmp_path)
    message = str(refusal.value)
    assert "missing" in message
    assert IMAGE_FILE in message and LABEL_FILE in message
    assert str(tmp_path / IDX_FOLDERS[dataset] / "raw") in message


def test_idx_label_file_missing_beside_the_images_is_named(tmp_path):
    images, labels = tiny_digits()
    raw = write_idx_dir(tmp_path, "mnist", images, labels)
    (raw / LABEL_FILE).unlink()
    with pytest.raises(DatasetError, match="missing") as refusal:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(raw / LABEL_FILE) in str(refusal.value)


def test_truncated_idx_image_file_is_refused_naming_it(tmp_path):
    images, labels = tiny_digits()
    raw = write_idx_dir(tmp_path, "mnist", images, labels)
    (raw / IMAGE_FILE).write_bytes(idx_images_bytes(images)[:-100])
    with pytest.raises(DatasetError, match="not a valid IDX file") as refusal:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(raw / IMAGE_FILE) in str(refusal.value)


def test_idx_file_with_an_unknown_element_type_is_refused_not_crashed_on(tmp_path):
    images, labels = tiny_digits()
    raw = write_idx_dir(tmp_path, "mnist", images, labels)
    # Type byte 0x0A is inside torchvision's asserted range 8..14 but has no dtype.
    (raw / LABEL_FILE).write_bytes(struct.pack(">II", 0x00000A01, 3) + bytes(3))
    with pytest.raises(DatasetError, match="not a valid IDX file") as refusal:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(raw / LABEL_FILE) in str(refusal.value)


def test_idx_image_and_label_counts_that_differ_are_refused(tmp_path):
    images, labels = tiny_digits()
    write_idx_dir(tmp_path, "mnist", images, labels[:2])
    with pytest.raises(DatasetError, match="3 images but .* 2 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_images_that_are_not_28_by_28_are_refused(tmp_path):
    write_idx_dir(tmp_path, "fashion-mnist", np.zeros((2, 32, 32), np.uint8), np.array([1, 2], np.uint8))
    with pytest.raises(DatasetError, match="not 28 x 28"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_idx_labels_outside_zero_to_nine_are_refused(tmp_path):
    images, _ = tiny_digits()
    raw = write_idx_dir(tmp_path, "mnist", images, np.array([1, 10, 2], np.uint8))
    with pytest.raises(DatasetError, match="outside 0..9") as refusal:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(raw / LABEL_FILE) in str(refusal.value)


# --- CIFAR-10 data dirs ---------------------------------------------------------------------------------


def test_empty_cifar10_data_dir_names_the_files_expected_and_the_folder(tmp_path):
    with pytest.raises(DatasetError, match="missing") as refusal:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(refusal.value)
    folder = tmp_path / "cifar-10-batches-py"
    assert str(folder / "data_batch_1") in message
    assert all(name in message for name in [*CIFAR_BATCHES, "batches.meta"])
    assert str(folder) in message


def test_cifar10_batch_that_is_not_the_published_file_is_refused_as_corrupt(tmp_path):
    write_cifar_dir(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(DatasetError, match="md5 mismatch") as refusal:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(refusal.value)
    assert str(folder / "data_batch_1") in message
    assert "batches.meta" in message and str(folder) in message


def test_cifar10_missing_the_last_batch_names_it_and_the_folder(tmp_path, monkeypatch):
    trust_cifar_digests(monkeypatch, write_cifar_dir(tmp_path, batches=CIFAR_BATCHES[:4]))
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(DatasetError, match="missing") as refusal:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(folder / "data_batch_5") in str(refusal.value)


def test_cifar10_batches_that_match_their_digests_load_as_channels_first_images(tmp_path, monkeypatch):
    # No test_batch is written: training reads only the five training batches and the meta file.
    trust_cifar_digests(monkeypatch, write_cifar_dir(tmp_path))
    cifar = load_dataset("cifar10", data_dir=tmp_path)
    assert cifar.name == "cifar10" and cifar.num_classes == 10
    assert cifar.x.shape == (10, 3, 32, 32) and cifar.x.dtype == torch.float32
    assert cifar.y.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    red = cifar.x[0]
    assert torch.all(red[0] == 1.0) and torch.all(red[2] == -1.0)
    green = red[1]
    assert green[1, 2] == 1.0 and green.sum() == 1.0 - (32 * 32 - 1)  # one lit pixel at row 1, column 2
    assert torch.allclose(cifar.x[1], torch.full((3, 32, 32), 128 / 127.5 - 1.0), atol=1e-6)


def test_cifar10_batch_that_matches_its_digest_but_is_no_pickle_is_refused(tmp_path, monkeypatch):
    digests = write_cifar_dir(tmp_path)
    bogus = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bogus.write_bytes(b"not a pickle")
    trust_cifar_digests(monkeypatch, {**digests, "data_batch_3": md5_bytes(b"not a pickle")})
    with pytest.raises(DatasetError, match="not a CIFAR-10 batch") as refusal:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(bogus) in str(refusal.value)


# --- choosing a data set --------------------------------------------------------------------------------


def test_unknown_dataset_name_is_refused_listing_the_choices():
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'") as refusal:
        load_dataset("svhn")
    assert all(name in str(refusal.value) for name in DATASETS)


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_image_dataset_not_shipped_without_data_dir_asks_for_data_dir(dataset):
    with pytest.raises(DatasetError, match=f"{dataset} is not shipped with edgegan; pass --data-dir"):
        load_dataset(dataset)


def test_data_dir_that_does_not_exist_is_refused_naming_it(tmp_path):
    absent = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="not a directory") as refusal:
        load_dataset("fashion-mnist", data_dir=absent)
    assert str(absent) in str(refusal.value)


# --- 2-D mixtures ---------------------------------------------------------------------------------------


def per_mode_std(points: torch.Tensor, labels: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    """Empirical std of each mode's points about its centre, per axis: shape (K, 2)."""
    return torch.stack([(points[labels == k] - modes[k]).std(dim=0) for k in range(modes.shape[0])])


def test_ring8_has_eight_modes_evenly_spaced_on_a_circle_of_radius_two():
    ring = load_dataset("ring8")
    assert ring.modes.shape == (8, 2) and ring.num_classes == 8 and not ring.is_image
    assert torch.allclose(ring.modes.norm(dim=1), torch.full((8,), RING8_RADIUS))
    angles = torch.atan2(ring.modes[:, 1], ring.modes[:, 0]).double()
    steps = (angles.roll(-1) - angles) % (2 * math.pi)
    assert torch.allclose(steps, torch.full((8,), math.pi / 4, dtype=torch.float64), atol=1e-6)
    assert RING8_RADIUS == 2.0 and ring.mode_std == RING8_STD == 0.02


def test_ring8_points_spread_around_each_mode_with_std_point_zero_two():
    ring = load_dataset("ring8")
    assert ring.x.shape == (8 * 2500, 2) and ring.x.dtype == torch.float32
    stds = per_mode_std(ring.x, ring.y, ring.modes)
    assert torch.all((stds - 0.02).abs() < 0.1 * 0.02), stds


def test_grid25_has_twenty_five_modes_on_a_grid_of_spacing_two():
    grid = load_dataset("grid25")
    axis = [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert grid.num_classes == 25
    assert sorted(map(tuple, grid.modes.tolist())) == [(x, y) for x in axis for y in axis]
    distances = torch.cdist(grid.modes, grid.modes) + torch.eye(25) * 1e9
    assert torch.allclose(distances.min(dim=1).values, torch.full((25,), GRID25_SPACING))
    assert GRID25_SPACING == 2.0 and grid.mode_std == GRID25_STD == 0.05


def test_grid25_points_spread_around_each_mode_with_std_point_zero_five():
    grid = load_dataset("grid25")
    assert grid.x.shape == (25 * 1000, 2)
    stds = per_mode_std(grid.x, grid.y, grid.modes)
    assert torch.all((stds - 0.05).abs() < 0.1 * 0.05), stds


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_mixture_label_is_the_index_of_the_mode_the_point_was_drawn_around(name):
    mixture = load_dataset(name)
    nearest = torch.cdist(mixture.x, mixture.modes).argmin(dim=1)
    assert torch.equal(nearest, mixture.y)
    assert torch.bincount(mixture.y).unique().numel() == 1  # equally many points per mode


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_mixture_is_the_same_data_whatever_the_run_seed(name):
    first, second = load_dataset(name, seed=0), load_dataset(name, seed=7)
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)


def test_mixture_draw_is_deterministic_in_its_own_seed():
    assert torch.equal(make_mixture("ring8", 50, seed=3).x, make_mixture("ring8", 50, seed=3).x)
    assert not torch.equal(make_mixture("ring8", 50, seed=3).x, make_mixture("ring8", 50, seed=4).x)


# --- partitioning ---------------------------------------------------------------------------------------

TEN_CLASS_LABELS = torch.arange(1003) % 10
SPECS = ["iid", "dirichlet:0.5", "shards:2"]


def label_distributions(labels: torch.Tensor, parts: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    counts = torch.stack([torch.bincount(labels[part], minlength=num_classes) for part in parts]).double()
    return counts / counts.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("spec", SPECS)
def test_every_example_goes_to_at_most_one_device(spec):
    parts = partition_indices(TEN_CLASS_LABELS, 8, parse_partition(spec), seed=0)
    assert len(parts) == 8 and all(len(part) > 0 for part in parts)
    held = torch.cat(parts)
    assert held.dtype == torch.long
    assert held.unique().numel() == held.numel()
    assert held.min() >= 0 and held.max() < len(TEN_CLASS_LABELS)


def test_iid_covers_every_example_with_device_sizes_within_one():
    parts = partition_indices(TEN_CLASS_LABELS, 8, parse_partition("iid"), seed=0)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(len(TEN_CLASS_LABELS)))
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_gives_the_same_split_and_another_seed_a_different_one(spec):
    parsed = parse_partition(spec)
    first = partition_indices(TEN_CLASS_LABELS, 8, parsed, seed=11)
    again = partition_indices(TEN_CLASS_LABELS, 8, parsed, seed=11)
    other = partition_indices(TEN_CLASS_LABELS, 8, parsed, seed=12)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_small_alpha_skews_labels_and_large_alpha_keeps_them_near_uniform():
    labels = torch.arange(5000) % 10
    uniform = torch.full((10,), 0.1, dtype=torch.float64)

    def mean_distance_from_uniform(alpha: float) -> float:
        parts = partition_indices(labels, 10, parse_partition(f"dirichlet:{alpha}"), seed=0)
        distributions = label_distributions(labels, parts, 10)
        return 0.5 * (distributions - uniform).abs().sum(dim=1).mean().item()  # total variation

    skewed, even = mean_distance_from_uniform(0.1), mean_distance_from_uniform(1000.0)
    assert skewed > 0.5, skewed
    assert even < 0.05, even


def test_shards_two_on_ring8_with_four_devices_gives_device_k_modes_2k_and_2k_plus_1():
    ring = load_dataset("ring8")
    parts = partition_indices(ring.y, 4, parse_partition("shards:2"), seed=0)
    for device, part in enumerate(parts):
        assert sorted(ring.y[part].unique().tolist()) == [2 * device, 2 * device + 1]
        assert len(part) == 2 * 2500  # each mode has one holder, who gets all of it


@pytest.mark.parametrize("classes_per_device", [1, 2, 3, 5, 7, 10])
def test_shards_k_gives_each_of_eight_devices_exactly_k_distinct_classes(classes_per_device):
    parts = partition_indices(TEN_CLASS_LABELS, 8, parse_partition(f"shards:{classes_per_device}"), seed=0)
    for part in parts:
        assert TEN_CLASS_LABELS[part].unique().numel() == classes_per_device


def test_shards_asking_for_more_classes_than_exist_is_refused():
    with pytest.raises(PartitionSpecError, match="shards:11 asks for more classes per device than the 10"):
        partition_indices(TEN_CLASS_LABELS, 8, parse_partition("shards:11"), seed=0)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("dirichlet:-1", "needs ALPHA > 0"),
        ("dirichlet:0", "needs ALPHA > 0"),
        ("dirichlet:nan", "needs ALPHA > 0"),
        ("dirichlet:x", "dirichlet needs a number"),
        ("dirichlet", "dirichlet needs a number"),
        ("shards:0", "needs K >= 1"),
        ("shards:1.5", "shards needs a whole number"),
        ("foo", "unknown partition"),
        ("iid:3", "iid takes no argument"),
    ],
)
def test_bad_partition_spec_is_refused_quoting_it_and_saying_why(spec, reason):
    with pytest.raises(PartitionSpecError, match=reason) as refusal:
        parse_partition(spec)
    assert repr(spec) in str(refusal.value)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "shards:3"])
def test_parsed_partition_spec_prints_as_it_was_written(spec):
    assert str(parse_partition(spec)) == spec


def test_zero_devices_is_refused():
    with pytest.raises(PartitionSpecError, match="at least one device, got 0"):
        partition_indices(TEN_CLASS_LABELS, 0, parse_partition("iid"), seed=0)


def test_split_that_would_leave_a_device_empty_is_refused_naming_the_device():
    with pytest.raises(PartitionSpecError, match="leaves device 5 with no data"):
        partition_indices(torch.arange(5) % 2, 8, parse_partition("iid"), seed=0)


def test_partition_spec_of_unknown_kind_is_refused_rather_than_treated_as_shards():
    with pytest.raises(PartitionSpecError, match="unknown partition kind 'iid '"):
        partition_indices(TEN_CLASS_LABELS, 2, PartitionSpec("iid "), seed=0)
