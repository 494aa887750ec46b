"""Shard-buffer shuffle: samples streamed shard by shard, for stores where random access is slow.

The global order of this mode is made of ``S`` streams (by default, processes x DataLoader
workers when the run started; the number is kept in checkpoints). Positions are dealt to streams
in blocks of ``block`` samples (the micro-batch when the run started): block ``b`` is stream
``b mod S``'s block ``b div S``. Each stream interleaves the pools by weight (in order, so each
pool's draws can be read as a stream), and each pool's draws in a stream are its epochs:

    the pool's shards permuted by (seed, pool, epoch) (drawn with replacement for a source with
    replacement) -> every S-th shard from the stream's own (or, with fewer shards than streams,
    every S-th video of every shard) -> read whole shard -> per video two clips (drawn in bulk
    from the stream's generator) -> shuffle buffer -> the stream's samples, epoch after epoch

When every reader (rank x worker) owns exactly one stream, as when the run started, each shard is
read by one reader only. A run resumed with another number of readers still produces the same
sequence: a reader then computes the streams its micro-batches come from and skips the samples
of those streams that other readers use (reading more than its share). Resuming inside an epoch
replays that epoch of the stream up to the position; whole epochs before it are skipped by the
manifest's counts, so if a corrupt shard was skipped (``on_corrupt: skip``) in one of them, the
resumed stream is shifted by that shard's videos from then on (the global shuffle has no such
caveat: it replaces a skipped shard's samples in place).
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vimpac.archive import Archive, ArchiveError, Format, ShardError
from vimpac.pretrain.clips import Catalog, ShardRef, ShuffleBuffer, StreamSpec, sample_clip_pairs
from vimpac.pretrain.mixing import SHARDS, STREAM, Interleave, Pool

log = logging.getLogger("vimpac.pretrain.data")

Items = tuple[np.ndarray, np.ndarray]          # (clip pairs [n, 2, T, G, G], video uids [n])


class ShardStreams:
    """What the streams read from: the run's archives, formats, view and video table."""

    def __init__(self, spec: StreamSpec, catalog: Catalog, pools: Sequence[Pool],
                 archives: Callable[[], list[Archive]], formats: Sequence[Format], view: str,
                 names: Sequence[str]) -> None:
        self.spec, self.catalog, self.pools = spec, catalog, list(pools)
        self.archives, self.formats, self.view, self.names = archives, formats, view, names
        self.shards = [catalog.shards_between(p.first, p.first + p.size) for p in pools]

    def assignment(self, p: int, epoch: int, stream: int, streams: int
                   ) -> list[tuple[ShardRef, int, int]]:
        """(shard, video modulus, video remainder) of pool ``p``'s epoch in one stream."""
        ids = self.shards[p]
        rng = np.random.default_rng([self.spec.seed, SHARDS, p, epoch])
        pick = rng.integers(0, len(ids), len(ids)) if self.pools[p].replacement else \
            rng.permutation(len(ids))
        order = [self.catalog.shards[ids[i]] for i in pick.tolist()]
        if len(order) >= streams:
            return [(s, 1, 0) for s in order[stream::streams]]
        return [(s, streams, stream) for s in order]

    def epoch_size(self, p: int, epoch: int, stream: int, streams: int) -> int:
        return sum(len(range(rem, s.videos, mod))
                   for s, mod, rem in self.assignment(p, epoch, stream, streams))

    def epoch_items(self, p: int, epoch: int, stream: int, streams: int) -> Iterator[Items]:
        """One epoch of pool ``p`` in one stream, through the shuffle buffer."""
        rng = np.random.default_rng([self.spec.seed, STREAM, p, stream, streams, epoch])
        buffer = ShuffleBuffer(self.spec.shuffle_buffer, rng)
        work = self.assignment(p, epoch, stream, streams)
        for (ref, mod, rem), read in zip(work, self._prefetched(r for r, _, _ in work),
                                         strict=True):
            try:
                flat, offsets = read()
            except ShardError as exc:
                if self.spec.on_corrupt == "stop":
                    raise
                log.warning("skipping corrupt shard: %s", exc)
                continue
            videos = np.arange(rem, len(offsets) - 1, mod)
            if len(videos):
                pairs = sample_clip_pairs(flat, offsets, videos, rng, self.spec)
                out = buffer.push(pairs, ref.first + videos)
                if len(out[0]):
                    yield out[0], out[1]
        rest = buffer.drain()
        if rest is not None:
            yield rest[0], rest[1]

    def _prefetched(self, shards: Iterable[ShardRef]
                    ) -> Iterator[Callable[[], tuple[np.ndarray, np.ndarray]]]:
        """Per shard, a call returning its (flat tokens, offsets). Shards of remote archives are
        fetched ``spec.prefetch`` ahead in a background thread (bounded memory: that many shards
        in flight); local ones are read when called."""
        def read(ref: ShardRef) -> tuple[np.ndarray, np.ndarray]:
            return self.archives()[ref.archive].read_shard(ref.name, self.view,
                                                           self.formats[ref.archive])

        shards = list(shards)
        remote = any(not self.archives()[ref.archive].root.is_local for ref in shards)
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

    def check_streams(self, streams: int) -> None:
        """Every stream must get samples of every pool in an epoch (else it would wait forever)."""
        for p, pool in enumerate(self.pools):
            for s in range(streams):
                if self.epoch_size(p, 0, s, streams) == 0:
                    raise ArchiveError(
                        f"{self.names[p]}: {pool.size} videos cannot feed {streams} shard-buffer "
                        "readers (processes x DataLoader workers): use pretrain.shuffle: "
                        "global, fewer DataLoader workers or more videos")


