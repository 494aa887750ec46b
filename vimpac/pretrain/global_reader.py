"""Global shuffle: the samples at any positions of the global order, read by random access.

Positions -> (pool, draw) by the interleave -> video uid by the pool's epoch permutation (or a
uniform pick, with replacement) -> two clip starts and a crop hashed from ``(seed, position)`` ->
clips read through the archive's shard readers (``ShardReader.read``, which reads what one clip
needs, not the shard), each read checked like every other read.

A window of positions is read together: its reads are sorted by shard, video and frame, so each
shard is opened once per window and each compressed chunk decoded once per window. Readers are kept
in a least-recently-used cache of ``open_shards`` entries; a reader's caches (a decoded chunk, a
file handle) are released when the window is done with its shard, so memory is bounded by the
window and the cache's size, never by the archive.

A shard found corrupt with ``on_corrupt: skip`` is named once in a warning and its samples are
replaced, deterministically, by the first video of the next readable shard of the same source (so
batches stay full and every position keeps its meaning); with ``stop`` the error ends the run.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence

import numpy as np

from vimpac.archive import Archive, ArchiveError, Format, ShardError
from vimpac.pretrain.clips import (
    Catalog,
    ClipDraws,
    StreamSpec,
    item_dtype,
    second_start_bounds,
    starts_range,
)
from vimpac.pretrain.mixing import CLIP, Draws, Interleave, Pool, below, derived_key, hashed

log = logging.getLogger("vimpac.pretrain.data")


class ReaderCache:
    """Open shard readers, least recently used dropped first.

    The first time this process opens a shard, the reader checks the whole shard once
    (``check``: structure and every token id), so a shard whose ids are out of range anywhere is
    refused as a whole, as the shard-buffer mode would refuse it, and not only when a sampled
    clip happens to cover the bad frame; clip reads from that reader then skip the per-read id
    check. With the archive's checksum check (also once per process) that is one sequential pass
    over each shard.
    """

    def __init__(self, archives: Callable[[], list[Archive]], formats: Sequence[Format],
                 catalog: Catalog, size: int, view: str) -> None:
        self.archives, self.formats, self.catalog, self.view = archives, formats, catalog, view
        self.size = max(1, size)
        self.open: collections.OrderedDict[int, object] = collections.OrderedDict()
        self.checked: set[int] = set()

    def get(self, shard: int) -> object:
        if shard in self.open:
            self.open.move_to_end(shard)
            return self.open[shard]
        ref = self.catalog.shards[shard]
        reader = self.archives()[ref.archive].open_shard(ref.name, self.formats[ref.archive])
        if shard not in self.checked:
            reader.check(self.view)                        # type: ignore[attr-defined]
            self.checked.add(shard)
        self.open[shard] = reader
        while len(self.open) > self.size:
            release(self.open.popitem(last=False)[1])
        return reader


def release(reader: object) -> None:
    """Let a reader drop what it keeps between reads (an optional method of readers)."""
    fn = getattr(reader, "release", None)
    if fn is not None:
        fn()


class GlobalReader:
    """Reads the samples at given positions of the global order."""

    def __init__(self, spec: StreamSpec, catalog: Catalog, pools: Sequence[Pool],
                 interleave: Interleave, archives: Callable[[], list[Archive]],
                 formats: Sequence[Format], view: str, names: Sequence[str]) -> None:
        self.spec, self.catalog, self.pools = spec, catalog, list(pools)
        self.interleave, self.view, self.names = interleave, view, list(names)
        self.draws = Draws(pools, spec.seed)
        self.cache = ReaderCache(archives, formats, catalog, spec.open_shards, view)
        self.archives = archives
        self.keys = [derived_key(spec.seed, CLIP, c) for c in range(4)]
        self.bad: set[int] = set()               # shards found corrupt (on_corrupt: skip)
        self.pool_first = np.array([p.first for p in pools], np.int64)

    def uids(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pool, video uid) of each position, before any corrupt shard is replaced."""
        pool, k = self.interleave.draws(positions)
        return pool, self.draws.uids(pool, k)

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clip pairs [n, 2, T, G, G] in :func:`item_dtype`, video uid [n]) at ``positions``."""
        positions = np.asarray(positions, np.int64)
        pool, uids = self.uids(positions)
        hashes = [hashed(key, positions) for key in self.keys]
        spec = self.spec
        out = np.full((len(positions), 2, spec.frames, spec.grid, spec.grid), spec.pad_id,
                      item_dtype(spec.pad_id))
        todo = np.arange(len(positions))
        while len(todo):
            uids[todo] = self.replace_bad(uids[todo], pool[todo])
            todo = self.fill(out, todo, uids, hashes)
        return out, uids

    def clip_draws(self, uids: np.ndarray, hashes: list[np.ndarray]) -> ClipDraws:
        """Starts and crop of each sample, scaled from its hashes to its video's frames (the
        archives of a run share one grid)."""
        spec = self.spec
        last = starts_range(self.catalog.frames[uids], spec)
        s1 = below(hashes[0], last + 1)
        lo, hi = second_start_bounds(s1, last, spec)
        s2 = lo + below(hashes[1], hi - lo + 1)
        height, width = self.archives()[0].settings.grid
        return ClipDraws(s1, s2, below(hashes[2], height - spec.grid + 1),
                         below(hashes[3], width - spec.grid + 1))

    def fill(self, out: np.ndarray, todo: np.ndarray, uids: np.ndarray,
             hashes: list[np.ndarray]) -> np.ndarray:
        """Read the samples ``todo`` into ``out``, shard by shard, in frame order; returns the
        samples of shards found corrupt (``on_corrupt: skip``)."""
        draws = self.clip_draws(uids[todo], [h[todo] for h in hashes])
        shard = self.catalog.shard_of(uids[todo])
        video = uids[todo] - self.catalog.starts[shard]
        m = len(todo)
        row = np.tile(np.arange(m), 2)                    # two reads per sample
        which = np.repeat([0, 1], m)
        start = np.concatenate([draws.s1, draws.s2])
        order = np.lexsort((start, video[row], shard[row]))
        cuts = np.flatnonzero(np.diff(shard[row][order])) + 1
        failed: list[np.ndarray] = []
        for group in np.split(order, cuts):
            sid = int(shard[row[group[0]]])
            try:
                self._read_group(out, sid, todo[row[group]], which[group], start[group],
                                 video[row[group]], draws.y[row[group]], draws.x[row[group]])
            except ShardError as exc:
                if self.spec.on_corrupt == "stop":
                    raise
                log.warning("skipping corrupt shard: %s (its samples are replaced by videos of "
                            "the next readable shard)", exc)
                self.bad.add(sid)
                hit = np.unique(todo[row[group]])
                out[hit] = self.spec.pad_id
                failed.append(hit)
        return np.unique(np.concatenate(failed)) if failed else np.zeros(0, np.int64)

    def _read_group(self, out: np.ndarray, sid: int, samples: np.ndarray, which: np.ndarray,
                    start: np.ndarray, video: np.ndarray, ys: np.ndarray,
                    xs: np.ndarray) -> None:
        """One shard's reads: clip ``which`` of sample ``samples[j]`` from ``start[j]``."""
        reader = self.cache.get(sid)
        t, g, view = self.spec.frames, self.spec.grid, self.view
        try:
            for i, c, s, v, y, x in zip(samples.tolist(), which.tolist(), start.tolist(),
                                        video.tolist(), ys.tolist(), xs.tolist(), strict=True):
                clip = reader.read(v, view, s, s + t)             # type: ignore[attr-defined]
                out[i, c, :len(clip)] = clip[:, y:y + g, x:x + g]
        finally:
            release(reader)

    def replace_bad(self, uids: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """Each uid in a shard known to be corrupt moved to the first video of the next shard
        of its pool (wrapping) that is not known to be corrupt."""
        if not self.bad:
            return uids
        uids = uids.copy()
        for i in range(len(uids)):
            shard = int(self.catalog.shard_of(uids[i:i + 1])[0])
            if shard not in self.bad:
                continue
            spec = self.pools[int(pool[i])]
            for _ in range(len(self.catalog.shards) + 1):
                nxt = int(self.catalog.starts[shard + 1])
                uid = nxt if nxt < spec.first + spec.size else spec.first
                shard = int(self.catalog.shard_of(np.array([uid]))[0])
                if shard not in self.bad:
                    uids[i] = uid
                    break
            else:
                raise ArchiveError(f"every shard of source {self.names[int(pool[i])]} was "
                                   "skipped as corrupt (see the warnings): nothing to train on")
        return uids
