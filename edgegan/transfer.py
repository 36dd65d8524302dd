"""Messages and compute as the in-process runners count them: a message is encoded only to be counted,
and decoded again when a lossy codec changes the numbers its receiver trains with; compute is CPU seconds."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from edgegan import wire
from edgegan.algorithms.sparsify import UplinkResidual


def message_bytes(kind: str, round_index: int, tensors: dict[str, torch.Tensor], codec: str) -> int:
    return len(encode_message(kind, round_index, tensors, codec))


def encode_message(kind: str, round_index: int, tensors: dict[str, torch.Tensor], codec: str) -> bytes:
    """As long as over MQTT: a model signed, an update bound to it (wire.encode_as_sent)."""
    return wire.encode_as_sent(
        wire.Envelope(
            kind=kind,
            run="sim",
            round=round_index,
            base_round=round_index,
            device="sim",
            samples=0,
            codec=codec,
            tensors=tensors,
            sent_at=0.0,
        )
    )


def transmit(kind: str, round_index: int, tensors: dict[str, torch.Tensor], codec: str):
    """(bytes on the wire, the tensors as the receiver decodes them): a lossy codec changes the numbers
    the receiver trains with, exactly as over MQTT."""
    payload = encode_message(kind, round_index, tensors, codec)
    if codec == "fp32":
        return len(payload), tensors
    try:
        return len(payload), wire.decode(payload).tensors
    except wire.WireError as error:
        if error.reason != "non-finite":
            raise
        # A diverging run's NaN, which no lossy codec carries: passed on as fp32 passes it, so that the
        # run's own divergence check stops it (a diverged GAN) instead of an exception ending the process.
        return len(payload), tensors


def uplink_residuals(codec: str, devices: int) -> dict[int, UplinkResidual]:
    """Each device's error feedback under a sparse codec (edgegan/algorithms/sparsify.py), else none."""
    return {index: UplinkResidual() for index in range(devices)} if wire.is_sparse(codec) else {}


def send_change(round_index: int, change: dict[str, torch.Tensor], codec: str,
                residual: UplinkResidual | None) -> tuple[int, dict[str, torch.Tensor]]:  # fmt: skip
    """A device's change through a lossy codec as `transmit` sends it, top-k first when it keeps a
    residual (which then keeps what the server did not receive)."""
    sent = residual.select(change) if residual is not None else change
    size, received = transmit("update", round_index, wire.discriminator_tensors(sent), codec)
    if residual is not None:
        residual.sent(wire.discriminator_state(received))
    return size, received


class Timer:
    """Accumulates the process's CPU seconds inside `with timer:` blocks: the compute a party needs, which
    other jobs on a shared machine do not inflate as they would wall time (the simulator runs torch on
    one thread, so CPU seconds are the seconds one core works)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self.started = time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.process_time() - self.started


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
