"""Which video each pre-training sample comes from: sources, weights, a global order.

The samples of a run form one global sequence, numbered 0, 1, 2, ... across epochs; sample ``g``
is a pure function of ``(seed, g)`` and the sources, never of how many processes or DataLoader
workers read it. That makes resuming with another world size exact (see
:mod:`vimpac.pretrain.data`).

**Sources and pools.** A source is one token archive. Sources given without weights (the
command line's ARCHIVES) form one pool drawn by size: each epoch is one permutation of every video
of every archive. With weights, each source is its own pool, and the pool's draws are its own
epochs (each a permutation of its videos: without replacement) or independent uniform picks (with
replacement); the epochs of each source are counted separately.

**Interleave.** Weights become whole quotas of a period of ``PERIOD`` = 65,536 slots (largest
remainders, so weights are kept to 1/65,536). Within the period, pool ``p``'s ``j``-th slot sits
at time ``(j + 1/2) / q_p`` and all pools' slots are merged in time order (ties by pool), which
spreads every pool evenly: any ``n`` consecutive slots hold ``n * w_p`` of pool ``p`` to within
two samples (tested for up to four pools). For the global order the slots are then permuted
inside blocks of ``BLOCK`` = 4,096 (seeded), so that the share of a source seen by one rank (every
W-th micro-batch) cannot lock onto a periodic pattern: whole blocks keep their shares to within
two samples, and a window of n samples inside blocks, overall or on one rank, is a sample without
replacement from them (standard deviation ``sqrt(n w (1 - w))`` or less).

**Randomness by position.** Clip starts and crops of sample ``g`` come from a counter-based hash
(splitmix64) of ``(seed, g)``, so they do not depend on which reader draws them or in what order.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from vimpac.archive.errors import ArchiveError

PERIOD = 1 << 16            # slots of one interleave period; weights are kept to 1 / PERIOD
BLOCK = 1 << 12             # slots permuted together in the global order
GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

# purposes of derived keys (any distinct integers)
ORDER, DRAW, CLIP, SLOTS, SHARDS, STREAM = 1, 2, 3, 4, 5, 6


def derived_key(seed: int, *parts: int) -> int:
    """A 64-bit key determined by the seed and ``parts`` (purpose, pool, epoch, ...)."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1, np.uint64)[0])


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(_M1)
        x ^= x >> np.uint64(27)
        x *= np.uint64(_M2)
        x ^= x >> np.uint64(31)
    return x


def hashed(key: int, values: np.ndarray) -> np.ndarray:
    """uint64 [n]: a hash of each value under ``key`` (splitmix64 of key + value * golden)."""
    with np.errstate(over="ignore"):
        x = np.uint64(key) + np.asarray(values).astype(np.uint64) * np.uint64(GOLDEN)
    return mix64(x)


def below(h: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """int64: uniform integers in [0, n) from 64-bit hashes (53 bits used)."""
    n = np.asarray(n, dtype=np.int64)
    u = (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return np.minimum((u * n).astype(np.int64), np.maximum(n - 1, 0))


# ------------------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    """One archive of a run: its weight (0: shares by size) and how it is drawn."""
    path: str
    weight: float = 0.0
    replacement: bool = False

    @property
    def name(self) -> str:
        return PurePosixPath(str(self.path).rstrip("/")).name or str(self.path)


class SourceError(ArchiveError):
    """Sources that cannot be mixed as given (one line naming the source)."""


def check_sources(sources: Sequence[Source]) -> None:
    """Weights are all given (> 0) or all left out; replacement needs a weight; no archive
    twice."""
    if not sources:
        raise SourceError("no archives: give them on the command line or in pretrain.sources")
    weighted = [s.weight > 0 for s in sources]
    for i, s in enumerate(sources):
        if not math.isfinite(s.weight) or s.weight < 0:
            raise SourceError(f"pretrain.sources[{i}] ({s.path}): weight {s.weight} must be a "
                              "finite number >= 0")
        if any(weighted) and not weighted[i]:
            raise SourceError(f"pretrain.sources[{i}] ({s.path}): no weight, while other "
                              "sources have one: give every source a weight, or none (shares "
                              "by size)")
        if s.replacement and not weighted[i]:
            raise SourceError(f"pretrain.sources[{i}] ({s.path}): replacement needs a weight")
    seen: dict[str, int] = {}
    for i, s in enumerate(sources):
        key = str(s.path).rstrip("/")
        if key in seen:
            raise SourceError(f"pretrain.sources[{i}] ({s.path}): the same archive as "
                              f"pretrain.sources[{seen[key]}]")
        seen[key] = i


def source_names(sources: Sequence[Source]) -> list[str]:
    """Short unique names for logs: the archive folder's name (with its index if repeated)."""
    names = [s.name for s in sources]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


# ------------------------------------------------------------------------------------ interleave

def quotas(weights: Sequence[float], total: int = PERIOD) -> np.ndarray:
    """int64 [P]: ``total`` slots shared by weight (largest remainders), each at least 1."""
    w = np.asarray(weights, dtype=np.float64)
    raw = w / w.sum() * total
    out = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - out), kind="stable")
    out[order[:total - int(out.sum())]] += 1
    if (out < 1).any():
        i = int(np.argmin(out))
        raise SourceError(f"pretrain.sources[{i}]: weight {weights[i]} is below 1/{total} of "
                          "the total: too small to be drawn")
    return out


