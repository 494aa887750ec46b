"""Fine-tuning and test clips out of a labelled token archive (paper App. C.1, Table 4).

Spatial augmentation happens in pixel space *before* tokenisation, as the paper does (App. C.1):
``vimpac tokenize`` stores every (resize scale x crop x flip) variant of a video as a *view* of the
archive (``s1_center``, ``s1.25_top_flip``, ...), all with the same frames. Nothing here crops or
flips pixels; training picks one stored view per sample, testing reads the scale-1 unflipped crops.
(The original code kept one LMDB per variant; our views are the same variants in one archive.)

- :class:`TrainClips`: one item per video. A view drawn uniformly from the training views (paper:
  2 scales x 3 crops x 2 flips = 12; SSV2 is tokenized without flips, 6), a temporal crop whose
  start is uniform in ``[0, max(len - T*step, 0)]`` (the length padded by ``step - 1`` so the last
  frames are reachable), frames ``start : start + T*step : step``, right-padded with [PAD]. If the
  archive grid is larger than the model grid a random ``grid x grid`` window is cut in token space
  (only happens when the archive was tokenized larger than the model input). Every random choice
  comes from a generator seeded by ``(seed, epoch, index)``: an item is a pure function of its key.
- :class:`TestClips`: one item per video, all its test views ``[num_clips * len(crops), T, G, G]``
  (clip-major: clip 0 in every crop, then clip 1, ...). Clip starts are uniform and include the
  first and the last position, ``start_k = floor(delta * k / (n - 1))``, and a single clip starts
  at 0, as the official code places them. Crops are the archive's scale-1, unflipped views named
  by crop (``top`` / ``center`` / ``bottom``); a crop the archive lacks falls back to the centre
  view (logged once). SSV2's protocol (centre crop only) is chosen by the config
  (``evaluate.test_crops``), not here. A larger archive grid is cut to its centre window.

Both read a :class:`SplitPart`: a whole split of the archive, or the training or validation part
of a hold-out carved from it (:func:`in_validation`: by a hash of the video key, so the same videos
are held out on every run and machine; UCF101's clips of one group, cut from one long video, stay
together).

Items are ``(tokens int64 tensor, label int)``; labels < 0 (unlabelled test sets) are skipped. Open
shards are cached per process (each DataLoader worker opens its own).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vimpac.archive import Archive, ArchiveError, Entry, ShardReader, View
from vimpac.common.workers import worker_options
from vimpac.pretrain.data import take_clip

log = logging.getLogger(__name__)

ItemKey = int | tuple[int, int]  # index, or (epoch, index)


def open_archive(archive: Archive | str | Path) -> Archive:
    return archive if isinstance(archive, Archive) else Archive(archive)


_UCF_CLIP = re.compile(r"(.*_g\d+)_c\d+")  # UCF101 key .../v_Class_gGG_cCC: group .../v_Class_gGG


def holdout_unit(key: str) -> str:
    """What a hold-out keeps whole: a UCF101 group (its clips are cut from one long video, so a
    clip in training and its neighbour in validation would flatter the validation score), else
    the video itself."""
    match = _UCF_CLIP.fullmatch(key)
    return match.group(1) if match else key


def in_validation(key: str, fraction: float) -> bool:
    """Whether video ``key`` belongs to the validation part: the first 8 bytes of
    sha256(:func:`holdout_unit`) read as a fraction of 2**64 fall below ``fraction``."""
    digest = hashlib.sha256(holdout_unit(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


@dataclass(frozen=True)
class SplitPart:
    """The videos of split ``tag``: ``all`` of them, or the ``train`` / ``val`` part of a
    hold-out of ``val_fraction`` of them (:func:`in_validation`)."""
    tag: str
    part: str = "all"
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.part not in ("all", "train", "val"):
            raise ValueError(f"SplitPart.part = {self.part!r}: expected all, train or val")
        if self.part != "all" and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"SplitPart.val_fraction = {self.val_fraction}: expected in (0, 1)")

    def keeps(self, key: str) -> bool:
        if self.part == "all":
            return True
        return in_validation(key, self.val_fraction) == (self.part == "val")

    def describe(self) -> str:
        """E.g. ``train1 (validation part: 10 % held out by key hash)``."""
        if self.part == "all":
            return self.tag
        what = "validation part" if self.part == "val" else "training part"
        return f"{self.tag} ({what}: {self.val_fraction:.0%} held out by key hash)"


def labelled_entries(archive: Archive, split: str | SplitPart) -> list[Entry]:
    """The labelled videos of a split or split part; an empty one is an error naming the tags."""
    part = split if isinstance(split, SplitPart) else SplitPart(split)
    tagged = [e for e in archive.entries_for_split(part.tag) if e.label >= 0]
    entries = [e for e in tagged if part.keeps(e.key)]
    if not tagged:
        known = sorted({t for e in archive.entries for t in e.splits})
        raise ArchiveError(f"{archive.root}: no labelled videos in split {part.tag!r} "
                           f"(splits in the archive: {', '.join(known) or 'none'})")
    if not entries:
        raise ArchiveError(f"{archive.root}: the {part.describe()} is empty ({len(tagged)} "
                           f"videos in {part.tag!r}): raise finetune.val_fraction, or set it "
                           "to 0 to fine-tune without validation")
    return entries


def check_grid(archive: Archive, grid: int) -> None:
    h, w = archive.settings.grid
    if grid > min(h, w):
        raise ArchiveError(f"{archive.root}: token grid {h}x{w} is smaller than the model's "
                           f"{grid}x{grid} (tokenize at a larger size or lower the grid)")


def temporal_span(length: int, frames: int, step: int) -> int:
    """Last valid start of ``frames`` frames every ``step``: ``max(len + step - 1 - T*step, 0)``."""
    return max(length + step - 1 - frames * step, 0)


def clip_starts(length: int, frames: int, num_clips: int, step: int = 1) -> list[int]:
    """Uniform clip starts including first and last, as the official code places them:
    ``floor(delta * k / (n - 1))``; a single clip starts at 0."""
    delta = temporal_span(length, frames, step)
    return [delta * k // max(num_clips - 1, 1) for k in range(num_clips)]


def strided_clip(video: np.ndarray, start: int, frames: int, step: int,
                 pad_id: int) -> np.ndarray:
    """Frames ``start : start + frames*step : step`` of ``video`` [t, H, W], right-padded: int64."""
    return take_clip(video[start::step], 0, frames, pad_id)


@dataclass(frozen=True)
class ClipChoice:
    """The random choices behind one training item."""
    view: str
    start: int  # first archive frame
    y: int  # token-space crop offset (rows)
    x: int  # token-space crop offset (columns)


def clip_workers(archive: Archive, workers: int) -> dict[str, Any]:
    """DataLoader keyword arguments for ``workers`` worker processes reading ``archive``: the
    platform's fork for a local archive, a forkserver for an object store (fsspec's async I/O
    does not survive a fork)."""
    return worker_options(workers, fork_safe=archive.root.is_local)


class _ShardReader:
    """Random access to an archive's videos with one open shard per name per process, in the
    archive's best random-access format (one that reads a clip without the whole shard); a
    format without random access keeps its decoded shard in memory.

    Shards held in memory (fetched from an object store, or of a format without random access)
    are kept ``OPEN_IN_MEMORY`` at a time, least recently used first out; set
    ``VIMPAC_SHARD_CACHE`` to keep fetched shards on disk.
    """

    OPEN_IN_MEMORY = 8

    def __init__(self, archive: Archive | str | Path) -> None:
        self.archive = open_archive(archive)
        self.format = self.archive.format(random_access=True)
        self._shards: collections.OrderedDict[str, ShardReader] = collections.OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_shards"] = collections.OrderedDict()  # shard readers reopen in each worker
        return state

    def shard(self, name: str) -> ShardReader:
        if name in self._shards:
            self._shards.move_to_end(name)
            return self._shards[name]
        in_memory = not self.archive.root.is_local or not self.format.random_access
        if in_memory and len(self._shards) >= self.OPEN_IN_MEMORY:
            self._shards.popitem(last=False)
        self._shards[name] = shard = self.archive.open_shard(name, self.format)
        return shard

    def read(self, entry: Entry, view: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """uint16 [t, H, W] frames ``start:stop`` of ``entry`` in ``view``."""
        return self.shard(entry.shard).read(entry.index, view, start, stop)


class TrainClips(_ShardReader, Dataset):
    """Training items: one random view, temporal crop and token-space crop per video.

    ``views``: view names to draw from (None = every view of the archive). ``step``: keep every
    ``step``-th archive frame (archive fps / model fps). ``dataset[i]`` uses the epoch set by
    :meth:`set_epoch`; ``dataset[(epoch, i)]`` names it explicitly (what the update sampler uses).
    """

    def __init__(self, archive: Archive | str | Path, split: str | SplitPart, frames: int,
                 grid: int, views: list[str] | None, pad_id: int, seed: int,
                 step: int = 1) -> None:
        super().__init__(archive)
        self.entries = labelled_entries(self.archive, split)
        check_grid(self.archive, grid)
        names = self.archive.settings.view_names
        self.views = list(views) if views else list(names)
        unknown = [v for v in self.views if v not in names]
        if unknown:
            raise ArchiveError(f"{self.archive.root}: no view {unknown[0]!r} (has "
                               f"{', '.join(names)})")
        self.frames, self.grid, self.pad_id, self.seed, self.step = frames, grid, pad_id, seed, step
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def labels(self) -> list[int]:
        return [e.label for e in self.entries]

    def choose(self, epoch: int, index: int) -> ClipChoice:
        """The random choices of item ``index`` in ``epoch`` (seeded by (seed, epoch, index))."""
        entry = self.entries[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        view = self.views[int(rng.integers(len(self.views)))]
        start = int(rng.integers(temporal_span(entry.frames, self.frames, self.step) + 1))
        h, w = self.archive.settings.grid
        y, x = int(rng.integers(h - self.grid + 1)), int(rng.integers(w - self.grid + 1))
        return ClipChoice(view, start, y, x)

    def __getitem__(self, key: ItemKey) -> tuple[torch.Tensor, int]:
        """-> (tokens int64 [T, grid, grid], label)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        entry, choice = self.entries[index], self.choose(epoch, index)
        video = self.read(entry, choice.view, choice.start,
                          choice.start + self.frames * self.step)  # [<= T*step, H, W]
        video = video[:, choice.y:choice.y + self.grid, choice.x:choice.x + self.grid]
        clip = strided_clip(video, 0, self.frames, self.step, self.pad_id)
        return torch.from_numpy(clip), entry.label


