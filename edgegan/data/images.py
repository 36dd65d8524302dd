"""Image data sets: the vendored MNIST test split and user data dirs in torchvision's layouts.

Nothing here downloads. IDX files are read with torchvision's reader and CIFAR-10 batches are unpickled
here, after their md5 matches torchvision's published digest; what is checked here is that the files are
present and intact, so that a user gets one error naming what is expected where.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.mnist import read_image_file, read_label_file

from edgegan.data.datasets import Dataset, DatasetError

VENDORED_MNIST = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# torchvision's folder names and the published digests of the gzip files.
IDX_LAYOUTS = {
    "mnist": (
        "MNIST",
        {
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        },
    ),
    "fashion-mnist": (
        "FashionMNIST",
        {
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        },
    ),
}


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (n, C, H, W) -> float32 in [-1, 1], the range of a tanh generator."""
    return images_uint8.float().div(127.5).sub(1.0)


def read_idx_pair(image_path: Path, label_path: Path, describe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads an (images, labels) IDX pair, plain or gzip, with torchvision's reader."""
    with tempfile.TemporaryDirectory(prefix="edgegan-idx-") as scratch:
        plain = []
        for path in (image_path, label_path):
            if path.suffix == ".gz":
                target = Path(scratch) / path.stem
                try:
                    with gzip.open(path, "rb") as source:
                        target.write_bytes(source.read())
                except (OSError, EOFError) as error:
                    raise DatasetError(f"{path} is not a readable gzip file ({error}); {describe}") from error
                plain.append(target)
            else:
                plain.append(path)
        images = read_idx_file(read_image_file, plain[0], image_path, describe)
        labels = read_idx_file(read_label_file, plain[1], label_path, describe)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{image_path} has {images.shape[0]} images but {label_path} has {labels.shape[0]} labels"
        )
    return images, labels.long()


def read_idx_file(
    reader: Callable[[str], torch.Tensor], plain: Path, original: Path, describe: str
) -> torch.Tensor:
    """Runs torchvision's IDX `reader` on `plain`; a malformed file is reported under its `original` name."""
    try:
        return reader(str(plain))
    # torchvision's reader checks the header with asserts and a dict lookup (KeyError on an unknown type).
    except (AssertionError, ValueError, TypeError, RuntimeError, IndexError, KeyError) as error:
        raise DatasetError(f"{original} is not a valid IDX file ({error!r}); {describe}") from error


def load_vendored_mnist(folder: Path | None = None) -> Dataset:
    """The 10,000-image MNIST test split shipped inside the package, md5-checked on every load.

    `folder` replaces the package's own `mnist/` folder (tests use it to show a corrupt copy is refused).
    """
    if folder is None:
        folder = Path(str(resources.files("edgegan.data") / "mnist"))
    for name, expected in VENDORED_MNIST.items():
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"the vendored MNIST file {path} is missing; reinstall edgegan")
        if md5_of(path) != expected:
            raise DatasetError(f"the vendored MNIST file {path} is corrupt (md5 mismatch); reinstall edgegan")
    images, labels = read_idx_pair(
        folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz", "reinstall edgegan"
    )
    return Dataset("mnist", to_unit_range(images.unsqueeze(1)), labels, 10)


def idx_expectation(data_dir: Path, dataset: str) -> str:
    folder, files = IDX_LAYOUTS[dataset]
    names = ", ".join(f"{name}[.gz]" for name in files)
    return f"{dataset} expects {names} in {data_dir / folder / 'raw'} (torchvision's layout)"


def locate_idx_file(raw: Path, name: str, md5: str, expectation: str) -> Path:
    """Finds `name` or `name.gz` in `raw`; a gzip file must match its published digest."""
    compressed = raw / f"{name}.gz"
    plain = raw / name
    if plain.is_file():
        return plain
    if compressed.is_file():
        if md5_of(compressed) != md5:
            raise DatasetError(f"{compressed} is corrupt (md5 mismatch); {expectation}")
        return compressed
    raise DatasetError(f"{plain} is missing; {expectation}")


def load_idx_dataset(data_dir: Path, dataset: str) -> Dataset:
    folder, files = IDX_LAYOUTS[dataset]
    raw = data_dir / folder / "raw"
    expectation = idx_expectation(data_dir, dataset)
    image_name, label_name = files
    image_path = locate_idx_file(raw, image_name, files[image_name], expectation)
    label_path = locate_idx_file(raw, label_name, files[label_name], expectation)
    images, labels = read_idx_pair(image_path, label_path, expectation)
    if tuple(images.shape[1:]) != (28, 28):
        raise DatasetError(f"{image_path} holds {tuple(images.shape[1:])} images, not 28 x 28; {expectation}")
    # Plain files carry no digest, so a label outside 0..9 is the only sign of a wrong file left to catch.
    if labels.numel() and labels.max() > 9:
        raise DatasetError(f"{label_path} holds labels outside 0..9; {expectation}")
    return Dataset(dataset, to_unit_range(images.unsqueeze(1)), labels, 10)


def load_cifar10(data_dir: Path) -> Dataset:
    """The 50,000 CIFAR-10 training images from `data_dir/cifar-10-batches-py`, md5-checked before reading."""
    folder = data_dir / CIFAR10.base_folder
    expectation = (
        f"cifar10 expects {', '.join(name for name, _ in CIFAR10.train_list)} and batches.meta "
        f"in {folder} (torchvision's layout of the python version)"
    )
    for name, md5 in [*CIFAR10.train_list, (CIFAR10.meta["filename"], CIFAR10.meta["md5"])]:
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"{path} is missing; {expectation}")
        if md5_of(path) != md5:
            raise DatasetError(f"{path} is corrupt (md5 mismatch); {expectation}")
    # Read the batches here rather than through torchvision's CIFAR10 class: its constructor also demands
    # test_batch, which the training run never uses, and would hash every file a second time. Unpickling
    # is safe only because each file has just matched its published digest.
    batches, targets = [], []
    for name, _ in CIFAR10.train_list:
        path = folder / name
        try:
            with open(path, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            batches.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            batch_labels = list(entry["labels"])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
            raise DatasetError(f"{path} is not a CIFAR-10 batch ({error!r}); {expectation}") from error
        if len(batch_labels) != batches[-1].shape[0]:
            raise DatasetError(
                f"{path} has {batches[-1].shape[0]} images but {len(batch_labels)} labels; {expectation}"
            )
        targets.extend(batch_labels)
    images = torch.from_numpy(np.concatenate(batches))
    return Dataset("cifar10", to_unit_range(images), torch.tensor(targets, dtype=torch.long), 10)
