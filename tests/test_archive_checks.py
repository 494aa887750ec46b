"""An archive whose checksums match is still checked: one test per kind of wrong archive.

Each test damages an archive the way a buggy tool or an attacker with write access would, then
re-signs the checksums in the manifest, so only the readers' own checks stand between the damage
and the training loop. Every case must end in one ArchiveError line naming archive, shard and
video (exit 2 on the command line), never a traceback and never silently wrong data.
"""

from __future__ import annotations

import io
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import resign, tar_members, write_tar, write_token_archive

from vimpac.archive import Archive, ArchiveError, ShardError, open_archives, verify
from vimpac.cli import cli
from vimpac.common.config import ConfigError
from vimpac.config import load_pipeline
from vimpac.data.inputs import collect_inputs
from vimpac.pretrain.data import ClipStream, StreamSpec

SHARD = "shard-w00000-000000"
CODEBOOK = 64


def manifest_path(root: Path) -> Path:
    (path,) = (root / "manifests").glob("*.json")
    return path


def edit_manifest(root: Path, change: Any) -> None:
    path = manifest_path(root)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def stream(root: Path | list[Path], fmt: str = "zarr", **kw: Any) -> list[np.ndarray]:
    roots = root if isinstance(root, list) else [root]
    spec = StreamSpec(frames=3, grid=8, batch_size=1, pad_id=CODEBOOK + 1, fmt=fmt,
                      shuffle_buffer=1, **kw)
    return list(ClipStream(roots, spec).epoch_batches(0, 0, 1))


def pretrain_cli(root: Path, tmp_path: Path, *sets: str) -> Any:
    args = ["-q", "--set", "pretrain.model=tiny", "--set", "pretrain.frames=3",
            "--set", "pretrain.grid=8", "--set", "pretrain.batch_size=2",
            "--set", "pretrain.micro_batch=2", "--set", "pretrain.steps=1",
            "--set", "pretrain.num_workers=0", "--set", "pretrain.proj_hidden=16", *sets,
            "pretrain", str(root), "--out", str(tmp_path / "run")]
    return CliRunner().invoke(cli, args)


def one_error_line(result: Any) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return write_token_archive(tmp_path / "arch", videos=4, per_shard=4, frames=(3, 6),
                               codebook=CODEBOOK)


def set_zarr_tokens(root: Path, transform: Any) -> None:
    import zarr

    group = zarr.open_group(str(root / "zarr" / f"{SHARD}.zarr"), mode="a")
    arr = group["tokens/s1_center"]
    arr[:] = transform(np.asarray(arr[:]))
    resign(root)


# ------------------------------------------------------------------------------------- token ids

@pytest.mark.parametrize("bad_id", [CODEBOOK, CODEBOOK + 1, CODEBOOK + 4, 9000])
@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_token_ids_at_or_above_the_codebook_size_are_refused_naming_the_video(
        archive: Path, fmt: str, bad_id: int) -> None:
    if fmt == "zarr":
        second = Archive(archive).entries[1]
        first_frame = Archive(archive).entries[0].frames

        def poke(tokens: np.ndarray) -> np.ndarray:
            tokens[first_frame + 1, 2, 3] = bad_id       # frame 1 of the second video
            return tokens
        set_zarr_tokens(archive, poke)
        assert second.key == "v0001"
    else:
        tar = archive / "wds" / f"{SHARD}.tar"
        members = tar_members(tar)
        name = f"{SHARD}_000001.tokens.npy"
        tokens = np.load(io.BytesIO(members[name])).copy()
        tokens[0, 2, 3] = bad_id
        members[name] = npy(tokens)
        write_tar(tar, members)
        resign(archive)
    assert verify(archive).ok                             # the checksums were re-signed
    problems = verify(archive, deep=True).problems
    assert len(problems) == 1 and f"{SHARD}" in problems[0] and "v0001" in problems[0]
    assert f"token id {bad_id} at frame {1 if fmt == 'zarr' else 0}" in problems[0]
    assert "not below the codebook size 64" in problems[0]
    with pytest.raises(ShardError, match=f"v0001.*token id {bad_id}"):
        stream(archive, fmt)
    with pytest.raises(ShardError, match=f"token id {bad_id}"):
        Archive(archive).read_video("v0001", fmt=fmt)


