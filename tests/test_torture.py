"""Torture corpus: the tokenize job over a folder of broken, odd and hostile inputs.

The input tree mixes good videos with odd properties (odd size, rotation, variable frame rate, one
frame, names that look like options, protocols or rich markup) with broken ones (truncated,
bit-flipped, random bytes, empty, text, audio only, a frame over MAX_PIXELS, a FIFO) and hostile
ones (HLS and concat playlists, symlinks to a file and to a folder outside the tree). A distinctive
"secret" video lives outside the tree; every hostile input points at it.

The job must finish with exit code 1, tokenize every good file, record every bad one with its
reason, and let no byte from outside the tree into the archive.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_test_video
from media_builders import vfr_args, with_rotation

from vimpac.archive import Archive, read_tokens, verify
from vimpac.cli import cli
from vimpac.common.ffmpeg_exe import ffmpeg_exe
from vimpac.config import TokenizeConfig
from vimpac.tokenize.job import run_tokenize

CONFIG = """\
pipelines:
  torture:
    tokenize:
      fps: 4.0
      shorter_side: 32
      size: 32
      decode_workers: 0
      videos_per_shard: 4
      batch_frames: 64
      chunk_frames: 8
      decode_timeout_s: 60
"""
CFG = TokenizeConfig(fps=4.0, shorter_side=32, size=32, decode_workers=0, videos_per_shard=4,
                     batch_frames=64, chunk_frames=8, decode_timeout_s=60)

# key -> the input's path relative to the tree; all must be tokenized
GOOD = {
    "good/plain": "good/plain.mp4",
    "good/odd_size": "good/odd_size.mp4",
    "good/rotated": "good/rotated.mp4",
    "good/vfr": "good/vfr.mkv",
    "good/one_frame": "good/one_frame.mp4",
    "good/-y": "good/-y.mp4",
    "good/concat:plain.mp4|vfr": "good/concat:plain.mp4|vfr.mkv",
    "good/weird [bold] name": "good/weird [bold] name.webm",
    "dir.mp4/inner": "dir.mp4/inner.mp4",
}
# file name -> a word its failure reason must contain
BAD = {
    "truncated.mp4": "truncated",
    "random.avi": "",
    "empty.mp4": "empty file",
    "x].mp4": "empty file",                 # its path, bad/[/x].mp4, reads as rich markup
    "text.mp4": "text file",
    "audio_only.mp4": "no video stream",
    "huge.mkv": "max_pixels",
    "hls.mp4": "playlist",
    "hls_bom.ts": "playlist",
    "concat.mkv": "concat list",
    "fifo.mp4": "not a regular file",
    "escape.mp4": "leaves the input tree",
    "escdir": "leaves the input tree",
}
MAYBE = {"bad/bitflip"}   # a damaged but maybe partly decodable file: either outcome is fine


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-nostdin", *args], check=True, timeout=60)


def _make_good(tree: Path) -> None:
    good = tree / "good"
    good.mkdir(parents=True)
    make_test_video(good / "plain.mp4", seconds=1.0)
    make_test_video(good / "odd_size.mp4", seconds=1.0, size=(101, 67))
    with_rotation(good / "odd_size.mp4", good / "rotated.mp4", 90)
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25:duration=2", "-vf",
            "select='lt(mod(n\\,5)\\,2)'", *vfr_args(), "-c:v", "libx264", "-preset",
            "ultrafast", "-pix_fmt", "yuv420p", str(good / "vfr.mkv"))
    make_test_video(good / "one_frame.mp4", seconds=0.04, fps=25)
    shutil.copy(good / "vfr.mkv", good / "-y.mp4")
    shutil.copy(good / "plain.mp4", good / "concat:plain.mp4|vfr.mkv")
    make_test_video(good / "weird [bold] name.webm", seconds=0.5, codec="libvpx-vp9")
    (tree / "dir.mp4").mkdir()
    shutil.copy(good / "plain.mp4", tree / "dir.mp4" / "inner.mp4")
    os.symlink("plain.mp4", good / "plain_alias.mp4")             # inside the tree: deduplicated


def _make_bad(tree: Path, secret: Path) -> None:
    bad = tree / "bad"
    bad.mkdir()
    plain = (tree / "good" / "plain.mp4").read_bytes()
    (bad / "truncated.mp4").write_bytes(plain[: len(plain) // 3])
    flipped = bytearray(plain)
    flipped[64::97] = bytes(b ^ 0x5A for b in flipped[64::97])
    (bad / "bitflip.mp4").write_bytes(bytes(flipped))
    (bad / "random.avi").write_bytes(np.random.default_rng(0).bytes(4096))
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "[").mkdir()
    (bad / "[" / "x].mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("My holiday videos are listed below.\n" * 10)
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(bad / "audio_only.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "color=c=black:s=9000x9000,format=monob", "-frames:v", "1",
            "-c:v", "png", str(bad / "huge.mkv"))                  # 81 Mpixel > MAX_PIXELS
    (bad / "hls.mp4").write_text(f"#EXTM3U\n#EXTINF:1.0,\n../../outside/secret.mp4\n"
                                 f"#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n")
    (bad / "hls_bom.ts").write_text(f"\ufeff#EXTM3U\n#EXTINF:1.0,\nfile:{secret}\n")
    (bad / "concat.mkv").write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    os.mkfifo(bad / "fifo.mp4")
    os.symlink(secret, bad / "escape.mp4")
    os.symlink(secret.parent, bad / "escdir")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(input tree, secret video outside it)."""
    base = tmp_path_factory.mktemp("torture")
    (base / "outside").mkdir()
    secret = make_test_video(base / "outside" / "secret.mp4", seconds=1.5, source="mandelbrot",
                             size=(64, 64))
    tree = base / "inputs"
    _make_good(tree)
    _make_bad(tree, secret)
    return tree, secret


