"""A small digit/object classifier whose 64-d penultimate layer stands in for Inception in a Fréchet distance.

Inception-v3 is 100 MB and expects 299 x 299 RGB; a score that an edge device or a CI runner can compute in
a second needs a network sized to 28 x 28 and 32 x 32 images. The price: the resulting distance is only
comparable with itself (same weights), never with published Inception-FID numbers.

Run `edgegan train-classifier --dataset mnist` to retrain the shipped MNIST weights.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from edgegan.data.datasets import Dataset

FEATURES = 64
MAX_SHIFT_PX = 2
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
CLASSIFIER_FOLDER = "edgegan-classifiers"
IMAGE_DATASETS_WITH_CLASSIFIERS = ("mnist", "fashion-mnist", "cifar10")


class ClassifierMissingError(ValueError):
    """No classifier weights for a data set; the message names the file and the command to make it."""


class FeatureClassifier(nn.Module):
    """conv(16)-pool-conv(32)-pool-linear to a 64-d feature layer, then a linear class head.

    `forward` returns the features, not logits, because torchmetrics' Fréchet distance calls `feature(imgs)`.
    Inputs are (n, C, H, W) images in [-1, 1], the range of the data sets and of a tanh generator.
    """

    num_features: int = FEATURES  # read by torchmetrics to size its statistics without a dummy pass

    def __init__(self, channels: int, size: int, num_classes: int = 10) -> None:
        super().__init__()
        if size % 4 != 0:
            raise ValueError(f"image size {size} must be divisible by 4 (28 or 32)")
        self.channels = channels
        self.size = size
        self.num_classes = num_classes
        self.features = nn.Sequential(
            # Narrow convolutions: the score runs every few rounds on CPU, and 16/32 channels keep 2,000
            # images to ~0.2 s per pass on 2 cores while MNIST accuracy stays above 98 %.
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (size // 4) ** 2, FEATURES),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, num_classes)
        self.metadata: dict = {}  # how the weights were made, filled in by `load_classifier`

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shifts each image by its own random offset of up to `max_shift` px, filling with background (-1)."""
    count, channels, height, width = images.shape
    padded = nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    rows = torch.randint(0, 2 * max_shift + 1, (count, 1), generator=generator) + torch.arange(height)
    cols = torch.randint(0, 2 * max_shift + 1, (count, 1), generator=generator) + torch.arange(width)
    return padded[
        torch.arange(count)[:, None, None, None],
        torch.arange(channels)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


@torch.no_grad()
def accuracy(
    model: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Fraction of `images` whose argmax class equals `labels`."""
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        predicted = model.logits(images[start : start + batch_size]).argmax(dim=1)
        correct += int((predicted == labels[start : start + batch_size]).sum())
    return correct / max(images.shape[0], 1)


def train_classifier(
    dataset: Dataset, epochs: int = 8, seed: int = 0, holdout: int = 1000
) -> tuple[FeatureClassifier, float]:
    """Trains a classifier on all but `holdout` seeded-random images; returns it and its held-out accuracy."""
    if not dataset.is_image:
        raise ValueError(f"{dataset.name} is not an image data set; point data sets need no classifier")
    channels, height, width = dataset.sample_shape
    if height != width:
        raise ValueError(
            f"{dataset.name} images are {height} x {width}; the classifier expects square images"
        )
    if not 0 < holdout < len(dataset):
        raise ValueError(f"holdout must be between 1 and {len(dataset) - 1}, got {holdout}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)
    held_out, training = order[:holdout], order[holdout:]
    train_x, train_y = dataset.x[training], dataset.y[training]

    model = FeatureClassifier(channels, height, dataset.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps = epochs * -(-train_x.shape[0] // BATCH_SIZE)
    # Annealing to zero is worth about half a point of held-out accuracy over a constant rate.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        permutation = torch.randperm(train_x.shape[0], generator=generator)
        for start in range(0, permutation.shape[0], BATCH_SIZE):
            batch = permutation[start : start + BATCH_SIZE]
            images = random_shift(train_x[batch], MAX_SHIFT_PX, generator)
            loss = loss_fn(model.logits(images), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model, accuracy(model, dataset.x[held_out], dataset.y[held_out])


def save_classifier(model: FeatureClassifier, path: Path, metadata: dict) -> None:
    """Writes weights and shape; `metadata` may hold only str/int/float/bool/list/dict (weights_only load)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "channels": model.channels,
            "size": model.size,
            "num_classes": model.num_classes,
            "metadata": metadata,
        },
        path,
    )