def test_token_ids_out_of_range_end_pretrain_with_one_line(archive: Path,
                                                           tmp_path: Path) -> None:
    def poke(tokens: np.ndarray) -> np.ndarray:
        tokens[0, 0, 0] = 60000
        return tokens
    set_zarr_tokens(archive, poke)
    line = one_error_line(pretrain_cli(archive, tmp_path))
    assert SHARD in line and "v0000" in line and "token id 60000" in line


# --------------------------------------------------------------------------- several archives

@pytest.mark.parametrize(("change", "what"), [
    ({"fingerprint": "other-tokenizer"}, "tokenizer"),
    ({"codebook": 128}, "codebook size"),
    ({"grid": 10}, "token grid"),
])
def test_every_archive_of_a_run_must_agree_with_the_first(tmp_path: Path, change: dict,
                                                          what: str) -> None:
    first = write_token_archive(tmp_path / "first", videos=2, codebook=CODEBOOK)
    second = write_token_archive(tmp_path / "second", videos=2, codebook=CODEBOOK)
    third = write_token_archive(tmp_path / "third", videos=2, **{"codebook": CODEBOOK, **change})
    with pytest.raises(ArchiveError, match=f"third: {what} .* differs from .*first"):
        open_archives([first, second, third])
    with pytest.raises(ArchiveError, match=f"third: {what}"):
        stream([first, second, third])


# ------------------------------------------------------------------------------- webdataset tars

def test_a_sample_whose_grid_differs_from_the_archive_is_refused(tmp_path: Path) -> None:
    root = write_token_archive(tmp_path / "arch", videos=3, per_shard=3, frames=(4, 4),
                               formats=("webdataset",), codebook=CODEBOOK)
    tar = root / "wds" / f"{SHARD}.tar"
    members = tar_members(tar)
    members[f"{SHARD}_000002.tokens.npy"] = npy(np.zeros((4, 6, 6), np.uint16))
    write_tar(tar, members)
    resign(root)
    with pytest.raises(ShardError, match=r"v0002.*uint16\[4, 6, 6\], expected uint16\[4, 8, 8\]"):
        stream(root, "webdataset")


def test_a_json_without_tokens_member_is_refused(tmp_path: Path) -> None:
    root = write_token_archive(tmp_path / "arch", videos=3, per_shard=3,
                               formats=("webdataset",), codebook=CODEBOOK)
    tar = root / "wds" / f"{SHARD}.tar"
    members = tar_members(tar)
    del members[f"{SHARD}_000001.tokens.npy"]
    write_tar(tar, members)
    resign(root)
    with pytest.raises(ShardError, match="v0001.*no tokens for view s1_center"):
        stream(root, "webdataset")


@pytest.mark.parametrize("keep", [0, 1, 2, 3])
def test_a_tar_cut_at_a_member_boundary_is_refused_not_read_short(tmp_path: Path,
                                                                   keep: int) -> None:
    root = write_token_archive(tmp_path / "arch", videos=4, per_shard=4,
                               formats=("webdataset",), codebook=CODEBOOK)
    tar = root / "wds" / f"{SHARD}.tar"
    members = tar_members(tar)
    write_tar(tar, dict(list(members.items())[:2 * keep]))      # whole videos only
    resign(root)
    assert verify(root).ok
    (problem,) = verify(root, deep=True).problems
    assert f"holds {keep} videos, the manifest lists 4" in problem
    with pytest.raises(ShardError, match=f"{SHARD}.tar: holds {keep} videos"):
        stream(root, "webdataset")


def test_a_tar_whose_videos_were_reordered_is_refused(tmp_path: Path) -> None:
    root = write_token_archive(tmp_path / "arch", videos=2, per_shard=2, frames=(4, 4),
                               formats=("webdataset",), codebook=CODEBOOK)
    tar = root / "wds" / f"{SHARD}.tar"
    members = tar_members(tar)
    names = list(members)
    swapped = {names[2]: members[names[0]], names[3]: members[names[1]],
               names[0]: members[names[2]], names[1]: members[names[3]]}
    write_tar(tar, {n: swapped[n] for n in names})
    resign(root)
    with pytest.raises(ShardError, match="holds video 'v0001', the manifest has 'v0000'"):
        stream(root, "webdataset")


