"""What a tokenize job reads: files, folders, list files and ``dataset:ROOT`` specs, as videos.

Every video gets a key: its path relative to the folder or list file that named it, without the
extension (datasets: their own keys, e.g. ``ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01``). A list
file may name videos anywhere (``../other/a.mp4``, ``/abs/b.mp4``); their keys are normalised
(:func:`vimpac.common.names.normalise_key`: ``other/a``, ``abs/b``), so no key ever starts with
``/`` or contains ``..``. Two videos with the same key get a hash suffix; one file named twice
(or reached through a symlink inside a folder) is one video.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vimpac.common.names import normalise_key

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".avi", ".webm", ".mkv", ".mpg", ".mpeg", ".flv",
                    ".ogv", ".ogg", ".3gp", ".ts", ".mts", ".wmv", ".gif"}
LIST_EXTENSIONS = {".txt", ".lst", ".csv", ".list"}


@dataclass
class InputVideo:
    key: str
    path: str
    label: int = -1
    splits: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    """The videos named by the job's inputs, plus what could not be used and why."""
    videos: list[InputVideo] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)   # (path or key, reason)
    dataset: dict[str, Any] | None = None


def _add(found: Inputs, seen: dict[str, str], keys: set[str], video: InputVideo) -> None:
    real = os.path.realpath(video.path)
    if real in seen:
        log.info("%s: given twice, tokenized once (as %s)", video.path, seen[real])
        return
    video.key = normalise_key(video.key)
    if video.key in keys:
        video.key = f"{video.key}~{hashlib.sha1(real.encode()).hexdigest()[:8]}"
    seen[real] = video.key
    keys.add(video.key)
    found.videos.append(video)


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, files in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(files):
            yield Path(dirpath) / name
        for name in dirnames:                    # symlinked folders: listed, not followed
            if (Path(dirpath) / name).is_symlink():
                yield Path(dirpath) / name


def _from_directory(root: Path, found: Inputs, seen: dict[str, str], keys: set[str]) -> None:
    real_root = os.path.realpath(root)
    for path in _walk(root):
        if path.suffix.lower() not in VIDEO_EXTENSIONS and not path.is_symlink():
            continue
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_root]) != real_root:
            found.rejected.append((str(path), f"symlink leaves the input tree (-> {real})"))
            continue
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        key = str(path.relative_to(root).with_suffix(""))
        _add(found, seen, keys, InputVideo(key=key, path=str(path)))


def _from_list(list_path: Path, found: Inputs, seen: dict[str, str], keys: set[str]) -> None:
    base = list_path.parent
    text = list_path.read_text(encoding="utf-8-sig", errors="replace")
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        rel, label = parts[0], -1
        if len(parts) > 1:
            try:
                label = int(parts[1])
            except ValueError:
                found.rejected.append((f"{list_path}:{lineno}", f"label {parts[1]!r} is not an "
                                       "integer"))
                continue
        path = base / rel
        key = str(Path(rel).with_suffix(""))
        _add(found, seen, keys, InputVideo(key=key, path=str(path), label=label))


def _from_dataset(name: str, root: str, found: Inputs, seen: dict[str, str],
                  keys: set[str]) -> None:
    from vimpac.data.datasets import load_dataset

    index = load_dataset(name, root)
    found.dataset = {"name": index.name, "root": str(Path(root).resolve()),
                     "classes": list(index.classes)}
    for key, reason in index.missing:
        found.rejected.append((key, reason))
    for item in index.items:
        _add(found, seen, keys, InputVideo(key=item.key, path=item.path, label=item.label,
                                           splits=list(item.splits)))


def collect_inputs(inputs: Iterable[str]) -> Inputs:
    """Expand files, folders (recursive), list files and ``dataset:ROOT`` specs into videos."""
    from vimpac.data.datasets import parse_dataset_arg

    found, seen, keys = Inputs(), {}, set()
    for arg in inputs:
        dataset = parse_dataset_arg(arg)
        if dataset is not None:
            _from_dataset(dataset[0], dataset[1], found, seen, keys)
            continue
        path = Path(arg)
        if path.is_dir():
            _from_directory(path, found, seen, keys)
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            _from_list(path, found, seen, keys)
        elif path.exists() or path.is_symlink():
            _add(found, seen, keys, InputVideo(key=path.stem, path=str(path)))
        else:
            found.rejected.append((arg, "no such file or folder"))
    return found
