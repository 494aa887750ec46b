"""The webdataset format: one plain tar per shard, streamed whole.

    wds/<shard>.tar     per video i of the shard, members named <shard>_<i:06d>:
                        .tokens.npy           uint16 [T, H, W], the first view
                        .tokens.<view>.npy    further views
                        .json                 {"key", "frames", "label", "splits", "views"}

The tars read with the ``webdataset`` library too (decode nothing but npy and json). Reading here
walks the writer's plain USTAR headers and ``.npy`` headers directly (about 3x faster than
:mod:`tarfile` + ``np.load``); any other tar goes through :mod:`tarfile`, any other array through
``np.load(allow_pickle=False)``. Members other than ``*.json`` and ``*.tokens*.npy`` are ignored,
so nothing in a tar can run code.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vimpac.archive.errors import ShardError
from vimpac.archive.formats.base import Format, ShardContent, ShardLayout, ShardSource
from vimpac.archive.manifest import TOKEN_DTYPE

# ----------------------------------------------------------------------------------------- write

def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0               # deterministic bytes: same tokens, same tar
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def member_extension(views: list[str] | tuple[str, ...], view: str) -> str:
    """The member extension holding ``view``: the first view is ``tokens.npy``."""
    return "tokens.npy" if view == views[0] else f"tokens.{view}.npy"


def write(content: ShardContent, dest: Path) -> None:
    """Write the shard's tar to the new local file ``dest``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (record, tokens) in enumerate(zip(content.records, content.tokens, strict=True)):
            member = f"{content.name}_{i:06d}"
            for view in content.views:
                ext = member_extension(content.views, view)
                _add_member(tar, f"{member}.{ext}", _npy_bytes(tokens[view]))
            meta = {"key": record.key, "frames": record.frames, "label": record.label,
                    "splits": record.splits, "views": content.views}
            _add_member(tar, f"{member}.json", json.dumps(meta).encode())
    dest.write_bytes(buf.getvalue())


# ------------------------------------------------------------------------------------------ read

def _is_ours(ext: str) -> bool:
    return ext == "json" or (ext.startswith("tokens") and ext.endswith(".npy"))


def samples(data: bytes | memoryview, label: str) -> list[tuple[str, dict[str, Any]]]:
    """(member name, {extension: bytes}) per video, in tar order; members of other kinds are
    ignored, as are groups made only of them."""
    groups: dict[str, dict[str, Any]] = {}
    for name, raw in _tar_members(data, label):
        member, _, ext = name.partition(".")
        if _is_ours(ext):
            groups.setdefault(member, {})[ext] = raw
    return list(groups.items())


def parse_wds_bytes(data: bytes | memoryview, label: str, views: list[str] | None = None
                    ) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """(metadata, {view: uint16 [T, H, W]}) per video of a tar in memory, checked only for what a
    tar alone can tell (JSON objects, plain uint16 3-D arrays); ``views`` limits which arrays
    are decoded. Readers of an archive use :class:`TarShard`, which checks the manifest too."""
    for member, parts in samples(data, label):
        if "json" not in parts:
            continue
        meta = _meta(parts, member, label)
        names = meta.get("views", [])
        names = names if isinstance(names, list) and all(isinstance(v, str) for v in names) \
            else []
        arrays = {}
        for view in names:
            ext = member_extension(names, view)
            if ext in parts and (views is None or view in views):
                arrays[view] = token_array(parts[ext], f"{label}: member {member}.{ext}")
        yield meta, arrays


def _meta(parts: dict[str, Any], member: str, label: str) -> dict[str, Any]:
    try:
        meta = json.loads(bytes(parts["json"]))
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise ShardError(f"{label}: member {member}.json is not a JSON object")
    return meta


