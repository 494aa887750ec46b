"""Streaming clip pairs out of token archives for pre-training (paper Sec. 3.2).

A chain of small stages, each a plain function or generator:

    list shards -> shuffle (seed, epoch) -> split by consumer (rank x worker) -> read shard
    -> per video two clips of T frames (independent, uniform; optional max distance)
    -> token-space crop -> [PAD] for short videos -> shuffle buffer -> batch

Every random choice comes from a generator seeded by (seed, epoch, consumer), never from global
state, so the stream is a pure function of its position. Each consumer runs epochs forever with
``drop_last`` per epoch; a batch's global index k maps to DataLoader worker k % W, so resuming at
global position K is exact (:class:`ClipStream` ``start_batch``). Memory holds one shard and the
shuffle buffer, never the archive (plus ``prefetch`` shards in flight from an object store).

For speed the per-video stages run vectorised over a whole shard (:func:`sample_clip_pairs`,
:class:`ShuffleBuffer`): one read per shard into a flat array, all random draws of the shard in
bulk, clips gathered with one fancy index, and items kept as uint16 until a batch is cut (then
int64).
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vimpac.archive import Archive, ArchiveError, Format, ShardError, open_archives

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    """One shard of one archive, as a unit of streaming."""
    archive: int
    name: str
    videos: int


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
    shuffle_buffer: int = 256
    on_corrupt: str = "stop"    # stop | skip
    prefetch: int = 2           # shards fetched ahead from remote archives (0: none)


def list_shards(archives: list[Archive]) -> list[ShardRef]:
    return [ShardRef(i, name, arch.shards[name].videos)
            for i, arch in enumerate(archives) for name in arch.shard_names()]


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A generator determined by the seed and the keys (epoch, consumer, ...)."""
    return np.random.default_rng([seed, *keys])


def epoch_assignment(shards: list[ShardRef], seed: int, epoch: int, consumer: int,
                     consumers: int) -> list[tuple[ShardRef, int, int]]:
    """The (shard, video modulus, video remainder) work of one consumer in one epoch.

    With at least as many shards as consumers each consumer takes whole shards; otherwise each
    reads every shard and keeps the videos whose shard-local index falls to it.
    """
    order = [shards[i] for i in rng_for(seed, epoch).permutation(len(shards))]
    if len(order) >= consumers:
        return [(s, 1, 0) for s in order[consumer::consumers]]
    return [(s, consumers, consumer) for s in order]


def videos_in_epoch(shards: list[ShardRef], seed: int, epoch: int, consumer: int,
                    consumers: int) -> int:
    work = epoch_assignment(shards, seed, epoch, consumer, consumers)
    return sum(len(range(rem, s.videos, mod)) for s, mod, rem in work)


# --------------------------------------------------------------------------------- reading shards

def take_clip(video: np.ndarray, start: int, frames: int, pad_id: int) -> np.ndarray:
    """Frames ``start:start+frames``, right-padded with [PAD] when the video is short."""
    clip = video[start:start + frames].astype(np.int64)
    if len(clip) < frames:
        pad = np.full((frames - len(clip), *clip.shape[1:]), pad_id, dtype=np.int64)
        clip = np.concatenate([clip, pad], axis=0)
    return clip


def sample_clip_pairs(flat: np.ndarray, offsets: np.ndarray, videos: np.ndarray,
                      rng: np.random.Generator, spec: StreamSpec) -> np.ndarray:
    """Two clips of each video in ``videos`` (shard-local indices), vectorised over the shard.

    Paper rules: two starts drawn independently and uniformly (optionally within
    ``spec.max_distance`` of each other), one token-space crop per video shared by both clips,
    [PAD] past the end of short videos; all random draws are made per shard in bulk.
    flat uint16 [F, H, W], offsets [V + 1] -> [n, 2, T, grid, grid] in :func:`item_dtype`.
    """
    n, t, g = len(videos), spec.frames, spec.grid
    first = offsets[videos]
    length = offsets[videos + 1] - first                             # [n]
    last = np.maximum(length - t, 0)
    s1 = rng.integers(0, last + 1)
    if spec.max_distance <= 0:
        s2 = rng.integers(0, last + 1)
    else:
        s2 = rng.integers(np.maximum(s1 - spec.max_distance, 0),
                          np.minimum(s1 + spec.max_distance, last) + 1)
    height, width = flat.shape[1:3]
    y = rng.integers(0, height - g + 1, n)
    x = rng.integers(0, width - g + 1, n)
    rel = np.stack([s1, s2], axis=1)[:, :, None] + np.arange(t)     # [n, 2, T]
    frame = first[:, None, None] + np.minimum(rel, length[:, None, None] - 1)
    if g == height and g == width:
        clips = flat[frame]                                           # [n, 2, T, H, W]
    else:
        rows = (y[:, None] + np.arange(g))[:, None, None, :, None]   # [n, 1, 1, g, 1]
        cols = (x[:, None] + np.arange(g))[:, None, None, None, :]   # [n, 1, 1, 1, g]
        clips = flat[frame[..., None, None], rows, cols]              # [n, 2, T, g, g]
    out = clips.astype(item_dtype(spec.pad_id))
    out[rel >= length[:, None, None]] = spec.pad_id
    return out


