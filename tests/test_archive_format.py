"""The webdataset shard reader's fast path (plain USTAR tars, the writer's .npy headers) agrees
with tarfile + np.load, falls back to them for other tars, and names broken input."""

import io
import json
import tarfile

import numpy as np
import pytest
from conftest import write_token_archive

from vimpac.archive import Archive, ArchiveError
from vimpac.archive.formats.wds import parse_wds_bytes


def _reference(data: bytes) -> list[tuple[dict, np.ndarray]]:
    """What tarfile + np.load read from a single-view shard."""
    out, members = [], {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            members[info.name] = tar.extractfile(info).read()
    for name in sorted(n for n in members if n.endswith(".json")):
        stem = name.removesuffix(".json")
        out.append((json.loads(members[name]),
                    np.load(io.BytesIO(members[f"{stem}.tokens.npy"]), allow_pickle=False)))
    return out


def _tar(members: dict[str, bytes], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_fast_reader_equals_tarfile_and_np_load(tmp_path):
    root = write_token_archive(tmp_path / "a", videos=6, per_shard=6, frames=(1, 9))
    archive = Archive(root)
    data = (root / "wds" / f"{archive.shard_names()[0]}.tar").read_bytes()
    got = list(parse_wds_bytes(data, "shard.tar"))
    want = _reference(data)
    assert len(got) == len(want) == 6
    for (meta, views), (ref_meta, ref_tokens) in zip(got, want, strict=True):
        assert meta == ref_meta and np.array_equal(views["s1_center"], ref_tokens)
        assert views["s1_center"].dtype == np.uint16


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_other_tar_flavours_and_long_names_are_read(fmt):
    long = "x" * 120                                  # needs a pax or GNU long-name header
    tokens = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    fortran = np.asfortranarray(tokens)               # another .npy header: np.load reads it
    data = _tar({f"{long}.tokens.npy": _npy(fortran),
                 f"{long}.json": json.dumps({"key": "k", "views": ["v"]}).encode()}, fmt)
    ((meta, views),) = list(parse_wds_bytes(data, "other.tar"))
    assert meta["key"] == "k" and np.array_equal(views["v"], tokens)


def test_broken_tars_and_arrays_are_named():
    good = _tar({"a.tokens.npy": _npy(np.zeros((1, 2, 2), np.uint16)),
                 "a.json": b'{"views": ["v"]}'}, tarfile.USTAR_FORMAT)
    flipped = bytearray(good)
    flipped[10] ^= 0xFF                               # inside the first header's name
    with pytest.raises(ArchiveError, match="bad.tar: broken tar: bad header checksum"):
        list(parse_wds_bytes(bytes(flipped), "bad.tar"))
    with pytest.raises(ArchiveError, match="cut.tar: broken tar"):
        list(parse_wds_bytes(good[:700], "cut.tar"))
    wrong = _tar({"a.tokens.npy": _npy(np.zeros((1, 2, 2), np.float32)),
                  "a.json": b'{"views": ["v"]}'}, tarfile.USTAR_FORMAT)
    with pytest.raises(ArchiveError, match=r"w.tar: member a.tokens.npy holds float32\[1, 2, 2\]"):
        list(parse_wds_bytes(wrong, "w.tar"))
