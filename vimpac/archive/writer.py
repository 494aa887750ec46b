"""Writing an archive: one writer per worker, one commit protocol for every format.

:class:`ArchiveWriter` is the only code that writes shards and manifests. The tokenize job, ``vimpac
archive merge`` and every test and benchmark fixture go through it. A shard is committed in four
steps, in this order, so a crash at any moment leaves the archive as it was before the shard or
with the shard complete:

1. each format builds the shard in a temporary folder (``.<shard>.<random>.tmp`` beside its final
   place, or a local temporary folder when the archive is on an object store);
2. every file is checksummed and fsynced;
3. the shard is renamed into place (object stores: uploaded as complete objects);
4. the worker's manifest part, now naming the shard and its checksums, replaces the old one.

A shard no manifest names is an interrupted write: it is invisible to readers and the next writer of
that worker removes it, as it removes temporary folders its worker left. The writer holds its worker
slot (:class:`~vimpac.archive.lock.WorkerLock`) from opening to closing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vimpac.archive.errors import ArchiveError
from vimpac.archive.formats import FORMATS, Format, ShardContent
from vimpac.archive.lock import WorkerLock
from vimpac.archive.manifest import (
    TOKEN_DTYPE,
    ArchiveSettings,
    ManifestPart,
    ShardRecord,
    VideoRecord,
    load_part,
    part_filename,
    save_part,
)
from vimpac.common.fileio import fsync_dir, fsync_tree, sha256_file
from vimpac.common.storage import Location, location

log = logging.getLogger(__name__)


def shard_name(worker: int, seq: int) -> str:
    return f"shard-w{worker:05d}-{seq:06d}"


class ArchiveWriter:
    """Writes worker ``worker``'s shards and manifest part of the archive at ``root``.

    Opening resumes what the worker committed before (settings must agree), removes its
    interrupted writes and takes its worker slot. ``add`` queues a video and commits a shard each
    ``videos_per_shard`` videos; ``fail`` records a video that could not be tokenized; ``close``
    commits the rest and marks the part complete or not. Use it as a context manager.
    """

    def __init__(self, root: str | Path | Location, settings: ArchiveSettings, *, worker: int = 0,
                 num_workers: int = 1, videos_per_shard: int = 256, chunk_frames: int = 1024,
                 zstd_level: int = 3, lock: bool = True) -> None:
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker index {worker} is outside 0..{num_workers - 1}")
        unknown = [f for f in settings.formats if f not in FORMATS]
        if unknown or not settings.formats:
            raise ArchiveError(f"unknown archive format {unknown[0] if unknown else None!r} "
                               f"(known: {', '.join(FORMATS)})")
        self.root, self.settings = location(root), settings
        self.worker, self.num_workers = worker, num_workers
        self.videos_per_shard, self.chunk_frames, self.zstd_level = \
            videos_per_shard, chunk_frames, zstd_level
        self.lock = WorkerLock(self.root, worker).acquire() if lock else None
        try:
            self.part = self._open_part()
        except BaseException:
            self._release()
            raise
        self.pending: ShardContent | None = None
        self.shards_written = 0
        self.bytes_written: dict[str, int] = {}

    # -- opening
    @property
    def formats(self) -> list[Format]:
        return [FORMATS[f] for f in self.settings.formats]

    def _open_part(self) -> ManifestPart:
        rel = f"manifests/{part_filename(self.worker, self.num_workers)}"
        stale = self._remove_stale_temps()
        if stale:
            log.info("removed %d temporary file(s) left by an interrupted run", len(stale))
        if not self.root.exists(rel):
            self._check_other_workers()
            return ManifestPart(self.settings, self.worker, self.num_workers)
        part = load_part(self.root, rel)
        theirs, ours = part.settings.compatible_key(), self.settings.compatible_key()
        if theirs != ours:
            diff = ", ".join(f"{k} {theirs.get(k)!r} -> {ours[k]!r}" for k in ours
                             if theirs.get(k) != ours[k])
            raise ArchiveError(f"{self.root.url(rel)}: archive was written with other settings "
                               f"({diff}); write to a new --out folder")
        if self.settings.dataset and part.settings.dataset is None:
            part.settings.dataset = self.settings.dataset
        removed = self._remove_orphans(part)
        if removed:
            log.info("removed %d interrupted shard file(s) from a previous run", len(removed))
        return part

    def _check_other_workers(self) -> None:
        for name in self.root.list("manifests"):
            if not (name.startswith("worker-") and name.endswith(".json")):
                continue
            part = load_part(self.root, f"manifests/{name}")
            if part.num_workers != self.num_workers:
                raise ArchiveError(f"{self.root.url('manifests/' + name)}: archive was written "
                                   f"by {part.num_workers} workers; rerun with --num-workers "
                                   f"{part.num_workers} or use a new --out folder")

    def _remove_orphans(self, part: ManifestPart) -> list[str]:
        """Delete this worker's shard entries that its manifest does not name."""
        known = {s.name for s in part.shards}
        prefix = shard_name(part.worker, 0)[:-6]
        removed = []
        for fmt in FORMATS.values():
            for name in self.root.list(fmt.folder):
                shard = name.removesuffix(fmt.suffix)
                if name.endswith(fmt.suffix) and name.startswith(prefix) and shard not in known:
                    self.root.remove(f"{fmt.folder}/{name}")
                    removed.append(self.root.url(f"{fmt.folder}/{name}"))
        return removed

    def _remove_stale_temps(self) -> list[str]:
        """Delete temporary files this worker's killed runs left: ``.<name>.<random>.tmp``."""
        mine = (f".{shard_name(self.worker, 0)[:-6]}", f".worker-{self.worker:05d}-of-",
                f".tokenize-w{self.worker:05d}.")
        folders = {f.folder for f in FORMATS.values()} | {"manifests", "config"}
        removed = []
        for sub in sorted(folders):
            for name in self.root.list(sub):
                if name.endswith(".tmp") and name.startswith(mine):
                    self.root.remove(f"{sub}/{name}")
                    removed.append(self.root.url(f"{sub}/{name}"))
        return removed

    # -- writing
    @property
    def records(self) -> dict[str, VideoRecord]:
        """Every video this worker has recorded (committed or failed)."""
        return self.part.videos

    def _new_shard(self) -> ShardContent:
        return ShardContent(shard_name(self.worker, len(self.part.shards)),
                            self.settings.view_names, tuple(self.settings.grid),
                            chunk_frames=self.chunk_frames, zstd_level=self.zstd_level)

    def add(self, record: VideoRecord, tokens: dict[str, np.ndarray]) -> None:
        """Queue a video: ``tokens`` maps each view name to uint16 ids [T, H, W]."""
        _check_tokens(record.key, tokens, self.settings)
        if self.pending is None:
            self.pending = self._new_shard()
        record.shard, record.index = self.pending.name, len(self.pending.records)
        record.frames = len(next(iter(tokens.values())))
        record.status, record.reason = "ok", ""
        self.pending.records.append(record)
        self.pending.tokens.append(tokens)
        if len(self.pending.records) >= self.videos_per_shard:
            self.commit()

    def fail(self, record: VideoRecord) -> None:
        """Record a video that could not be tokenized (written with the next manifest)."""
        record.status = "failed"
        self.part.videos[record.key] = record

    def commit(self) -> ShardRecord | None:
        """Write the pending shard in every format, then the manifest part naming it."""
        if self.pending is None:
            return None
        self._check_lock()
        content, self.pending = self.pending, None
        files: dict[str, dict[str, str]] = {}
        sizes: dict[str, int] = {}
        for fmt in self.formats:
            files[fmt.name], sizes[fmt.name] = publish_shard(self.root, fmt, content)
        shard = ShardRecord(name=content.name, videos=len(content.records),
                            frames=sum(r.frames for r in content.records), files=files,
                            bytes=sizes)
        self.part.shards.append(shard)
        self.part.videos.update((r.key, r) for r in content.records)
        self._save()                                 # the shard becomes visible only now
        self.shards_written += 1
        for fmt, nbytes in sizes.items():
            self.bytes_written[fmt] = self.bytes_written.get(fmt, 0) + nbytes
        return shard

    def save(self) -> None:
        """Rewrite the manifest part (failures recorded since the last commit)."""
        self._save()

    def _save(self) -> None:
        self._check_lock()
        save_part(self.root, self.part)

    def _check_lock(self) -> None:
        if self.lock is not None:
            self.lock.check()

    def close(self, complete: bool = True) -> ManifestPart:
        """Commit the pending shard, mark the part complete (or not) and free the slot."""
        try:
            self.commit()
            self.part.complete = complete
            self._save()
        finally:
            self._release()
        return self.part

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.close(complete=self.part.complete)
        else:
            self._release()                      # committed shards stay; the rest is redone


