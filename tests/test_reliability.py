"""Reliability and security: crashes, full disks, unwritable outputs, integrity, safe loading.

What each test checks is listed, promise by promise, in RELIABILITY.md. Crash tests run the real
CLI (``python -m vimpac``) in a subprocess and SIGKILL it at seeded random moments; they are marked
``slow``. Full disks are simulated with ``RLIMIT_FSIZE`` in the child (writes past the limit fail
with EFBIG; SIGXFSZ is ignored so the write fails instead of killing the process).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_test_video, resign, tar_members, write_tar, write_token_archive

from vimpac.archive import Archive, ArchiveError, ChecksumError, verify
from vimpac.archive import reader as archive_reader
from vimpac.archive.formats.wds import parse_wds_bytes
from vimpac.cli import cli
from vimpac.common.checkpoint import CheckpointError, load_checkpoint
from vimpac.common.fileio import atomic_write_json, sha256_file
from vimpac.config import load_pipeline
from vimpac.pretrain.data import ClipStream, StreamSpec
from vimpac.pretrain.export import load_pretrained
from vimpac.pretrain.train import run_pretrain
from vimpac.tokenize.job import run_tokenize
from vimpac.tokenize.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent

PIPELINES = """\
pipelines:
  rel:
    tokenize:
      fps: 4.0
      shorter_side: 32
      size: 32
      decode_workers: 0
      videos_per_shard: 1
      batch_frames: 32
      chunk_frames: 4
    pretrain:
      model: tiny
      frames: 5
      grid: 8
      batch_size: 4
      micro_batch: 2
      steps: 3
      num_workers: 0
      checkpoint_every: 1
      log_every: 1
      proj_hidden: 16
      shuffle_buffer: 4
"""


# ----------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads made these tiny
    runs over 10x slower. (Children get OMP_NUM_THREADS=1 too.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "pipelines.yaml"
    path.write_text(PIPELINES)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    make_test_video(root / "a.mp4", seconds=1.0)
    make_test_video(root / "b.mp4", seconds=1.5, size=(48, 64))
    return root


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_archive(tmp_path_factory.mktemp("tok") / "arch", videos=12, grid=8,
                               frames=(3, 9), codebook=64, per_shard=3)


def _limit_file_size(limit: int | None):
    """preexec_fn: cap the size of any file the child writes (a full disk, portably)."""
    def apply() -> None:
        os.setsid()
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def vimpac_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vimpac", "-q", "--config", str(config), "--pipeline", "rel",
            *map(str, args)]


def run_cli(cmd: list[str], cwd: Path, *, fsize: int | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limit_file_size(fsize))


def error_line(stderr: str) -> str:
    """The single ``error:`` line of a failed command (and no traceback anywhere)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (dot-files included)."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file()}


def shard_files(root: Path) -> dict[str, str]:
    return {k: v for k, v in tree(root).items() if k.startswith(("zarr/", "wds/"))}


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def tokenize_cfg(config_file: Path) -> Any:
    return load_pipeline("rel", config_file).tokenize


def pretrain_cfg(config_file: Path, **changes: Any) -> Any:
    return dataclasses.replace(load_pipeline("rel", config_file).pretrain, **changes)


def backbone_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["backbone"]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metric_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


class Payload:
    """Unpickling this creates ``marker``: proof that code ran while loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


# --------------------------------------------------------------- unwritable output, full disk

def test_payload_really_runs_code(tmp_path: Path) -> None:
    """Sanity check of the planted payload used below: plain pickle does run it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_get_the_permissions_of_the_umask_not_owner_only(umask: int,
                                                                       tmp_path: Path) -> None:
    """A cache shared by a group stays readable by it: atomically written files and the
    tokenizer folder (built in a temporary folder, then renamed) get what open and mkdir would."""
    from vimpac.tokenize.tokenizer import save_tokenizer
    from vimpac.tokenize.vqvae import VQConfig, VQTokenizer

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "stage.json", {"a": 1})
        save_tokenizer(VQTokenizer(VQConfig(codebook_size=16, channels=8, image_size=32)),
                       tmp_path / "tok")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "stage.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "tok").stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "tok").iterdir()} == {
        0o666 & ~umask}


