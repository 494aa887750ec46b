"""What every pre-training reader shares: the stream's settings, the table of videos, and the
paper's clip rules (Sec. 3.2): two clips of T frames per video, starts drawn independently and
uniformly (optionally within a maximum distance), one token-space crop shared by both clips,
[PAD] past the end of short videos.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vimpac.archive import Archive, Format

SHUFFLE_MODES = ("auto", "global", "shard")


@dataclass
class StreamSpec:
    frames: int                 # T token frames per clip
    grid: int                   # model's token grid side; larger archive grids are cropped
    batch_size: int             # videos per batch (each gives two clips)
    pad_id: int
    seed: int = 0
    fmt: str | None = None      # archive format to stream (None: the archive's first)
    view: str | None = None     # archive view to read (default: the first, unflipped centre)
    max_distance: int = 0       # max start distance of the two clips in token frames; 0 = any
    shuffle_buffer: int = 256   # shard-buffer mode: videos in the shuffle buffer
    on_corrupt: str = "stop"    # stop | skip
    prefetch: int = 2           # shard-buffer mode: shards fetched ahead from object stores
    shuffle: str = "auto"       # global | shard | auto (global when every archive is local)
    window: int = 2048          # global mode: samples read together, grouped by shard
    open_shards: int = 64       # global mode: shard readers kept open (least recently used out)


# ------------------------------------------------------------------------------- video table

@dataclass(frozen=True)
class ShardRef:
    """One shard of one archive; its videos are uids ``first .. first + videos - 1``."""
    archive: int
    name: str
    videos: int
    first: int


class Catalog:
    """Every video of every archive of a run, numbered 0 .. N-1 (uid) archive by archive, shard
    by shard (sorted names), in shard order: its shard, index in the shard and frame count."""

    def __init__(self, archives: Sequence[Archive], formats: Sequence[Format]) -> None:
        self.shards: list[ShardRef] = []
        frames, first = [], 0
        self.archive_first = [0]
        for i, (arch, fmt) in enumerate(zip(archives, formats, strict=True)):
            for name in arch.shard_names():
                lengths = arch.layout(name, fmt).frames
                self.shards.append(ShardRef(i, name, len(lengths), first))
                frames.append(lengths)
                first += len(lengths)
            self.archive_first.append(first)
        self.frames = (np.concatenate(frames) if frames else np.zeros(0)).astype(np.int64)
        self.starts = np.array([s.first for s in self.shards] + [first], np.int64)

    @property
    def videos(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, uids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, uids, side="right") - 1

    def shards_between(self, first: int, stop: int) -> list[int]:
        """Ids of the shards whose videos are uids ``first .. stop - 1``."""
        lo = int(np.searchsorted(self.starts, first, side="left"))
        hi = int(np.searchsorted(self.starts, stop, side="left"))
        return list(range(lo, hi))


# ---------------------------------------------------------------------------------- clip rules

def item_dtype(pad_id: int) -> type:
    """Smallest dtype that holds token ids and [PAD] (the stream widens to int64 per batch)."""
    return np.uint16 if pad_id <= np.iinfo(np.uint16).max else np.int32


def take_clip(video: np.ndarray, start: int, frames: int, pad_id: int) -> np.ndarray:
    """Frames ``start:start+frames``, right-padded with [PAD] when the video is short."""
    clip = video[start:start + frames].astype(np.int64)
    if len(clip) < frames:
        pad = np.full((frames - len(clip), *clip.shape[1:]), pad_id, dtype=np.int64)
        clip = np.concatenate([clip, pad], axis=0)
    return clip


@dataclass
class ClipDraws:
    """The random choices of n samples: two clip starts and one crop corner each (int64 [n])."""
    s1: np.ndarray
    s2: np.ndarray
    y: np.ndarray
    x: np.ndarray


def starts_range(length: np.ndarray, spec: StreamSpec) -> np.ndarray:
    """The last valid clip start of each video (0 when shorter than a clip)."""
    return np.maximum(length - spec.frames, 0)


def second_start_bounds(s1: np.ndarray, last: np.ndarray, spec: StreamSpec
                        ) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi] of the second start: anywhere, or within ``max_distance`` of the first."""
    if spec.max_distance <= 0:
        return np.zeros_like(last), last
    return (np.maximum(s1 - spec.max_distance, 0),
            np.minimum(s1 + spec.max_distance, last))


