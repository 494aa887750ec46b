"""What a shard format is: how it writes one shard and how it reads one back, validated.

A format is one module under ``vimpac/archive/formats/`` exposing a :class:`Format` and one entry
in :data:`vimpac.archive.formats.FORMATS`. It never sees the manifest or the archive's storage:

* ``write(content, dest)`` builds one shard at the local path ``dest`` (a file or a folder); the
  archive writer then checksums it and publishes it atomically.
* ``open(source, layout)`` returns a :class:`ShardReader` over the shard's bytes. ``layout`` is
  what the manifest says the shard holds; the reader checks the shard against it before it
  allocates anything from declared shapes, and checks token ids on every read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from vimpac.archive.errors import ShardError
from vimpac.archive.manifest import TOKEN_DTYPE, VideoRecord


@dataclass
class ShardContent:
    """One shard to write: its videos in order, each with uint16 [T, H, W] ids per view."""
    name: str
    views: list[str]
    grid: tuple[int, int]
    records: list[VideoRecord] = field(default_factory=list)
    tokens: list[dict[str, np.ndarray]] = field(default_factory=list)
    chunk_frames: int = 1024               # zarr inner chunk, in frames
    zstd_level: int = 3


@dataclass(frozen=True)
class ShardLayout:
    """What the manifest says one shard holds: every read is checked against this."""
    label: str                             # the shard's URL or path, for messages
    views: tuple[str, ...]
    grid: tuple[int, int]
    codebook_size: int
    keys: tuple[str, ...]                  # video keys by shard-local index
    frames: np.ndarray                     # int64 [videos]: frames of each video

    @property
    def videos(self) -> int:
        return len(self.keys)

    @property
    def total_frames(self) -> int:
        return int(self.frames.sum())

    def offsets(self) -> np.ndarray:
        """int64 [videos + 1]: video i is frames offsets[i]:offsets[i + 1] of the shard."""
        out = np.zeros(self.videos + 1, np.int64)
        np.cumsum(self.frames, out=out[1:])
        return out

    def check_view(self, view: str) -> None:
        if view not in self.views:
            raise ShardError(f"{self.label}: no view {view!r} (has {', '.join(self.views)})")

    def check_offsets(self, offsets: np.ndarray) -> None:
        """Offsets stored in a shard must be the manifest's: int64 [videos + 1], from 0, each
        video its recorded frame count."""
        if offsets.dtype != np.int64 or offsets.shape != (self.videos + 1,):
            raise ShardError(f"{self.label}: offsets are {offsets.dtype}{list(offsets.shape)}, "
                             f"the manifest lists {self.videos} videos (expected int64 "
                             f"[{self.videos + 1}])")
        lengths = np.diff(offsets)
        if offsets[0] != 0 or (lengths <= 0).any() or not np.array_equal(lengths, self.frames):
            bad = int(np.argmax(lengths != self.frames)) if len(lengths) else 0
            raise ShardError(f"{self.label}: video {self.keys[bad]!r}: offsets give "
                             f"{int(lengths[bad])} frames from {int(offsets[bad])}, the manifest "
                             f"records {int(self.frames[bad])} (offsets must start at 0 and "
                             "increase by each video's frames)")

    def check_array(self, array: np.ndarray, what: str, frames: int) -> None:
        """``array`` must be uint16 [frames, H, W] on the archive's grid."""
        want = (frames, *self.grid)
        if array.dtype != TOKEN_DTYPE or tuple(array.shape) != want:
            raise ShardError(f"{self.label}: {what} holds {array.dtype}{list(array.shape)}, "
                             f"expected uint16{list(want)}")

    def check_ids(self, array: np.ndarray, index: int, view: str, start: int = 0) -> None:
        """Every id of video ``index`` (frames ``start:``) must be below the codebook size: one
        vectorised max per read."""
        if array.size and int(array.max()) >= self.codebook_size:
            at = int(np.argmax(array.reshape(-1) >= self.codebook_size))
            frame = start + at // (array.shape[1] * array.shape[2])
            raise ShardError(f"{self.label}: video {self.keys[index]!r} view {view}: token id "
                             f"{int(array.reshape(-1)[at])} at frame {frame} is not below the "
                             f"codebook size {self.codebook_size}")

    def check_flat_ids(self, flat: np.ndarray, offsets: np.ndarray, view: str) -> None:
        """:meth:`check_ids` over a whole shard [frames, H, W], naming the video at fault."""
        if flat.size and int(flat.max()) >= self.codebook_size:
            frame = int(np.argmax((flat >= self.codebook_size).reshape(len(flat), -1).any(1)))
            index = int(np.searchsorted(offsets, frame, side="right")) - 1
            self.check_ids(flat[offsets[index]:offsets[index + 1]], index, view)


@dataclass
class ShardSource:
    """Where a reader finds a shard's bytes: ``raw(name)`` gives a file inside the shard entry
    ('' for a single-file shard); ``local`` is the entry's path on a local disk, ``files`` the
    entry's files already in memory (fetched from an object store and checksummed)."""
    label: str
    raw: Callable[[str], bytes | memoryview]
    local: Path | None = None
    files: dict[str, bytes] | None = None


class ShardReader(Protocol):
    """A shard opened for reading; every array returned is validated uint16 [T, H, W]."""

    layout: ShardLayout

    def read_all(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        """Every video of the shard in ``view``: (uint16 [frames, H, W], int64 offsets
        [videos + 1]); video i is ``flat[offsets[i]:offsets[i + 1]]``."""
        ...

    def read(self, index: int, view: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start:stop`` of video ``index`` in ``view``: uint16 [t, H, W]."""
        ...

    def check(self, view: str) -> None:
        """Check the whole of ``view`` once (structure and every token id); a reader may then
        skip the per-read id check of that view's clips."""
        ...

    # Optional: ``release()`` drops what a reader keeps between reads (decoded chunks, file
    # handles) and leaves it usable; callers that keep many readers open call it when idle.


@dataclass(frozen=True)
class Format:
    """One shard format: where its shards live and how to write and read them."""
    name: str                                  # as written in configs and manifests
    folder: str                                # archive sub-folder holding its shards
    suffix: str                                # shard entry suffix (".zarr" folder, ".tar" file)
    random_access: bool                        # clip reads without reading the whole shard
    write: Callable[[ShardContent, Path], None]
    open: Callable[[ShardSource, ShardLayout], ShardReader]
    describe: str = ""                         # one line for docs and ``--help``

    def rel(self, shard: str) -> str:
        """The shard's entry, relative to the archive root."""
        return f"{self.folder}/{shard}{self.suffix}"

    def owns(self, shard: str, rel: str) -> bool:
        """Whether the file ``rel`` belongs to ``shard`` in this format."""
        entry = self.rel(shard)
        return rel == entry or rel.startswith(entry + "/")
