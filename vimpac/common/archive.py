"""The token archive: the contract between the tokenize stage and the training stages.

This module alone knows the on-disk format. An archive is a folder, local or on an object store
(any fsspec URL; :mod:`vimpac.common.storage` does the I/O)::

    ARCHIVE/
      manifests/worker-00000-of-00001.json   one manifest part per tokenize worker (atomic rewrites)
      manifest.json                          optional merged manifest (``vimpac archive merge``)
      zarr/<shard>.zarr/                     zarr v3 group per shard (sharding codec + zstd):
          tokens/<view>   uint16 [frames, H, W], all videos of the shard concatenated on frames
          offsets         int64 [videos + 1], video i is frames offsets[i]:offsets[i+1]
      wds/<shard>.tar                        webdataset shard: per video <name>.tokens.npy
                                             (uint16 [T, H, W], first view),
                                             <name>.tokens.<view>.npy for further views,
                                             and <name>.json metadata

Shards are immutable once written: each is built under a temporary name, fsynced, then renamed into
place (on an object store: uploaded as complete objects), and only then recorded in its worker's
manifest part (itself rewritten atomically). A shard not named by a manifest is an interrupted
write and is ignored (and removed by the next run).

Per-shard checksums (sha256 of each file) are kept in the manifest and checked by :func:`verify`
and, once per shard, by the readers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vimpac.common.storage import Location, atomic_open, fsync_dir, location

log = logging.getLogger(__name__)

FORMAT_NAME = "vimpac-token-archive"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16
FORMATS = ("zarr", "webdataset")
_PART_RE = re.compile(r"^worker-(\d{5})-of-(\d{5})\.json$")
CACHE_ENV = "VIMPAC_SHARD_CACHE"


class ArchiveError(RuntimeError):
    """A problem with an archive on disk; the message names the file."""


class ChecksumError(ArchiveError):
    """A shard whose bytes do not match the manifest's checksum."""


# ---------------------------------------------------------------------------------- manifest types

@dataclass(frozen=True)
class View:
    """One spatial view of a video: resize scale of the shorter side, crop position, flip."""
    name: str
    scale: float = 1.0
    crop: str = "center"
    hflip: bool = False


def make_views(scales: list[float], crops: list[str], hflip: bool) -> list[View]:
    """All (scale x crop x flip) views, the un-flipped centre crop at scale 1 first if present."""
    views = []
    for scale in scales:
        for crop in crops:
            for flip in ([False, True] if hflip else [False]):
                name = f"s{scale:g}_{crop}" + ("_flip" if flip else "")
                views.append(View(name=name, scale=scale, crop=crop, hflip=flip))
    views.sort(key=lambda v: (v.scale != 1.0 or v.crop != "center" or v.hflip))
    return views


@dataclass
class ArchiveSettings:
    """What every video in an archive shares; mismatches between workers are errors."""
    tokenizer_fingerprint: str
    codebook_size: int
    grid: tuple[int, int]                  # token grid (H, W)
    fps: float                             # token frames per second
    shorter_side: int
    size: int
    views: list[View]
    formats: list[str]
    tokenizer_kind: str = "vqvae"
    dataset: dict[str, Any] | None = None  # {"name", "root", "classes"} for labelled archives
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    dtype: str = "uint16"

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["grid"] = list(self.grid)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArchiveSettings:
        data = dict(data)
        data["grid"] = tuple(data["grid"])
        data["views"] = [View(**v) for v in data["views"]]
        return cls(**data)

    def compatible_key(self) -> dict[str, Any]:
        """The settings that must agree for archives to be read together (dataset excluded)."""
        out = self.to_json()
        out.pop("dataset")
        return out

    @property
    def view_names(self) -> list[str]:
        return [v.name for v in self.views]


@dataclass
class VideoRecord:
    """One input video and what became of it."""
    key: str
    source: str
    size: int
    mtime: float
    status: str = "ok"                      # ok | failed
    reason: str = ""
    frames: int = 0
    shard: str = ""
    index: int = -1                         # position inside its shard
    label: int = -1
    splits: list[str] = field(default_factory=list)

    def same_source(self, size: int, mtime: float) -> bool:
        return self.size == size and abs(self.mtime - mtime) < 1e-6


