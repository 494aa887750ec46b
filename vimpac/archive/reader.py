"""Reading an archive: every worker's manifest part as one archive, shards checked as they are read.

:class:`Archive` validates the manifests once when it opens (types, sizes, names that stay inside
the archive, per shard the videos and frames its records add up to). A shard is opened through
:meth:`Archive.open_shard`: its files' checksums are checked once per process (remote shards are
fetched whole and checked), then its format's reader checks the shard's structure against the
manifest before allocating anything, and every read checks token ids against the codebook size.
Readers of several archives use :func:`open_archives`, which requires one tokenizer, codebook and
token grid for all of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vimpac.archive.errors import ArchiveError, ChecksumError, ShardError
from vimpac.archive.formats import FORMATS, Format, ShardLayout, ShardReader, ShardSource
from vimpac.archive.manifest import (
    PART_NAME,
    ArchiveSettings,
    ManifestPart,
    ShardRecord,
    VideoRecord,
    load_part,
)
from vimpac.common.fileio import atomic_write_bytes, sha256_bytes, sha256_file
from vimpac.common.storage import Location, location

log = logging.getLogger(__name__)

CACHE_ENV = "VIMPAC_SHARD_CACHE"


@dataclass
class Entry:
    """An ok video as the readers see it."""
    key: str
    shard: str
    index: int
    frames: int
    label: int
    splits: list[str]


class Archive:
    """All manifest parts of an archive folder (local path or fsspec URL) read as one archive.

    Shards of a remote archive are fetched whole (one object at a time), checked against the
    manifest's checksums and read from memory; with ``cache_dir`` (default: the
    ``VIMPAC_SHARD_CACHE`` environment variable) fetched objects are also kept on local disk,
    named by their checksum, so later epochs and runs read them from there.
    """

    def __init__(self, root: str | Path | Location, cache_dir: str | Path | None = None) -> None:
        self.root = location(root)
        if not self.root.is_dir():
            raise ArchiveError(f"{self.root}: no such archive folder")
        cache_dir = cache_dir or os.environ.get(CACHE_ENV) or None
        self.cache_dir = Path(cache_dir) if cache_dir and not self.root.is_local else None
        self.parts = self._load_parts()
        self.settings = self._check_settings()
        self.shards: dict[str, ShardRecord] = {}
        for part in self.parts:
            for shard in part.shards:
                if shard.name in self.shards:
                    raise ArchiveError(f"{self.root.url('manifests/' + part.filename)}: shard "
                                       f"{shard.name} is also listed by another worker")
                self.shards[shard.name] = shard
        self.records = self._merge_records()
        self.entries = [Entry(r.key, r.shard, r.index, r.frames, r.label, r.splits)
                        for r in self.records.values() if r.status == "ok"]
        self.entries.sort(key=lambda e: (e.shard, e.index))
        self._layouts = self._check_shards()
        self._verified: set[tuple[str, str]] = set()

    # -- manifests
    def _load_parts(self) -> list[ManifestPart]:
        names = [n for n in self.root.list("manifests") if PART_NAME.match(n)]
        if not names and self.root.exists("manifest.json"):
            return [load_part(self.root, "manifest.json")]
        if not names:
            raise ArchiveError(f"{self.root}: no manifest (expected manifests/worker-*.json "
                               "or manifest.json): not a vimpac archive, or nothing was written")
        return [load_part(self.root, f"manifests/{n}") for n in names]

    def _check_settings(self) -> ArchiveSettings:
        first = self.parts[0].settings
        for part in self.parts[1:]:
            if part.settings.compatible_key() != first.compatible_key():
                diff = [k for k, v in first.compatible_key().items()
                        if part.settings.compatible_key().get(k) != v]
                raise ArchiveError(f"{self.root.url('manifests/' + part.filename)}: settings "
                                   f"differ from {self.parts[0].filename} in {', '.join(diff)}")
        return first

    def _merge_records(self) -> dict[str, VideoRecord]:
        records: dict[str, VideoRecord] = {}
        for part in self.parts:
            for key, rec in part.videos.items():
                if key in records and rec.status == "ok" and records[key].status == "ok":
                    raise ArchiveError(f"{self.root}: video {key!r} appears in two workers' "
                                       "manifests (were the workers run with different counts?)")
                if key not in records or rec.status == "ok":
                    records[key] = rec
        return records

    def _check_shards(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """Per shard, (keys, frames) by index from the records, checked against the shard's
        record and its files; one line naming shard and video for anything inconsistent."""
        grouped: dict[str, list[Entry]] = {}
        for entry in self.entries:
            if entry.shard not in self.shards:
                raise ArchiveError(f"{self.root}: video {entry.key!r} points at unknown shard "
                                   f"{entry.shard!r}")
            grouped.setdefault(entry.shard, []).append(entry)
        layouts = {}
        for name, shard in self.shards.items():
            members = grouped.get(name, [])
            where = f"{self.root}: shard {name}"
            if [e.index for e in members] != list(range(len(members))):
                raise ArchiveError(f"{where}: video indices {[e.index for e in members][:8]} "
                                   "are not 0, 1, 2, ...")
            frames = np.array([e.frames for e in members], np.int64)
            if len(members) != shard.videos or int(frames.sum()) != shard.frames:
                raise ArchiveError(f"{where}: manifest lists {shard.videos} videos / "
                                   f"{shard.frames} frames, its records give {len(members)} / "
                                   f"{int(frames.sum())}")
            for fmt_name, files in shard.files.items():
                fmt = FORMATS.get(fmt_name)
                outside = [rel for rel in files if fmt is not None and not fmt.owns(name, rel)]
                if outside:
                    raise ArchiveError(f"{where}: file {outside[0]!r} is not inside the shard's "
                                       f"{fmt_name} entry {fmt.rel(name)!r}")
            layouts[name] = (tuple(e.key for e in members), frames)
        return layouts

    @property
    def failed(self) -> list[VideoRecord]:
        return [r for r in self.records.values() if r.status != "ok"]

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.parts)

    def shard_names(self) -> list[str]:
        return sorted(self.shards)

    def entries_for_split(self, tag: str | None) -> list[Entry]:
        return [e for e in self.entries if tag is None or tag in e.splits]

    # -- formats
    def format(self, name: str | None = None, *, random_access: bool = False) -> Format:
        """Format ``name`` of this archive, or the best one it has: the first of
        :data:`FORMATS` it was written in (a random-access one when asked for)."""
        have = [FORMATS[f] for f in FORMATS if f in self.settings.formats]
        if name is not None:
            if name not in self.settings.formats:
                raise ArchiveError(f"{self.root}: not written in {name} format (has "
                                   f"{', '.join(self.settings.formats)})")
            if name not in FORMATS:
                raise ArchiveError(f"{self.root}: format {name!r} is unknown to this vimpac "
                                   f"(known: {', '.join(FORMATS)})")
            return FORMATS[name]
        if not have:
            raise ArchiveError(f"{self.root}: written in {', '.join(self.settings.formats)}, "
                               f"none known to this vimpac ({', '.join(FORMATS)})")
        if random_access:
            have = [f for f in have if f.random_access] + [f for f in have if not f.random_access]
        return have[0]

    def layout(self, name: str, fmt: Format) -> ShardLayout:
        if name not in self._layouts:
            raise ArchiveError(f"{self.root}: no shard {name!r}")
        keys, frames = self._layouts[name]
        return ShardLayout(label=self.root.url(fmt.rel(name)), views=tuple(
            self.settings.view_names), grid=tuple(self.settings.grid),  # type: ignore[arg-type]
            codebook_size=self.settings.codebook_size, keys=keys, frames=frames)

    # -- integrity
    def shard_files(self, name: str, fmt: Format) -> dict[str, str]:
        """{relative path: sha256} of shard ``name`` in ``fmt``; none recorded is a failure."""
        files = self.shards[name].files.get(fmt.name) or {}
        if not files:
            raise ChecksumError(f"{self.root.url(fmt.rel(name))}: the manifest records no "
                                f"checksums for shard {name} in {fmt.name} format")
        return files

    def verify_shard(self, name: str, fmt: Format | str) -> None:
        """Check every file of shard ``name`` in format ``fmt`` against the manifest."""
        fmt = fmt if isinstance(fmt, Format) else self.format(fmt)
        files = self.shard_files(name, fmt)
        if not self.root.is_local:
            self.fetch_shard(name, fmt, use_cache=False)
            return
        real_root = self.root.local_path().resolve()
        for rel, digest in files.items():
            path = self.root.local_path(rel)
            if not path.is_file():
                raise ChecksumError(f"{path}: missing shard file")
            if not path.resolve().is_relative_to(real_root):
                raise ChecksumError(f"{path}: links outside the archive")
            if sha256_file(path) != digest:
                raise ChecksumError(f"{path}: checksum mismatch (shard {name} is corrupt)")

    def verify_once(self, name: str, fmt: Format) -> None:
        if (name, fmt.name) not in self._verified:
            self.verify_shard(name, fmt)
            self._verified.add((name, fmt.name))

    def fetch_shard(self, name: str, fmt: Format, use_cache: bool = True) -> dict[str, bytes]:
        """{relative path: bytes} of every file of shard ``name`` in ``fmt``, each checked
        against the manifest's checksum (from the local cache when it holds them)."""
        files = self.shard_files(name, fmt)
        out: dict[str, bytes] = {}
        cache = self.cache_dir if use_cache else None
        for rel, digest in files.items():
            cached = cache / digest[:2] / digest if cache else None
            if cached is not None and cached.is_file():
                data = cached.read_bytes()
                if sha256_bytes(data) == digest:
                    out[rel] = data
                    continue
                log.warning("%s: cached copy of %s is corrupt; fetching it again", cached,
                            self.root.url(rel))
        missing = [rel for rel in files if rel not in out]
        try:
            fetched = self.root.read_many(missing)
        except FileNotFoundError as exc:
            raise ChecksumError(f"{exc.filename}: missing shard file") from None
        for rel, data in fetched.items():
            digest = files[rel]
            if sha256_bytes(data) != digest:
                raise ChecksumError(f"{self.root.url(rel)}: checksum mismatch (shard {name} "
                                    "is corrupt)")
            if cache is not None:
                atomic_write_bytes(cache / digest[:2] / digest, data)
            out[rel] = data
        return {rel: out[rel] for rel in files}

    # -- reading
    def open_shard(self, name: str, fmt: Format | str | None = None, *,
                   verify: bool = True) -> ShardReader:
        """Shard ``name`` opened for reading in ``fmt`` (default: :meth:`format`), checksums
        checked once per process and structure checked against the manifest."""
        fmt = fmt if isinstance(fmt, Format) else self.format(fmt)
        layout = self.layout(name, fmt)
        entry = fmt.rel(name)
        if self.root.is_local:
            if verify:
                self.verify_once(name, fmt)
            path = self.root.local_path(entry)
            source = ShardSource(layout.label, _local_raw(path), local=path)
        else:
            files = {k[len(entry) + 1:] if k != entry else "": v
                     for k, v in self.fetch_shard(name, fmt).items()}
            source = ShardSource(layout.label, _memory_raw(files, layout.label), files=files)
        return fmt.open(source, layout)

    def read_shard(self, name: str, view: str, fmt: Format | str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Every video of shard ``name`` in ``view``: (uint16 [frames, H, W], int64 offsets
        [videos + 1]), validated."""
        return self.open_shard(name, fmt).read_all(view)

    def read_video(self, key: str, view: str | None = None,
                   fmt: Format | str | None = None) -> np.ndarray:
        """All token frames of one video, by key: uint16 [T, H, W]."""
        rec = self.records.get(key)
        if rec is None or rec.status != "ok":
            raise ArchiveError(f"{self.root}: no tokenized video with key {key!r}")
        view = view or self.settings.view_names[0]
        fmt = fmt if isinstance(fmt, Format) else self.format(fmt, random_access=True)
        return self.open_shard(rec.shard, fmt).read(rec.index, view)


def _local_raw(path: Path) -> Callable[[str], bytes]:
    def raw(name: str) -> bytes:
        return (path / name if name else path).read_bytes()
    return raw


def _memory_raw(files: dict[str, bytes], label: str) -> Callable[[str], bytes]:
    def raw(name: str) -> bytes:
        if name not in files:
            raise KeyError(f"{label}/{name}")
        return files[name]
    return raw


def read_tokens(root: str | Path | Location, key: str, view: str | None = None,
                fmt: str | None = None) -> np.ndarray:
    """All token frames of one video, by key (convenience for tools and tests)."""
    return Archive(root).read_video(key, view, fmt)


def open_archives(paths: list[str | Path | Location],
                  codebook_size: int | None = None) -> list[Archive]:
    """Archives that can be read together: one tokenizer fingerprint, codebook size and token
    grid (the error names the two archives that differ), and a codebook that fits the model's."""
    archives = [Archive(p) for p in paths]
    first = archives[0]
    for arch in archives[1:]:
        for what, mine, theirs in (
                ("tokenizer", first.settings.tokenizer_fingerprint[:12],
                 arch.settings.tokenizer_fingerprint[:12]),
                ("codebook size", first.settings.codebook_size, arch.settings.codebook_size),
                ("token grid", "x".join(map(str, first.settings.grid)),
                 "x".join(map(str, arch.settings.grid)))):
            if mine != theirs:
                raise ArchiveError(f"{arch.root}: {what} {theirs} differs from {first.root}'s "
                                   f"{mine}: archives read together need one tokenizer, "
                                   "codebook and grid")
    if codebook_size is not None:
        for arch in archives:
            if arch.settings.codebook_size > codebook_size:
                raise ArchiveError(f"{arch.root}: tokenizer vocabulary "
                                   f"{arch.settings.codebook_size} does not fit the model's "
                                   f"codebook_size {codebook_size}")
    return archives


__all__ = ["Archive", "ArchiveError", "Entry", "ShardError", "open_archives", "read_tokens"]