class Interleave:
    """Position -> (pool, draw index within the pool) for pools of the given weights.

    ``shuffled`` permutes positions inside blocks of :data:`BLOCK` (the global order); without
    it (the shard-buffer streams) each pool's draws come in order, so they can be read as
    streams.
    """

    def __init__(self, weights: Sequence[float], *, seed: int, shuffled: bool) -> None:
        self.quotas = quotas(weights)
        self.pools = len(self.quotas)
        times = np.concatenate([(2 * np.arange(q) + 1) / (2.0 * q) for q in self.quotas])
        pool = np.concatenate([np.full(q, p, np.int64) for p, q in enumerate(self.quotas)])
        occ = np.concatenate([np.arange(q, dtype=np.int64) for q in self.quotas])
        order = np.argsort(times, kind="stable")
        self.pool, self.occ = pool[order], occ[order]
        per_block = self.pool.reshape(PERIOD // BLOCK, BLOCK)
        counts = np.stack([np.bincount(b, minlength=self.pools) for b in per_block])
        self.block_counts = np.concatenate([np.zeros((1, self.pools), np.int64),
                                            np.cumsum(counts, axis=0)])
        self.shuffled, self.seed = shuffled, seed
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def _perm(self, block: int) -> np.ndarray:
        if block not in self._perms:
            rng = np.random.default_rng([self.seed, SLOTS, block])
            self._perms[block] = rng.permutation(BLOCK)
            while len(self._perms) > 16:
                self._perms.popitem(last=False)
        return self._perms[block]

    def slots(self, positions: np.ndarray) -> np.ndarray:
        if not self.shuffled:
            return positions
        blocks, offsets = np.divmod(positions, BLOCK)
        out = np.empty_like(positions)
        for b in np.unique(blocks).tolist():
            sel = blocks == b
            out[sel] = b * BLOCK + self._perm(b)[offsets[sel]]
        return out

    def draws(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pool int64 [n], draw index int64 [n]) of each position."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.pools == 1:
            return np.zeros_like(positions), positions.copy()
        periods, t = np.divmod(self.slots(positions), PERIOD)
        pool = self.pool[t]
        return pool, periods * self.quotas[pool] + self.occ[t]

    def counts(self, n: int) -> np.ndarray:
        """int64 [P]: draws of each pool among positions [0, n)."""
        if self.pools == 1:
            return np.array([n], np.int64)
        blocks, rest = divmod(n, BLOCK)
        periods, in_period = divmod(blocks * BLOCK, PERIOD)
        out = periods * self.quotas + self.block_counts[in_period // BLOCK]
        if rest:
            t = in_period + (self._perm(blocks)[:rest] if self.shuffled else np.arange(rest))
            out = out + np.bincount(self.pool[t], minlength=self.pools)
        return out


# ----------------------------------------------------------------------------------------- pools

@dataclass(frozen=True)
class Pool:
    """Videos drawn as one: uids ``first .. first + size - 1`` of the run's video table."""
    name: str
    first: int
    size: int
    weight: float
    replacement: bool


class Draws:
    """Draw ``k`` of pool ``p`` -> the video uid, for the global order."""

    def __init__(self, pools: Sequence[Pool], seed: int) -> None:
        self.pools, self.seed = list(pools), seed
        self._perms: collections.OrderedDict[tuple[int, int], np.ndarray] = \
            collections.OrderedDict()

    def permutation(self, p: int, epoch: int) -> np.ndarray:
        """The order of pool ``p``'s videos in its epoch ``epoch`` (cached, a few at a time)."""
        key = (p, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, ORDER, p, epoch])
            dtype = np.int32 if self.pools[p].size < 2**31 else np.int64
            self._perms[key] = rng.permutation(self.pools[p].size).astype(dtype)
            while len(self._perms) > 2 * len(self.pools) + 2:
                self._perms.popitem(last=False)
        return self._perms[key]

    def uids(self, pool: np.ndarray, k: np.ndarray) -> np.ndarray:
        out = np.empty(len(k), np.int64)
        for p in np.unique(pool).tolist():
            sel = pool == p
            spec = self.pools[p]
            kp = k[sel]
            if spec.replacement:
                idx = below(hashed(derived_key(self.seed, DRAW, p), kp), spec.size)
            else:
                epochs, at = np.divmod(kp, spec.size)
                idx = np.empty(len(kp), np.int64)
                for e in np.unique(epochs).tolist():
                    here = epochs == e
                    idx[here] = self.permutation(p, e)[at[here]]
            out[sel] = spec.first + idx
        return out


# --------------------------------------------------------------------------------------- quality

def shuffle_quality(shards: np.ndarray, batch: int) -> float:
    """How much more often two samples of one batch come from the same shard than they would
    in a uniformly random order: 1.0 is as good as a perfect shuffle, larger is worse.

    ``shards`` [n]: the shard of each sample, in the order the model sees them; batches are
    consecutive runs of ``batch`` samples. The expectation for a random order is the chance
    that two samples drawn without replacement share a shard, from the shards' counts in
    ``shards`` itself.
    """
    shards = np.asarray(shards)
    n = len(shards) // batch * batch
    if n < batch or batch < 2:
        raise ValueError("shuffle_quality needs at least one batch of two samples")
    _, inverse, counts = np.unique(shards[:n], return_inverse=True, return_counts=True)
    expected = float((counts * (counts - 1)).sum()) / (n * (n - 1))
    same = 0
    for b in inverse.reshape(-1, batch):
        c = np.bincount(b)
        same += int((c * (c - 1)).sum())
    observed = same / (n // batch * batch * (batch - 1))
    return observed / expected if expected > 0 else 1.0
