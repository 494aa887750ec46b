"""Clip pairs for pre-training (paper Sec. 3.2), in one global order over weighted sources.

The samples of a run are one sequence, numbered across epochs: sample ``g`` (a video and its two
clips) is a pure function of the seed, the sources and ``g`` (:mod:`vimpac.pretrain.mixing`).
Micro-batch ``u`` is samples ``u*B .. u*B + B - 1``; with W processes and K DataLoader workers,
process ``r``'s ``j``-th micro-batch after the start position is ``u0 + j*W + r`` and DataLoader
worker ``j mod K`` makes it (DataLoader takes batches from its workers in turn). The data
position is therefore one number, the samples consumed by all processes, and a run checkpointed
with W1 x K1 readers resumes with W2 x K2 on exactly the same sequence: nothing repeated or
skipped. Batches carry ``position`` and ``video`` (uid) next to ``tokens`` for checks like these.

Two ways to read it, by ``StreamSpec.shuffle``:

* ``global``: the order is a seeded permutation over every video of every source, read by random
  access (:mod:`vimpac.pretrain.global_reader`); the default when every archive is local.
* ``shard``: shards streamed whole through a shuffle buffer, for object stores where random
  access is slow (:mod:`vimpac.pretrain.shard_streams`); the default when an archive is remote.

Every random choice comes from the seed and positions, never from global state.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vimpac.archive import Archive, ArchiveError, Format, open_archives
from vimpac.pretrain.clips import (
    SHUFFLE_MODES,
    Catalog,
    ClipDraws,
    ShardRef,
    ShuffleBuffer,
    StreamSpec,
    gather_pairs,
    item_dtype,
    sample_clip_pairs,
    take_clip,
)
from vimpac.pretrain.global_reader import GlobalReader
from vimpac.pretrain.mixing import (
    Interleave,
    Pool,
    Source,
    SourceError,
    check_sources,
    shuffle_quality,
    source_names,
)
from vimpac.pretrain.shard_streams import ShardStreams, StreamCursor, stream_of

log = logging.getLogger(__name__)

__all__ = ["SHUFFLE_MODES", "Catalog", "ClipDraws", "ClipStream", "ShardRef", "ShuffleBuffer",
           "Source", "StreamSpec", "gather_pairs", "item_dtype", "sample_clip_pairs",
           "shuffle_quality", "take_clip"]


def resolve_mode(shuffle: str, archives: Sequence[Archive]) -> str:
    """``auto`` is ``global`` when every archive is on a local disk, ``shard`` otherwise."""
    if shuffle not in SHUFFLE_MODES:
        raise ValueError(f"shuffle {shuffle!r}: expected one of {', '.join(SHUFFLE_MODES)}")
    if shuffle != "auto":
        return shuffle
    return "global" if all(a.root.is_local for a in archives) else "shard"


def make_pools(sources: Sequence[Source], catalog: Catalog, names: Sequence[str]) -> list[Pool]:
    """One pool of every video when no source has a weight; else one pool per source."""
    if all(s.weight == 0 for s in sources):
        return [Pool("+".join(names), 0, catalog.videos, 1.0, False)]
    pools = []
    for i, (s, name) in enumerate(zip(sources, names, strict=True)):
        first, stop = catalog.archive_first[i], catalog.archive_first[i + 1]
        if stop == first:
            raise SourceError(f"{s.path}: archive has no videos")
        pools.append(Pool(name, first, stop - first, s.weight, s.replacement))
    return pools


class ClipStream(IterableDataset):
    """Infinite stream of batches ``{"tokens": int64 [B, 2, T, G, G], "position": int64 [B],
    "video": int64 [B]}`` for process ``rank`` of ``world``, from global sample ``start`` on.

    ``archives`` are paths (shares by size) or :class:`Source` entries (weights). ``streams``,
    ``block`` and ``mode`` come from a checkpoint when resuming (see :meth:`state`); by default
    the shard-buffer order has one stream per reader and blocks of one micro-batch.
    """

    def __init__(self, archives: Sequence[str | Path | Source], spec: StreamSpec, rank: int = 0,
                 world: int = 1, start: int = 0, streams: int | None = None,
                 block: int | None = None, mode: str | None = None) -> None:
        self.sources = [a if isinstance(a, Source) else Source(str(a)) for a in archives]
        check_sources(self.sources)
        self.paths = [s.path for s in self.sources]
        self.spec, self.rank, self.world = spec, rank, world
        if start % spec.batch_size:
            raise ValueError(f"start {start} is not a whole number of batches of "
                             f"{spec.batch_size}")
        self.start = start
        self._archives: list[Archive] | None = open_archives(self.paths)  # fail early, here
        self.view = spec.view or self.archives[0].settings.view_names[0]
        self.formats = self._formats()
        self.catalog = Catalog(self.archives, self.formats)
        if not self.catalog.shards:
            raise ArchiveError(f"{self.paths[0]}: archive has no shards")
        self.names = source_names(self.sources)
        self.pools = make_pools(self.sources, self.catalog, self.names)
        self.mode = mode or resolve_mode(spec.shuffle, self.archives)
        if self.mode == "global" and not all(a.root.is_local for a in self.archives):
            log.warning("global shuffle over an object store fetches a whole shard per reader "
                        "cache miss: set VIMPAC_SHARD_CACHE, or use pretrain.shuffle: shard")
        self.streams, self.block = streams, block or spec.batch_size
        self.interleave = Interleave([p.weight for p in self.pools], seed=spec.seed,
                                     shuffled=self.mode == "global")
        self._global: GlobalReader | None = None
        self._shards: ShardStreams | None = None

    def _formats(self) -> list[Format]:
        formats = []
        for arch in self.archives:
            if self.view not in arch.settings.view_names:
                raise ArchiveError(f"{arch.root}: no view {self.view!r} (has "
                                   f"{', '.join(arch.settings.view_names)})")
            formats.append(arch.format(self.spec.fmt, random_access=True))
            h, w = arch.settings.grid
            if self.spec.grid > min(h, w):
                raise ArchiveError(f"{arch.root}: token grid {h}x{w} is smaller than the "
                                   f"model's {self.spec.grid}x{self.spec.grid}")
        return formats

    @property
    def archives(self) -> list[Archive]:
        if self._archives is None:
            self._archives = open_archives(self.paths)
        return self._archives

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_archives=None, _global=None, _shards=None)   # reopened in each worker
        return state

    # -- readers
    @property
    def global_reader(self) -> GlobalReader:
        if self._global is None:
            self._global = GlobalReader(self.spec, self.catalog, self.pools, self.interleave,
                                        lambda: self.archives, self.formats, self.view,
                                        [p.name for p in self.pools])
        return self._global

    @property
    def shard_streams(self) -> ShardStreams:
        if self._shards is None:
            self._shards = ShardStreams(self.spec, self.catalog, self.pools,
                                        lambda: self.archives, self.formats, self.view,
                                        [p.name for p in self.pools])
        return self._shards

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.batches(worker, workers)

    def micro_batches(self, worker: int = 0, workers: int = 1) -> Iterator[int]:
        """The global micro-batches this process's DataLoader worker makes, in order."""
        first = self.start // self.spec.batch_size
        return (first + (worker + i * workers) * self.world + self.rank
                for i in itertools.count())

    def batches(self, worker: int = 0, workers: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """This process's batches made by DataLoader worker ``worker`` of ``workers``."""
        micro = self.micro_batches(worker, workers)
        if self.mode == "global":
            yield from self._global_batches(micro)
        else:
            yield from self._shard_batches(micro, self.streams or self.world * workers)

    def _positions(self, micro: Sequence[int]) -> np.ndarray:
        size = self.spec.batch_size
        return (np.asarray(micro, np.int64)[:, None] * size + np.arange(size)).ravel()

    def _global_batches(self, micro: Iterator[int]) -> Iterator[dict[str, torch.Tensor]]:
        size = self.spec.batch_size
        group = max(1, self.spec.window // size)
        while True:
            positions = self._positions(list(itertools.islice(micro, group)))
            pairs, uids = self.global_reader.read(positions)
            for j in range(0, len(positions), size):
                yield self._batch(pairs[j:j + size], positions[j:j + size], uids[j:j + size])

    def _shard_batches(self, micro: Iterator[int], streams: int
                       ) -> Iterator[dict[str, torch.Tensor]]:
        self.shard_streams.check_streams(streams)
        cursors: dict[int, StreamCursor] = {}
        for u in micro:
            positions = self._positions([u])
            stream, local = stream_of(positions, streams, self.block)
            pairs: np.ndarray | None = None
            uids = np.empty(len(positions), np.int64)
            for s in np.unique(stream).tolist():
                sel = stream == s
                if s not in cursors:
                    cursors[s] = StreamCursor(self.shard_streams, self.interleave, s, streams,
                                              int(local[sel][0]))
                got, ids = cursors[s].take(local[sel])
                if pairs is None:
                    pairs = np.empty((len(positions), *got.shape[1:]), got.dtype)
                pairs[sel], uids[sel] = got, ids
            assert pairs is not None
            yield self._batch(pairs, positions, uids)

    @staticmethod
    def _batch(pairs: np.ndarray, positions: np.ndarray, uids: np.ndarray
               ) -> dict[str, torch.Tensor]:
        return {"tokens": torch.from_numpy(pairs.astype(np.int64)),
                "position": torch.from_numpy(np.ascontiguousarray(positions)),
                "video": torch.from_numpy(np.ascontiguousarray(uids))}

    def epoch_batches(self, epoch: int, consumer: int = 0, consumers: int = 1
                      ) -> Iterator[np.ndarray]:
        """One pass over the videos (one pool, no weights): the epoch's batches int64
        [B, 2, T, G, G] dealt to ``consumers`` readers in turn, this reader's share, the last
        partial batch dropped. For tools and tests; training uses :meth:`batches`."""
        if len(self.pools) != 1:
            raise ValueError("epoch_batches reads the epoch of one pool (sources without weights)")
        size = self.spec.batch_size
        if self.mode == "shard":
            items = self.shard_streams.epoch_items(0, epoch, consumer, consumers)
            held = np.zeros((0, 2, self.spec.frames, self.spec.grid, self.spec.grid),
                            item_dtype(self.spec.pad_id))
            for pairs, _ in items:
                held = np.concatenate([held, pairs])
                while len(held) >= size:
                    yield held[:size].astype(np.int64)
                    held = held[size:]
            return
        base, count = epoch * self.pools[0].size, self.pools[0].size // size
        mine = list(range(consumer, count, consumers))
        group = max(1, self.spec.window // size)
        for i in range(0, len(mine), group):
            positions = base + self._positions(mine[i:i + group])
            pairs, _ = self.global_reader.read(positions)
            for j in range(0, len(positions), size):
                yield pairs[j:j + size].astype(np.int64)

    # -- checks, position and progress
    def check_enough_videos(self, workers: int) -> None:
        """Fail early (not inside a DataLoader worker): one micro-batch of every process must
        hold distinct videos, and in shard-buffer mode every reader must get videos."""
        need = self.world * self.spec.batch_size
        if len(self.pools) == 1 and self.pools[0].size < need:
            raise ArchiveError(
                f"{self.paths[0]}: {self.pools[0].size} videos cannot fill batches of "
                f"{self.spec.batch_size} videos for each of {self.world} processes with distinct "
                "videos; use more videos or a smaller pretrain.micro_batch")
        if self.mode == "shard":
            self.shard_streams.check_streams(self.streams or self.world * max(1, workers))

    def draws_before(self, position: int, workers: int = 1) -> np.ndarray:
        """int64 [pools]: samples each pool gave to global positions [0, position)."""
        if self.mode == "global":
            return self.interleave.counts(position)
        streams = self.streams or self.world * max(1, workers)
        blocks, rest = divmod(position, self.block)
        out = np.zeros(len(self.pools), np.int64)
        for s in range(streams):
            local = len(range(s, blocks, streams)) * self.block
            local += rest if blocks % streams == s else 0
            out += self.interleave.counts(local)
        return out

    def source_epochs(self, position: int) -> dict[str, float]:
        """Epochs of each source (pool draws / pool videos) after ``position`` samples."""
        draws = self.draws_before(position)
        if len(self.pools) == 1:
            return {name: float(draws[0]) / self.pools[0].size for name in self.names}
        return {p.name: float(d) / p.size for p, d in zip(self.pools, draws, strict=True)}

    def log_epochs(self, before: int, after: int) -> None:
        """Log each source that began an epoch between two positions."""
        was, now = self.source_epochs(before), self.source_epochs(after)
        for name, epochs in now.items():
            if int(epochs) > int(was[name]):
                log.info("source %s: epoch %d begins (sample %d)", name, int(epochs) + 1,
                         after)

    def state(self, position: int) -> dict[str, Any]:
        """The data position for a checkpoint: global samples consumed, and what the order
        depends on beyond the config (mode, shard-buffer streams and block, the sources)."""
        return {"samples": int(position), "mode": self.mode, "streams": self.streams,
                "block": self.block, "source_epochs": self.source_epochs(position),
                "sources": self.fingerprint()}

    def fingerprint(self) -> list[dict[str, Any]]:
        return [{"name": name, "weight": s.weight, "replacement": s.replacement,
                 "videos": self.catalog.archive_first[i + 1] - self.catalog.archive_first[i]}
                for i, (s, name) in enumerate(zip(self.sources, self.names, strict=True))]

    def check_resume(self, state: dict[str, Any], where: str) -> None:
        """Refuse to continue a checkpoint's order over other sources."""
        saved = state.get("sources")
        if saved is None:
            return
        now = self.fingerprint()
        if len(saved) != len(now):
            raise SourceError(f"{where}: the run read {len(saved)} archives, now {len(now)}: "
                              "resume with the same sources, or use a new output folder")
        for i, (a, b) in enumerate(zip(saved, now, strict=True)):
            diff = [k for k in ("weight", "replacement", "videos") if a.get(k) != b[k]]
            if diff:
                raise SourceError(f"{where}: source {i} ({b['name']}) has {diff[0]} "
                                  f"{b[diff[0]]!r}, the run was started with {a.get(diff[0])!r}: "
                                  "resume with the same sources, or use a new output folder")

    def shard_of(self, uids: np.ndarray) -> np.ndarray:
        """Shard id of each video uid (for shuffle-quality figures)."""
        return self.catalog.shard_of(np.asarray(uids))
