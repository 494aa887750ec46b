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

import collections
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
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


class TarBytes:
    """Byte ranges of one tar: ``pread`` on a local file (nothing else is read), or slices of
    bytes already in memory (a shard fetched from an object store)."""

    def __init__(self, data: bytes | memoryview | None = None, path: Path | None = None) -> None:
        self.data = memoryview(data) if data is not None else None
        self.path, self._fd = path, -1
        self.size = len(self.data) if self.data is not None else os.stat(path).st_size

    @classmethod
    def of(cls, source: ShardSource) -> TarBytes:
        if source.local is not None and source.local.is_file():
            return cls(path=source.local)
        return cls(data=source.raw(""))

    def read(self, offset: int, size: int) -> bytes | memoryview:
        if self.data is not None:
            return self.data[offset:offset + size]
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, size, offset)

    def whole(self) -> bytes | memoryview:
        return self.data if self.data is not None else Path(self.path).read_bytes()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def samples(data: bytes | memoryview, label: str) -> list[tuple[str, dict[str, Any]]]:
    """(member name, {extension: bytes}) per video, in tar order; members of other kinds are
    ignored, as are groups made only of them."""
    view = memoryview(data)
    return [(member, {ext: view[off:off + size] for ext, (off, size) in parts.items()})
            for member, parts in member_index(TarBytes(view), label)]


