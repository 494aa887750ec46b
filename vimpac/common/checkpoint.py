"""Checkpoints: atomic writes, safe loading, keep-last-k rotation.

A checkpoint is a dict of ``state_dict``s (model, optimizer, scheduler, data stream) plus plain
values (step, RNG, resolved config). It is written to a temporary file, fsynced and renamed, so a
crash leaves the previous checkpoint intact; it is read with ``torch.load(weights_only=True)``, so
loading one cannot run code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vimpac.common.errors import VimpacError
from vimpac.common.fileio import atomic_open

_NAME = re.compile(r"^step-(\d{9})\.pt$")


class CheckpointError(VimpacError):
    """A checkpoint that cannot be read; the message names the file."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename).

    Raises:
        OSError: naming ``path`` when the disk is full or the folder is not writable (torch's
            own "unexpected pos" error for a failed write is turned back into that OSError).
    """
    with atomic_open(path) as fh:
        writer = _WriteErrors(fh)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


class _WriteErrors:
    """A binary file wrapper that remembers the OSError of a failed write (torch hides it)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain containers only."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # unpickling errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable vimpac checkpoint ({first})") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """``DIR/step-000001000.pt`` files, the newest ``keep`` of them kept."""

    def __init__(self, folder: str | Path, keep: int = 3) -> None:
        self.folder, self.keep = Path(folder), keep

    def steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir()
                      if (m := _NAME.match(p.name)))

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:09d}.pt"

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        path = self.path(step)
        save_checkpoint(path, state)
        for old in self.steps()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        for stale in self.folder.glob(".step-*.tmp"):      # left by a killed writer
            stale.unlink(missing_ok=True)
        return path
