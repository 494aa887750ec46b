"""The tokenize job: mixed good/bad inputs, resume after kill -9, scale-out, verify."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_test_video

from vimpac.archive import Archive, ChecksumError, read_tokens, verify
from vimpac.common.video import decode_video
from vimpac.config import TokenizeConfig
from vimpac.tokenize.job import collect_inputs, decode_specs, run_tokenize, worker_of
from vimpac.tokenize.tokenizer import encode_frames, load_tokenizer

CFG = dict(fps=4.0, shorter_side=32, size=32, decode_workers=0, videos_per_shard=2,
           chunk_frames=4, batch_frames=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    make_test_video(root / "a.mp4", seconds=1.0)
    make_test_video(root / "sub" / "b.webm", seconds=1.5, codec="libvpx-vp9", size=(48, 64))
    make_test_video(root / "c.avi", seconds=2.0, codec="mpeg4", source="mandelbrot",
                    size=(80, 60), audio=True)
    make_test_video(root / "d.mp4", seconds=0.5, fps=25, size=(33, 21))
    (root / "notes.txt").write_text("not an input: wrong extension inside a folder\n")
    (root / "text.mp4").write_text("just some text\n")
    (root / "empty.avi").write_bytes(b"")
    good = (root / "a.mp4").read_bytes()
    (root / "trunc.mp4").write_bytes(good[: len(good) // 3])
    (root / "playlist.mp4").write_text("#EXTM3U\n#EXTINF:1,\na.mp4\n")
    return root


GOOD = {"a": 4, "sub/b": 6, "c": 8, "d": 2}
BAD = {"text", "empty", "trunc", "playlist"}


def tokenize(inputs, tokenizer, out, **overrides):
    cfg = TokenizeConfig(**{**CFG, **overrides})
    return run_tokenize([str(i) for i in inputs], tokenizer, out, cfg)


def test_mixed_folder_good_in_bad_named(corpus, tiny_tokenizer, tmp_path):
    summary = tokenize([corpus], tiny_tokenizer, tmp_path / "arch")
    assert summary.ok == len(GOOD) and summary.failed == len(BAD)
    failed = {Path(p).stem: reason for p, reason in summary.failures}
    assert set(failed) == BAD and all(failed.values())
    archive = Archive(tmp_path / "arch")
    assert {e.key: e.frames for e in archive.entries} == GOOD
    assert {r.key for r in archive.failed} == BAD
    for key, frames in GOOD.items():
        zarr_tokens = read_tokens(tmp_path / "arch", key)
        assert zarr_tokens.shape == (frames, 4, 4) and zarr_tokens.dtype == np.uint16
        assert (zarr_tokens == read_tokens(tmp_path / "arch", key, fmt="webdataset")).all()
    assert verify(tmp_path / "arch").ok


def test_rerun_does_nothing_and_inputs_twice_once(corpus, tiny_tokenizer, tmp_path):
    first = tokenize([corpus / "a.mp4", corpus / "a.mp4", corpus], tiny_tokenizer,
                     tmp_path / "arch")
    assert first.ok == len(GOOD)
    again = tokenize([corpus], tiny_tokenizer, tmp_path / "arch")
    assert again.nothing_to_do and again.ok == 0 and again.skipped == len(GOOD) + len(BAD)


def test_append_new_videos(corpus, tiny_tokenizer, tmp_path):
    tokenize([corpus / "a.mp4"], tiny_tokenizer, tmp_path / "arch")
    summary = tokenize([corpus / "a.mp4", corpus / "c.avi"], tiny_tokenizer, tmp_path / "arch")
    assert (summary.ok, summary.skipped) == (1, 1)
    assert {e.key for e in Archive(tmp_path / "arch").entries} == {"a", "c"}


def test_views_and_flip(corpus, tiny_tokenizer, tmp_path):
    tokenize([corpus / "c.avi"], tiny_tokenizer, tmp_path / "arch", crops=["top", "bottom"],
             hflip=True, scales=[1.0, 1.25])
    archive = Archive(tmp_path / "arch")
    assert len(archive.settings.views) == 8
    shard = archive.open_shard(archive.entries[0].shard, "zarr")
    views = {v: shard.read(0, v) for v in archive.settings.view_names}
    assert len({v.tobytes() for v in views.values()}) == 8     # every view differs


def test_multi_view_tokens_equal_each_view_decoded_alone(corpus, tiny_tokenizer, tmp_path):
    # the job decodes all views of a video in one ffmpeg run (decode threads on)
    views = dict(crops=["top", "center", "bottom"], hflip=True, scales=[1.0, 1.5],
                 decode_workers=2)
    videos = {"c": corpus / "c.avi", "b": corpus / "sub" / "b.webm", "d": corpus / "d.mp4"}
    tokenize(videos.values(), tiny_tokenizer, tmp_path / "arch", **views)
    archive = Archive(tmp_path / "arch")
    specs = decode_specs(TokenizeConfig(**{**CFG, **views}), archive.settings.views)
    model = load_tokenizer(tiny_tokenizer)
    assert len(specs) == 12 and {e.key for e in archive.entries} == set(videos)
    for entry in archive.entries:
        shard = archive.open_shard(entry.shard, "zarr")
        for name, spec in zip(archive.settings.view_names, specs, strict=True):
            alone = encode_frames(model, decode_video(videos[entry.key], spec), batch_size=32)
            np.testing.assert_array_equal(shard.read(entry.index, name), alone)


def test_two_workers_read_as_one(corpus, tiny_tokenizer, tmp_path):
    keys = {worker_of(k, 2) for k in GOOD}
    assert keys == {0, 1}, "fixture keys should split over both workers"
    for index in (0, 1):
        run_tokenize([str(corpus)], tiny_tokenizer, tmp_path / "arch",
                     TokenizeConfig(**CFG), worker_index=index, num_workers=2)
    archive = Archive(tmp_path / "arch")
    assert {e.key for e in archive.entries} == set(GOOD)
    assert len(list((tmp_path / "arch" / "manifests").glob("*.json"))) == 2
    single = tmp_path / "single"
    tokenize([corpus], tiny_tokenizer, single)
    for key in GOOD:
        assert (read_tokens(tmp_path / "arch", key) == read_tokens(single, key)).all()


def test_webdataset_shard_is_plain_tar_of_npy(corpus, tiny_tokenizer, tmp_path):
    import io
    import tarfile

    tokenize([corpus / "a.mp4"], tiny_tokenizer, tmp_path / "arch")
    (tar_path,) = (tmp_path / "arch" / "wds").glob("*.tar")
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        npy = [n for n in names if n.endswith(".tokens.npy")]
        arr = np.load(io.BytesIO(tar.extractfile(npy[0]).read()), allow_pickle=False)
        meta = json.loads(tar.extractfile(npy[0].replace(".tokens.npy", ".json")).read())
    assert arr.dtype == np.uint16 and arr.shape == (4, 4, 4) and meta["key"] == "a"
    import zarr

    group = zarr.open_group(str(next((tmp_path / "arch" / "zarr").iterdir())), mode="r")
    assert group["tokens/s1_center"].shape == (4, 4, 4)
    assert list(group["offsets"][:]) == [0, 4]


def test_verify_names_corrupt_shard(corpus, tiny_tokenizer, tmp_path):
    tokenize([corpus], tiny_tokenizer, tmp_path / "arch")
    tar = sorted((tmp_path / "arch" / "wds").glob("*.tar"))[1]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0x01
    tar.write_bytes(bytes(data))
    report = verify(tmp_path / "arch")
    assert not report.ok and len(report.problems) == 1 and tar.name in report.problems[0]
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        Archive(tmp_path / "arch").read_shard(tar.stem, "s1_center", "webdataset")


def test_other_settings_refused(corpus, tiny_tokenizer, tmp_path):
    tokenize([corpus / "a.mp4"], tiny_tokenizer, tmp_path / "arch")
    with pytest.raises(Exception, match="other settings"):
        tokenize([corpus / "a.mp4"], tiny_tokenizer, tmp_path / "arch", fps=2.0)


def test_symlink_leaving_tree_is_refused(corpus, tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    shutil.copy(corpus / "a.mp4", root / "inside.mp4")
    os.symlink(corpus / "c.avi", root / "escape.mp4")
    found = collect_inputs([str(root)])
    assert [v.key for v in found.videos] == ["inside"]
    assert len(found.rejected) == 1 and "leaves the input tree" in found.rejected[0][1]


def _cli(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "vimpac", "-q", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill9_then_resume_is_bitwise_identical(corpus, tiny_tokenizer, tmp_path):
    sets = ["--set", "tokenize.fps=4", "--set", "tokenize.shorter_side=32",
            "--set", "tokenize.size=32", "--set", "tokenize.videos_per_shard=1",
            "--set", "tokenize.decode_workers=1"]
    reference = tmp_path / "ref"
    proc = _cli([*sets, "tokenize", str(corpus), "--tokenizer", str(tiny_tokenizer),
                 "--out", str(reference)], tmp_path)
    proc.communicate(timeout=300)
    for delay in (0.5, 2.0, 3.5):
        out = tmp_path / f"killed{delay}"
        proc = _cli([*sets, "tokenize", str(corpus), "--tokenizer", str(tiny_tokenizer),
                     "--out", str(out)], tmp_path)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        rerun = _cli([*sets, "tokenize", str(corpus), "--tokenizer", str(tiny_tokenizer),
                      "--out", str(out)], tmp_path)
        rerun.communicate(timeout=300)
        assert rerun.returncode == 1                       # the broken inputs are still listed
        ref, got = Archive(reference), Archive(out)
        assert {e.key for e in got.entries} == set(GOOD)
        assert {n: s.files for n, s in got.shards.items()} == \
            {n: s.files for n, s in ref.shards.items()}    # same bytes, shard by shard
        assert verify(out).ok


def test_rerun_removes_its_own_stale_temporary_files(corpus, tiny_tokenizer, tmp_path):
    """A run killed mid-write leaves `.name.random.tmp` files; the next run of the same worker
    removes its own (shards, manifest, config) and leaves other workers' alone."""
    out = tmp_path / "arch"
    mine = ["zarr/.shard-w00000-000003.ab12.tmp", "wds/.shard-w00000-000001.tar.x1.tmp",
            "manifests/.worker-00000-of-00002.json.k3.tmp", "config/.tokenize-w00000.yaml.q.tmp"]
    theirs = ["wds/.shard-w00001-000000.tar.z9.tmp", "config/.tokenize-w00001.yaml.r.tmp"]
    for rel in mine + theirs:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"half written")
    run_tokenize([str(corpus / "a.mp4")], tiny_tokenizer, out, TokenizeConfig(**CFG),
                 worker_index=0, num_workers=2)
    assert [rel for rel in mine if (out / rel).exists()] == []
    assert [rel for rel in theirs if (out / rel).exists()] == theirs
