"""The zarr format: one zarr v3 group per shard, random access to any clip.

    zarr/<shard>.zarr/
        tokens/<view>   uint16 [frames, H, W]   all videos of the shard concatenated on frames,
                                                one zarr shard of zstd inner chunks
        offsets         int64 [videos + 1]      video i is frames offsets[i]:offsets[i + 1]
        (attributes: format, format_version, keys, views)

Reading: shards in exactly the layout written here are decoded directly (about twice as fast as
through zarr's async machinery for whole shards; a clip costs one ``pread`` and one inner-chunk
decode instead of milliseconds of zarr overhead, and the last chunk decoded is kept for the next
clip); any other valid zarr v3 layout is read through zarr. Only zarr v3
is opened, so no v2 object codec (pickle) can be reached. Declared shapes are checked against the
manifest before anything is allocated or decoded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vimpac.archive.errors import ShardError
from vimpac.archive.formats.base import Format, ShardContent, ShardLayout, ShardSource
from vimpac.archive.manifest import FORMAT_NAME, FORMAT_VERSION, TOKEN_DTYPE

_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}


# ----------------------------------------------------------------------------------------- write

def write(content: ShardContent, dest: Path) -> None:
    """Build the shard's zarr v3 group in the new local folder ``dest``."""
    import zarr
    from zarr.codecs import ZstdCodec

    group = zarr.open_group(str(dest), mode="w", zarr_format=3)
    lengths = [r.frames for r in content.records]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    h, w = content.grid
    chunk = max(1, min(content.chunk_frames, total))
    shard_frames = chunk * max(1, -(-total // chunk))
    for view in content.views:
        arr = group.create_array(
            f"tokens/{view}", shape=(total, h, w), dtype="uint16", chunks=(chunk, h, w),
            shards=(shard_frames, h, w), compressors=[ZstdCodec(level=content.zstd_level)])
        arr[:] = np.concatenate([t[view] for t in content.tokens], axis=0)
    off = group.create_array("offsets", shape=offsets.shape, dtype="int64", chunks=offsets.shape)
    off[:] = offsets
    group.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                        "keys": [r.key for r in content.records], "views": content.views})


# ------------------------------------------------------------------------------------------ read