# ------------------------------------------------------------------------------------ zarr shards

def _rewrite_offsets(root: Path, offsets: list[int]) -> None:
    import zarr

    group = zarr.open_group(str(root / "zarr" / f"{SHARD}.zarr"), mode="a")
    del group["offsets"]
    arr = group.create_array("offsets", shape=(len(offsets),), dtype="int64",
                             chunks=(len(offsets),))
    arr[:] = np.asarray(offsets, np.int64)
    resign(root)


@pytest.mark.parametrize(("make", "message"), [
    (lambda o: [o[0], o[2], o[1], *o[3:]], "offsets give"),            # not increasing
    (lambda o: [*o, o[-1] + 1], "the manifest lists 4 videos"),         # too many
    (lambda o: [*o[:-1], o[-1] + 50], "offsets give"),                  # past the end
    (lambda o: [3, *o[1:]], "offsets must start at 0"),                 # not from 0
])
def test_zarr_offsets_that_disagree_with_the_manifest_are_refused(archive: Path, make: Any,
                                                                   message: str) -> None:
    offsets = [int(x) for x in Archive(archive).open_shard(SHARD, "zarr").offsets]
    _rewrite_offsets(archive, make(offsets))
    with pytest.raises(ShardError, match=message):
        stream(archive)
    assert any(message in p for p in verify(archive, deep=True).problems)


def test_a_zarr_array_declaring_400m_frames_is_refused_before_allocating(archive: Path) -> None:
    meta_path = archive / "zarr" / f"{SHARD}.zarr" / "tokens" / "s1_center" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] = 400_000_000
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 400_000_000
    meta["codecs"][0]["configuration"]["chunk_shape"][0] = 400_000_000
    meta_path.write_text(json.dumps(meta))
    resign(archive)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, hard))        # 12 GiB would fail loudly
    try:
        start = time.monotonic()
        with pytest.raises(ShardError, match=r"declares \[400000000, 8, 8\]"):
            stream(archive)
        assert time.monotonic() - start < 5
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_zarr_chunks_out_of_proportion_are_refused(tmp_path: Path) -> None:
    import zarr

    root = write_token_archive(tmp_path / "arch", videos=2, per_shard=2, frames=(4, 4),
                               formats=("zarr",), codebook=CODEBOOK)
    group = zarr.open_group(str(root / "zarr" / f"{SHARD}.zarr"), mode="a")
    data = np.asarray(group["tokens/s1_center"][:])
    del group["tokens/s1_center"]
    arr = group.create_array("tokens/s1_center", shape=data.shape, dtype="uint16",
                             chunks=(1_000_000, 8, 8))
    arr[:] = data
    resign(root)
    with pytest.raises(ShardError, match="out of proportion"):
        stream(root)


# ------------------------------------------------------------------------------------- manifests

@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["shards"][0].update(videos="4"), r"shards\[0\]\.videos: expected an integer"),
    (lambda d: d["videos"][1].update(frames=[5]), r"videos\[1\]\.frames: expected an integer"),
    (lambda d: d["settings"].update(grid=[8]), r"settings\.grid: expected \[H, W\]"),
    (lambda d: d["settings"].update(codebook_size=10**6), r"codebook_size: expected an integer"),
    (lambda d: d.update(videos={"a": 1}), "videos: expected a list"),
    (lambda d: d["videos"][0].update(key="../../etc/passwd"), r"videos\[0\]\.key: expected a "
                                                              "relative name"),
    (lambda d: d["videos"][0].update(key="/abs/key"), r"videos\[0\]\.key"),
    (lambda d: d["shards"][0].update(name="../escape"), r"shards\[0\]\.name: expected a plain"),
    (lambda d: d["shards"][0]["files"]["zarr"].update({"/etc/passwd": "0" * 64}),
     "expected a relative path inside"),
    (lambda d: d["shards"][0]["files"]["zarr"].update({"zarr/../../x": "0" * 64}),
     "no '..'"),
    (lambda d: d["shards"][0]["files"]["zarr"].update({"wds/other.tar": "0" * 64}),
     "is not inside the shard's zarr entry"),
    (lambda d: d["videos"][2].update(index=7), "video indices"),
    (lambda d: d["shards"][0].update(frames=1), "manifest lists 4 videos / 1 frames"),
    (lambda d: d.update(worker=3), "worker: expected an integer in 0..0"),
])
def test_malformed_manifests_are_one_line_errors(archive: Path, tmp_path: Path, change: Any,
                                                 message: str) -> None:
    edit_manifest(archive, change)
    with pytest.raises(ArchiveError, match=message):
        Archive(archive)
    assert verify(archive).problems and message.split(":")[0].replace("\\", "") in \
        verify(archive).problems[0].replace("\\", "")
    one_error_line(pretrain_cli(archive, tmp_path))


