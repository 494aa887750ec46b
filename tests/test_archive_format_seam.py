"""Adding a shard format is one module and one FORMATS entry: a toy format (one .npz file per
shard), defined here and registered in the table, is written, streamed, read and verified by the
archive's own writer, readers and verify, with no other change."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import write_token_archive

from vimpac.archive import FORMATS, Archive, ShardError, verify
from vimpac.archive.formats import Format, ShardContent, ShardLayout, ShardSource
from vimpac.pretrain.data import ClipStream, StreamSpec


def write(content: ShardContent, dest: Path) -> None:
    arrays = {f"tokens_{view}": np.concatenate([t[view] for t in content.tokens])
              for view in content.views}
    frames = [r.frames for r in content.records]
    arrays["offsets"] = np.concatenate([[0], np.cumsum(frames)]).astype(np.int64)
    with open(dest, "wb") as fh:
        np.savez(fh, **arrays)


class NpzShard:
    def __init__(self, source: ShardSource, layout: ShardLayout) -> None:
        self.layout = layout
        try:
            self.arrays = dict(np.load(io.BytesIO(source.raw("")), allow_pickle=False))
        except (ValueError, OSError) as exc:
            raise ShardError(f"{layout.label}: not an npz shard ({exc})") from None
        self.offsets = self.arrays.get("offsets", np.zeros(0, np.int64))
        layout.check_offsets(self.offsets)

    def read_all(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        self.layout.check_view(view)
        flat = self.arrays[f"tokens_{view}"]
        self.layout.check_array(flat, view, self.layout.total_frames)
        self.layout.check_flat_ids(flat, self.offsets, view)
        return flat, self.offsets

    def read(self, index: int, view: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        flat, offsets = self.read_all(view)
        return flat[offsets[index]:offsets[index + 1]][start:stop]

    def check(self, view: str) -> None:
        self.read_all(view)


NPZ = Format(name="npz", folder="npz", suffix=".npz", random_access=False, write=write,
             open=NpzShard, describe="one .npz per shard (a test format)")


@pytest.fixture
def with_npz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FORMATS, "npz", NPZ)


def test_a_format_added_to_the_table_is_written_read_and_verified(with_npz: None,
                                                                  tmp_path: Path) -> None:
    both = write_token_archive(tmp_path / "both", videos=6, per_shard=4, grid=8,
                               formats=("zarr", "npz"))
    archive = Archive(both)
    assert sorted(p.name for p in (both / "npz").iterdir()) == [
        "shard-w00000-000000.npz", "shard-w00000-000001.npz"]
    for entry in archive.entries:
        np.testing.assert_array_equal(archive.read_video(entry.key, fmt="npz"),
                                      archive.read_video(entry.key, fmt="zarr"))
    spec = StreamSpec(frames=3, grid=8, batch_size=2, pad_id=65, shuffle_buffer=1)
    zarr_batches = list(ClipStream([both], spec).epoch_batches(0, 0, 1))
    spec.fmt = "npz"
    npz_batches = list(ClipStream([both], spec).epoch_batches(0, 0, 1))
    assert len(npz_batches) == 3
    for a, b in zip(zarr_batches, npz_batches, strict=True):
        np.testing.assert_array_equal(a, b)
    report = verify(both, deep=True)
    listed = sum(len(files) for s in archive.shards.values() for files in s.files.values())
    assert report.ok and report.files_checked == listed and report.videos_decoded == 2 * 6
    assert all(len(s.files["npz"]) == 1 for s in archive.shards.values())