def _check_tokens(key: str, tokens: dict[str, np.ndarray], settings: ArchiveSettings) -> None:
    missing = set(settings.view_names) - set(tokens)
    if missing:
        raise ValueError(f"{key}: views missing: {sorted(missing)}")
    frames = {arr.shape[0] for arr in tokens.values()}
    if len(frames) != 1 or 0 in frames:
        raise ValueError(f"{key}: views have frame counts {sorted(frames)} (expected one count "
                         ">= 1)")
    for view, arr in tokens.items():
        if arr.shape[1:] != tuple(settings.grid) or arr.dtype != TOKEN_DTYPE:
            raise ValueError(f"{key}: view {view} has {arr.dtype}{list(arr.shape)}, expected "
                             f"uint16[T, {settings.grid[0]}, {settings.grid[1]}]")
        if arr.size and int(arr.max()) >= settings.codebook_size:
            raise ValueError(f"{key}: view {view} holds id {int(arr.max())}, not below the "
                             f"codebook size {settings.codebook_size}")


def publish_shard(root: Location, fmt: Format, content: ShardContent) -> tuple[dict[str, str],
                                                                                 int]:
    """Build ``content`` in ``fmt``, checksum it and move it into place atomically; returns
    ({relative path: sha256}, bytes)."""
    rel = fmt.rel(content.name)
    if not root.is_local:
        with tempfile.TemporaryDirectory(prefix=f"vimpac-{content.name}-") as tmp:
            built = Path(tmp) / Path(rel).name
            fmt.write(content, built)
            sums, nbytes = _checksums(built, rel)
            root.remove(rel)                        # left by a run killed before its manifest
            if built.is_dir():
                root.put_tree(built, rel)
            else:
                root.write_bytes(rel, built.read_bytes())
            return sums, nbytes
    final = root.local_path(rel)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{content.name}.", suffix=".tmp"))
    try:
        built = work / final.name
        fmt.write(content, built)
        sums, nbytes = _checksums(built, rel)
        fsync_tree(built)
        if final.is_dir() and not final.is_symlink():   # left by a run killed after the rename
            shutil.rmtree(final)
        os.replace(built, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(final)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sums, nbytes


def _checksums(built: Path, rel: str) -> tuple[dict[str, str], int]:
    """{rel/sub path: sha256} of every file of a built shard entry, and their total bytes."""
    if built.is_file():
        return {rel: sha256_file(built)}, built.stat().st_size
    sums, nbytes = {}, 0
    for dirpath, _, files in sorted(os.walk(built)):
        for name in sorted(files):
            full = Path(dirpath) / name
            sums[f"{rel}/{full.relative_to(built).as_posix()}"] = sha256_file(full)
            nbytes += full.stat().st_size
    return sums, nbytes


def write_archive(root: str | Path | Location, settings: ArchiveSettings,
                  videos: Iterable[tuple[VideoRecord, dict[str, np.ndarray]]], *,
                  videos_per_shard: int = 256, chunk_frames: int = 1024,
                  zstd_level: int = 3) -> ManifestPart:
    """A complete one-worker archive from tokens already in memory (tokens converted from another
    tool, or made up for tests): ``videos`` yields (record, {view: uint16 [T, H, W]})."""
    with ArchiveWriter(root, settings, videos_per_shard=videos_per_shard,
                       chunk_frames=chunk_frames, zstd_level=zstd_level) as writer:
        for record, tokens in videos:
            writer.add(record, tokens)
        writer.part.complete = True
    return writer.part


def merge_manifests(root: str | Path | Location) -> str:
    """Write ``manifest.json``: all workers' parts as one (readers work without it too)."""
    from vimpac.archive.reader import Archive

    archive = Archive(root)
    merged = ManifestPart(settings=archive.settings, worker=0, num_workers=1,
                          videos=dict(sorted(archive.records.items())),
                          shards=[archive.shards[n] for n in archive.shard_names()],
                          complete=archive.complete)
    save_part(archive.root, merged, "manifest.json")
    return archive.root.url("manifest.json")
