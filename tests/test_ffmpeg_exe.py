"""Which ffmpeg vimpac runs: VIMPAC_FFMPEG, else PATH, else the bundled one; any from 4.2 on.

An older one is refused with one line (doctor and every decode path, exit 2 on the command line)
before any video is touched. The tests find ffmpeg through the same hook users get.
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio_ffmpeg
import pytest
from conftest import make_test_video
from media_builders import lavfi

from vimpac import cli as cli_module
from vimpac.cli import cli
from vimpac.common import ffmpeg_exe as exe
from vimpac.common import video
from vimpac.common.video import DecodeSpec

REAL = exe.ffmpeg_exe()  # the binary this test run uses (whatever VIMPAC_FFMPEG / PATH say)


@pytest.fixture(autouse=True)
def fresh_lookup(monkeypatch: pytest.MonkeyPatch):
    """Each test looks ffmpeg up anew, and leaves no cached binary behind."""
    exe.clear_caches()
    yield monkeypatch
    monkeypatch.undo()
    exe.clear_caches()


def _use(monkeypatch: pytest.MonkeyPatch, binary: Path | str) -> None:
    """Point VIMPAC_FFMPEG at ``binary`` (the lookup is cached per process: clear it)."""
    monkeypatch.setenv("VIMPAC_FFMPEG", str(binary))
    exe.clear_caches()


def _fake(tmp_path: Path, first_line: str, lavf: str = "") -> Path:
    """A script answering ``-version`` with ``first_line`` (+ a libavformat line); any other call
    runs the real ffmpeg, so a check that let it through would decode normally."""
    fake = tmp_path / "fake" / "ffmpeg"
    fake.parent.mkdir(exist_ok=True)
    lavf_line = f"libavformat    {lavf} / {lavf}" if lavf else ""
    fake.write_text(f'#!/bin/sh\ncase "$*" in *-version*) printf "%s\\n%s\\n" "{first_line}" '
                    f'"{lavf_line}"; exit 0;; esac\nexec "{REAL}" "$@"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("text, release, too_old", [
    ("ffmpeg version 4.2.2-static https://johnvansickle.com/ffmpeg/  Copyright (c) 2000-2019\n"
     "libavformat    58. 29.100 / 58. 29.100", (4, 2, 2), False),       # imageio-ffmpeg 0.5.1
    ("ffmpeg version 4.4.2-0ubuntu0.22.04.1 Copyright (c) 2000-2021", (4, 4, 2), False),
    ("ffmpeg version 5.1.9-0+deb12u1 Copyright (c) 2000-2026\n"
     "libavformat    59. 27.100 / 59. 27.100", (5, 1, 9), False),       # Debian 12
    ("ffmpeg version 6.1.1-3ubuntu5 Copyright (c) 2000-2023", (6, 1, 1), False),  # Ubuntu 24.04
    ("ffmpeg version 7.1 Copyright (c) 2000-2024", (7, 1), False),
    ("ffmpeg version n9.0.2-17-g2a571b6068-20260930 Copyright (c) 2000-2026\n"
     "libavformat    63.  1.102 / 63.  1.102", (9, 0, 2), False),       # imageio-ffmpeg 0.8.1
    ("ffmpeg version N-113012-gfa1b2c3d4e Copyright (c) 2000-2024\n"
     "libavformat    61.  1.100 / 61.  1.100", None, False),            # a build from git
    ("ffmpeg version 2024-03-14-git-abcdef-full_build Copyright (c) 2000-2024\n"
     "libavformat    60. 22.100 / 60. 22.100", None, False),            # a dated build
    ("ffmpeg version 4.1.6 Copyright (c) 2000-2020\n"
     "libavformat    58. 20.100 / 58. 20.100", (4, 1, 6), True),
    ("ffmpeg version 3.4.8-0ubuntu0.2 Copyright (c) 2000-2020", (3, 4, 8), True),
    ("ffmpeg version N-93000-g0123456 Copyright (c) 2000-2019\n"
     "libavformat    58. 26.101 / 58. 26.101", None, True),             # git, before 4.2
])
def test_version_lines_of_real_builds_are_understood(text: str, release, too_old: bool) -> None:
    build = exe.parse_version(text)
    assert build.recognized and build.release == release and build.too_old is too_old


def test_the_ffmpeg_in_use_is_supported_and_found_where_the_order_says() -> None:
    build = exe.ffmpeg_build()
    assert build.path == REAL and not build.too_old
    assert build.release is None or build.release[:2] >= exe.MIN_VERSION
    expected = ("VIMPAC_FFMPEG" if os.environ.get("VIMPAC_FFMPEG") else
                "PATH" if build.path == _which_ffmpeg() else "imageio-ffmpeg")
    assert build.source == expected


def _which_ffmpeg() -> str | None:
    import shutil

    return shutil.which("ffmpeg")


def test_lookup_order_is_vimpac_ffmpeg_then_path_then_the_bundled_binary(
        fresh_lookup: pytest.MonkeyPatch, tmp_path: Path) -> None:
    on_path = tmp_path / "bin" / "ffmpeg"
    on_path.parent.mkdir()
    on_path.symlink_to(REAL)
    fresh_lookup.delenv("VIMPAC_FFMPEG", raising=False)
    fresh_lookup.setenv("PATH", str(on_path.parent))
    assert exe.locate_ffmpeg() == (str(on_path), "PATH")
    _use(fresh_lookup, REAL)
    assert exe.locate_ffmpeg() == (REAL, "VIMPAC_FFMPEG")
    fresh_lookup.delenv("VIMPAC_FFMPEG")
    fresh_lookup.setenv("PATH", str(tmp_path / "empty"))
    assert exe.locate_ffmpeg() == (imageio_ffmpeg.get_ffmpeg_exe(), "imageio-ffmpeg")
    assert exe.ffmpeg_build().source == "imageio-ffmpeg"     # the bundled one is supported too


def test_tests_make_their_videos_with_the_ffmpeg_users_get(fresh_lookup: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    spy = tmp_path / "spy" / "ffmpeg"
    spy.parent.mkdir()
    spy.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{REAL}" "$@"\n')
    spy.chmod(0o755)
    _use(fresh_lookup, spy)
    make_test_video(tmp_path / "a.mp4", seconds=0.5)              # conftest's helper
    lavfi(tmp_path / "b.mkv", "testsrc2=size=32x32:rate=5:duration=1")  # the corpus builders
    calls = log.read_text()
    assert "a.mp4" in calls and "b.mkv" in calls


def test_an_ffmpeg_older_than_4_2_is_refused_before_any_decoding(
        fresh_lookup: pytest.MonkeyPatch, tmp_path: Path) -> None:
    good = make_test_video(tmp_path / "good.mp4", seconds=0.5)
    _use(fresh_lookup, _fake(tmp_path, "ffmpeg version 4.1.6 Copyright", "58. 20.100"))
    for call in (lambda: video.decode_frames(good, DecodeSpec()),   # refused at the call
                 lambda: video.count_frames(good, 2.0), lambda: video.probe(good)):
        with pytest.raises(exe.FFmpegTooOld) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "4.1.6" in message and "4.2 or newer" in message
        assert "VIMPAC_FFMPEG" in message


def test_a_binary_that_is_not_ffmpeg_is_refused(fresh_lookup: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    _use(fresh_lookup, _fake(tmp_path, "Usage: convert [options]"))
    with pytest.raises(exe.FFmpegNotFound, match="does not look like ffmpeg"):
        exe.ffmpeg_exe()
    _use(fresh_lookup, tmp_path / "missing")
    with pytest.raises(exe.FFmpegNotFound, match="not an executable file"):
        exe.ffmpeg_exe()


def test_doctor_reports_the_ffmpeg_version_and_where_it_came_from(
        cli_runner, monkeypatch: pytest.MonkeyPatch) -> None:
    # a terminal wide enough for no cell to fold, whatever COLUMNS the test runs under
    monkeypatch.setattr(cli_module.out, "width", 400)
    build = exe.ffmpeg_build()
    result = cli_runner.invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert build.version in text and f"from {build.source}" in text and "supported" in text


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_doctor_refuses_a_too_old_ffmpeg_with_one_line(fresh_lookup: pytest.MonkeyPatch,
                                                       cli_runner, tmp_path: Path) -> None:
    _use(fresh_lookup, _fake(tmp_path, "ffmpeg version 4.1.6 Copyright", "58. 20.100"))
    result = cli_runner.invoke(cli, ["doctor"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "REFUSED" in result.output                          # the table says it too
    (line,) = _error_lines(result.output)
    assert "ffmpeg 4.1.6" in line and "too old" in line and "4.2 or newer" in line


def test_tokenize_refuses_a_too_old_ffmpeg_before_any_video(fresh_lookup: pytest.MonkeyPatch,
                                                            cli_runner, tiny_tokenizer: Path,
                                                            tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    make_test_video(tmp_path / "in" / "a.mp4", seconds=0.5)
    _use(fresh_lookup, _fake(tmp_path, "ffmpeg version 3.4.8 Copyright"))
    result = cli_runner.invoke(cli, ["-q", "tokenize", str(tmp_path / "in"), "--tokenizer",
                                     str(tiny_tokenizer), "--out", str(tmp_path / "arch")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = _error_lines(result.output)
    assert "ffmpeg 3.4.8" in line and "too old" in line
    manifests = list((tmp_path / "arch").rglob("*.json")) if (tmp_path / "arch").exists() else []
    assert not any("a.mp4" in m.read_text() for m in manifests)  # no video recorded as failed