class PoolStream:
    """Pool ``p``'s samples in one stream, epoch after epoch, from draw ``start`` on."""

    def __init__(self, source: ShardStreams, p: int, stream: int, streams: int,
                 start: int) -> None:
        self.source, self.p, self.stream, self.streams = source, p, stream, streams
        epoch = 0
        while True:
            size = source.epoch_size(p, epoch, stream, streams)
            if start < size:
                break
            start -= size
            epoch += 1
        self.items = self._epochs(epoch)
        self.held: collections.deque[Items] = collections.deque()
        self.count = 0
        self.take(start)

    def _epochs(self, epoch: int) -> Iterator[Items]:
        while True:
            produced = 0
            for items in self.source.epoch_items(self.p, epoch, self.stream, self.streams):
                produced += len(items[1])
                yield items
            if not produced and self.source.epoch_size(self.p, epoch, self.stream,
                                                       self.streams):
                raise ArchiveError(f"{self.source.names[self.p]}: every shard of this reader's "
                                   f"epoch {epoch} was skipped as corrupt (see the warnings): "
                                   "nothing to train on")
            epoch += 1

    def take(self, n: int) -> Items:
        """The next ``n`` samples."""
        got: list[Items] = []
        while n > 0:
            if not self.held:
                self.held.append(next(self.items))
            pairs, uids = self.held.popleft()
            if len(uids) > n:
                self.held.appendleft((pairs[n:], uids[n:]))
                pairs, uids = pairs[:n], uids[:n]
            got.append((pairs, uids))
            n -= len(uids)
        if not got:
            shape = (0, 2, self.source.spec.frames, self.source.spec.grid, self.source.spec.grid)
            return np.zeros(shape, np.uint16), np.zeros(0, np.int64)
        if len(got) == 1:
            return got[0]
        return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])


class StreamCursor:
    """One stream of the shard-buffer order, read forward from a local position."""

    def __init__(self, source: ShardStreams, interleave: Interleave, stream: int, streams: int,
                 start: int) -> None:
        self.interleave, self.pos = interleave, start
        counts = interleave.counts(start)
        self.pools = [PoolStream(source, p, stream, streams, int(counts[p]))
                      for p in range(len(source.pools))]

    def take(self, local: np.ndarray) -> Items:
        """The samples at increasing local positions ``local`` (none before the cursor)."""
        span = np.arange(self.pos, int(local[-1]) + 1)
        pool, _ = self.interleave.draws(span)
        pairs: np.ndarray | None = None
        uids = np.empty(len(span), np.int64)
        for p in np.unique(pool).tolist():
            sel = pool == p
            got, ids = self.pools[p].take(int(sel.sum()))
            if pairs is None:
                pairs = np.empty((len(span), *got.shape[1:]), got.dtype)
            pairs[sel], uids[sel] = got, ids
        self.pos = int(local[-1]) + 1
        assert pairs is not None
        keep = local - span[0]
        return pairs[keep], uids[keep]


def stream_of(positions: np.ndarray, streams: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(stream, local position) of global positions: block b is stream b mod S's block b div S."""
    b, within = np.divmod(positions, block)
    return b % streams, (b // streams) * block + within