class ZarrShard:
    """Random access to the videos of one zarr shard, checked against the manifest's layout."""

    def __init__(self, source: ShardSource, layout: ShardLayout) -> None:
        self.source, self.layout, self.path = source, layout, source.label
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        self._whole: set[str] = set()                    # views whose every id was checked
        self._direct: dict[str, _DirectView | None] = {}
        self._last: tuple[str, int, np.ndarray] | None = None     # the last chunk decoded
        offsets = self._offsets_direct()
        if offsets is None:
            offsets = self._offsets_via_zarr()
        layout.check_offsets(offsets)
        self.offsets = offsets
        keys = self._attr_keys()
        if keys is not None and keys != list(layout.keys):
            i = next(i for i in range(len(keys) + 1)
                     if i == len(keys) or i == layout.videos or keys[i] != layout.keys[i])
            raise ShardError(f"{self.path}: the shard's video keys differ from the manifest's "
                             f"at index {i} ({keys[i:i + 1]} vs {list(layout.keys[i:i + 1])})")

    @property
    def keys(self) -> list[str]:
        return list(self.layout.keys)

    def __len__(self) -> int:
        return self.layout.videos

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    # -- opening
    @property
    def group(self) -> Any:
        if self._group is None:
            import zarr

            store = self.source.local if self.source.local is not None else _memory_store(
                self.source.files or {})
            try:                  # zarr v3 only: no v2 object codecs (pickle) can be reached
                self._group = zarr.open_group(str(store) if isinstance(store, Path) else store,
                                              mode="r", zarr_format=3)
            except Exception as exc:  # zarr raises many kinds on broken metadata
                raise ShardError(f"{self.path}: cannot open zarr shard: {_one_line(exc)}") \
                    from None
        return self._group

    def _meta(self, key: str) -> dict[str, Any] | None:
        """A zarr.json parsed, or None when it cannot be read as JSON."""
        try:
            meta = json.loads(bytes(self.source.raw(key)))
        except (OSError, KeyError, ValueError, RecursionError):
            return None
        return meta if isinstance(meta, dict) else None

    def _attr_keys(self) -> list[str] | None:
        meta = self._meta("zarr.json")
        keys = (meta or {}).get("attributes", {}).get("keys") if isinstance(
            (meta or {}).get("attributes"), dict) else None
        return [str(k) for k in keys] if isinstance(keys, list) else None

    def _offsets_direct(self) -> np.ndarray | None:
        """The offsets decoded without zarr when in the writer's layout (one zstd chunk)."""
        from numcodecs import Zstd

        meta = self._meta("offsets/zarr.json")
        if meta is None:
            return None
        codecs = meta.get("codecs", [])
        if not (_plain_meta(meta, "int64", 1) and isinstance(codecs, list)
                and meta["chunk_grid"]["configuration"]["chunk_shape"] == meta["shape"]
                and len(codecs) == 2 and codecs[0] == _BYTES_LE
                and isinstance(codecs[1], dict) and codecs[1].get("name") == "zstd"):
            return None
        if meta["shape"] != [self.layout.videos + 1]:
            raise ShardError(f"{self.path}: offsets declare {meta['shape']} entries, the "
                             f"manifest lists {self.layout.videos} videos")
        try:
            raw = Zstd().decode(bytes(self.source.raw("offsets/c/0")))
        except (OSError, KeyError, ValueError, RuntimeError, TypeError):
            return None
        if len(raw) != 8 * meta["shape"][0]:
            return None
        return np.frombuffer(raw, "<i8").astype(np.int64)

    def _offsets_via_zarr(self) -> np.ndarray:
        try:
            arr = self.group["offsets"]
        except ShardError:
            raise
        except Exception as exc:
            raise ShardError(f"{self.path}: cannot open zarr shard: {_one_line(exc)}") from None
        if tuple(arr.shape) != (self.layout.videos + 1,) or arr.dtype != np.int64:
            raise ShardError(f"{self.path}: offsets are {arr.dtype}{list(arr.shape)}, the "
                             f"manifest lists {self.layout.videos} videos (expected int64 "
                             f"[{self.layout.videos + 1}])")
        return np.asarray(_guarded(self.path, "offsets", lambda: arr[:]))

    def array(self, view: str) -> Any:
        """The zarr array of ``view``, its dtype and declared shape checked: uint16
        [frames, H, W] with the manifest's frames and grid."""
        if view not in self._arrays:
            self.layout.check_view(view)
            try:
                arr = self.group[f"tokens/{view}"]
            except ShardError:
                raise
            except Exception as exc:
                raise ShardError(f"{self.path}: cannot open view {view!r}: {_one_line(exc)}") \
                    from None
            want = (self.layout.total_frames, *self.layout.grid)
            if arr.dtype != TOKEN_DTYPE or tuple(arr.shape) != want:
                raise ShardError(f"{self.path}: tokens/{view} is {arr.dtype}{list(arr.shape)}, "
                                 f"expected uint16{list(want)} (token arrays must be uint16 "
                                 "on the archive's grid)")
            chunks, shards = tuple(arr.chunks), tuple(arr.shards or arr.chunks)
            if chunks[1:] != want[1:] or shards[1:] != want[1:] or \
                    not _bounded_chunks(want[0], chunks[0], shards[0], 2 * want[1] * want[2]):
                raise ShardError(f"{self.path}: tokens/{view} has chunks {list(chunks)} in "
                                 f"shards {list(shards)}, out of proportion to its shape "
                                 f"{list(want)} (refused before allocating them)")
            self._arrays[view] = arr
        return self._arrays[view]

    def release(self) -> None:
        """Drop the decoded chunk kept for the next clip (the reader stays usable)."""
        self._last = None

    # -- reading
    def read(self, index: int, view: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        base, end = int(self.offsets[index]), int(self.offsets[index + 1])
        start = min(max(start, 0), end - base)
        stop = end - base if stop is None else min(max(stop, start), end - base)
        self.layout.check_view(view)
        clip = self._read_direct(view, base + start, base + stop)
        if clip is None:
            arr = self.array(view)
            clip = np.asarray(_guarded(self.path, view, lambda: arr[base + start: base + stop]))
        if view not in self._whole:                      # else all its ids were checked once
            self.layout.check_ids(clip, index, view, start)
        return clip

    def check(self, view: str) -> None:
        """Check the whole view once (structure and every id); later clip reads of it skip the
        per-read id check."""
        self.read_all(view)

    def _read_direct(self, view: str, first: int, last: int) -> np.ndarray | None:
        """Frames ``first:last`` of ``view`` from the inner chunks that hold them, decoded
        without zarr (the last chunk decoded is kept); None when the shard is not in the
        writer's layout or a chunk is not as expected (zarr's path then reads or names it)."""
        direct = self._direct_view(view)
        if direct is None:
            return None
        chunk = direct.chunk
        pieces = []
        for ci in range(first // chunk, (last - 1) // chunk + 1 if last > first else 0):
            data = self._chunk(view, direct, ci)
            if data is None:
                return None
            lo, hi = max(first - ci * chunk, 0), min(last - ci * chunk, chunk)
            pieces.append(data[lo:hi])
        if not pieces:
            return np.empty((0, *self.layout.grid), TOKEN_DTYPE)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _direct_view(self, view: str) -> _DirectView | None:
        if view not in self._direct:
            self._direct[view] = self._open_direct(view)
        return self._direct[view]

    def _writer_view(self, view: str) -> tuple[int, int, int, tuple[int, int]] | None:
        """(frames, inner chunk, shard frames, grid) of ``view`` when its zarr.json is in the
        writer's layout, checked against the manifest before anything is allocated; None for
        any other layout (zarr's path then reads it, or refuses it by name)."""
        meta = self._meta(f"tokens/{view}/zarr.json")
        layout = _writer_layout(meta) if meta is not None else None
        if layout is None:
            return None
        frames, chunk, shard, (h, w) = layout
        if frames != self.layout.total_frames or (h, w) != self.layout.grid:
            raise ShardError(f"{self.path}: tokens/{view} declares [{frames}, {h}, {w}], the "
                             f"manifest records [{self.layout.total_frames}, "
                             f"{self.layout.grid[0]}, {self.layout.grid[1]}]")
        if not _bounded_chunks(frames, chunk, shard, 2 * h * w):
            return None
        return frames, chunk, shard, (h, w)

    def _open_direct(self, view: str) -> _DirectView | None:
        layout = self._writer_view(view)
        if layout is None:
            return None
        frames, chunk, shard, (h, w) = layout
        name = f"tokens/{view}/c/0/0/0"
        size = _size(self.source, name)
        index_bytes = 16 * (shard // chunk)              # (offset, nbytes) uint64 per chunk
        if size is None or size < index_bytes + 4:
            return None
        raw = _read_range(self.source, name, size - index_bytes - 4, index_bytes)
        if raw is None or len(raw) != index_bytes:
            return None
        index = np.frombuffer(raw, "<u8").reshape(-1, 2)[:-(-frames // chunk)].astype(np.int64)
        return _DirectView(name, chunk, (h, w), index, size - index_bytes - 4)

    def _chunk(self, view: str, direct: _DirectView, ci: int) -> np.ndarray | None:
        if self._last is not None and self._last[:2] == (view, ci):
            return self._last[2]
        from numcodecs import Zstd

        offset, nbytes = (int(x) for x in direct.index[ci])
        if offset < 0 or nbytes < 0 or offset + nbytes > direct.data_end:
            return None                                  # missing chunk (fill value): use zarr
        raw = _read_range(self.source, direct.file, offset, nbytes)
        try:
            data = Zstd().decode(raw) if raw is not None else None
        except (RuntimeError, ValueError, TypeError):
            return None                                  # let zarr name the problem
        h, w = direct.grid
        if data is None or len(data) != direct.chunk * h * w * 2:
            return None
        array = np.frombuffer(data, "<u2").reshape(direct.chunk, h, w)
        self._last = (view, ci, array)
        return array

    def read_all(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        self.layout.check_view(view)
        flat = self._read_all_direct(view)
        if flat is None:
            arr = self.array(view)
            flat = np.asarray(_guarded(self.path, view, lambda: arr[:]))
        self.layout.check_array(flat, f"tokens/{view}", self.layout.total_frames)
        self.layout.check_flat_ids(flat, self.offsets, view)
        self._whole.add(view)
        return flat, self.offsets

    def _read_all_direct(self, view: str) -> np.ndarray | None:
        """The whole view decoded without zarr when in the writer's layout; None otherwise."""
        from numcodecs import Zstd

        layout = self._writer_view(view)
        if layout is None:
            return None
        frames, chunk, shard, (h, w) = layout
        try:
            data = self.source.raw(f"tokens/{view}/c/0/0/0")
        except (OSError, KeyError):
            return None
        index_bytes = 16 * (shard // chunk)              # (offset, nbytes) uint64 per chunk
        if len(data) < index_bytes + 4:
            return None
        index = np.frombuffer(data[len(data) - index_bytes - 4:len(data) - 4], "<u8")
        index = index.reshape(-1, 2)
        count = -(-frames // chunk)
        out = np.empty((count * chunk, h, w), TOKEN_DTYPE)
        codec, size = Zstd(), chunk * h * w * 2
        for i, (offset, nbytes) in enumerate(index[:count].tolist()):
            if offset + nbytes > len(data) - index_bytes - 4:
                return None                              # missing chunk (fill value): use zarr
            try:
                raw = codec.decode(data[offset:offset + nbytes])
            except (RuntimeError, ValueError, TypeError):
                return None                              # let zarr name the problem
            if len(raw) != size:
                return None
            out[i * chunk:(i + 1) * chunk] = np.frombuffer(raw, "<u2").reshape(chunk, h, w)
        return out[:frames]


@dataclass(frozen=True)
class _DirectView:
    """Where a view's inner chunks lie in its one zarr shard file (the writer's layout)."""
    file: str                  # relative to the shard entry
    chunk: int                 # frames per inner chunk
    grid: tuple[int, int]
    index: np.ndarray          # int64 [chunks, 2]: (offset, nbytes) per inner chunk
    data_end: int              # where the shard index starts: no chunk may reach past it


def _size(source: ShardSource, name: str) -> int | None:
    """Bytes of file ``name`` of the shard entry; None when it cannot be read."""
    if source.local is not None:
        try:
            return os.stat(source.local / name).st_size
        except OSError:
            return None
    files = source.files or {}
    return len(files[name]) if name in files else None


def _read_range(source: ShardSource, name: str, offset: int, size: int) -> bytes | None:
    """``size`` bytes at ``offset`` of file ``name`` (by offset on a local disk)."""
    if source.local is not None:
        try:
            fd = os.open(source.local / name, os.O_RDONLY)
        except OSError:
            return None
        try:
            return os.pread(fd, size, offset)
        except OSError:
            return None
        finally:
            os.close(fd)
    data = (source.files or {}).get(name)
    return None if data is None else bytes(memoryview(data)[offset:offset + size])


CHUNK_BYTES_ALLOWED = 64 << 20     # a chunk may exceed its array's data by this much, no more


def _bounded_chunks(frames: int, chunk: int, shard: int, frame_bytes: int) -> bool:
    """Chunks in proportion to the data they hold, so decoding one cannot allocate far more
    than the array: a chunk no larger than the array's data (or 64 MiB), a shard less than
    one chunk past the end."""
    limit = max(frames * frame_bytes, CHUNK_BYTES_ALLOWED)
    return 0 < chunk and chunk * frame_bytes <= limit and chunk <= shard < max(frames, 1) + chunk


def _guarded(label: str, what: str, read: Any) -> Any:
    """Run a zarr read; decoding errors of a corrupt shard become one ShardError line."""
    try:
        return read()
    except ShardError:
        raise
    except Exception as exc:  # zarr / numcodecs raise many kinds on corrupt chunks
        raise ShardError(f"{label}: cannot read {what}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _memory_store(files: dict[str, bytes]) -> Any:
    from zarr.core.buffer import cpu
    from zarr.storage import MemoryStore

    return MemoryStore({k: cpu.Buffer.from_bytes(v) for k, v in files.items()}, read_only=True)


def _plain_meta(meta: dict[str, Any], dtype: str, ndim: int) -> bool:
    """An array's zarr.json is v3, ``dtype``, ``ndim``-D, fill 0, default '/' chunk keys."""
    shape = meta.get("shape")
    grid = meta.get("chunk_grid")
    grid = grid.get("configuration", {}) if isinstance(grid, dict) else {}
    grid = grid.get("chunk_shape") if isinstance(grid, dict) else None
    return (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
            and meta.get("data_type") == dtype and meta.get("fill_value") == 0
            and not meta.get("storage_transformers")
            and isinstance(shape, list) and len(shape) == ndim
            and all(isinstance(s, int) and s >= 0 for s in shape)
            and isinstance(grid, list) and len(grid) == ndim
            and all(isinstance(g, int) and g > 0 for g in grid)
            and meta.get("chunk_key_encoding") == {"name": "default",
                                                   "configuration": {"separator": "/"}})


def _writer_layout(meta: dict[str, Any]) -> tuple[int, int, int, tuple[int, int]] | None:
    """(frames, inner chunk frames, shard frames, (H, W)) when an array's zarr.json is exactly
    what :func:`write` writes: uint16 [frames, H, W] in one shard of zstd inner chunks, little
    endian, index at the end; None for anything else."""
    if not _plain_meta(meta, "uint16", 3):
        return None
    shape, codecs = meta["shape"], meta.get("codecs", [])
    grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
    if not (grid[1:] == shape[1:] and grid[0] >= shape[0] and isinstance(codecs, list)
            and len(codecs) == 1 and isinstance(codecs[0], dict)
            and codecs[0].get("name") == "sharding_indexed"):
        return None
    conf = codecs[0].get("configuration", {})
    conf = conf if isinstance(conf, dict) else {}
    inner = conf.get("chunk_shape")
    inner_codecs = conf.get("codecs", [])
    if not (isinstance(inner, list) and len(inner) == 3 and inner[1:] == shape[1:]
            and isinstance(inner[0], int) and inner[0] > 0 and grid[0] % inner[0] == 0
            and conf.get("index_location") == "end"
            and conf.get("index_codecs") == [_BYTES_LE, {"name": "crc32c"}]
            and isinstance(inner_codecs, list) and len(inner_codecs) == 2
            and inner_codecs[0] == _BYTES_LE and isinstance(inner_codecs[1], dict)
            and inner_codecs[1].get("name") == "zstd"):
        return None
    return shape[0], inner[0], grid[0], (shape[1], shape[2])


FORMAT = Format(name="zarr", folder="zarr", suffix=".zarr", random_access=True, write=write,
                open=ZarrShard,
                describe="zarr v3 group per shard (sharding codec + zstd): any clip by random "
                         "access")