@dataclass
class ShardRecord:
    name: str
    videos: int
    frames: int
    files: dict[str, dict[str, str]]        # format -> {relative path: sha256}
    bytes: dict[str, int]                   # format -> bytes on disk


@dataclass
class ManifestPart:
    """What one tokenize worker has committed. Rewritten atomically after every shard."""
    settings: ArchiveSettings
    worker: int = 0
    num_workers: int = 1
    videos: dict[str, VideoRecord] = field(default_factory=dict)
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False

    @property
    def filename(self) -> str:
        return f"worker-{self.worker:05d}-of-{self.num_workers:05d}.json"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "worker": self.worker, "num_workers": self.num_workers, "complete": self.complete,
            "settings": self.settings.to_json(),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "videos": [dataclasses.asdict(v) for v in self.videos.values()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ManifestPart:
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')} is not supported "
                             f"(this vimpac reads {FORMAT_VERSION})")
        videos = {v["key"]: VideoRecord(**v) for v in data["videos"]}
        return cls(settings=ArchiveSettings.from_json(data["settings"]), worker=data["worker"],
                   num_workers=data["num_workers"], videos=videos,
                   shards=[ShardRecord(**s) for s in data["shards"]],
                   complete=bool(data.get("complete", False)))


# ------------------------------------------------------------------------------------ atomic files

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as fh:
        fh.write(data)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_bytes(path, _json_bytes(data))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


# ----------------------------------------------------------------------------------------- writing

def shard_name(worker: int, seq: int) -> str:
    return f"shard-w{worker:05d}-{seq:06d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0               # deterministic bytes: same tokens, same tar
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Collects the videos of one shard in memory and writes every format atomically."""

    def __init__(self, root: str | Path | Location, name: str, settings: ArchiveSettings,
                 chunk_frames: int = 64, zstd_level: int = 3) -> None:
        self.root, self.name, self.settings = location(root), name, settings
        self.chunk_frames, self.zstd_level = chunk_frames, zstd_level
        self.records: list[VideoRecord] = []
        self.tokens: list[dict[str, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: VideoRecord, tokens: dict[str, np.ndarray]) -> None:
        """Queue a video: ``tokens`` maps each view name to uint16 ids [T, H, W]."""
        missing = set(self.settings.view_names) - set(tokens)
        if missing:
            raise ValueError(f"{record.key}: views missing: {sorted(missing)}")
        frames = {arr.shape[0] for arr in tokens.values()}
        if len(frames) != 1:
            raise ValueError(f"{record.key}: views have different frame counts {sorted(frames)}")
        for view, arr in tokens.items():
            if arr.shape[1:] != tuple(self.settings.grid) or arr.dtype != TOKEN_DTYPE:
                raise ValueError(f"{record.key}: view {view} has {arr.dtype}{list(arr.shape)}, "
                                 f"expected uint16[T, {self.settings.grid[0]}, "
                                 f"{self.settings.grid[1]}]")
        record.shard, record.index, record.frames = self.name, len(self.records), frames.pop()
        self.records.append(record)
        self.tokens.append(tokens)

    def commit(self) -> ShardRecord:
        """Write the shard in every format (temp name, fsync, rename) and describe it."""
        files: dict[str, dict[str, str]] = {}
        sizes: dict[str, int] = {}
        if "zarr" in self.settings.formats:
            files["zarr"], sizes["zarr"] = self._write_zarr()
        if "webdataset" in self.settings.formats:
            files["webdataset"], sizes["webdataset"] = self._write_tar()
        return ShardRecord(name=self.name, videos=len(self.records),
                           frames=sum(r.frames for r in self.records), files=files, bytes=sizes)

    def _write_zarr(self) -> tuple[dict[str, str], int]:
        """Local: build under a temporary name, fsync, rename. Object store: build in a local
        temporary folder, upload every object; the manifest written after it publishes it."""
        rel = f"zarr/{self.name}.zarr"
        if not self.root.is_local:
            with tempfile.TemporaryDirectory(prefix=f"vimpac-{self.name}-") as tmp:
                self._build_zarr(Path(tmp))
                sums = _tree_checksums(Path(tmp), Path(tmp), prefix=rel)
                self.root.remove(rel)           # left by a run killed before its manifest
                self.root.put_tree(Path(tmp), rel)
                return sums, _tree_bytes(Path(tmp))
        root = self.root.local_path()
        final = root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{self.name}.", suffix=".tmp"))
        try:
            self._build_zarr(tmp)
            _fsync_tree(tmp)
            if final.exists():              # left by a run killed after rename, before manifest
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.filename is None:
                exc.filename = str(final)
            raise
        return _tree_checksums(final, final, prefix=rel), _tree_bytes(final)

    def _build_zarr(self, folder: Path) -> None:
        """Write the shard's zarr v3 group into the empty local ``folder``."""
        import zarr
        from zarr.codecs import ZstdCodec

        group = zarr.open_group(str(folder), mode="w", zarr_format=3)
        lengths = [r.frames for r in self.records]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        total = int(offsets[-1])
        h, w = self.settings.grid
        chunk = max(1, min(self.chunk_frames, total))
        shard_frames = chunk * max(1, -(-total // chunk))
        for view in self.settings.view_names:
            arr = group.create_array(
                f"tokens/{view}", shape=(total, h, w), dtype="uint16", chunks=(chunk, h, w),
                shards=(shard_frames, h, w), compressors=[ZstdCodec(level=self.zstd_level)])
            arr[:] = np.concatenate([t[view] for t in self.tokens], axis=0)
        off = group.create_array("offsets", shape=offsets.shape, dtype="int64",
                                 chunks=offsets.shape)
        off[:] = offsets
        group.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                            "keys": [r.key for r in self.records],
                            "views": self.settings.view_names})

    def _write_tar(self) -> tuple[dict[str, str], int]:
        buf = io.BytesIO()
        first, *others = self.settings.view_names
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (record, tokens) in enumerate(zip(self.records, self.tokens, strict=True)):
                member = f"{self.name}_{i:06d}"
                _add_tar_member(tar, f"{member}.tokens.npy", _npy_bytes(tokens[first]))
                for view in others:
                    _add_tar_member(tar, f"{member}.tokens.{view}.npy", _npy_bytes(tokens[view]))
                meta = {"key": record.key, "frames": record.frames, "label": record.label,
                        "splits": record.splits, "views": self.settings.view_names}
                _add_tar_member(tar, f"{member}.json", json.dumps(meta).encode())
        data = buf.getvalue()
        rel = f"wds/{self.name}.tar"
        self.root.write_bytes(rel, data)
        return {rel: hashlib.sha256(data).hexdigest()}, len(data)


