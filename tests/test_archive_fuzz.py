"""Fuzzing the archive readers: mutate shards and manifests, re-sign the checksums, read.

Every example copies a small two-format archive, damages it (a tar cut at a member boundary, a
flipped byte in any shard file, new offsets, another dtype or shape, out-of-range ids, hostile
manifest values and paths), recomputes the manifest's checksums as an attacker with write access
would, and reads everything back. The outcome must be one of:

* an :class:`ArchiveError` (one line, exit 2 on the command line), and ``verify --deep`` names a
  problem too; or
* complete, valid data: every video of the manifest, uint16 on the manifest's frames and grid, ids
  below the codebook size, equal to the original unless the mutation changed token values.

Anything else (another exception: exit 3; fewer videos than the manifest: silent loss) fails.
Examples are derandomized, so the file is deterministic.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import resign, tar_members, write_tar, write_token_archive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vimpac.archive import Archive, ArchiveError, verify

FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CODEBOOK = 64
SHARD = "shard-w00000-000000"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = write_token_archive(tmp_path_factory.mktemp("fuzz") / "arch", videos=3, per_shard=3,
                               frames=(2, 5), grid=4, codebook=CODEBOOK)
    archive = Archive(root)
    return root, {e.key: archive.read_video(e.key) for e in archive.entries}


@pytest.fixture
def fresh(pristine: tuple[Path, dict], tmp_path: Path):
    """A function giving a fresh copy of the pristine archive per hypothesis example."""
    count = iter(range(10**9))

    def copy() -> Path:
        return Path(shutil.copytree(pristine[0], tmp_path / f"copy{next(count)}"))
    return copy


def manifest(root: Path) -> Path:
    return next((root / "manifests").glob("*.json"))


def check_outcome(root: Path, original: dict[str, np.ndarray], values_may_change: bool) -> None:
    """Correct data or ArchiveError, consistently with verify --deep; never anything else."""
    try:
        archive = Archive(root)
        got = {fmt: {e.key: archive.read_video(e.key, fmt=fmt) for e in archive.entries}
               for fmt in archive.settings.formats}
        whole = {fmt: [archive.read_shard(n, v, fmt) for n in archive.shard_names()
                       for v in archive.settings.view_names] for fmt in archive.settings.formats}
    except ArchiveError as exc:
        assert "\n" not in str(exc)
        assert not verify(root, deep=True).ok, f"readers refused ({exc}) but verify passed"
        return
    assert verify(root, deep=True).ok
    settings_ = archive.settings
    for fmt, videos in got.items():
        assert sorted(videos) == sorted(e.key for e in archive.entries), "silent loss"
        for entry in archive.entries:
            tokens = videos[entry.key]
            assert tokens.dtype == np.uint16
            assert tokens.shape == (entry.frames, *settings_.grid)
            assert int(tokens.max(initial=0)) < settings_.codebook_size
            if not values_may_change and entry.key in original:
                np.testing.assert_array_equal(tokens, original[entry.key])
        for flat, offsets in whole[fmt]:
            assert flat.shape[0] == offsets[-1] == sum(e.frames for e in archive.entries)


# ------------------------------------------------------------------------------------ mutations

def tar_path(root: Path) -> Path:
    return root / "wds" / f"{SHARD}.tar"


def shard_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "zarr").rglob("*") if p.is_file()) + [tar_path(root)]


@given(keep=st.integers(0, 12), end_blocks=st.booleans())
@FUZZ
def test_tar_cut_at_every_member_boundary(fresh, pristine, keep: int, end_blocks: bool) -> None:
    root = fresh()
    with tarfile.open(tar_path(root)) as tar:
        infos = [m for m in tar if m.isfile()]
    data = tar_path(root).read_bytes()
    cut = infos[keep].offset if keep < len(infos) else len(data)
    if not end_blocks or keep < len(infos):
        tar_path(root).write_bytes(data[:cut] + (b"\0" * 1024 if end_blocks else b""))
    resign(root)
    check_outcome(root, pristine[1], values_may_change=False)


@given(file_index=st.integers(0, 100), position=st.integers(0, 10**6), value=st.integers(0, 255))
@FUZZ
def test_byte_flips_in_any_shard_file(fresh, pristine, file_index: int, position: int,
                                      value: int) -> None:
    root = fresh()
    files = shard_files(root)
    target = files[file_index % len(files)]
    data = bytearray(target.read_bytes())
    if data:
        data[position % len(data)] = value
    target.write_bytes(bytes(data))
    resign(root)
    check_outcome(root, pristine[1], values_may_change=True)


@given(offsets=st.lists(st.integers(-5, 40), min_size=0, max_size=7))
@FUZZ
def test_any_offsets(fresh, pristine, offsets: list[int]) -> None:
    import zarr

    root = fresh()
    group = zarr.open_group(str(root / "zarr" / f"{SHARD}.zarr"), mode="a")
    del group["offsets"]
    arr = group.create_array("offsets", shape=(len(offsets),), dtype="int64",
                             chunks=(max(len(offsets), 1),))
    if offsets:
        arr[:] = np.asarray(offsets, np.int64)
    resign(root)
    check_outcome(root, pristine[1], values_may_change=False)


@given(dtype=st.sampled_from(["uint8", "int16", "int32", "uint32", "float32", "uint16"]),
       frames=st.integers(0, 30), side=st.integers(1, 6), fmt=st.sampled_from(["zarr", "wds"]),
       member=st.integers(0, 2))
@FUZZ
def test_other_dtypes_and_shapes(fresh, pristine, dtype: str, frames: int, side: int, fmt: str,
                                 member: int) -> None:
    import zarr

    root = fresh()
    array = (np.arange(frames * side * side) % CODEBOOK).astype(dtype).reshape(frames, side, side)
    if fmt == "zarr":
        group = zarr.open_group(str(root / "zarr" / f"{SHARD}.zarr"), mode="a")
        del group["tokens/s1_center"]
        arr = group.create_array("tokens/s1_center", shape=array.shape, dtype=dtype,
                                 chunks=(max(frames, 1), side, side))
        arr[:] = array
    else:
        _replace_member(root, f"{SHARD}_{member:06d}.tokens.npy", _npy(array))
    resign(root)
    check_outcome(root, pristine[1], values_may_change=True)


@given(value=st.integers(0, 65535), frame=st.integers(0, 12), fmt=st.sampled_from(["zarr", "wds"]))
@FUZZ
def test_any_token_id(fresh, pristine, value: int, frame: int, fmt: str) -> None:
    import zarr

    root = fresh()
    if fmt == "zarr":
        arr = zarr.open_group(str(root / "zarr" / f"{SHARD}.zarr"), mode="a")["tokens/s1_center"]
        data = np.asarray(arr[:])
        data.reshape(-1)[frame % data.size] = value
        arr[:] = data
    else:
        name = f"{SHARD}_{frame % 3:06d}.tokens.npy"
        with tarfile.open(tar_path(root)) as tar:
            data = np.load(io.BytesIO(tar.extractfile(name).read())).copy()
        data.reshape(-1)[frame % data.size] = value
        _replace_member(root, name, _npy(data))
    resign(root)
    check_outcome(root, pristine[1], values_may_change=True)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
              st.sampled_from(["", "..", "../../etc/passwd", "/abs", "zarr/../x", "a\0b",
                               "shard-w00000-000000", "s1_center", "ok", "failed", "x" * 5000,
                               "zarr", "webdataset", "0" * 64])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


@given(pick=st.integers(0, 10**6), value=json_values, drop=st.booleans())
@FUZZ
def test_any_manifest_value(fresh, pristine, pick: int, value: Any, drop: bool) -> None:
    root = fresh()
    path = manifest(root)
    data = json.loads(path.read_text())
    paths = _paths(data)[1:]
    where = paths[pick % len(paths)]
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    if drop and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    path.write_text(json.dumps(data))
    check_outcome(root, pristine[1], values_may_change=False)


@given(rel=st.sampled_from(["../outside", "/etc/passwd", "zarr/../../x", "wds/other.tar",
                            "zarr/shard-w00000-000000.zarr/../../escape", "", "."]),
       fmt=st.sampled_from(["zarr", "webdataset"]))
@FUZZ
def test_hostile_file_paths_in_the_manifest(fresh, pristine, rel: str, fmt: str) -> None:
    root = fresh()
    path = manifest(root)
    data = json.loads(path.read_text())
    files = data["shards"][0]["files"][fmt]
    first = next(iter(files))
    files[rel] = files.pop(first)
    path.write_text(json.dumps(data))
    check_outcome(root, pristine[1], values_may_change=False)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _replace_member(root: Path, name: str, data: bytes) -> None:
    members = tar_members(tar_path(root))
    members[name] = data
    write_tar(tar_path(root), members)