def item_dtype(pad_id: int) -> type:
    """Smallest dtype that holds token ids and [PAD] (the stream widens to int64 per batch)."""
    return np.uint16 if pad_id <= np.iinfo(np.uint16).max else np.int32


class ShuffleBuffer:
    """A shuffle buffer over arrays of items, drawing its random indices in bulk.

    The first ``size`` items fill the buffer; then every new item swaps with a uniformly chosen
    slot, whose old item is emitted; :meth:`drain` emits the rest permuted.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.items: np.ndarray | None = None          # [<= size, ...]

    def push(self, block: np.ndarray) -> np.ndarray:
        """Add items [n, ...]; returns the emitted items [m, ...] in order (m may be 0)."""
        held = 0 if self.items is None else len(self.items)
        fill = min(self.size - held, len(block))
        if fill:
            self.items = block[:fill] if self.items is None else \
                np.concatenate([self.items, block[:fill]])
            block = block[fill:]
        if not len(block):
            return block
        slots = self.rng.integers(0, self.size, len(block)).tolist()
        owner = list(range(self.size))               # pool index held by each slot
        emitted = []
        for j, slot in enumerate(slots):
            emitted.append(owner[slot])
            owner[slot] = self.size + j
        pool = np.concatenate([self.items, block])
        self.items = pool[owner]
        return pool[emitted]

    def drain(self) -> np.ndarray | None:
        """The remaining items in random order (None when empty); the buffer is emptied."""
        if self.items is None:
            return None
        items, self.items = self.items[self.rng.permutation(len(self.items))], None
        return items


# ---------------------------------------------------------------------------------------- stream

class ClipStream(IterableDataset):
    """Infinite stream of batches ``{"tokens": int64 [B, 2, T, G, G]}`` for one process.

    ``rank``/``world`` split the data across processes, DataLoader workers split it further.
    ``start_batch`` is the number of batches this process has already consumed (resume).
    """

    def __init__(self, archives: list[str | Path], spec: StreamSpec, rank: int = 0,
                 world: int = 1, start_batch: int = 0) -> None:
        self.paths = [str(p) for p in archives]
        self.spec, self.rank, self.world, self.start_batch = spec, rank, world, start_batch
        self._archives: list[Archive] | None = open_archives(self.paths)  # fail early, here
        view = spec.view or self.archives[0].settings.view_names[0]
        self.formats: list[Format] = []
        for arch in self.archives:
            if view not in arch.settings.view_names:
                raise ArchiveError(f"{arch.root}: no view {view!r} (has "
                                   f"{', '.join(arch.settings.view_names)})")
            self.formats.append(arch.format(spec.fmt))
            h, w = arch.settings.grid
            if spec.grid > min(h, w):
                raise ArchiveError(f"{arch.root}: token grid {h}x{w} is smaller than the "
                                   f"model's {spec.grid}x{spec.grid}")
        self.view = view
        self.shards = list_shards(self.archives)
        if not self.shards:
            raise ArchiveError(f"{self.paths[0]}: archive has no shards")

    @property
    def archives(self) -> list[Archive]:
        if self._archives is None:
            self._archives = open_archives(self.paths)
        return self._archives

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_archives"] = None          # reopened in each worker
        return state

    def consumer(self) -> tuple[int, int, int, int]:
        """(consumer id, consumers, worker, workers) of the calling DataLoader worker.

        A DataLoader always starts with its worker 0, so after resuming at global batch K,
        DataLoader worker w plays the part of worker (w + K) mod W of the original run.
        """
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (loader_worker + self.start_batch) % workers
        return self.rank * workers + worker, self.world * workers, worker, workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        consumer, consumers, worker, workers = self.consumer()
        skip = len(range(worker, self.start_batch, workers))   # this worker's share of the past
        batches = self.consumer_batches(consumer, consumers)
        for i, batch in enumerate(batches):
            if i >= skip:
                yield {"tokens": torch.from_numpy(batch)}

    def batches_per_epoch(self, consumer: int, consumers: int, epoch: int) -> int:
        return videos_in_epoch(self.shards, self.spec.seed, epoch, consumer,
                               consumers) // self.spec.batch_size

    def check_enough_videos(self, workers: int) -> None:
        """Fail early (not inside a DataLoader worker) when a consumer cannot fill one batch."""
        consumers = self.world * max(1, workers)
        fewest = min(videos_in_epoch(self.shards, self.spec.seed, 0, c, consumers)
                     for c in range(consumers))
        if fewest < self.spec.batch_size:
            total = sum(s.videos for s in self.shards)
            raise ArchiveError(
                f"{self.paths[0]}: {total} videos cannot fill batches of {self.spec.batch_size} "
                f"videos for each of {consumers} readers (processes x DataLoader workers); "
                "use more videos, a smaller pretrain.micro_batch or fewer workers")

    def consumer_batches(self, consumer: int, consumers: int) -> Iterator[np.ndarray]:
        """This consumer's batches, epoch after epoch, forever."""
        epoch = 0
        while True:
            if self.batches_per_epoch(consumer, consumers, epoch) == 0:
                raise ArchiveError(f"{self.paths[0]}: too few videos for a batch of "
                                   f"{self.spec.batch_size} per consumer ({consumers} consumers)")
            produced = 0
            for batch in self.epoch_batches(epoch, consumer, consumers):
                produced += 1
                yield batch
            if not produced:              # with on_corrupt=skip, every shard was skipped
                raise ArchiveError(f"{self.paths[0]}: every shard of this reader's epoch {epoch} "
                                   "was skipped as corrupt (see the warnings): nothing to train on")
            epoch += 1

    def epoch_batches(self, epoch: int, consumer: int, consumers: int) -> Iterator[np.ndarray]:
        """One epoch of batches int64 [B, 2, T, G, G] (drop_last)."""
        rng = rng_for(self.spec.seed, epoch, consumer)
        buffer = ShuffleBuffer(self.spec.shuffle_buffer, rng)
        pending: list[np.ndarray] = []               # emitted items not yet in a batch
        held, size = 0, self.spec.batch_size
        for block in self._pair_blocks(epoch, consumer, consumers, rng):
            out = buffer.push(block)
            if len(out):
                pending.append(out)
                held += len(out)
            while held >= size:
                items = pending[0] if len(pending) == 1 else np.concatenate(pending)
                for start in range(0, len(items) - size + 1, size):
                    yield items[start:start + size].astype(np.int64)
                rest = len(items) % size
                pending, held = ([items[len(items) - rest:]] if rest else []), rest
        rest = buffer.drain()
        if rest is not None:
            items = np.concatenate(pending + [rest]) if pending else rest
            for start in range(0, len(items) - size + 1, size):
                yield items[start:start + size].astype(np.int64)

    def _prefetched(self, shards: Iterable[ShardRef]
                    ) -> Iterator[Callable[[], tuple[np.ndarray, np.ndarray]]]:
        """Per shard, a call returning its (flat tokens, offsets). Shards of remote archives are
        fetched ``spec.prefetch`` ahead in a background thread (bounded memory: that many shards
        in flight); local ones are read when called."""
        def read(ref: ShardRef) -> tuple[np.ndarray, np.ndarray]:
            return self.archives[ref.archive].read_shard(ref.name, self.view,
                                                         self.formats[ref.archive])

        shards = list(shards)
        remote = any(not self.archives[ref.archive].root.is_local for ref in shards)
        if not remote or self.spec.prefetch <= 0:
            for ref in shards:
                yield functools.partial(read, ref)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="vimpac-prefetch") as pool:
            pending: collections.deque = collections.deque()
            for ref in shards:
                pending.append(pool.submit(read, ref))
                if len(pending) > self.spec.prefetch:
                    yield pending.popleft().result
            while pending:
                yield pending.popleft().result

    def _pair_blocks(self, epoch: int, consumer: int, consumers: int,
                     rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Per shard of this consumer's epoch: its videos' clip pairs [n, 2, T, G, G]."""
        work = epoch_assignment(self.shards, self.spec.seed, epoch, consumer, consumers)
        reads = self._prefetched(ref for ref, _, _ in work)
        for (_, mod, rem), read in zip(work, reads, strict=True):
            try:
                flat, offsets = read()
            except ShardError as exc:
                if self.spec.on_corrupt == "stop":
                    raise
                log.warning("skipping corrupt shard: %s", exc)
                continue
            videos = np.arange(rem, len(offsets) - 1, mod)
            if len(videos):
                yield sample_clip_pairs(flat, offsets, videos, rng, self.spec)
