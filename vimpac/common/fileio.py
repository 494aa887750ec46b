"""Atomic local file writes and checksums: what every stage uses to write its outputs.

A file is replaced atomically: written to a temporary file in the same folder, fsynced, renamed over
the target, and the folder fsynced, so a crash or a full disk leaves the old file or the new one,
never a mix. Temporary names are ``.<name>.<random>.tmp``: an interrupted writer's leftovers are
recognisable and safe to delete. Files and folders end with the permissions a plain ``open`` or
``mkdir`` would give them (the process umask), not the owner-only ones of a temporary file, so a
cache shared by a group stays readable by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    """The process umask, without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(directory: bool = False) -> int:
    """What ``open`` (0o666) or ``mkdir`` (0o777) would create under the process umask."""
    return (0o777 if directory else 0o666) & ~_read_umask()


def make_temp_dir(parent: str | Path, prefix: str, suffix: str = "") -> Path:
    """A new folder in ``parent`` for building something that is renamed into place, with a
    folder's usual permissions (``tempfile.mkdtemp`` makes it owner-only)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    os.chmod(path, usual_mode(directory=True))
    return path


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (a file or a folder)."""
    root = Path(root)
    if root.is_file():
        _fsync_file(root)
        return
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[Any]:
    """A binary file that replaces ``path`` only when the block succeeds (temp, fsync, rename).

    Readers see the old file or the new one, never a mix; on any error the temporary file is
    removed and an OSError that names no file is made to name ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), usual_mode())
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)        # a failed write() names no file: name the target
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as fh:
        fh.write(data)


def json_bytes(data: Any) -> bytes:
    """``data`` as the JSON text vimpac writes (indented, one trailing newline)."""
    return (json.dumps(data, indent=1, sort_keys=False) + "\n").encode()


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_bytes(path, json_bytes(data))


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