@pytest.mark.parametrize("stage", ["tokenize", "pretrain"])
def test_output_under_a_file_is_a_one_line_error(stage: str, videos: Path, tokens: Path,
                                                 tiny_tokenizer: Path, config_file: Path,
                                                 tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("a regular file\n")
    out = tmp_path / "file.txt" / "sub"
    if stage == "tokenize":
        args = ["tokenize", str(videos), "--tokenizer", str(tiny_tokenizer), "--out", str(out)]
    else:
        args = ["pretrain", str(tokens), "--out", str(out)]
    result = CliRunner().invoke(cli, ["-q", "--config", str(config_file), "--pipeline", "rel",
                                      *args])
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr)
    assert "file.txt/sub" in line and "Not a directory" in line


def _mount_readonly_tmpfs(path: Path) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_read_only_output_is_a_one_line_error(tokens: Path, config_file: Path,
                                              tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    if not _mount_readonly_tmpfs(ro):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        result = CliRunner().invoke(cli, ["-q", "--config", str(config_file), "--pipeline", "rel",
                                          "pretrain", str(tokens), "--out", str(ro / "run")])
    finally:
        subprocess.run(["umount", str(ro)], check=False)
    assert result.exit_code == 2
    assert "Read-only file system" in error_line(result.stderr)


def test_full_disk_during_tokenize_keeps_the_archive_and_resumes(
        videos: Path, tiny_tokenizer: Path, config_file: Path, tmp_path: Path) -> None:
    cfg = tokenize_cfg(config_file)
    reference, out = tmp_path / "reference", tmp_path / "out"
    run_tokenize([str(videos)], tiny_tokenizer, reference, cfg)
    run_tokenize([str(videos / "a.mp4")], tiny_tokenizer, out, cfg)    # shard 0 committed
    before = tree(out)
    # Every webdataset shard is >= 10 KiB (tar records): the next one cannot be written.
    proc = run_cli(vimpac_cmd(config_file, "tokenize", videos, "--tokenizer", tiny_tokenizer,
                              "--out", out), tmp_path, fsize=4096)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert "shard-w00000-000001.tar" in line and "File too large" in line
    assert verify(out).ok and no_temp_files(out)
    assert [e.key for e in Archive(out).entries] == ["a"]
    before = {k: v for k, v in before.items() if not k.startswith("locks/")}  # holder info
    assert {k: v for k, v in tree(out).items() if k in before} == before  # old files untouched
    summary = run_tokenize([str(videos)], tiny_tokenizer, out, cfg)       # space is back
    assert (summary.ok, summary.skipped) == (1, 1)
    assert shard_files(out) == shard_files(reference) and verify(out).ok


def test_full_disk_during_checkpoint_keeps_the_last_one_and_resumes(
        tokens: Path, config_file: Path, tmp_path: Path) -> None:
    cfg = pretrain_cfg(config_file)
    whole = run_pretrain([tokens], cfg, tmp_path / "whole")
    run = tmp_path / "run"
    run_pretrain([tokens], cfg, run, stop_after=1)                      # checkpoint of step 1
    step1 = sha256_file(run / "checkpoints" / "step-000000001.pt")
    # A checkpoint is far above 64 KiB: the step-2 checkpoint cannot be written.
    proc = run_cli(vimpac_cmd(config_file, "pretrain", tokens, "--out", run), tmp_path,
                   fsize=64 * 1024)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert "step-000000002.pt" in line and "File too large" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000001.pt"]
    assert sha256_file(run / "checkpoints" / "step-000000001.pt") == step1
    assert load_checkpoint(run / "checkpoints" / "step-000000001.pt")["step"] == 1
    resumed = run_pretrain([tokens], cfg, run)                          # space is back
    assert resumed.step == whole.step == cfg.steps
    assert_same_tensors(backbone_of(resumed.pretrained), backbone_of(whole.pretrained))
    assert metric_steps(run) == [1, 2, 3]


# ------------------------------------------------------------------------------- archive integrity

def _flip_byte(path: Path, offset: int = -40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _zarr_chunk(root: Path, shard: str) -> Path:
    return next(p for p in sorted((root / "zarr" / f"{shard}.zarr" / "tokens").rglob("*"))
                if p.is_file() and p.name != "zarr.json")


def test_verify_names_every_corrupt_shard(tokens: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tokens, tmp_path / "arch"))
    _flip_byte(_zarr_chunk(root, "shard-w00000-000001"))
    _flip_byte(root / "wds" / "shard-w00000-000002.tar", 600)
    report = verify(root)
    assert len(report.problems) == 2
    assert "shard-w00000-000001" in report.problems[0] and "checksum" in report.problems[0]
    assert "shard-w00000-000002.tar" in report.problems[1]
    result = CliRunner().invoke(cli, ["verify", str(root)])
    assert result.exit_code == 1 and result.stderr.count("corrupt:") == 2
    assert "shard-w00000-000001" in result.stderr and "shard-w00000-000002" in result.stderr


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_corrupt_shard_stops_or_is_skipped_by_setting(fmt: str, tokens: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    root = Path(shutil.copytree(tokens, tmp_path / "arch"))
    bad = "shard-w00000-000001"
    _flip_byte(_zarr_chunk(root, bad) if fmt == "zarr" else root / "wds" / f"{bad}.tar", 600)
    spec = StreamSpec(frames=5, grid=8, batch_size=1, pad_id=65, fmt=fmt, shuffle_buffer=1,
                      shuffle="shard")                 # global mode replaces the shard's videos
    with pytest.raises(ChecksumError, match=bad):
        list(ClipStream([root], spec).epoch_batches(0, 0, 1))
    skip = ClipStream([root], dataclasses.replace(spec, on_corrupt="skip"))
    with caplog.at_level(logging.WARNING, logger="vimpac.pretrain.data"):
        pairs = list(skip.epoch_batches(0, 0, 1))
    assert len(pairs) == 12 - 3                          # every video but the bad shard's three
    assert any("skipping corrupt shard" in r.message and bad in r.message for r in caplog.records)


def test_zarr_checksums_are_checked_once_per_shard(tokens: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = archive_reader.sha256_file
    monkeypatch.setattr(archive_reader, "sha256_file",
                        lambda p: hashed.append(str(p)) or real(p))
    stream = ClipStream([tokens], StreamSpec(frames=5, grid=8, batch_size=1, pad_id=65))
    for epoch in range(3):
        list(stream.epoch_batches(epoch, 0, 1))
    files = [f for s in Archive(tokens).shards.values() for f in s.files["zarr"]]
    assert sorted(hashed) == sorted(str(tokens / f) for f in files)   # each file exactly once


def test_truncated_manifest_is_named(tokens: Path, config_file: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tokens, tmp_path / "arch"))
    (manifest,) = (root / "manifests").glob("*.json")
    manifest.write_bytes(manifest.read_bytes()[:-200])
    with pytest.raises(ArchiveError, match=f"{manifest}.*truncated"):
        Archive(root)
    assert str(manifest) in verify(root).problems[0]
    result = CliRunner().invoke(cli, ["-q", "--config", str(config_file), "--pipeline", "rel",
                                      "pretrain", str(root), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert str(manifest) in error_line(result.stderr)
    manifest.write_bytes(b"\xff\xfe garbage \x00")
    with pytest.raises(ArchiveError, match="corrupt"):
        Archive(root)


# ------------------------------------------------------------------------------------ safe loading

def _rewrite_tar(root: Path, shard: str, change: Any) -> None:
    """Rebuild ``wds/<shard>.tar`` with ``change(members)`` applied and fix the manifest's
    checksums, as an attacker with write access to the archive would."""
    path = root / "wds" / f"{shard}.tar"
    members = tar_members(path)
    change(members)
    write_tar(path, members)
    resign(root)


@pytest.fixture
def wds_archive(tmp_path: Path) -> Path:
    return write_token_archive(tmp_path / "arch", videos=4, per_shard=4, grid=8, frames=(5, 6),
                               formats=("webdataset",))


def _read_all(root: Path) -> list[tuple[dict, dict]]:
    archive = Archive(root)
    shard = archive.shard_names()[0]
    archive.verify_shard(shard, "webdataset")
    tar = root / "wds" / f"{shard}.tar"
    return list(parse_wds_bytes(tar.read_bytes(), str(tar)))


def test_extra_pickle_members_in_a_shard_are_ignored(wds_archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    before = _read_all(wds_archive)
    payload = pickle.dumps(Payload(marker))

    def plant(members: dict[str, bytes]) -> None:
        first = next(iter(members)).split(".")[0]
        for ext in ("pyd", "pickle", "tokens.pickle", "tokens.pth", "json.pyd"):
            members[f"{first}.{ext}"] = payload

    _rewrite_tar(wds_archive, "shard-w00000-000000", plant)
    assert verify(wds_archive).ok                       # checksums were fixed up
    after = _read_all(wds_archive)
    assert [m for m, _ in after] == [m for m, _ in before]
    for (_, a), (_, b) in zip(before, after, strict=True):
        assert all(np.array_equal(a[v], b[v]) for v in a)
    spec = StreamSpec(frames=5, grid=8, batch_size=2, pad_id=65, fmt="webdataset")
    assert len(list(ClipStream([wds_archive], spec).epoch_batches(0, 0, 1))) == 2
    assert not marker.exists()


def test_object_array_in_place_of_tokens_is_refused(wds_archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(marker)
    buf = io.BytesIO()
    np.save(buf, evil, allow_pickle=True)

    def plant(members: dict[str, bytes]) -> None:
        name = next(n for n in members if n.endswith(".tokens.npy"))
        members[name] = buf.getvalue()

    _rewrite_tar(wds_archive, "shard-w00000-000000", plant)
    assert verify(wds_archive).ok
    with pytest.raises(ArchiveError, match=r"shard-w00000-000000\.tar: member .*tokens\.npy"):
        _read_all(wds_archive)
    spec = StreamSpec(frames=5, grid=8, batch_size=2, pad_id=65, fmt="webdataset",
                      shuffle="shard")                 # global mode replaces the shard's videos
    with pytest.raises(ArchiveError, match="not a plain array"):
        list(ClipStream([wds_archive], spec).epoch_batches(0, 0, 1))
    skip = ClipStream([wds_archive], dataclasses.replace(spec, on_corrupt="skip"))
    assert list(skip.epoch_batches(0, 0, 1)) == []        # its only shard skipped, by name
    with pytest.raises(ArchiveError, match="every shard .* was skipped"):
        next(iter(skip))
    assert not marker.exists()


def test_zarr_v2_pickle_codec_shard_is_refused(tmp_path: Path) -> None:
    """A shard swapped for a zarr v2 group whose object codec is pickle is never decoded."""
    import numcodecs

    root = write_token_archive(tmp_path / "arch", videos=2, per_shard=2, formats=("zarr",))
    marker = tmp_path / "pwned"
    shard = root / "zarr" / "shard-w00000-000000.zarr"
    shutil.rmtree(shard)
    (shard / "tokens" / "s1_center").mkdir(parents=True)
    (shard / ".zgroup").write_text('{"zarr_format": 2}')
    (shard / ".zattrs").write_text('{"keys": ["v0000", "v0001"], "views": ["s1_center"]}')
    (shard / "tokens" / ".zgroup").write_text('{"zarr_format": 2}')
    (shard / "tokens" / "s1_center" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None,
        "fill_value": None, "filters": [{"id": "pickle", "protocol": 5}], "order": "C"}))
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(marker)
    (shard / "tokens" / "s1_center" / "0").write_bytes(numcodecs.Pickle().encode(evil))
    resign(root)
    assert verify(root).ok
    with pytest.raises(ArchiveError, match="cannot open zarr shard"):
        Archive(root).open_shard("shard-w00000-000000", "zarr")
    spec = StreamSpec(frames=5, grid=8, batch_size=1, pad_id=65)
    with pytest.raises(ArchiveError, match=str(shard)):
        list(ClipStream([root], spec).epoch_batches(0, 0, 1))
    assert not marker.exists()


def test_pickled_checkpoints_are_refused(tokens: Path, config_file: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = {"step": 9, "model": Payload(marker), "format": "vimpac-pretrained-backbone/1"}
    ckpt = tmp_path / "run" / "checkpoints" / "step-000000009.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(evil, ckpt)                              # pickles the payload object
    with pytest.raises(CheckpointError, match=str(ckpt)):
        run_pretrain([tokens], pretrain_cfg(config_file), tmp_path / "run")
    torch.save(evil, tmp_path / "pretrained.pt")
    with pytest.raises(CheckpointError, match="pretrained.pt"):
        load_pretrained(tmp_path / "pretrained.pt")
    with pytest.raises(CheckpointError, match="pretrained.pt"):
        run_pretrain([tokens], pretrain_cfg(config_file, init_from=str(tmp_path / "pretrained.pt")),
                     tmp_path / "run2")
    result = CliRunner().invoke(cli, ["-q", "--config", str(config_file), "--pipeline", "rel",
                                      "pretrain", str(tokens), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and str(ckpt) in error_line(result.stderr)
    assert not marker.exists()


def test_pickles_in_a_tokenizer_folder_never_run(tiny_tokenizer: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = Path(shutil.copytree(tiny_tokenizer, tmp_path / "tok"))
    for name in ("pytorch_model.bin", "model.pkl", "model.pt"):
        torch.save({"w": Payload(marker)}, folder / name)
    assert load_tokenizer(folder).fingerprint() == load_tokenizer(tiny_tokenizer).fingerprint()
    torch.save({"w": Payload(marker)}, folder / "model.safetensors")
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses it (its own error type)
        load_tokenizer(folder)
    assert not marker.exists()


# ------------------------------------------------------------------------------ kill -9 and resume

def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process, then anything left in its session (orphaned helpers)."""
    proc.kill()
    proc.wait()
    for pid in _session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    members.append(int(entry))
            except OSError:
                continue
    return members


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=_limit_file_size(None))


def _kill_at_random_moments(cmd: list[str], cwd: Path, rng: random.Random, duration: float,
                            kills: int = 3) -> int:
    """Start ``cmd`` and SIGKILL it at a random moment of its expected ``duration``, ``kills``
    times in a row on the same output; returns how many kills landed before it finished (if none
    did, the machine got faster: one more try, early)."""
    landed = 0
    for attempt in range(kills + 1):
        if attempt == kills and landed:
            break
        delay = (rng.uniform(0.35, 0.9) if attempt < kills else 0.3) * duration
        proc = _start(cmd, cwd)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            landed += 1
        _kill_group(proc)
    return landed


def _timed(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = run_cli(cmd, cwd)
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def crash_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    for i in range(10):
        make_test_video(root / f"v{i}.mp4", seconds=1.0 + 0.25 * i, size=(48 + 8 * i, 40))
    (root / "bad.mp4").write_text("not a video\n")
    return root


@pytest.mark.slow
def test_tokenize_kill9_at_random_moments_then_rerun_is_bitwise_identical(
        crash_corpus: Path, tiny_tokenizer: Path, config_file: Path, tmp_path: Path) -> None:
    sets = ["--set", "tokenize.decode_workers=2", "--set", "tokenize.videos_per_shard=2",
            "--set", "tokenize.fps=8", "--set", "tokenize.shorter_side=64",
            "--set", "tokenize.size=64"]                # more work per video: kills land mid-job
    cmd = vimpac_cmd(config_file, *sets, "tokenize", crash_corpus, "--tokenizer",
                     tiny_tokenizer, "--out")
    reference = tmp_path / "reference"
    proc, duration = _timed([*cmd, str(reference)], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]                     # bad.mp4 is reported
    rng = random.Random(1234)
    for trial in range(3):
        out = tmp_path / f"killed{trial}"
        assert _kill_at_random_moments([*cmd, str(out)], tmp_path, rng, duration, kills=2) >= 1
        proc = run_cli([*cmd, str(out)], tmp_path)
        # 1 if bad.mp4 was first met in this rerun, 0 if a killed run recorded it (see
        # test_resumed_tokenize_reports_failures_of_earlier_runs)
        assert proc.returncode in (0, 1), proc.stderr[-2000:]
        got = Archive(out)
        assert shard_files(out) == shard_files(reference)                 # bitwise, shard by shard
        keys = [k for s in got.shard_names() for k in got.open_shard(s, "zarr").keys]
        assert sorted(keys) == sorted(set(keys)) == [f"v{i}" for i in range(10)]  # once each
        assert [r.key for r in got.failed] == ["bad"]
        assert verify(out).ok and no_temp_files(out)


def test_resumed_tokenize_reports_failures_of_earlier_runs(
        videos: Path, tiny_tokenizer: Path, config_file: Path, tmp_path: Path) -> None:
    """A resumed run's exit status must not depend on where the previous run was killed."""
    cfg = tokenize_cfg(config_file)
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video\n")
    first = run_tokenize([str(bad)], tiny_tokenizer, tmp_path / "a", cfg)
    assert [Path(p).name for p, _ in first.failures] == ["bad.mp4"]
    resumed = run_tokenize([str(bad), str(videos / "a.mp4")], tiny_tokenizer, tmp_path / "a",
                           cfg)
    assert resumed.ok == 1
    assert [Path(p).name for p, _ in resumed.failures] == ["bad.mp4"]


@pytest.mark.slow
def test_tokenize_kill9_leaves_no_orphan_decode_workers(crash_corpus: Path, tiny_tokenizer: Path,
                                                        config_file: Path,
                                                        tmp_path: Path) -> None:
    cmd = vimpac_cmd(config_file, "--set", "tokenize.decode_workers=2", "tokenize",
                     crash_corpus, "--tokenizer", tiny_tokenizer, "--out", tmp_path / "out")
    proc = _start(cmd, tmp_path)
    deadline = time.monotonic() + 60
    while len(_session_members(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)                                 # until an ffmpeg decode runs
    assert proc.poll() is None, "the job ended before any decode was seen"
    proc.kill()
    proc.wait()
    time.sleep(5)
    left = _session_members(proc.pid)
    _kill_group(proc)
    names = [open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:200] for p in left
             if os.path.exists(f"/proc/{p}/cmdline")]
    assert not left, f"{len(left)} process(es) outlived the killed job: {names}"


@pytest.mark.slow
def test_pretrain_kill9_at_random_moments_then_resume_is_bitwise_identical(
        tokens: Path, config_file: Path, tmp_path: Path) -> None:
    sets = ["--set", "pretrain.steps=8"]
    whole = tmp_path / "whole"
    proc, duration = _timed(vimpac_cmd(config_file, *sets, "pretrain", tokens, "--out", whole),
                            tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    cmd = vimpac_cmd(config_file, *sets, "pretrain", tokens, "--out", run)
    assert _kill_at_random_moments(cmd, tmp_path, random.Random(99), duration) >= 1
    proc = run_cli(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_tensors(backbone_of(run / "pretrained.pt"), backbone_of(whole / "pretrained.pt"))
    assert metric_steps(run) == list(range(1, 9))        # nothing duplicated, nothing missing
    assert no_temp_files(run)


FINETUNE_SCRIPT = """\
import sys
from vimpac.config import FinetuneConfig
from vimpac.finetune.train import run_finetune
cfg = FinetuneConfig(frames=5, grid=8, fps=4.0, epochs=4, batch_size=4, micro_batch=2,
                     num_workers=0, eval_every=2.0, seed=0, val_fraction=0.2)
run_finetune(sys.argv[1], cfg, sys.argv[2], model_preset="tiny", splits=("train", "val"),
             device="cpu")
"""


@pytest.mark.slow
def test_finetune_kill9_at_random_moments_then_resume_is_bitwise_identical(
        tmp_path: Path) -> None:
    pytest.importorskip("vimpac.finetune.train")
    labels = [i % 2 for i in range(12)]
    splits = [["train"] if i < 8 else ["val"] for i in range(12)]
    root = write_token_archive(tmp_path / "arch", videos=12, grid=8, frames=(5, 9),
                               per_shard=4, labels=labels, splits=splits)
    (manifest,) = (root / "manifests").glob("*.json")
    data = json.loads(manifest.read_text())
    data["settings"]["dataset"] = {"name": "list", "root": str(root), "classes": ["a", "b"]}
    manifest.write_text(json.dumps(data))
    script = tmp_path / "finetune.py"
    script.write_text(textwrap.dedent(FINETUNE_SCRIPT))
    whole = tmp_path / "whole"
    proc, duration = _timed([sys.executable, str(script), str(root), str(whole)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    cmd = [sys.executable, str(script), str(root), str(run)]
    assert _kill_at_random_moments(cmd, tmp_path, random.Random(7), duration) >= 1
    proc = run_cli(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(whole / "final.pt", weights_only=True)["model"]
    b = torch.load(run / "final.pt", weights_only=True)["model"]
    assert_same_tensors(a, b)
    assert metric_steps(run) == metric_steps(whole)
    assert no_temp_files(run)
