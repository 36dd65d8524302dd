"""A device's own data, read from one path and shaped like the run's data set.

Accepted forms (the path decides which):

- a folder of images: torchvision's `ImageFolder` layout (class subfolders, whose names are ignored) or a
  flat folder of image files, or both mixed; every file under the folder, at any depth, whose name ends in
  one of IMAGE_SUFFIXES counts (hidden files are skipped), in sorted path order. Each image is converted
  with Pillow to the run's channels (1: grayscale "L", 3: "RGB"; an alpha channel is dropped) and fitted to
  the run's H x W by `PIL.ImageOps.fit`: the largest centred crop with the run's aspect ratio is cut out
  and resized (bilinear) to H x W, which for square images is a plain resize and otherwise the same as
  resizing the short side and cropping the centre. An image already H x W is taken pixel for pixel.
- a `.npy` or `.pt` file holding one tensor of shape (N, C, H, W), or (N, H, W) for a one-channel run,
  with exactly the run's C, H and W (tensors are not resized). Integer values are pixels 0..255 and are
  mapped to [-1, 1] as the shipped data sets are; floating values are taken as they are and must already
  lie in [-1, 1].
- for a 2-D point run, a `.npy` or `.pt` file of shape (N, 2), any finite values.

The result is float32, (N, C, H, W) in [-1, 1] for images or (N, 2) for points: what `load_dataset` gives.
Nothing but `path` is read. Pillow is imported only for a folder, torchvision never (it costs a device
process 100-200 MB of memory, edgegan/data/images.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgegan.data.datasets import DatasetError
from edgegan.data.images import to_unit_range

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
TENSOR_SUFFIXES = (".npy", ".pt")
PIL_MODES = {1: "L", 3: "RGB"}


@dataclass(kw_only=True, frozen=True)
class LocalData:
    """A device's own samples and where they came from."""

    x: torch.Tensor
    path: Path
    form: str  # "image folder", ".npy file" or ".pt file"

    def __len__(self) -> int:
        return self.x.shape[0]

    def describe(self) -> str:
        return f"{len(self)} samples of shape {tuple(self.x.shape[1:])} from {self.path} ({self.form})"


def load_local(path: Path, *, sample_shape: tuple[int, ...], flag: str = "--data") -> LocalData:
    """Reads a device's own data at `path` as samples of `sample_shape` ((C, H, W) or (2,)), in the
    layout and value range of the shipped data sets; every problem is a one-line DatasetError naming
    `flag`, the option that gave the path (a server's public reference set is read the same way)."""
    try:
        return read_local(path, sample_shape)
    except DatasetError as error:
        if flag == "--data":
            raise
        raise DatasetError(str(error).replace("--data", flag, 1)) from None


def read_local(path: Path, sample_shape: tuple[int, ...]) -> LocalData:
    path = Path(path)
    sample_shape = tuple(sample_shape)
    if len(sample_shape) not in (1, 3) or (len(sample_shape) == 3 and sample_shape[0] not in PIL_MODES):
        raise DatasetError(
            f"--data: cannot load samples of shape {sample_shape}; runs use (1|3, H, W) or (2,)"
        )
    if not path.exists():
        raise DatasetError(f"--data {path} does not exist")
    if path.is_dir():
        if len(sample_shape) != 3:
            raise DatasetError(
                f"--data {path} is a folder of images, but this run's samples are points of shape "
                f"{sample_shape}; give a .npy or .pt file of shape (N, 2)"
            )
        x, form = load_image_folder(path, sample_shape), "image folder"
    elif path.suffix.lower() in TENSOR_SUFFIXES:
        x, form = shape_tensor(read_tensor_file(path), path, sample_shape), f"{path.suffix.lower()} file"
    else:
        raise DatasetError(
            f"--data {path} is neither a folder of images nor a {' or '.join(TENSOR_SUFFIXES)} tensor file"
        )
    if x.shape[0] == 0:
        raise DatasetError(f"--data {path} holds zero samples")
    if not torch.isfinite(x).all():
        raise DatasetError(f"--data {path} holds NaN or infinite values")
    return LocalData(x=x, path=path, form=form)