def member_index(tar: TarBytes, label: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(member name, {extension: (data offset, size)}) per video, in tar order, from the tar's
    headers alone; members of other kinds are ignored, as are groups made only of them."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    for name, offset, size in _tar_members(tar, label):
        member, _, ext = name.partition(".")
        if _is_ours(ext):
            groups.setdefault(member, {})[ext] = (offset, size)
    return list(groups.items())


def parse_wds_bytes(data: bytes | memoryview, label: str, views: list[str] | None = None
                    ) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """(metadata, {view: uint16 [T, H, W]}) per video of a tar in memory, checked only for what a
    tar alone can tell (JSON objects, plain uint16 3-D arrays); ``views`` limits which arrays
    are decoded. Readers of an archive use :class:`TarShard`, which checks the manifest too."""
    for member, parts in samples(data, label):
        if "json" not in parts:
            continue
        meta = _meta(parts["json"], member, label)
        names = meta.get("views", [])
        names = names if isinstance(names, list) and all(isinstance(v, str) for v in names) \
            else []
        arrays = {}
        for view in names:
            ext = member_extension(names, view)
            if ext in parts and (views is None or view in views):
                arrays[view] = token_array(parts[ext], f"{label}: member {member}.{ext}")
        yield meta, arrays


MAX_JSON_BYTES = 1 << 20           # a video's metadata is a key, a label, splits and view names


def _meta(raw: Any, member: str, label: str) -> dict[str, Any]:
    try:
        meta = json.loads(bytes(raw))
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise ShardError(f"{label}: member {member}.json is not a JSON object")
    return meta


@dataclass(frozen=True)
class _Index:
    """A checked member index: per video, its member name and (offset, size) of each tokens
    member (-1 where a view's member is absent)."""
    names: tuple[str, ...]
    exts: tuple[str, ...]
    table: np.ndarray                      # int64 [videos, len(exts), 2]

    @classmethod
    def of(cls, found: list[tuple[str, dict[str, tuple[int, int]]]],
           views: tuple[str, ...]) -> _Index:
        exts = tuple(member_extension(views, v) for v in views)
        table = np.full((len(found), len(exts), 2), -1, np.int64)
        for i, (_, parts) in enumerate(found):
            for j, ext in enumerate(exts):
                if ext in parts:
                    table[i, j] = parts[ext]
        return cls(tuple(m for m, _ in found), exts, table)


MEMO_SHARDS = 4096     # checked member indexes kept per process (~100 bytes per video)
_CHECKED: collections.OrderedDict[tuple[Any, ...], _Index] = collections.OrderedDict()


def _memo_key(tar: TarBytes, layout: ShardLayout) -> tuple[Any, ...] | None:
    """What a checked member index of a local tar is valid for: the file as it is now (device,
    inode, size, modification time) read against the same manifest entry; None in memory."""
    if tar.path is None:
        return None
    st = os.stat(tar.path)
    return (str(tar.path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, layout.keys,
            layout.views)


class TarShard:
    """The videos of one tar shard, checked against the manifest's layout: as many videos as
    it lists, in its order, each with its tokens members on the archive's grid.

    Opening walks the tar's headers and reads each video's small ``.json`` (for a local file,
    by offset: no token bytes are read); the checked index of a local tar is kept per process
    (:data:`MEMO_SHARDS`), so reopening the unchanged file against the same manifest entry reads
    nothing. :meth:`read_all` reads the whole tar; :meth:`read`
    reads one clip by member offset, after checking that member's ``.npy`` header against the
    manifest (dtype, frames, grid); anything but the writer's plain header is decoded whole
    and checked the same way.
    """

    def __init__(self, source: ShardSource, layout: ShardLayout) -> None:
        self.layout, self.path = layout, source.label
        self._tar = TarBytes.of(source)
        self._headers: dict[tuple[int, str], int | None] = {}
        self._whole: set[str] = set()                    # views whose every id was checked
        memo = _memo_key(self._tar, layout)
        if memo is not None and memo in _CHECKED:
            _CHECKED.move_to_end(memo)
            self._index = _CHECKED[memo]
            return
        self._index = _Index.of(self._check(member_index(self._tar, self.path)), layout.views)
        if memo is not None:
            _CHECKED[memo] = self._index
            while len(_CHECKED) > MEMO_SHARDS:
                _CHECKED.popitem(last=False)

    def _check(self, found: list[tuple[str, dict[str, tuple[int, int]]]]
               ) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        """The member index, checked against the manifest: video count, then each video's
        ``.json`` key at its index."""
        layout = self.layout
        if len(found) != layout.videos:
            raise ShardError(f"{self.path}: holds {len(found)} videos, the manifest lists "
                             f"{layout.videos} (a tar cut short or extended)")
        for i, (member, parts) in enumerate(found):
            if "json" not in parts:
                raise ShardError(f"{self.path}: video {layout.keys[i]!r}: member {member} has "
                                 "no .json")
            offset, size = parts["json"]
            if size > MAX_JSON_BYTES:
                raise ShardError(f"{self.path}: member {member}.json is {size} bytes, more "
                                 "than a video's metadata can be")
            key = _meta(self._tar.read(offset, size), member, self.path).get("key")
            if key != layout.keys[i]:
                raise ShardError(f"{self.path}: member {member}.json holds video {key!r}, the "
                                 f"manifest has {layout.keys[i]!r} at index {i}")
        return found

    @property
    def keys(self) -> list[str]:
        return list(self.layout.keys)

    def release(self) -> None:
        """Close the tar's file handle (reopened by the next read)."""
        self._tar.close()

    def _member(self, index: int, view: str) -> tuple[str, tuple[int, int]]:
        """(what, (offset, size)) of video ``index``'s tokens member for ``view``."""
        self.layout.check_view(view)
        j = self.layout.views.index(view)
        member, ext = self._index.names[index], self._index.exts[j]
        what = f"video {self.layout.keys[index]!r} ({member}.{ext})"
        offset, size = (int(x) for x in self._index.table[index, j])
        if offset < 0:
            raise ShardError(f"{self.path}: {what} is missing: no tokens for view {view}")
        return what, (offset, size)

    def _array(self, index: int, view: str, raw: Any) -> np.ndarray:
        what, _ = self._member(index, view)
        member = self._index.names[index]
        ext = member_extension(self.layout.views, view)
        arr = token_array(raw, f"{self.path}: member {member}.{ext}")
        self.layout.check_array(arr, what, int(self.layout.frames[index]))
        return arr

    def read_all(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        data = memoryview(self._tar.whole())
        arrays = []
        for i in range(self.layout.videos):
            _, (offset, size) = self._member(i, view)
            arrays.append(self._array(i, view, data[offset:offset + size]))
        flat = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
        offsets = self.layout.offsets()
        self.layout.check_flat_ids(flat, offsets, view)
        self._whole.add(view)
        return flat, offsets

    def check(self, view: str) -> None:
        """Check the whole view once (structure and every id); later clip reads of it skip the
        per-read id check."""
        self.read_all(view)

    def read(self, index: int, view: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        frames = int(self.layout.frames[index])
        start = min(max(start, 0), frames)
        stop = frames if stop is None else min(max(stop, start), frames)
        _, (offset, size) = self._member(index, view)
        body = self._body_offset(index, view)
        if body is None:                                 # not the writer's header: decode whole
            clip = self._array(index, view, self._tar.read(offset, size))[start:stop]
        else:
            h, w = self.layout.grid
            raw = self._tar.read(body + 2 * h * w * start, 2 * h * w * (stop - start))
            clip = np.frombuffer(raw, "<u2").reshape(stop - start, h, w)
        if view not in self._whole:                      # else all its ids were checked once
            self.layout.check_ids(clip, index, view, start)
        return clip

    def _body_offset(self, index: int, view: str) -> int | None:
        """Where video ``index``'s tokens start in the tar, when its member holds the writer's
        plain ``.npy`` header declaring exactly the manifest's uint16 [frames, H, W]."""
        if (index, view) not in self._headers:
            _, (offset, size) = self._member(index, view)
            head = bytes(self._tar.read(offset, min(size, 256)))
            found = None
            if head[:8] == b"\x93NUMPY\x01\x00":
                length = int.from_bytes(head[8:10], "little")
                match = _NPY_U16_3D.fullmatch(head[10:10 + length])
                want = (int(self.layout.frames[index]), *self.layout.grid)
                if match is not None and tuple(int(g) for g in match.groups()) == want \
                        and size == 10 + length + 2 * want[0] * want[1] * want[2]:
                    found = offset + 10 + length
            self._headers[(index, view)] = found
        return self._headers[(index, view)]


class _PlainTarOnly(Exception):
    """A tar feature the fast reader leaves to :mod:`tarfile` (pax or GNU headers...)."""


def _tar_members(tar: TarBytes, label: str) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of a tar. The writer's plain USTAR tars
    are walked header by header; anything else goes through tarfile (read whole)."""
    try:
        return _ustar_members(tar, label)
    except _PlainTarOnly:
        pass
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(tar.whole())), mode="r:") as archive:
            return [(info.name, info.offset_data, info.size) for info in archive
                    if info.isfile()]
    except tarfile.TarError as exc:
        raise ShardError(f"{label}: broken tar: {exc}") from None


def _ustar_members(tar: TarBytes, label: str) -> list[tuple[str, int, int]]:
    out, pos = [], 0
    while pos + 512 <= tar.size:
        header = bytes(tar.read(pos, 512))
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
        if end > tar.size:
            raise ShardError(f"{label}: broken tar: member at byte {pos} is cut short")
        if kind in (b"0", b"\0", b"7"):
            full = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
            out.append((full, start, size))
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


FORMAT = Format(name="webdataset", folder="wds", suffix=".tar", random_access=True, write=write,
                open=TarShard,
                describe="one plain tar per shard (webdataset layout): streamed whole, or clips "
                         "read by member offset")
