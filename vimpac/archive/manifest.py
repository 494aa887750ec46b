"""The manifest: typed settings and records of an archive, parsed and validated once.

Each tokenize worker keeps one manifest part, ``manifests/worker-WWWWW-of-NNNNN.json``; ``vimpac
archive merge`` may add a merged ``manifest.json``. A manifest is read from disk that anyone may
have written, so :func:`parse_part` checks every field's type and range, bounds nesting and sizes,
and refuses names that could leave the archive (``..``, absolute paths) before anything else
trusts it. Errors are one line: ``<manifest>: malformed manifest: shards[3].videos: expected ...``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vimpac.archive.errors import ArchiveError
from vimpac.common.fileio import json_bytes
from vimpac.common.names import key_problem, relative_path_problem
from vimpac.common.storage import Location

FORMAT_NAME = "vimpac-token-archive"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16
MAX_CODEBOOK = int(np.iinfo(TOKEN_DTYPE).max) + 1     # ids are stored as uint16
MAX_MANIFEST_BYTES = 4 << 30                          # ~10 M videos; anything larger is refused
MAX_TEXT = 4096                                        # keys, paths: a practical bound
MAX_FRAMES = 1 << 40
MAX_TEMPORAL_STRIDE = 1024
SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VIEW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PART_NAME = re.compile(r"^worker-(\d{5})-of-(\d{5})\.json$")
CROPS = ("top", "center", "bottom")
STATUSES = ("ok", "failed")


# ------------------------------------------------------------------------------------------ types

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


# Fields added after format version 1 was first written: stored only when they differ from these
# values, which every earlier archive implies, so archives that do not use them stay byte-identical
# to those of earlier versions (and earlier readers read them as before).
_IMPLIED = {"temporal_stride": 1, "decoded_frames": 0}


def _without_implied(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in _IMPLIED or v != _IMPLIED[k]}


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
    temporal_stride: int = 1               # decoded frames per token frame (decoded at fps x this)

    def to_json(self) -> dict[str, Any]:
        out = _without_implied(dataclasses.asdict(self))
        out["grid"] = list(self.grid)
        return out

    @property
    def decode_fps(self) -> float:
        """Frame rate the sources were decoded at: ``temporal_stride`` frames per token frame."""
        return self.fps * self.temporal_stride

    def compatible_key(self) -> dict[str, Any]:
        """The settings that must agree for archives to be read together (dataset excluded);
        every field, implied ones too, so a difference always names its key."""
        out = {**dataclasses.asdict(self), "grid": list(self.grid)}
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
    decoded_frames: int = 0                 # frames decoded, when temporal stride > 1 (else 0)

    def same_source(self, size: int, mtime: float) -> bool:
        return self.size == size and abs(self.mtime - mtime) < 1e-6

    def to_json(self) -> dict[str, Any]:
        return _without_implied(dataclasses.asdict(self))


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
        return part_filename(self.worker, self.num_workers)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "worker": self.worker, "num_workers": self.num_workers, "complete": self.complete,
            "settings": self.settings.to_json(),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "videos": [v.to_json() for v in self.videos.values()],
        }


def part_filename(worker: int, num_workers: int) -> str:
    return f"worker-{worker:05d}-of-{num_workers:05d}.json"


# --------------------------------------------------------------------------------------- parsing

class _Fields:
    """Typed field access on parsed JSON; every failure is one ArchiveError line."""

    def __init__(self, label: str) -> None:
        self.label = label

    def fail(self, where: str, expected: str, value: Any = dataclasses.MISSING) -> ArchiveError:
        got = "" if value is dataclasses.MISSING else f", got {_short(value)}"
        return ArchiveError(f"{self.label}: malformed manifest: {where}: {expected}{got}")

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "expected an object", value)
        return value

    def get(self, data: dict[str, Any], key: str, where: str, default: Any) -> Any:
        if key in data:
            return data[key]
        if default is dataclasses.MISSING:
            raise self.fail(f"{where}.{key}" if where else key, "missing")
        return default

    def text(self, data: dict[str, Any], key: str, where: str, *,
             default: Any = dataclasses.MISSING, check: Callable[[str], str] | None = None,
             max_len: int = MAX_TEXT) -> str:
        value = self.get(data, key, where, default)
        return self._text(value, f"{where}.{key}" if where else key, check, max_len)

    def _text(self, value: Any, name: str, check: Callable[[str], str] | None,
              max_len: int) -> str:
        if not isinstance(value, str) or len(value) > max_len:
            raise self.fail(name, f"expected a string of at most {max_len} characters", value)
        why = check(value) if check else ""
        if why:
            raise self.fail(name, why, value)
        return value

    def integer(self, data: dict[str, Any], key: str, where: str, lo: int, hi: int, *,
                default: Any = dataclasses.MISSING) -> int:
        name = f"{where}.{key}" if where else key
        value = self.get(data, key, where, default)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.fail(name, f"expected an integer in {lo}..{hi}", value)
        return value

    def number(self, data: dict[str, Any], key: str, where: str, lo: float, hi: float, *,
               default: Any = dataclasses.MISSING) -> float:
        name = f"{where}.{key}" if where else key
        value = self.get(data, key, where, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                not math.isfinite(value) or not lo <= value <= hi:
            raise self.fail(name, f"expected a number in {lo:g}..{hi:g}", value)
        return float(value)

    def flag(self, data: dict[str, Any], key: str, where: str, *,
             default: Any = dataclasses.MISSING) -> bool:
        value = self.get(data, key, where, default)
        if not isinstance(value, bool):
            raise self.fail(f"{where}.{key}" if where else key, "expected true or false", value)
        return value

    def items(self, data: dict[str, Any], key: str, where: str, *,
              default: Any = dataclasses.MISSING) -> list[Any]:
        value = self.get(data, key, where, default)
        if not isinstance(value, list):
            raise self.fail(f"{where}.{key}" if where else key, "expected a list", value)
        return value

    def texts(self, data: dict[str, Any], key: str, where: str, *, max_len: int = 256,
              check: Callable[[str], str] | None = None,
              default: Any = dataclasses.MISSING) -> list[str]:
        name = f"{where}.{key}" if where else key
        return [self._text(item, f"{name}[{i}]", check, max_len)
                for i, item in enumerate(self.items(data, key, where, default=default))]


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _name_check(pattern: re.Pattern[str], what: str) -> Callable[[str], str]:
    return lambda s: "" if pattern.match(s) else f"expected a plain {what} name ({pattern.pattern})"


def _parse_view(f: _Fields, raw: Any, where: str) -> View:
    data = f.obj(raw, where)
    return View(name=f.text(data, "name", where, check=_name_check(VIEW_NAME, "view")),
                scale=f.number(data, "scale", where, 0.01, 16.0),
                crop=f.text(data, "crop", where, check=lambda s: "" if s in CROPS else
                            "expected one of " + ", ".join(CROPS)),
                hflip=f.flag(data, "hflip", where))


def _parse_dataset(f: _Fields, raw: Any, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    data = f.obj(raw, where)
    return {"name": f.text(data, "name", where, max_len=256),
            "root": f.text(data, "root", where),
            "classes": f.texts(data, "classes", where, max_len=MAX_TEXT)}


def parse_settings(f: _Fields, raw: Any, where: str = "settings") -> ArchiveSettings:
    data = f.obj(raw, where)
    grid = f.items(data, "grid", where)
    if len(grid) != 2:
        raise f.fail(f"{where}.grid", "expected [H, W]", grid)
    grid_hw = tuple(f.integer({"grid": g}, "grid", where, 1, 4096) for g in grid)
    views = [_parse_view(f, v, f"{where}.views[{i}]")
             for i, v in enumerate(f.items(data, "views", where))]
    if not views or len({v.name for v in views}) != len(views):
        raise f.fail(f"{where}.views", "expected at least one view, names unique")
    formats = f.texts(data, "formats", where, check=_name_check(VIEW_NAME, "format"))
    if not formats:
        raise f.fail(f"{where}.formats", "expected at least one format")
    settings = ArchiveSettings(
        tokenizer_fingerprint=f.text(data, "tokenizer_fingerprint", where, max_len=256),
        codebook_size=f.integer(data, "codebook_size", where, 1, MAX_CODEBOOK),
        grid=grid_hw,                                            # type: ignore[arg-type]
        fps=f.number(data, "fps", where, 1e-6, 1000.0),
        shorter_side=f.integer(data, "shorter_side", where, 1, 1 << 16),
        size=f.integer(data, "size", where, 1, 1 << 16),
        views=views, formats=formats,
        tokenizer_kind=f.text(data, "tokenizer_kind", where, default="vqvae", max_len=64),
        dataset=_parse_dataset(f, data.get("dataset"), f"{where}.dataset"),
        format=f.text(data, "format", where, default=FORMAT_NAME, max_len=64),
        format_version=f.integer(data, "format_version", where, 0, 1 << 30,
                                 default=FORMAT_VERSION),
        dtype=f.text(data, "dtype", where, default="uint16", max_len=16),
        temporal_stride=f.integer(data, "temporal_stride", where, 1, MAX_TEMPORAL_STRIDE,
                                  default=1))
    if settings.dtype != "uint16":
        raise f.fail(f"{where}.dtype", "expected 'uint16'", settings.dtype)
    return settings


def _parse_video(f: _Fields, raw: Any, where: str) -> VideoRecord:
    data = f.obj(raw, where)
    rec = VideoRecord(
        key=f.text(data, "key", where, check=key_problem),
        source=f.text(data, "source", where),
        size=f.integer(data, "size", where, -1, 1 << 62),
        mtime=f.number(data, "mtime", where, -1e12, 1e12),
        status=f.text(data, "status", where, default="ok",
                      check=lambda s: "" if s in STATUSES else "expected ok or failed"),
        reason=f.text(data, "reason", where, default="", max_len=1 << 16),
        frames=f.integer(data, "frames", where, 0, MAX_FRAMES, default=0),
        shard=f.text(data, "shard", where, default="", max_len=128),
        index=f.integer(data, "index", where, -1, 1 << 40, default=-1),
        label=f.integer(data, "label", where, -1, (1 << 31) - 1, default=-1),
        splits=f.texts(data, "splits", where, default=[], max_len=64),
        decoded_frames=f.integer(data, "decoded_frames", where, 0, MAX_FRAMES, default=0))
    if rec.status == "ok" and (not SHARD_NAME.match(rec.shard) or rec.index < 0
                               or rec.frames < 1):
        raise f.fail(where, f"video {rec.key!r} is ok but has no shard, index or frames")
    return rec


def _parse_shard(f: _Fields, raw: Any, where: str) -> ShardRecord:
    data = f.obj(raw, where)
    files_raw = f.obj(f.get(data, "files", where, dataclasses.MISSING), f"{where}.files")
    files: dict[str, dict[str, str]] = {}
    for fmt, listing in files_raw.items():
        fmt_where = f"{where}.files.{_short(fmt)}"
        if not isinstance(fmt, str) or not VIEW_NAME.match(fmt):
            raise f.fail(fmt_where, "expected a format name")
        files[fmt] = {}
        for rel, digest in f.obj(listing, fmt_where).items():
            why = relative_path_problem(rel)
            if why:
                raise f.fail(fmt_where, why, rel)
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise f.fail(f"{fmt_where}[{rel!r}]", "expected a sha256 hex digest", digest)
            files[fmt][rel] = digest
    sizes = {}
    for fmt, n in f.obj(f.get(data, "bytes", where, {}), f"{where}.bytes").items():
        sizes[str(fmt)] = f.integer({"bytes": n}, "bytes", where, 0, 1 << 62)
    return ShardRecord(name=f.text(data, "name", where, check=_name_check(SHARD_NAME, "shard")),
                       videos=f.integer(data, "videos", where, 0, 1 << 40),
                       frames=f.integer(data, "frames", where, 0, MAX_FRAMES),
                       files=files, bytes=sizes)


def parse_part(data: Any, label: str) -> ManifestPart:
    """A validated :class:`ManifestPart` from parsed JSON; ``label`` names the file in errors."""
    f = _Fields(label)
    data = f.obj(data, "manifest")
    if data.get("format") != FORMAT_NAME:
        raise ArchiveError(f"{label}: not a {FORMAT_NAME} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArchiveError(f"{label}: format_version {_short(data.get('format_version'))} is not "
                           f"supported (this vimpac reads {FORMAT_VERSION})")
    num_workers = f.integer(data, "num_workers", "", 1, 99999)
    worker = f.integer(data, "worker", "", 0, num_workers - 1)
    videos: dict[str, VideoRecord] = {}
    for i, raw in enumerate(f.items(data, "videos", "")):
        rec = _parse_video(f, raw, f"videos[{i}]")
        if rec.key in videos:
            raise f.fail(f"videos[{i}].key", "duplicate key", rec.key)
        videos[rec.key] = rec
    shards = [_parse_shard(f, raw, f"shards[{i}]")
              for i, raw in enumerate(f.items(data, "shards", ""))]
    if len({s.name for s in shards}) != len(shards):
        raise f.fail("shards", "duplicate shard names")
    settings = parse_settings(f, data.get("settings"))
    _check_decoded_frames(f, videos, settings.temporal_stride)
    return ManifestPart(settings=settings, worker=worker, num_workers=num_workers, videos=videos,
                        shards=shards, complete=f.flag(data, "complete", "", default=False))


def _check_decoded_frames(f: _Fields, videos: dict[str, VideoRecord], stride: int) -> None:
    """A video's decoded frames fill its token frames, the last one at least partly."""
    for i, rec in enumerate(videos.values()):
        if rec.decoded_frames and not (rec.frames - 1) * stride < rec.decoded_frames \
                <= rec.frames * stride:
            raise f.fail(f"videos[{i}].decoded_frames", f"expected {rec.frames} token frames of "
                         f"{stride} frames to hold them", rec.decoded_frames)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, label: str) -> Any:
    """JSON from untrusted bytes: size bounded, NaN/Infinity refused, deep nesting and huge
    integers reported as one line (never a RecursionError traceback)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{label}: manifest is {len(raw)} bytes, more than the "
                           f"{MAX_MANIFEST_BYTES} this vimpac reads")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise ArchiveError(f"{label}: manifest is corrupt (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ArchiveError(f"{label}: manifest is truncated or not JSON ({exc.msg} at line "
                           f"{exc.lineno})") from None
    except RecursionError:
        raise ArchiveError(f"{label}: manifest is nested too deeply to be one") from None
    except ValueError as exc:                     # NaN, Infinity, integers of > 4300 digits
        raise ArchiveError(f"{label}: malformed manifest: {str(exc).splitlines()[0]}") from None


def part_from_bytes(raw: bytes, label: str) -> ManifestPart:
    return parse_part(parse_json(raw, label), label)


# ------------------------------------------------------------------------------------------- I/O

def save_part(root: Location, part: ManifestPart, name: str | None = None) -> None:
    """Replace the manifest part (or ``name``, e.g. ``manifest.json``) atomically."""
    root.write_bytes(name or f"manifests/{part.filename}", json_bytes(part.to_json()))


def load_part(root: Location, rel: str) -> ManifestPart:
    """The validated manifest part at ``rel`` in ``root``; every failure names the file."""
    try:
        raw = root.read_bytes(rel)
    except OSError as exc:
        raise ArchiveError(f"{exc.filename or root.url(rel)}: cannot read manifest: "
                           f"{exc.strerror or exc}") from None
    return part_from_bytes(raw, root.url(rel))
