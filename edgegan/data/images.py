"""Image data sets: the vendored MNIST test split and user data dirs in torchvision's layouts.

Nothing here downloads. IDX files are parsed here (the format is a short header and raw bytes; reading
them without torchvision keeps it out of device processes, where it costs about 100-200 MB of memory) and
CIFAR-10 batches are unpickled here, after their md5 matches torchvision's published digest; what is
checked here is that the files are present and intact, so that a user gets one error naming what is
expected where.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import torch

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
    return images_uint8.float().div_(127.5).sub_(1.0)  # in place: one float copy of the data set at a time


def read_idx_pair(image_path: Path, label_path: Path, describe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads an (images, labels) IDX pair, plain or gzip."""
    images = read_idx_file(image_path, 3, describe)
    labels = read_idx_file(label_path, 1, describe)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{image_path} has {images.shape[0]} images but {label_path} has {labels.shape[0]} labels"
        )
    return images, labels.long()


def read_idx_file(path: Path, dimensions: int, describe: str) -> torch.Tensor:
    """An IDX file of unsigned bytes (MNIST's images: 3 dimensions, labels: 1), plain or gzip, as uint8."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as source:
                data = source.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path} is not a readable gzip file ({error}); {describe}") from error
    try:
        return parse_idx(data, dimensions)
    except ValueError as error:
        raise DatasetError(f"{path} is not a valid IDX file ({error}); {describe}") from error


def parse_idx(data: bytes, dimensions: int) -> torch.Tensor:
    """IDX: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions, each size as
    a big-endian uint32, then the elements."""
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise ValueError("no IDX magic number")
    element_type, ndim = data[2], data[3]
    if element_type != 0x08:
        raise ValueError(f"element type 0x{element_type:02x}, expected unsigned bytes (0x08)")
    if ndim != dimensions:
        raise ValueError(f"{ndim} dimensions, expected {dimensions}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError("truncated header")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{len(data) - header} bytes of data for shape {shape}")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy())


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
    return Dataset(name="mnist", x=to_unit_range(images.unsqueeze(1)), y=labels, num_classes=10)


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
    return Dataset(name=dataset, x=to_unit_range(images.unsqueeze(1)), y=labels, num_classes=10)


def load_cifar10(data_dir: Path) -> Dataset:
    """The 50,000 CIFAR-10 training images from `data_dir/cifar-10-batches-py`, md5-checked before reading."""
    from torchvision.datasets import CIFAR10  # its file names and digests; imported only for CIFAR-10

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
    return Dataset(
        name="cifar10", x=to_unit_range(images), y=torch.tensor(targets, dtype=torch.long), num_classes=10
    )