@pytest.mark.parametrize("text", [
    "[" * 10_000 + "]" * 10_000,
    '{"format": "vimpac-token-archive", "format_version": 1, "worker": ' + "9" * 5000 + "}",
    '{"format": "vimpac-token-archive", "format_version": NaN}',
])
def test_deeply_nested_or_huge_manifests_are_one_line_errors(archive: Path, tmp_path: Path,
                                                             text: str) -> None:
    manifest_path(archive).write_text(text)
    start = time.monotonic()
    with pytest.raises(ArchiveError, match="manifest"):
        Archive(archive)
    assert time.monotonic() - start < 1
    one_error_line(pretrain_cli(archive, tmp_path))


def test_a_shard_with_an_empty_checksum_list_is_not_verified(archive: Path) -> None:
    edit_manifest(archive, lambda d: d["shards"][0]["files"].update(zarr={}))
    problems = verify(archive).problems
    assert len(problems) == 1 and "records no checksums" in problems[0] and SHARD in problems[0]
    with pytest.raises(ShardError, match="records no checksums"):
        stream(archive)
    edit_manifest(archive, lambda d: d["shards"][0]["files"].pop("zarr"))
    assert "records no checksums" in verify(archive).problems[0]


def test_a_shard_file_linked_outside_the_archive_is_refused(archive: Path,
                                                           tmp_path: Path) -> None:
    chunk = next(p for p in sorted((archive / "zarr").rglob("c/*")) if p.is_file())
    outside = tmp_path / "outside.bin"
    shutil.copy(chunk, outside)
    chunk.unlink()
    chunk.symlink_to(outside)
    assert "links outside the archive" in verify(archive).problems[0]


# ------------------------------------------------------------------------------ keys and configs

def test_list_files_may_name_videos_anywhere_but_keys_stay_relative(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "videos").mkdir()
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "videos" / name).write_bytes(b"\0")
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text(f"../videos/a.mp4 0\n{tmp_path}/videos/b.mp4 1\n./../videos/./a.mp4 0\n")
    found = collect_inputs([str(listing)])
    assert sorted(v.key for v in found.videos) == sorted(
        ["videos/a", f"{str(tmp_path).lstrip('/')}/videos/b"])          # a.mp4 named twice
    for video in found.videos:
        assert not video.key.startswith("/") and ".." not in video.key.split("/")


def test_pipeline_names_that_would_leave_the_runs_folder_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"../../evil": {}}}))
    with pytest.raises(ConfigError, match=r"pipeline name '\.\./\.\./evil'"):
        load_pipeline("../../evil", path)


@pytest.mark.parametrize(("text", "message"), [
    ("a: &a [x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
               for p, c in zip("abcdefgh", "bcdefghi", strict=True))
     + "pipelines: {demo: {description: *i}}\n", "aliases"),
    ("pipelines: {demo: {pretrain: {steps: " + "9" * 5000 + "}}}\n", "integer"),
    ("pipelines: {demo: {description: " + "[" * 10_000 + "]" * 10_000 + "}}\n", "nest"),
])
def test_hostile_configs_end_in_one_line_within_a_second(tmp_path: Path, text: str,
                                                         message: str) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        load_pipeline("demo", path)
    assert time.monotonic() - start < 1.0
    result = CliRunner().invoke(cli, ["--config", str(path), "config", "show"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert time.monotonic() - start < 2.0