def shipped_weights_path() -> Path:
    return Path(str(resources.files("edgegan.metrics") / "weights" / "mnist_classifier.pt"))


def user_weights_path(data_dir: Path, dataset_name: str) -> Path:
    return data_dir / CLASSIFIER_FOLDER / f"{dataset_name}.pt"


def read_classifier(path: Path, remedy: str) -> FeatureClassifier:
    """Rebuilds a classifier from a `save_classifier` file, without unpickling arbitrary objects."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = FeatureClassifier(saved["channels"], saved["size"], saved["num_classes"])
        model.load_state_dict(saved["state_dict"])
    except Exception as error:  # torch.load fails on a junk file with struct, pickle, EOF or runtime errors
        raise ClassifierMissingError(
            f"{path} is not a readable classifier file ({error}); {remedy}"
        ) from error
    model.metadata = saved.get("metadata", {})
    return model.eval()


def load_classifier(dataset_name: str, data_dir: Path | None = None) -> FeatureClassifier:
    """The classifier in `<data_dir>/edgegan-classifiers/<name>.pt`, else for MNIST the shipped one."""
    if dataset_name not in IMAGE_DATASETS_WITH_CLASSIFIERS:
        raise ValueError(
            f"no classifier for {dataset_name!r}; image data sets are "
            f"{', '.join(IMAGE_DATASETS_WITH_CLASSIFIERS)} (point data sets are scored by point_quality)"
        )
    command = f"edgegan train-classifier --dataset {dataset_name} --data-dir {data_dir or 'DIR'}"
    if data_dir is not None:
        # A user who trained their own (e.g. MNIST on the full 60,000-image train split) gets theirs.
        path = user_weights_path(data_dir, dataset_name)
        if path.is_file():
            return read_classifier(path, f"recreate it with: {command}")
    if dataset_name == "mnist":
        path = shipped_weights_path()
        if not path.is_file():
            raise ClassifierMissingError(
                f"the shipped MNIST classifier {path} is missing; reinstall edgegan or recreate it with: "
                "edgegan train-classifier --dataset mnist"
            )
        return read_classifier(path, "reinstall edgegan")
    expected = user_weights_path(data_dir or Path("DIR"), dataset_name)
    raise ClassifierMissingError(
        f"no classifier for {dataset_name}: expected {expected}; make it with: {command}"
    )


def default_weights_path(dataset_name: str, data_dir: Path | None) -> Path:
    """Where `load_classifier` will look: the data dir's folder, or the package's own file for MNIST."""
    if data_dir is not None:
        return user_weights_path(data_dir, dataset_name)
    if dataset_name == "mnist":
        return shipped_weights_path()
    raise ClassifierMissingError(
        f"{dataset_name} has no shipped classifier; pass --data-dir DIR (or --out PATH)"
    )


def train_and_save(
    dataset: Dataset, data_dir: Path | None, out: Path, epochs: int, seed: int, holdout: int = 1000
) -> float:
    """Trains a classifier, saves it with its provenance, and returns its held-out accuracy."""
    started = time.perf_counter()
    model, held_out_accuracy = train_classifier(dataset, epochs, seed, holdout)
    metadata = {
        "dataset": dataset.name,
        "source": "vendored MNIST test split" if data_dir is None else str(data_dir),
        "train_images": len(dataset) - holdout,
        "holdout": holdout,
        "holdout_accuracy": held_out_accuracy,
        "epochs": epochs,
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "torch": str(torch.__version__),  # TorchVersion would not pass a weights_only load
    }
    save_classifier(model, out, metadata)
    return held_out_accuracy
