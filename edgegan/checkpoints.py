"""Checkpoints written so that a crash at any instant leaves either the old file or the new one."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomic(payload: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync it, then rename over `path` (atomic on POSIX)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
