"""Checkpoints: one save / resume mechanism for every trainer.

A checkpoint is a dict of ``state_dict``s (model, optimizer, scheduler, ...) plus plain values: the
step, the trainer's data position and extras, every rank's RNG state and the resolved config. It is
written to a temporary file, fsynced and renamed, so a crash leaves the previous checkpoint
intact; it is read with ``torch.load(weights_only=True)``, so loading one cannot run code.

:class:`Checkpointer` is what the three trainers (tokenizer, pre-training, fine-tuning) use:
``save`` is a collective (every rank gives its RNG state, rank 0 writes), ``resume`` restores the
newest checkpoint after checking that it belongs to this run: a changed config field is refused,
naming it, unless the field is *volatile* (:func:`vimpac.common.config.param`: how a job runs, not
what it computes), whose change is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vimpac.common.config import changed_fields
from vimpac.common.errors import VimpacError
from vimpac.common.fileio import atomic_open

log = logging.getLogger(__name__)

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


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order): a collective when torch.distributed is running."""
    state = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in rng_state().items()}
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


@dataclass
class Resumed:
    """What :meth:`Checkpointer.resume` restored: the step and the whole checkpoint dict (for
    the trainer's own extras: data position, best score, ...)."""
    path: Path
    step: int
    state: dict[str, Any]


class Checkpointer:
    """Save and resume one run: ``DIR/step-NNNNNNNNN.pt``, the newest ``keep`` kept.

    ``config``: the run's config dataclass (saved, and checked on resume field by field);
    ``identity``: other values that must match exactly (e.g. the data size, the start).
    ``parts`` given to :meth:`save` and :meth:`resume` map names to objects with ``state_dict``
    and ``load_state_dict`` (model, optimizer, scheduler, a data stream...).
    """

    def __init__(self, folder: str | Path, config: Any, *, keep: int = 3,
                 identity: dict[str, Any] | None = None) -> None:
        self.files = CheckpointManager(folder, keep)
        self.config, self.identity = config, dict(identity or {})

    def latest(self) -> Path | None:
        return self.files.latest()

    def save(self, step: int, parts: dict[str, Any], extra: dict[str, Any] | None = None, *,
             main: bool = True) -> Path | None:
        """A checkpoint of ``parts`` and ``extra`` at ``step`` (collective: every rank calls it,
        rank 0, ``main``, writes)."""
        rngs = gather_rng_states()
        if not main:
            return None
        state = {name: part.state_dict() for name, part in parts.items()}
        state.update(extra or {})
        state.update(step=step, rng=rngs, config=dataclasses.asdict(self.config),
                     identity=self.identity)
        return self.files.save(step, state)

    def resume(self, parts: dict[str, Any], *, rank: int = 0, world: int = 1) -> Resumed | None:
        """Restore the newest checkpoint into ``parts`` (None when there is none)."""
        path = self.latest()
        if path is None:
            return None
        state = load_checkpoint(path)
        self.check(state, path)
        for name, part in parts.items():
            if name not in state:
                raise CheckpointError(f"{path}: holds no {name} state")
            part.load_state_dict(state[name])
        rngs = state.get("rng")
        if isinstance(rngs, dict):                      # a checkpoint of one process
            rngs = [rngs]
        if isinstance(rngs, list) and len(rngs) == world:
            set_rng_state(rngs[rank])
        else:
            log.warning("%s: saved by %s processes, resumed by %d: RNG streams not restored",
                        path, len(rngs) if isinstance(rngs, list) else "?", world)
        log.info("resumed from %s at step %d", path, int(state["step"]))
        return Resumed(path, int(state["step"]), state)

    def check(self, state: dict[str, Any], path: Path) -> None:
        """The checkpoint belongs to this run: same identity and non-volatile config fields."""
        saved = state.get("config")
        if not isinstance(saved, dict) or not isinstance(state.get("step"), int):
            raise CheckpointError(f"{path}: not a vimpac training checkpoint (no config or step)")
        changed, volatile = changed_fields(saved, self.config)
        changed += [f"{k} {state.get('identity', {}).get(k)!r} -> {v!r}"
                    for k, v in self.identity.items() if state.get("identity", {}).get(k) != v]
        if changed:
            raise CheckpointError(f"{path}: written by a run with other settings ("
                                  + ", ".join(changed) + "); use a new output folder or the "
                                  "original settings")
        if volatile:
            log.info("%s: resuming with changed run settings: %s", path, ", ".join(volatile))
