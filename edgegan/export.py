"""A trained generator as one file that runs without edgegan: TorchScript (torch alone loads it) or ONNX
(any ONNX runtime), with what a user needs to drive it (noise size, output shape and range, data set,
source run) stored inside the file."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from edgegan.models import ModelSpec

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".ts", "onnx": ".onnx"}
METADATA_KEY = "edgegan.json"  # the card as JSON: a TorchScript extra file, an ONNX metadata_prop
ONNX_TOLERANCE = 1e-5  # absolute, on outputs in [-1, 1]: float32 kernels of two runtimes, not bit-equal
CHECK_BATCH = 4


class ExportError(Exception):
    """An export that cannot be done, with a one-line reason a user can act on."""


@dataclass(frozen=True)
class GeneratorCard:
    """What a program needs to use the exported generator: feed N x latent_dim standard-normal noise."""

    latent_dim: int
    output_shape: tuple[int, ...]
    output_range: tuple[float, float] | None  # images end in tanh; 2-D points are unbounded
    dataset: str
    source: str
    input_name: str = "noise"
    output_name: str = "samples"

    @classmethod
    def of(cls, *, spec: ModelSpec, dataset: str, source: str) -> GeneratorCard:
        return cls(
            latent_dim=spec.latent_dim, output_shape=tuple(spec.sample_shape),
            output_range=(-1.0, 1.0) if spec.is_image else None, dataset=dataset, source=source,
        )  # fmt: skip

    def as_json(self) -> str:
        return json.dumps(asdict(self))

    def line(self) -> str:
        value_range = "in [-1, 1] (tanh)" if self.output_range else "unbounded"
        return (
            f"input {self.input_name} (N, {self.latent_dim}) standard normal; output {self.output_name} "
            f"(N, {', '.join(map(str, self.output_shape))}) {value_range}; data set {self.dataset}; "
            f"from {self.source}"
        )


def check_noise(latent_dim: int) -> torch.Tensor:
    """Fixed noise on which an exported file is compared with the torch generator."""
    return torch.randn(CHECK_BATCH, latent_dim, generator=torch.Generator().manual_seed(0))


def export_generator(generator: nn.Module, *, card: GeneratorCard, format: str, out: Path) -> str:
    """Write `generator` to `out` in `format`, check the file, and say how it was checked (one phrase)."""
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {' | '.join(FORMATS)}, got {format!r}")
    generator = generator.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "torchscript":
        return export_torchscript(generator, card=card, out=out)
    return export_onnx(generator, card=card, out=out)


def export_torchscript(generator: nn.Module, *, card: GeneratorCard, out: Path) -> str:
    """Scripted (not traced), so any batch size runs; the card rides along as an extra file."""
    with warnings.catch_warnings():  # torch marks torch.jit deprecated; it is still what C++ and mobile load
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(generator), str(out), _extra_files={METADATA_KEY: card.as_json()})
        loaded = torch.jit.load(str(out))
    noise = check_noise(card.latent_dim)
    with torch.no_grad():
        if not torch.equal(loaded(noise), generator(noise)):
            raise ExportError(f"{out}: the TorchScript file does not reproduce the generator's output")
    return "TorchScript reloaded, equal to torch"


def require_onnx():
    """The onnx package, or an ExportError that says how to install it."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export's exporter needs it)
    except ImportError as error:
        raise ExportError(
            f"--format onnx needs the {error.name} package: pip install 'edgegan[export]'"
        ) from None
    return onnx


# The exporter logs its passes at INFO ("PassManager: No more graph changes ..."): not the user's business,
# and a process whose root logger is at INFO (every edgegan command's) would print them.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")


@contextlib.contextmanager
def quiet(names: tuple[str, ...]) -> Iterator[None]:
    """Within the block, the loggers `names` pass on warnings and errors only."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(generator: nn.Module, *, card: GeneratorCard, out: Path) -> str:
    """Exported with a dynamic batch axis, passed through onnx.checker, and run in onnxruntime on the check
    noise against torch's output where onnxruntime is installed."""
    onnx = require_onnx()
    noise = check_noise(card.latent_dim)
    with warnings.catch_warnings(), quiet(EXPORTER_LOGGERS):
        warnings.simplefilter("ignore")  # the exporter's own notes on its internals are not the user's
        program = torch.onnx.export(
            generator, (noise,), input_names=[card.input_name], output_names=[card.output_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )  # fmt: skip
    model = program.model_proto
    fields = {f"edgegan.{key}": value if isinstance(value, str) else json.dumps(value)
              for key, value in asdict(card).items()}  # fmt: skip
    for key, value in {METADATA_KEY: card.as_json(), **fields}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out))
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{out}: onnx.checker rejects the file ({str(error).splitlines()[0]})") from None
    difference = onnxruntime_difference(out, generator=generator, noise=noise, card=card)
    if difference is None:
        return "onnx.checker passed; onnxruntime not installed, not run"
    if difference > ONNX_TOLERANCE:
        raise ExportError(f"{out}: onnxruntime's output differs from torch's by {difference:.2e}")
    return f"onnx.checker passed; onnxruntime within {ONNX_TOLERANCE:g} of torch (max {difference:.1e})"


def onnxruntime_difference(
    path: Path, *, generator: nn.Module, noise: torch.Tensor, card: GeneratorCard
) -> float | None:
    """Largest absolute difference between onnxruntime's and torch's outputs, None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (theirs,) = session.run([card.output_name], {card.input_name: noise.numpy()})
    with torch.no_grad():
        ours = generator(noise)
    return float((torch.from_numpy(theirs) - ours).abs().max())