@pytest.fixture(scope="module")
def tortured(corpus: tuple[Path, Path], tiny_tokenizer: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The archive of the whole tree, written through the CLI; (archive, click result)."""
    tree, _ = corpus
    work = tmp_path_factory.mktemp("out")
    (work / "pipelines.yaml").write_text(CONFIG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(cli, ["--config", str(work / "pipelines.yaml"), "--pipeline",
                                          "torture", "-q", "tokenize", str(tree), "--tokenizer",
                                          str(tiny_tokenizer), "--out", str(work / "arch")])
    finally:
        torch.set_num_threads(threads)
    return work / "arch", result


def test_job_finishes_with_exit_1_and_a_clean_report(tortured: tuple[Path, object]) -> None:
    root, result = tortured
    assert result.exit_code == 1, (result.output, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr and "failed inputs" in result.output
    assert Archive(root).complete and verify(root).ok


def test_every_good_file_is_tokenized(tortured: tuple[Path, object],
                                      corpus: tuple[Path, Path]) -> None:
    root, _ = tortured
    tree, _ = corpus
    archive = Archive(root)
    ok = {e.key for e in archive.entries}
    assert set(GOOD) <= ok and ok - set(GOOD) <= MAYBE
    for key in GOOD:
        tokens = read_tokens(root, key)
        assert tokens.shape[1:] == (4, 4) and len(tokens) >= 1
    assert np.array_equal(read_tokens(root, "good/concat:plain.mp4|vfr"),
                          read_tokens(root, "good/plain"))        # the file itself, no protocol
    assert len(read_tokens(root, "good/one_frame")) == 1
    assert "good/plain_alias" not in ok                            # same file, tokenized once


def test_every_bad_file_is_reported_with_its_reason(tortured: tuple[Path, object]) -> None:
    root, _ = tortured
    reasons = {Path(r.source).name: r.reason for r in Archive(root).failed}
    assert set(BAD) <= set(reasons) and set(reasons) - set(BAD) <= {"bitflip.mp4"}
    for name, word in BAD.items():
        assert reasons[name] and word in reasons[name].lower(), (name, reasons[name])


def test_nothing_from_outside_the_tree_enters_the_archive(
        tortured: tuple[Path, object], corpus: tuple[Path, Path], tiny_tokenizer: Path,
        tmp_path: Path) -> None:
    root, _ = tortured
    tree, secret = corpus
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_tokenize([str(secret)], tiny_tokenizer, tmp_path / "secret", CFG)
    finally:
        torch.set_num_threads(threads)
    secret_tokens = read_tokens(tmp_path / "secret", "secret")
    archive = Archive(root)
    for entry in archive.entries:
        tokens = read_tokens(root, entry.key)
        assert not (tokens.shape == secret_tokens.shape and np.array_equal(tokens, secret_tokens))
        source = os.path.realpath(archive.records[entry.key].source)
        assert os.path.commonpath([source, os.path.realpath(tree)]) == os.path.realpath(tree)
    assert not [r for r in archive.records.values()
                if r.status == "ok" and os.path.realpath(r.source) == os.path.realpath(secret)]