def pick_test_views(views: list[View], crops: list[str], root: Path | str = "") -> list[str]:
    """The scale-1 unflipped view of each crop; a missing crop falls back to the centre view."""
    plain = {v.crop: v.name for v in views if v.scale == 1.0 and not v.hflip}
    centre = plain.get("center") or views[0].name
    picked = []
    for crop in crops:
        if crop in plain:
            picked.append(plain[crop])
        else:
            log.warning("%s: no scale-1 unflipped %r view; testing on %s instead", root, crop,
                        centre)
            picked.append(centre)
    return picked


class TestClips(_ShardReader, Dataset):
    """Test items: every (clip, crop) view of a video, ``[num_clips * len(crops), T, G, G]``."""

    __test__ = False  # not a pytest test class

    def __init__(self, archive: Archive | str | Path, split: str | SplitPart, frames: int,
                 grid: int, num_clips: int, crops: list[str], pad_id: int,
                 step: int = 1) -> None:
        super().__init__(archive)
        if num_clips < 1 or not crops:
            raise ValueError(f"TestClips: need num_clips >= 1 and at least one crop, got "
                             f"{num_clips} and {crops}")
        self.entries = labelled_entries(self.archive, split)
        check_grid(self.archive, grid)
        self.views = pick_test_views(self.archive.settings.views, crops, self.archive.root)
        self.frames, self.grid, self.num_clips = frames, grid, num_clips
        self.pad_id, self.step = pad_id, step

    def __len__(self) -> int:
        return len(self.entries)

    def labels(self) -> list[int]:
        return [e.label for e in self.entries]

    def starts(self, index: int) -> list[int]:
        return clip_starts(self.entries[index].frames, self.frames, self.num_clips, self.step)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """-> (tokens int64 [num_clips * len(crops), T, grid, grid], label)."""
        entry = self.entries[index]
        videos = [self._centre(self.read(entry, view)) for view in self.views]
        clips = [strided_clip(video, start, self.frames, self.step, self.pad_id)
                 for start in self.starts(index) for video in videos]
        return torch.from_numpy(np.stack(clips)), entry.label

    def _centre(self, video: np.ndarray) -> np.ndarray:
        """Centre ``grid x grid`` window of [t, H, W]."""
        h, w = video.shape[1:]
        y, x = (h - self.grid) // 2, (w - self.grid) // 2
        return video[:, y:y + self.grid, x:x + self.grid]