def _tree_checksums(path: Path, base: Path, prefix: str) -> dict[str, str]:
    """{prefix/relative path: sha256} of every file under ``path`` (paths relative to ``base``)."""
    out = {}
    for dirpath, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = Path(dirpath) / name
            out[f"{prefix}/{full.relative_to(base).as_posix()}"] = sha256_file(full)
    return out


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=False) + "\n").encode()


def save_part(root: str | Path | Location, part: ManifestPart) -> None:
    location(root).write_bytes(f"manifests/{part.filename}", _json_bytes(part.to_json()))


def load_part(path: str | Path, where: Location | None = None) -> ManifestPart:
    """The manifest part at local ``path``, or at ``path`` relative to ``where``."""
    try:
        raw = where.read_bytes(str(path)) if where is not None else Path(path).read_bytes()
        path = where.url(str(path)) if where is not None else path
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArchiveError(f"{path}: manifest is corrupt (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ArchiveError(f"{path}: manifest is truncated or not JSON ({exc.msg} at line "
                           f"{exc.lineno})") from None
    except OSError as exc:
        raise ArchiveError(f"{exc.filename or path}: cannot read manifest: "
                           f"{exc.strerror or exc}") from None
    try:
        return ManifestPart.from_json(data)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ArchiveError(f"{path}: malformed manifest: {exc}") from None


def write_archive(root: str | Path | Location, settings: ArchiveSettings,
                  videos: Iterable[tuple[VideoRecord, dict[str, np.ndarray]]], *,
                  videos_per_shard: int = 256, chunk_frames: int = 1024,
                  zstd_level: int = 3) -> ManifestPart:
    """Write an archive from tokens already in memory (one worker), e.g. tokens converted from
    another tool or made up for tests: ``videos`` yields (record, {view: uint16 [T, H, W]})."""
    part = ManifestPart(settings=settings)
    writer: ShardWriter | None = None

    def commit(w: ShardWriter) -> None:
        part.shards.append(w.commit())
        part.videos.update((r.key, r) for r in w.records)
        save_part(root, part)

    for record, tokens in videos:
        if writer is None:
            writer = ShardWriter(root, shard_name(0, len(part.shards)), settings,
                                 chunk_frames=chunk_frames, zstd_level=zstd_level)
        writer.add(record, tokens)
        if len(writer) == videos_per_shard:
            commit(writer)
            writer = None
    if writer is not None:
        commit(writer)
    part.complete = True
    save_part(root, part)
    return part


def remove_orphans(root: str | Path | Location, part: ManifestPart) -> list[str]:
    """Delete this worker's shard files that its manifest does not name (interrupted writes)."""
    root = location(root)
    known = {s.name for s in part.shards}
    prefix = shard_name(part.worker, 0)[:-6]
    removed = []
    for sub, suffix in (("zarr", ".zarr"), ("wds", ".tar")):
        for name in root.list(sub):
            if name.startswith(prefix) and name.removesuffix(suffix) not in known:
                root.remove(f"{sub}/{name}")
                removed.append(root.url(f"{sub}/{name}"))
    return removed


def remove_stale_temps(root: str | Path | Location, worker: int) -> list[str]:
    """Delete temporary files a killed run of tokenize worker ``worker`` left (shards being
    built, manifest and config rewrites): ``.<name>.<random>.tmp`` in the archive's folders."""
    root = location(root)
    mine = (f".{shard_name(worker, 0)[:-6]}", f".worker-{worker:05d}-of-",
            f".tokenize-w{worker:05d}.")
    removed = []
    for sub in ("zarr", "wds", "manifests", "config"):
        for name in root.list(sub):
            if name.endswith(".tmp") and name.startswith(mine):
                root.remove(f"{sub}/{name}")
                removed.append(root.url(f"{sub}/{name}"))
    return removed


# ----------------------------------------------------------------------------------------- reading

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
        self.shards: dict[str, ShardRecord] = {s.name: s for p in self.parts for s in p.shards}
        self.records: dict[str, VideoRecord] = {}
        for part in self.parts:
            for key, rec in part.videos.items():
                if key in self.records and rec.status == "ok" and \
                        self.records[key].status == "ok":
                    raise ArchiveError(f"{self.root}: video {key!r} appears in two workers' "
                                       "manifests (were the workers run with different counts?)")
                if key not in self.records or rec.status == "ok":
                    self.records[key] = rec
        self.entries = [Entry(r.key, r.shard, r.index, r.frames, r.label, r.splits)
                        for r in self.records.values() if r.status == "ok"]
        self.entries.sort(key=lambda e: (e.shard, e.index))
        self._verified: set[tuple[str, str]] = set()

    def _load_parts(self) -> list[ManifestPart]:
        names = [n for n in self.root.list("manifests") if _PART_RE.match(n)]
        if not names and self.root.exists("manifest.json"):
            return [load_part("manifest.json", self.root)]
        if not names:
            raise ArchiveError(f"{self.root}: no manifest (expected manifests/worker-*.json "
                               "or manifest.json): not a vimpac archive, or nothing was written")
        return [load_part(f"manifests/{n}", self.root) for n in names]

    def _check_settings(self) -> ArchiveSettings:
        first = self.parts[0].settings
        for part in self.parts[1:]:
            if part.settings.compatible_key() != first.compatible_key():
                diff = [k for k, v in first.compatible_key().items()
                        if part.settings.compatible_key().get(k) != v]
                raise ArchiveError(f"{self.root.url('manifests/' + part.filename)}: settings "
                                   f"differ from {self.parts[0].filename} in {', '.join(diff)}")
        return first

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

    # -- integrity
    def verify_shard(self, name: str, fmt: str) -> None:
        """Check every file of shard ``name`` in format ``fmt`` against the manifest."""
        if not self.root.is_local:
            self.fetch_shard(name, fmt, use_cache=False)
            return
        for rel, digest in self.shards[name].files.get(fmt, {}).items():
            path = self.root.local_path(rel)
            if not path.is_file():
                raise ChecksumError(f"{path}: missing shard file")
            if sha256_file(path) != digest:
                raise ChecksumError(f"{path}: checksum mismatch (shard {name} is corrupt)")

    def verify_once(self, name: str, fmt: str) -> None:
        if (name, fmt) not in self._verified:
            self.verify_shard(name, fmt)
            self._verified.add((name, fmt))

    def fetch_shard(self, name: str, fmt: str, use_cache: bool = True) -> dict[str, bytes]:
        """{relative path: bytes} of every file of shard ``name`` in ``fmt``, each checked
        against the manifest's checksum (from the local cache when it holds them)."""
        files = self.shards[name].files.get(fmt, {})
        out: dict[str, bytes] = {}
        cache = self.cache_dir if use_cache else None
        for rel, digest in files.items():
            cached = cache / digest[:2] / digest if cache else None
            if cached is not None and cached.is_file():
                data = cached.read_bytes()
                if hashlib.sha256(data).hexdigest() == digest:
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
            if hashlib.sha256(data).hexdigest() != digest:
                raise ChecksumError(f"{self.root.url(rel)}: checksum mismatch (shard {name} "
                                    "is corrupt)")
            if cache is not None:
                atomic_write_bytes(cache / digest[:2] / digest, data)
            out[rel] = data
        return {rel: out[rel] for rel in files}

    # -- zarr random access
    def open_zarr_shard(self, name: str, verify: bool = True) -> ZarrShard:
        """Random access to shard ``name``; remote shards are fetched (and always checked)."""
        rel = f"zarr/{name}.zarr"
        if self.root.is_local:
            if verify:
                self.verify_once(name, "zarr")
            return ZarrShard(self.root.local_path(rel))
        from zarr.core.buffer import cpu
        from zarr.storage import MemoryStore

        files = {k[len(rel) + 1:]: v for k, v in self.fetch_shard(name, "zarr").items()}
        store = MemoryStore({k: cpu.Buffer.from_bytes(v) for k, v in files.items()},
                            read_only=True)
        return ZarrShard(store, label=self.root.url(rel), raw=files.__getitem__)

    # -- webdataset
    def read_wds(self, name: str, views: list[str] | None = None
                 ) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """(metadata, {view: uint16 [T, H, W]}) per video of webdataset shard ``name``
        (only ``views`` when given)."""
        rel = f"wds/{name}.tar"
        if self.root.is_local:
            self.verify_once(name, "webdataset")          # checksum once per shard
            data = self.root.local_path(rel).read_bytes()
        else:
            data = self.fetch_shard(name, "webdataset")[rel]
        return parse_wds_bytes(data, self.root.url(rel), views)


class ZarrShard:
    """Random access to the videos of one zarr shard: any clip without reading the whole shard.

    ``source`` is the shard's local folder or a zarr store holding it (``label`` names it in
    errors). Arrays are opened, and their dtype checked, on first use.
    """

    def __init__(self, source: str | Path | Any, label: str | None = None,
                 raw: Callable[[str], bytes] | None = None) -> None:
        local = isinstance(source, (str, Path))
        self.path = label or str(source)
        if raw is None and local:
            raw = lambda key: (Path(source) / key).read_bytes()     # noqa: E731
        self._raw = raw           # bytes of a key inside the shard (for the fast paths)
        self._source = str(source) if local else source
        self._group: Any = None
        offsets = self._offsets_direct()
        if offsets is None:
            try:
                offsets = np.asarray(self.group["offsets"][:])
            except ArchiveError:
                raise
            except Exception as exc:  # zarr raises many kinds on broken metadata
                raise ArchiveError(f"{self.path}: cannot open zarr shard: {exc}") from None
        if offsets.dtype != np.int64 or offsets.ndim != 1:
            raise ArchiveError(f"{self.path}: not a token shard (offsets must be int64 [n], "
                               f"found {offsets.dtype}{list(offsets.shape)})")
        self.offsets = offsets
        self._arrays: dict[str, Any] = {}

    @property
    def group(self) -> Any:
        """The shard's zarr group (opened on first use)."""
        if self._group is None:
            import zarr

            try:                  # zarr v3 only: no v2 object codecs (pickle) can be reached
                self._group = zarr.open_group(self._source, mode="r", zarr_format=3)
            except Exception as exc:  # zarr raises many kinds on broken metadata
                raise ArchiveError(f"{self.path}: cannot open zarr shard: {exc}") from None
        return self._group

    def _offsets_direct(self) -> np.ndarray | None:
        """The offsets array decoded without zarr when it is in the writer's layout (one
        zstd chunk); None otherwise (zarr then reads it)."""
        from numcodecs import Zstd

        if self._raw is None:
            return None
        try:
            meta = json.loads(self._raw("offsets/zarr.json"))
            codecs = meta.get("codecs", [])
            if not (_plain_meta(meta, "int64", 1)
                    and meta["chunk_grid"]["configuration"]["chunk_shape"] == meta["shape"]
                    and len(codecs) == 2 and codecs[0] == _BYTES_LE
                    and codecs[1].get("name") == "zstd"):
                return None
            raw = Zstd().decode(self._raw("offsets/c/0"))
        except (OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError):
            return None
        if len(raw) != 8 * meta["shape"][0]:
            return None
        return np.frombuffer(raw, "<i8").astype(np.int64)

    @property
    def keys(self) -> list[str]:
        return [str(k) for k in self.group.attrs["keys"]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def array(self, view: str) -> Any:
        """The zarr array of ``view``: uint16 [frames, H, W]."""
        if view not in self._arrays:
            try:
                arr = self.group[f"tokens/{view}"]
            except Exception as exc:
                raise ArchiveError(f"{self.path}: cannot open view {view!r}: {exc}") from None
            if arr.dtype != TOKEN_DTYPE:
                raise ArchiveError(f"{self.path}: not a token shard (tokens/{view} is "
                                   f"{arr.dtype}, token arrays must be uint16)")
            self._arrays[view] = arr
        return self._arrays[view]

    def read(self, index: int, view: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token frames ``start:stop`` of video ``index`` in ``view``: uint16 [t, H, W]."""
        base, end = int(self.offsets[index]), int(self.offsets[index + 1])
        stop = end - base if stop is None else min(stop, end - base)
        return np.asarray(self.array(view)[base + start: base + stop])

    def read_all(self, view: str) -> np.ndarray:
        """Every video of the shard in ``view``, concatenated: uint16 [frames, H, W].

        Shards in the layout :class:`ShardWriter` writes (one zarr shard of zstd inner chunks) are
        decoded directly, about twice as fast as through zarr's async machinery; any other
        layout is read through zarr."""
        fast = self._read_all_direct(view)
        return fast if fast is not None else np.asarray(self.array(view)[:])

    def _read_all_direct(self, view: str) -> np.ndarray | None:
        from numcodecs import Zstd

        if self._raw is None:
            return None
        try:
            layout = _writer_layout(json.loads(self._raw(f"tokens/{view}/zarr.json")))
            if layout is None:
                return None
            frames, chunk, shard, (h, w) = layout
            data = self._raw(f"tokens/{view}/c/0/0/0")
        except (OSError, KeyError, ValueError, TypeError):
            return None
        index_bytes = 16 * (shard // chunk)              # (offset, nbytes) uint64 per chunk
        if len(data) < index_bytes + 4:
            return None
        index = np.frombuffer(data[-index_bytes - 4:-4], "<u8").reshape(-1, 2)
        count = -(-frames // chunk)
        out = np.empty((count * chunk, h, w), TOKEN_DTYPE)
        codec, size = Zstd(), chunk * h * w * 2
        for i, (offset, nbytes) in enumerate(index[:count].tolist()):
            if offset + nbytes > len(data) - index_bytes - 4:
                return None                              # missing chunk (fill value): use zarr
            raw = codec.decode(data[offset:offset + nbytes])
            if len(raw) != size:
                return None
            out[i * chunk:(i + 1) * chunk] = np.frombuffer(raw, "<u2").reshape(chunk, h, w)
        return out[:frames]


_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}


def _plain_meta(meta: dict[str, Any], dtype: str, ndim: int) -> bool:
    """An array's zarr.json is v3, ``dtype``, ``ndim``-D, fill 0, default '/' chunk keys."""
    shape = meta.get("shape")
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    return (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
            and meta.get("data_type") == dtype and meta.get("fill_value") == 0
            and not meta.get("storage_transformers")
            and isinstance(shape, list) and len(shape) == ndim
            and isinstance(grid, list) and len(grid) == ndim
            and meta.get("chunk_key_encoding") == {"name": "default",
                                                   "configuration": {"separator": "/"}})


def _writer_layout(meta: dict[str, Any]) -> tuple[int, int, int, tuple[int, int]] | None:
    """(frames, inner chunk frames, shard frames, (H, W)) when an array's zarr.json is exactly
    what :class:`ShardWriter` writes: uint16 [frames, H, W] in one shard of zstd inner chunks,
    little endian, index at the end; None for anything else."""
    if not _plain_meta(meta, "uint16", 3):
        return None
    shape, codecs = meta["shape"], meta.get("codecs", [])
    grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
    if not (grid[1:] == shape[1:] and grid[0] >= shape[0] and len(codecs) == 1
            and codecs[0].get("name") == "sharding_indexed"):
        return None
    conf = codecs[0].get("configuration", {})
    inner = conf.get("chunk_shape")
    inner_codecs = conf.get("codecs", [])
    if not (isinstance(inner, list) and len(inner) == 3 and inner[1:] == shape[1:]
            and inner[0] > 0 and grid[0] % inner[0] == 0
            and conf.get("index_location") == "end"
            and conf.get("index_codecs") == [_BYTES_LE, {"name": "crc32c"}]
            and len(inner_codecs) == 2 and inner_codecs[0] == _BYTES_LE
            and inner_codecs[1].get("name") == "zstd"):
        return None
    return shape[0], inner[0], grid[0], (shape[1], shape[2])


def read_wds_shard(path: str | Path, expected_sha256: str | None = None
                   ) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Yield (metadata, {view: uint16 [T, H, W]}) per video of a webdataset shard.

    Only ``*.npy`` (``allow_pickle=False``) and ``*.json`` members are read; anything else in the
    tar is ignored. With ``expected_sha256`` the bytes are checked before anything is yielded.
    """
    data = Path(path).read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ChecksumError(f"{path}: checksum mismatch (shard is corrupt)")
    return parse_wds_bytes(data, str(path))


def parse_wds_bytes(data: bytes, path: str, views: list[str] | None = None
                    ) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """:func:`read_wds_shard` on a shard already in memory (``path`` names it in errors);
    ``views`` limits which token arrays are decoded (default: all)."""
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for name, raw in _tar_members(data, path):
        member, _, ext = name.partition(".")
        if ext != "json" and not (ext.startswith("tokens") and ext.endswith(".npy")):
            continue
        if member not in samples:
            samples[member] = {}
            order.append(member)
        samples[member][ext] = raw
    for member in order:
        parts = samples[member]
        if "json" not in parts:
            continue
        try:
            meta = json.loads(bytes(parts["json"]))
            names = list(meta.get("views", []))
        except (ValueError, AttributeError, TypeError):
            raise ArchiveError(f"{path}: member {member}.json is not a JSON object") from None
        arrays = {}
        for i, view in enumerate(names):
            ext = "tokens.npy" if i == 0 else f"tokens.{view}.npy"
            if ext not in parts or (views is not None and view not in views):
                continue
            arrays[view] = _token_array(parts[ext], f"{path}: member {member}.{ext}")
        yield meta, arrays


class _PlainTarOnly(Exception):
    """A tar feature the fast reader leaves to :mod:`tarfile` (pax or GNU headers...)."""


def _tar_members(data: bytes, path: str) -> list[tuple[str, Any]]:
    """(name, bytes) of the regular files of a tar in memory. The writer's plain USTAR tars are
    walked directly (about 3x faster than :mod:`tarfile`); anything else goes through tarfile."""
    try:
        return _ustar_members(memoryview(data), path)
    except _PlainTarOnly:
        pass
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return [(info.name, tar.extractfile(info).read()) for info in tar if info.isfile()]
    except tarfile.TarError as exc:
        raise ArchiveError(f"{path}: broken tar: {exc}") from None


def _ustar_members(data: memoryview, path: str) -> list[tuple[str, memoryview]]:
    out, pos = [], 0
    while pos + 512 <= len(data):
        header = bytes(data[pos:pos + 512])
        if header.count(0) == 512:
            return out                                   # end-of-archive block
        if header[257:262] != b"ustar" or header[124] & 0x80:
            raise _PlainTarOnly                          # old-style or base-256 sizes
        checksum = sum(header[:148]) + 8 * 32 + sum(header[156:])
        try:
            if int(header[148:156].strip(b"\0 ") or b"-1", 8) != checksum:
                raise ArchiveError(f"{path}: broken tar: bad header checksum at byte {pos}")
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ArchiveError(f"{path}: broken tar: bad header at byte {pos}") from None
        kind = header[156:157]
        if kind not in (b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"):
            raise _PlainTarOnly                          # pax / GNU long-name headers
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        start, end = pos + 512, pos + 512 + size
        if end > len(data):
            raise ArchiveError(f"{path}: broken tar: member at byte {pos} is cut short")
        if kind in (b"0", b"\0", b"7"):
            full = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
            out.append((full, data[start:end]))
        pos = start + -(-size // 512) * 512
    raise _PlainTarOnly                                  # no end block: let tarfile decide


_NPY_U16_3D = re.compile(rb"\{'descr': '<u2', 'fortran_order': False, 'shape': "
                         rb"\((\d+), (\d+), (\d+)\), \} *\n")


def _token_array(raw: Any, label: str) -> np.ndarray:
    """uint16 [T, H, W] from .npy bytes. The writer's exact header is parsed directly; anything
    else goes through ``np.load(allow_pickle=False)``: object arrays (pickles) are refused."""
    head = bytes(raw[:10])
    if head[:8] == b"\x93NUMPY\x01\x00":
        size = int.from_bytes(head[8:10], "little")
        match = _NPY_U16_3D.fullmatch(bytes(raw[10:10 + size]))
        if match is not None:
            shape = tuple(int(g) for g in match.groups())
            body = raw[10 + size:]
            if len(body) == 2 * shape[0] * shape[1] * shape[2]:
                return np.frombuffer(body, "<u2").reshape(shape)
    try:
        arr = np.load(io.BytesIO(bytes(raw)), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ArchiveError(f"{label} is not a plain array ({exc})") from None
    if arr.dtype != TOKEN_DTYPE or arr.ndim != 3:
        raise ArchiveError(f"{label} holds {arr.dtype}{list(arr.shape)}, expected uint16 "
                           "[T, H, W]")
    return arr


# ---------------------------------------------------------------------------------- verify / merge

@dataclass
class VerifyReport:
    shards_checked: int = 0
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(root: str | Path) -> VerifyReport:
    """Check every shard file's checksum and the manifest's internal consistency."""
    report = VerifyReport()
    try:
        archive = Archive(root)
    except ArchiveError as exc:
        report.problems.append(str(exc))
        return report
    for name, shard in sorted(archive.shards.items()):
        report.shards_checked += 1
        for fmt, files in shard.files.items():
            report.files_checked += len(files)
            try:
                archive.verify_shard(name, fmt)
            except ChecksumError as exc:
                report.problems.append(str(exc))
        members = [e for e in archive.entries if e.shard == name]
        if len(members) != shard.videos or sum(e.frames for e in members) != shard.frames:
            report.problems.append(f"{archive.root}: shard {name}: manifest lists {shard.videos} "
                                   f"videos / {shard.frames} frames, records give "
                                   f"{len(members)} / {sum(e.frames for e in members)}")
    for entry in archive.entries:
        if entry.shard not in archive.shards:
            report.problems.append(f"{archive.root}: video {entry.key!r} points at unknown "
                                   f"shard {entry.shard}")
    return report


def merge_manifests(root: str | Path | Location) -> str:
    """Write ``manifest.json``: all workers' parts as one (readers work without it too)."""
    archive = Archive(root)
    merged = ManifestPart(settings=archive.settings, worker=0, num_workers=1,
                          videos=dict(sorted(archive.records.items())),
                          shards=[archive.shards[n] for n in archive.shard_names()],
                          complete=archive.complete)
    archive.root.write_bytes("manifest.json", _json_bytes(merged.to_json()))
    return archive.root.url("manifest.json")


def read_tokens(root: str | Path, key: str, view: str | None = None,
                fmt: str = "zarr") -> np.ndarray:
    """All token frames of one video, by key (convenience for tools and tests)."""
    archive = Archive(root)
    rec = archive.records.get(key)
    if rec is None or rec.status != "ok":
        raise KeyError(f"{root}: no tokenized video with key {key!r}")
    view = view or archive.settings.view_names[0]
    if fmt == "zarr":
        return archive.open_zarr_shard(rec.shard).read(rec.index, view)
    for meta, views in archive.read_wds(rec.shard):
        if meta["key"] == key:
            return views[view]
    raise ArchiveError(f"{archive.root.url(f'wds/{rec.shard}.tar')}: video {key!r} missing "
                       "from shard")