def sample_clip_pairs(flat: np.ndarray, offsets: np.ndarray, videos: np.ndarray,
                      rng: np.random.Generator, spec: StreamSpec) -> np.ndarray:
    """Two clips of each video in ``videos`` (shard-local indices), vectorised over the shard.

    All random draws of the shard are made in bulk from ``rng`` (the shard-buffer streams).
    flat uint16 [F, H, W], offsets [V + 1] -> [n, 2, T, grid, grid] in :func:`item_dtype`.
    """
    n, g = len(videos), spec.grid
    length = offsets[videos + 1] - offsets[videos]
    last = starts_range(length, spec)
    s1 = rng.integers(0, last + 1)
    lo, hi = second_start_bounds(s1, last, spec)
    s2 = rng.integers(lo, hi + 1) if spec.max_distance > 0 else rng.integers(0, last + 1)
    height, width = flat.shape[1:3]
    y = rng.integers(0, height - g + 1, n)
    x = rng.integers(0, width - g + 1, n)
    return gather_pairs(flat, offsets, videos, ClipDraws(s1, s2, y, x), spec)


def gather_pairs(flat: np.ndarray, offsets: np.ndarray, videos: np.ndarray, draws: ClipDraws,
                 spec: StreamSpec) -> np.ndarray:
    """The clip pairs of ``draws`` gathered from a shard in memory with one fancy index."""
    t, g = spec.frames, spec.grid
    first = offsets[videos]
    length = offsets[videos + 1] - first                             # [n]
    rel = np.stack([draws.s1, draws.s2], axis=1)[:, :, None] + np.arange(t)   # [n, 2, T]
    frame = first[:, None, None] + np.minimum(rel, length[:, None, None] - 1)
    height, width = flat.shape[1:3]
    if g == height and g == width:
        clips = flat[frame]                                           # [n, 2, T, H, W]
    else:
        rows = (draws.y[:, None] + np.arange(g))[:, None, None, :, None]
        cols = (draws.x[:, None] + np.arange(g))[:, None, None, None, :]
        clips = flat[frame[..., None, None], rows, cols]              # [n, 2, T, g, g]
    out = clips.astype(item_dtype(spec.pad_id))
    out[rel >= length[:, None, None]] = spec.pad_id
    return out


class ShuffleBuffer:
    """A shuffle buffer over aligned arrays of items (first axis), random indices in bulk.

    The first ``size`` items fill the buffer; then every new item swaps with a uniformly chosen
    slot, whose old item is emitted; :meth:`drain` emits the rest permuted.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.items: tuple[np.ndarray, ...] | None = None      # each [<= size, ...]

    def push(self, *block: np.ndarray) -> tuple[np.ndarray, ...]:
        """Add aligned items [n, ...]; returns the emitted items [m, ...] in order (m may be 0)."""
        held = 0 if self.items is None else len(self.items[0])
        fill = min(self.size - held, len(block[0]))
        if fill:
            self.items = tuple(b[:fill] for b in block) if self.items is None else \
                tuple(np.concatenate([a, b[:fill]]) for a, b in zip(self.items, block,
                                                                    strict=True))
            block = tuple(b[fill:] for b in block)
        if not len(block[0]):
            return block
        slots = self.rng.integers(0, self.size, len(block[0])).tolist()
        owner = list(range(self.size))               # pool index held by each slot
        emitted = []
        for j, slot in enumerate(slots):
            emitted.append(owner[slot])
            owner[slot] = self.size + j
        assert self.items is not None
        pools = [np.concatenate([a, b]) for a, b in zip(self.items, block, strict=True)]
        self.items = tuple(p[owner] for p in pools)
        return tuple(p[emitted] for p in pools)

    def drain(self) -> tuple[np.ndarray, ...] | None:
        """The remaining items in random order (None when empty); the buffer is emptied."""
        if self.items is None:
            return None
        order = self.rng.permutation(len(self.items[0]))
        items, self.items = tuple(a[order] for a in self.items), None
        return items