def native_shape(path: Path) -> tuple[int, ...]:
    """The shape a device's data has of itself, before any run names one: its first image's channels
    (1 for grayscale files, else 3) and size, or its tensor's. What a device without --dataset validates its
    data in at start; the run's configuration then says the shape it is read in (and fitted to)."""
    path = Path(path)
    if path.is_dir():
        files = image_files(path)
        if not files:
            return (1, 28, 28)  # reading it says what is wrong (no image files), in the usual words
        from PIL import Image

        try:
            with Image.open(files[0]) as opened:
                channels = 1 if opened.mode in ("1", "L", "I", "I;16", "F") else 3
                return (channels, opened.height, opened.width)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return (1, 28, 28)  # ... as is an unreadable first file
    if path.is_file() and path.suffix.lower() in TENSOR_SUFFIXES:
        shape = tuple(read_tensor_file(path).shape)
        if len(shape) == 2:
            return (shape[1],)
        if len(shape) == 3:
            return (1, *shape[1:])
        if len(shape) == 4:
            return shape[1:]
    return (1, 28, 28)


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, flat or in class subfolders, in sorted path order."""
    return sorted(
        file
        for file in folder.rglob("*")
        if file.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in file.relative_to(folder).parts)
        and file.is_file()
    )


def load_image_folder(folder: Path, sample_shape: tuple[int, ...]) -> torch.Tensor:
    from PIL import Image, ImageOps

    channels, height, width = sample_shape
    files = image_files(folder)
    if not files:
        raise DatasetError(
            f"--data {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}), flat or in class subfolders"
        )
    images = np.empty((len(files), height, width, channels), dtype=np.uint8)
    for slot, file in enumerate(files):
        try:
            with Image.open(file) as opened:
                image = opened.convert(PIL_MODES[channels])
        except (
            OSError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombError,
        ) as error:  # OSError: unidentified
            raise DatasetError(f"--data: {file} is not a readable image ({error})") from None
        if image.size != (width, height):
            image = ImageOps.fit(image, (width, height), method=Image.Resampling.BILINEAR)
        images[slot] = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
    return to_unit_range(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


def read_tensor_file(path: Path) -> torch.Tensor:
    """The one tensor in a .npy (no pickles) or .pt (weights only) file."""
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
                raise DatasetError(f"--data {path} holds {array.dtype} values, not numbers")
            return torch.from_numpy(np.ascontiguousarray(array))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except DatasetError:
        raise
    except Exception as error:  # numpy and torch raise many unrelated types on a damaged file
        raise DatasetError(f"--data {path} is not a readable {path.suffix} tensor file ({error})") from None
    if not isinstance(loaded, torch.Tensor):
        raise DatasetError(f"--data {path} holds a {type(loaded).__name__}, not one tensor")
    return loaded


def shape_tensor(tensor: torch.Tensor, path: Path, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor as float32 samples of `sample_shape`: integer pixels mapped to [-1, 1], floats kept."""
    found = tuple(tensor.shape)
    if len(sample_shape) == 3 and sample_shape[0] == 1 and tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)  # (N, H, W): one channel
    if tensor.dim() != 1 + len(sample_shape) or tuple(tensor.shape[1:]) != sample_shape:
        expected = f"(N, {', '.join(str(size) for size in sample_shape)})"
        if len(sample_shape) == 3 and sample_shape[0] == 1:
            expected += f" or (N, {sample_shape[1]}, {sample_shape[2]})"
        raise DatasetError(f"--data {path} holds shape {found}; this run needs {expected}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise DatasetError(f"--data {path} holds {tensor.dtype} values, not numbers")
    if tensor.is_floating_point():
        tensor = tensor.float()
        if len(sample_shape) == 3 and tensor.numel() and torch.isfinite(tensor).all():
            low, high = float(tensor.min()), float(tensor.max())
            if low < -1 or high > 1:
                raise DatasetError(
                    f"--data {path} holds floats in [{low:g}, {high:g}]; image floats must lie in [-1, 1] "
                    "(or give uint8 pixels 0..255)"
                )
        return tensor.contiguous()
    if len(sample_shape) == 1:
        return tensor.float().contiguous()
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) > 255):
        raise DatasetError(
            f"--data {path} holds integers in [{int(tensor.min())}, {int(tensor.max())}]; integer pixels "
            "must lie in 0..255"
        )
    return to_unit_range(tensor.to(torch.uint8).contiguous())