class TarShard:
    """The videos of one tar shard, checked against the manifest's layout: as many videos as
    it lists, in its order, each with its tokens members on the archive's grid."""

    def __init__(self, source: ShardSource, layout: ShardLayout) -> None:
        self.layout, self.path = layout, source.label
        found = [(m, p) for m, p in samples(source.raw(""), self.path)]
        if len(found) != layout.videos:
            raise ShardError(f"{self.path}: holds {len(found)} videos, the manifest lists "
                             f"{layout.videos} (a tar cut short or extended)")
        self._samples = found
        for i, (member, parts) in enumerate(found):
            if "json" not in parts:
                raise ShardError(f"{self.path}: video {layout.keys[i]!r}: member {member} has "
                                 "no .json")
            key = _meta(parts, member, self.path).get("key")
            if key != layout.keys[i]:
                raise ShardError(f"{self.path}: member {member}.json holds video {key!r}, the "
                                 f"manifest has {layout.keys[i]!r} at index {i}")
        self._views: dict[str, list[np.ndarray]] = {}

    @property
    def keys(self) -> list[str]:
        return list(self.layout.keys)

    def _arrays(self, view: str) -> list[np.ndarray]:
        self.layout.check_view(view)
        ext = member_extension(self.layout.views, view)
        out = []
        for i, (member, parts) in enumerate(self._samples):
            what = f"video {self.layout.keys[i]!r} ({member}.{ext})"
            if ext not in parts:
                raise ShardError(f"{self.path}: {what} is missing: no tokens for view {view}")
            arr = token_array(parts[ext], f"{self.path}: member {member}.{ext}")
            self.layout.check_array(arr, what, int(self.layout.frames[i]))
            out.append(arr)
        return out

    def read_all(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._views.get(view) or self._arrays(view)
        flat = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
        offsets = self.layout.offsets()
        self.layout.check_flat_ids(flat, offsets, view)
        return flat, offsets

    def read(self, index: int, view: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        if view not in self._views:                      # random access: keep the shard decoded
            self._views[view] = self._arrays(view)
        clip = self._views[view][index][start:stop]
        self.layout.check_ids(clip, index, view, start)
        return clip


class _PlainTarOnly(Exception):
    """A tar feature the fast reader leaves to :mod:`tarfile` (pax or GNU headers...)."""


def _tar_members(data: bytes | memoryview, label: str) -> list[tuple[str, Any]]:
    """(name, bytes) of the regular files of a tar in memory. The writer's plain USTAR tars are
    walked directly; anything else goes through tarfile."""
    try:
        return _ustar_members(memoryview(data), label)
    except _PlainTarOnly:
        pass
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:") as tar:
            return [(info.name, tar.extractfile(info).read()) for info in tar if info.isfile()]
    except tarfile.TarError as exc:
        raise ShardError(f"{label}: broken tar: {exc}") from None


def _ustar_members(data: memoryview, label: str) -> list[tuple[str, memoryview]]:
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
                raise ShardError(f"{label}: broken tar: bad header checksum at byte {pos}")
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(f"{label}: broken tar: bad header at byte {pos}") from None
        kind = header[156:157]
        if kind not in (b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"):
            raise _PlainTarOnly                          # pax / GNU long-name headers
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        start, end = pos + 512, pos + 512 + size
        if end > len(data):
            raise ShardError(f"{label}: broken tar: member at byte {pos} is cut short")
        if kind in (b"0", b"\0", b"7"):
            full = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
            out.append((full, data[start:end]))
        pos = start + -(-size // 512) * 512
    raise _PlainTarOnly                                  # no end block: let tarfile decide


_NPY_U16_3D = re.compile(rb"\{'descr': '<u2', 'fortran_order': False, 'shape': "
                         rb"\((\d+), (\d+), (\d+)\), \} *\n")


def token_array(raw: Any, label: str) -> np.ndarray:
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
    data = bytes(raw)
    try:
        declared = _declared_bytes(data)
        if declared is not None and declared > len(data):
            raise ValueError(f"it declares {declared} bytes of data, the member has {len(data)}")
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ShardError(f"{label} is not a plain array ({exc})") from None
    if arr.dtype != TOKEN_DTYPE or arr.ndim != 3:
        raise ShardError(f"{label} holds {arr.dtype}{list(arr.shape)}, expected uint16 "
                         "[T, H, W]")
    return arr


def _declared_bytes(data: bytes) -> int | None:
    """Data bytes an .npy header declares (read before np.load allocates them); None for object
    arrays and other headers np.load itself refuses."""
    fp = io.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fp, max_header_size=1 << 16)
    if dtype.hasobject:
        return None
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


FORMAT = Format(name="webdataset", folder="wds", suffix=".tar", random_access=False, write=write,
                open=TarShard,
                describe="one plain tar per shard (webdataset layout): streamed whole")
