"""The feature extractor a Fréchet distance is measured in, chosen by a spec string that every party of a
run resolves the same way (docs/protocol.md, "Choosing the feature extractor"):

- `classifier` (default): the shipped or user-trained classifier of the data set (metrics/classifier.py);
  64-d features and a class head, so the `classes` coverage score exists too.
- `torchscript:PATH`: a user's TorchScript module: [-1, 1] images (N, C, H, W) of the run's shape in,
  (N, d) features out. The run names it by the file's sha256, so each device may keep its copy anywhere.
- `inception`: torchmetrics' Inception-v3 pool features (2048-d), comparable with published FID numbers;
  needs the torch-fidelity package and its weights in torch's hub cache, never downloaded here.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from edgegan.metrics.classifier import FeatureClassifier, load_classifier

FEATURE_KINDS = ("classifier", "torchscript", "inception")
DEFAULT_FEATURES = "classifier"
# torch-fidelity's Inception weights, as torchmetrics' FrechetInceptionDistance(feature=2048) loads them.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FEATURES = 2048


class FeatureExtractor(nn.Module):
    """[-1, 1] images of `sample_shape` -> (n, `num_features`) float features. `name` is what the run's
    configuration carries (the same on every party), `description` what a person reads; `num_classes` > 0
    when `logits` gives a class head (for the `classes` score), else `logits` returns None."""

    name: str = ""
    description: str = ""
    num_features: int = 0  # read by torchmetrics to size its statistics without a dummy pass
    sample_shape: tuple[int, ...] = ()
    num_classes: int = 0

    def logits(self, images: torch.Tensor) -> torch.Tensor | None:
        return None

    @property
    def device(self) -> torch.device:
        tensors = [*self.parameters(), *self.buffers()]
        return tensors[0].device if tensors else torch.device("cpu")


class ClassifierFeatures(FeatureExtractor):
    """The data set's classifier: its 64-d penultimate layer, and its head for `classes`."""

    def __init__(self, classifier: FeatureClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.name = "classifier"
        self.description = f"the {classifier.channels}x{classifier.size}x{classifier.size} classifier"
        self.num_features = classifier.num_features
        self.sample_shape = (classifier.channels, classifier.size, classifier.size)
        self.num_classes = classifier.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(images)


def file_digest(path: Path) -> str:
    """The sha256 of a file, in hex: how a run names a TorchScript extractor."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TorchScriptFeatures(FeatureExtractor):
    """A user's TorchScript module, loaded on CPU and checked on one dummy batch of the run's shape."""

    def __init__(self, path: Path, sample_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        try:
            with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript, yet loads it fine
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as error:  # junk files fail with RuntimeError, zip errors, ...
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"--features {path} is not a readable TorchScript file: {reason}") from None
        dummy = torch.zeros(2, *self.sample_shape)
        try:
            with torch.no_grad():
                output = self.module(dummy)
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"--features {path} fails on a batch of {self.sample_shape} images: {reason}"
            ) from None
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != 2:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"--features {path} must map (N, {', '.join(map(str, self.sample_shape))}) images to (N, d) "
                f"features; 2 images gave {shape}"
            )
        if not torch.isfinite(output).all():
            raise ValueError(f"--features {path} gives NaN or infinite features on a batch of zeros")
        self.num_features = int(output.shape[1])
        digest = file_digest(path)
        self.name = f"torchscript:{digest}"
        self.description = f"TorchScript features of {path} (sha256 {digest[:12]}…, {self.num_features}-d)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images).float()


def inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]


class InceptionFeatures(FeatureExtractor):
    """torchmetrics' Inception-v3 2048-d features: grey images repeated to 3 channels, [-1, 1] turned into
    the uint8 images it expects (as `normalize=True` does); it resizes to 299 x 299 itself."""

    def __init__(self, sample_shape: tuple[int, ...]) -> None:
        super().__init__()
        channels = sample_shape[0] if len(sample_shape) == 3 else 0
        if channels not in (1, 3):
            raise ValueError(f"--features inception needs grey or RGB images, the run's are {sample_shape}")
        try:
            import torch_fidelity  # noqa: F401 - torchmetrics' Inception is torch-fidelity's
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError:
            raise ValueError(
                "--features inception needs the torch-fidelity package: pip install torch-fidelity "
                f"(and its weights: {INCEPTION_WEIGHTS_URL} in {inception_weights_path().parent})"
            ) from None
        weights = inception_weights_path()
        if not weights.is_file():  # torch-fidelity would download them; a run never does
            raise ValueError(f"--features inception needs {weights}: fetch {INCEPTION_WEIGHTS_URL} there")
        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
            feature_extractor_weights_path=str(weights),
        )  # fmt: skip
        self.name = "inception"
        self.description = "torchmetrics' Inception-v3 features (2048-d)"
        self.num_features = INCEPTION_FEATURES
        self.sample_shape = tuple(sample_shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        unit = ((images + 1.0) / 2.0).clamp(0.0, 1.0)
        pixels = (unit * 255).byte()
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        return self.inception(pixels).reshape(images.shape[0], -1).float()


def parse_features(spec: str) -> tuple[str, str]:
    """("classifier" | "torchscript" | "inception", its argument: the path, or ""); ValueError otherwise."""
    kind, _, argument = spec.partition(":")
    if kind not in FEATURE_KINDS or (kind == "torchscript") != bool(argument):
        raise ValueError(f"--features must be classifier, torchscript:PATH or inception, got {spec!r}")
    return kind, argument


def load_extractor(
    spec: str, *, dataset: str, data_dir: Path | None, sample_shape: tuple[int, ...]
) -> FeatureExtractor:
    """The extractor `spec` names, for images of `sample_shape` (ValueError, or ClassifierMissingError, with
    a one-line reason when it cannot be built)."""
    kind, argument = parse_features(spec)
    if kind == "torchscript":
        path = Path(argument)
        if not path.is_file():
            raise ValueError(f"--features {path}: no such file")
        return TorchScriptFeatures(path, sample_shape)
    if kind == "inception":
        return InceptionFeatures(sample_shape)
    extractor = ClassifierFeatures(load_classifier(dataset, data_dir))
    if extractor.sample_shape != tuple(sample_shape):
        raise ValueError(f"the {dataset} classifier takes {extractor.sample_shape} images, the run "
                         f"{tuple(sample_shape)}")  # fmt: skip
    return extractor.eval()
