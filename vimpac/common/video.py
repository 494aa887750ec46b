"""Video decoding with ffmpeg: whole videos, streamed in chunks of square RGB frames.

Follows the paper's decoding chain (official code
``VideoDatasetBase.load_video_from_path``):

    fps=<FPS> -> scale so the shorter side = S -> crop out x out at k*(resized-out)/2 -> [hflip]
    -> rawvideo rgb24 piped into numpy

with k = 0 / 1 / 2 for the "top" (top-left) / "center" / "bottom" (bottom-right) crop.
Deliberate differences from the original:

* No ffprobe: :func:`probe` parses the banner that ``ffmpeg -i`` prints (the bundled static
  ffmpeg has no ffprobe). Scale and crop are ffmpeg expressions on the *displayed* frame (after
  autorotation, sample aspect ratio applied), so the graph never needs the probed size, and
  decoding runs without a probe: a file is probed only when ffmpeg fails on it, to name why.
* Several views of one video (crops, flips, scales: :func:`decode_views`) come from one ffmpeg
  run: the source is decoded once and split after the ``fps`` filter.
* One-frame or very short videos for which the ``fps`` filter emits nothing still give one frame
  (the first source frame).
* The input is treated as hostile (this runs over millions of uncurated files):
  :func:`check_input` recognises containers by magic and structure (:data:`CONTAINERS`) and
  refuses unrecognised text files (playlists, concat lists), empty and non-regular files;
  ffmpeg opens only the ``file:`` protocol and only the demuxers in :data:`ALLOWED_DEMUXERS` (no
  hls, dash, concat, image2, avisynth, ...: no input can pull in another file or URL); MOV
  external data references stay off (ffmpeg's default ``enable_drefs=0``); a decoded frame may
  hold at most :data:`MAX_PIXELS` pixels.
* A per-file time limit kills ffmpeg and raises :class:`VideoError`.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import math
import os
import re
import select
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import ffmpeg
import numpy as np

from vimpac.common.errors import VimpacError
from vimpac.common.ffmpeg_exe import ffmpeg_exe, passthrough_option

logger = logging.getLogger(__name__)

# Demuxers ffmpeg may use. None of them reads any file but the one it is given: playlist and
# reference formats (hls, dash, concat, image2, avisynth, dvdvideo, mxf, ...) are left out.
ALLOWED_DEMUXERS: tuple[str, ...] = (
    "mov", "matroska", "webm", "avi", "flv", "mpegts", "mpeg", "mpegvideo", "ogg", "gif", "asf",
    "rm", "nut", "ivf", "obu", "dv", "m4v", "h264", "hevc", "vc1", "mjpeg",
)
MAX_PIXELS = 8192 * 8192  # largest decoded frame accepted (width * height)
CROP_POSITIONS = {"top": 0, "center": 1, "bottom": 2}  # k in the crop offset k*(resized-out)/2
SNIFF_BYTES = 4096  # how much of a file check_input reads
PROBE_TIMEOUT_S = 60.0  # probe's own limit (decode_frames spends from its timeout_s instead)

# Starts of text files that ffmpeg would treat as lists of other files or URLs.
_TEXT_PREFIXES = (b"#extm3u", b"ffconcat", b"file ", b"file:", b"#", b"<", b"[playlist]", b"http:",
                  b"https:")
_GLOBAL_ARGS = ("-hide_banner", "-nostdin", "-nostats", "-v", "error")
_STDERR_LINES = 40  # last lines of ffmpeg's stderr kept for error messages
_PIPE_BYTES = 1 << 20  # ffmpeg's stdout pipe buffer (Linux default 64 KiB, about one frame)


@dataclass(frozen=True)
class DecodeSpec:
    """How to turn a video into frames (one token archive = one spec)."""

    fps: float | None = 2.0  # resample to this frame rate (None = keep every source frame)
    shorter_side: int = 128  # scale so the shorter displayed side equals this, keeping aspect ratio
    size: int = 128  # side of the square crop taken after scaling (<= shorter_side)
    crop: str = "center"  # "top" (top-left), "center" or "bottom" (bottom-right)
    hflip: bool = False  # mirror left-right after cropping

    def __post_init__(self) -> None:
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"DecodeSpec.fps must be a positive number or None, got {self.fps!r}")
        if self.size < 1:
            raise ValueError(f"DecodeSpec.size must be >= 1, got {self.size!r}")
        if self.shorter_side < self.size:
            raise ValueError(f"DecodeSpec.shorter_side ({self.shorter_side}) must be >= size "
                             f"({self.size})")
        if self.crop not in CROP_POSITIONS:
            raise ValueError(f"DecodeSpec.crop must be one of {sorted(CROP_POSITIONS)}, "
                             f"got {self.crop!r}")

    @property
    def frame_bytes(self) -> int:
        """Bytes of one output frame (size * size * 3)."""
        return self.size * self.size * 3


class VideoError(VimpacError):
    """A video that cannot (or must not) be decoded; ``str()`` is ``"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple:
        # Picklable across worker processes although __init__ takes two arguments.
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class VideoInfo:
    """What ``ffmpeg -i`` reports about a file's first real video stream."""

    width: int  # displayed width in pixels (after rotation; storage pixels, SAR not applied)
    height: int  # displayed height in pixels (after rotation)
    fps: float | None  # the stream's frame rate (average, or tbr), None when unknown
    duration: float | None  # container duration in seconds, None when unknown
    rotation: int  # display rotation, degrees counter-clockwise (ffmpeg's convention), 0..359
    has_video: bool  # a video stream that is not a cover picture / thumbnail
    has_audio: bool
    container: str  # ffmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"


# ----------------------------------------------------------------------------- input checks


def check_input(path: str | os.PathLike) -> str | None:
    """Refuse what must never reach ffmpeg: missing, non-regular, empty and text files.

    The file's first :data:`SNIFF_BYTES` are first matched against :data:`CONTAINERS` (magic
    numbers and structure): a recognised container goes to ffmpeg, which opens it under the
    demuxer whitelist, however much readable text its header holds (AVI ``JUNK`` padding,
    Matroska attachments, ...). Anything else is refused when it looks like text, because the
    dangerous inputs (HLS playlists, ffconcat lists, URL lists) are text.
    Returns:
        The recognised container's name, or None for an unrecognised binary file.
    Raises:
        VideoError: with the reason.
    """
    path = os.fspath(path)
    head = _read_head(path)
    kind = sniff_container(head)
    if kind is not None:
        return kind
    reason = _text_reason(head)
    if reason:
        raise VideoError(path, reason)
    return None


def _read_head(path: str) -> bytes:
    """The first :data:`SNIFF_BYTES` of a regular, non-empty file (else VideoError)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoError(path, "no such file") from None
    except OSError as exc:
        raise VideoError(path, f"cannot stat file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoError(path, "is a directory, not a video file")
    if not stat.S_ISREG(st.st_mode):
        raise VideoError(path, "not a regular file (fifo, device or socket)")
    if st.st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            return f.read(SNIFF_BYTES)
    except OSError as exc:
        raise VideoError(path, f"cannot read file: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------- container magic

Recognizer = Callable[[bytes], bool]


def _starts(*magics: bytes) -> Recognizer:
    return lambda head: head.startswith(magics)


def _riff(*forms: bytes) -> Recognizer:
    """RIFF header: "RIFF", little-endian size, form type (e.g. "AVI ")."""
    return lambda head: head[:4] == b"RIFF" and head[8:12] in forms \
        and int.from_bytes(head[4:8], "little") >= 4


# First boxes of MP4 / QuickTime files: "ftyp" (ISO), or an old QuickTime file's first atom.
_BMFF_FIRST_BOXES = {b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot",
                     b"uuid", b"moof", b"sidx"}


def _iso_bmff(head: bytes) -> bool:
    """ISO base media (MP4, MOV, 3GP): a first box of a known type and a possible size."""
    if len(head) < 8 or head[4:8] not in _BMFF_FIRST_BOXES:
        return False
    size = int.from_bytes(head[:4], "big")
    if size == 1:                                   # 64-bit size follows the type
        return len(head) >= 16 and int.from_bytes(head[8:16], "big") >= 16
    return size == 0 or size >= 8                   # 0: the box runs to the end of the file


def _ogg(head: bytes) -> bool:
    return head[:4] == b"OggS" and head[4:5] == b"\x00"       # capture pattern, version 0


def _flv(head: bytes) -> bool:
    return head[:4] == b"FLV\x01" and int.from_bytes(head[5:9], "big") >= 9   # header size


def _ivf(head: bytes) -> bool:
    return head[:4] == b"DKIF" and int.from_bytes(head[6:8], "little") >= 32  # header size


def _transport_stream(packet: int) -> Recognizer:
    """MPEG-TS (188-byte packets) or M2TS/BDAV (192: a 4-byte timestamp, then the packet).

    A capture may start anywhere in a packet: some shift puts the 0x47 sync byte of every packet
    in ``head`` in place, at least 3 of them.
    """
    def recognize(head: bytes) -> bool:
        return any(len(syncs := head[start::packet]) >= 3 and syncs.count(0x47) == len(syncs)
                   for start in range(min(packet, len(head))))
    return recognize


def _annex_b(head: bytes) -> bool:
    """Raw H.264 / HEVC (Annex B): a start code, then a NAL header with its forbidden bit 0."""
    for code in (b"\x00\x00\x00\x01", b"\x00\x00\x01"):
        if head.startswith(code) and len(head) > len(code):
            return head[len(code)] & 0x80 == 0
    return False


# (name, recognizer): the containers vimpac's whitelisted demuxers read (and WAVE, which ffmpeg
# then refuses as audio), tried in order, the first match naming the file.
CONTAINERS: tuple[tuple[str, Recognizer], ...] = (
    ("AVI (RIFF)", _riff(b"AVI ", b"AVIX")),
    ("WAVE (RIFF)", _riff(b"WAVE")),
    ("MP4/QuickTime (ISO-BMFF)", _iso_bmff),
    ("Matroska/WebM (EBML)", _starts(b"\x1a\x45\xdf\xa3")),
    ("Ogg", _ogg),
    ("MPEG-PS", _starts(b"\x00\x00\x01\xba")),
    ("MPEG video elementary stream", _starts(b"\x00\x00\x01\xb3")),
    ("MPEG-TS", _transport_stream(188)),
    ("MPEG-TS (M2TS)", _transport_stream(192)),
    ("FLV", _flv),
    ("ASF/WMV", _starts(bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"))),
    ("RealMedia", _starts(b".RMF")),
    ("NUT", _starts(b"nut/multimedia container\x00")),
    ("IVF", _ivf),
    ("DV", _starts(b"\x1f\x07\x00")),
    ("AV1 (OBU)", _starts(b"\x12\x00")),
    ("H.264/HEVC (Annex B)", _annex_b),
    ("MJPEG", _starts(b"\xff\xd8\xff")),
    ("GIF", _starts(b"GIF87a", b"GIF89a")),
)


def sniff_container(head: bytes) -> str | None:
    """Name of the container whose magic and structure ``head`` (a file's start) has, or None."""
    return next((name for name, recognize in CONTAINERS if recognize(head)), None)


def _text_reason(head: bytes) -> str | None:
    """Why ``head`` (a file's first bytes) looks like a text file, or None if it looks binary.

    A NUL or any other control byte but tab, CR and LF makes it binary.
    """
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "text file (UTF-16), not a video"
    body = head.removeprefix(b"\xef\xbb\xbf")
    start = body.lstrip()
    for prefix in _TEXT_PREFIXES:
        if start.lower().startswith(prefix):
            shown = start[:len(prefix)].decode("ascii", "replace")
            return (f"text file starting with {shown!r} (a playlist, concat list or other list "
                    "of files/URLs), not a video; refused")
    arr = np.frombuffer(body, np.uint8)
    if arr.size == 0:
        return "text file (only a byte-order mark), not a video"
    printable = np.isin(arr, (9, 10, 13)) | ((arr >= 32) & (arr < 127))
    if np.count_nonzero((arr < 128) & ~printable):
        return None
    return (f"text file (no NUL or other control byte in the first {arr.size} bytes, "
            f"{printable.mean():.0%} printable ASCII) and no known video container; refused")


def _input_options(path: str, threads: int | None = None) -> tuple[str, dict[str, object]]:
    """ffmpeg input URL and options that let ffmpeg read nothing but the file at ``path``."""
    options: dict[str, object] = {
        "protocol_whitelist": "file",
        "format_whitelist": ",".join(ALLOWED_DEMUXERS),
        "max_pixels": MAX_PIXELS,
    }
    if threads is not None:
        options["threads"] = threads
    # "file:" + absolute path: nothing in the name ("concat:", "|", "%d", a leading "-") is parsed.
    return "file:" + os.path.abspath(path), options


def _safe_input(path: str, *, threads: int | None = None) -> ffmpeg.nodes.FilterableStream:
    """ffmpeg-python input node for ``path`` (see :func:`_input_options`)."""
    url, options = _input_options(path, threads)
    return ffmpeg.input(url, **options)


# ----------------------------------------------------------------------------- probing

_INPUT_RE = re.compile(r"^Input #0, (.+), from '")
_DURATION_RE = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_STREAM_RE = re.compile(r"^\s*Stream #0:\d+\S*: (Video|Audio|Subtitle|Data|Attachment): (.*)$")
_SIZE_RE = re.compile(r", (\d{1,6})x(\d{1,6})[ ,\[]")
_RATE_RE = r"(\d+(?:\.\d+)?)(k?) {}(?:,|$|\s)"
_ROTATION_RE = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees", re.IGNORECASE)
_NOT_REAL_VIDEO = ("(attached pic)", "(timed thumbnails)", "(still image)")


def probe(path: str | os.PathLike, *, timeout_s: float = PROBE_TIMEOUT_S) -> VideoInfo:
    """Describe a video from the stderr of ``ffmpeg -hide_banner -i path`` (no ffprobe needed).

    Runs :func:`check_input` first and opens the file with the same restrictions as decoding.
    Raises:
        VideoError: the file is refused, ffmpeg cannot open it, or the probe timed out.
    """
    path = os.fspath(path)
    return _probe(path, timeout_s, VideoError(path, f"probe timed out after {timeout_s:g}s"))


def _probe(path: str, timeout_s: float, timeout_error: VideoError) -> VideoInfo:
    """:func:`probe`, raising ``timeout_error`` when it runs over ``timeout_s``."""
    check_input(path)
    stderr = _run_probe(path, timeout_s, timeout_error)
    info = _parse_probe(stderr)
    if info is None:
        raise VideoError(path, _ffmpeg_reason(stderr.splitlines(), "ffmpeg cannot open the file"))
    if info.has_video and info.width * info.height == 0 and \
            "exceeds specified max pixel count" in stderr:   # ffmpeg hid the size: say why
        raise VideoError(path, f"frame larger than the MAX_PIXELS limit ({MAX_PIXELS} pixels)")
    return info


def _run_probe(path: str, timeout_s: float, timeout_error: VideoError) -> str:
    """ffmpeg's stderr when asked to open ``path`` with no output (it then exits 1 by design)."""
    url, options = _input_options(path)
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin"]  # no "-v error": the banner is the answer
    for key, value in options.items():
        cmd += [f"-{key}", str(value)]
    cmd += ["-i", url]
    try:
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, timeout=max(timeout_s, 0.001), check=False)
    except subprocess.TimeoutExpired:
        raise timeout_error from None
    if out.returncode < 0:
        raise VideoError(path, _crash_reason(out.returncode))
    return out.stderr.decode("utf-8", "replace")


def _parse_probe(text: str) -> VideoInfo | None:
    """VideoInfo from ffmpeg's input banner, or None when ffmpeg did not open the input."""
    lines = text.splitlines()
    container = next((m.group(1) for m in map(_INPUT_RE.match, lines) if m), None)
    if container is None:
        return None
    duration = None
    for line in lines:
        if m := _DURATION_RE.search(line):
            h, mnt, s = m.groups()
            duration = int(h) * 3600 + int(mnt) * 60 + float(s)
            break
    kinds = [(i, m.group(1), m.group(2)) for i, m in enumerate(map(_STREAM_RE.match, lines)) if m]
    has_audio = any(kind == "Audio" for _, kind, _ in kinds)
    video = [(i, desc) for i, kind, desc in kinds
             if kind == "Video" and not any(tag in desc for tag in _NOT_REAL_VIDEO)]
    if not video:
        return VideoInfo(0, 0, None, duration, 0, False, has_audio, container)
    i, desc = video[0]
    width, height = map(int, m.groups()) if (m := _SIZE_RE.search(desc + " ")) else (0, 0)
    rotation = _stream_rotation(lines[i + 1:])
    if rotation % 180 == 90:
        width, height = height, width
    fps = _rate(desc, "fps") or _rate(desc, "tbr")
    return VideoInfo(width, height, fps, duration, rotation, True, has_audio, container)


def _rate(desc: str, unit: str) -> float | None:
    """The number before ``unit`` ("25 fps", "29.97 tbr", "1k tbr") in a stream line."""
    m = re.search(_RATE_RE.format(unit), desc)
    if not m:
        return None
    value = float(m.group(1)) * (1000.0 if m.group(2) else 1.0)
    return value if value > 0 else None


def _stream_rotation(following: list[str]) -> int:
    """Display rotation from the side-data lines after a stream line (until the next stream)."""
    for line in following:
        if _STREAM_RE.match(line) or not line.startswith("    "):
            break
        if m := _ROTATION_RE.search(line):
            return round(float(m.group(1))) % 360
    return 0


_KNOWN_ERRORS = (  # (words that must all be on one line of ffmpeg's stderr, lowercase; reason)
    (("protocol", "not on whitelist"),
     "refers to another resource through a protocol other than file: (refused)"),
    (("not on whitelist",), "not a supported video container (ffmpeg detected a format outside "
                            "the video demuxer whitelist: audio, images, playlists, lists of "
                            "files and other reference formats are refused)"),
    (("moov atom not found",), "truncated or incomplete MP4/MOV file (moov atom not found)"),
    (("exceeds specified max pixel count",), "frame larger than the MAX_PIXELS limit"),
    (("matches no streams",), "no video stream"),
    (("does not contain any stream",), "no video stream"),
    (("error binding filtergraph",), "video stream cannot be decoded (unknown codec or frame "
                                     "size: corrupt, truncated or unsupported)"),
    (("permission denied",), "permission denied"),
    (("end of file",), "truncated file (ffmpeg reached the end of the file while opening it)"),
    (("input/output error",), "truncated or unreadable file (ffmpeg: input/output error)"),
    (("no such file",), "no such file"),
    (("invalid data found when processing input",),
     "not a recognized video file, or corrupt (ffmpeg: invalid data found when processing input)"),
)


_CRASH_SIGNALS = {"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT"}


def _crash_reason(returncode: int) -> str:
    """Reason for an ffmpeg that died from a signal (``returncode`` < 0) it did not get from us."""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if name in _CRASH_SIGNALS:
        return (f"ffmpeg crashed ({name}) on this file: a bug in this ffmpeg build; another "
                "build (VIMPAC_FFMPEG) may read it")
    return f"ffmpeg was killed by {name}"


def _failure_reason(returncode: int, lines: list[str]) -> str:
    """Why ffmpeg exited with ``returncode`` != 0, from its stderr ``lines``."""
    if returncode < 0:
        return _crash_reason(returncode)
    return _ffmpeg_reason(lines, f"ffmpeg failed (exit {returncode})")


def _ffmpeg_reason(lines: list[str], default: str) -> str:
    """A short, specific reason from ffmpeg's error output (else ``default`` + its last line)."""
    low = [line.lower() for line in lines]
    for words, reason in _KNOWN_ERRORS:
        if any(all(w in line for w in words) for line in low):
            return reason
    useful = [ln.strip() for ln in lines
              if ln.strip() and "exiting with exit code" not in ln.lower()]
    return f"{default}: {useful[-1][:300]}" if useful else default


def _check_decodable(path: str, info: VideoInfo) -> None:
    """Refuse files whose probe shows nothing to decode."""
    if not info.has_video:
        what = ("audio only" if info.has_audio
                else "no streams found: truncated, corrupt or empty container")
        raise VideoError(path, f"no video stream ({what})")
    if info.width <= 0 or info.height <= 0:
        raise VideoError(path, "video stream with unknown codec or frame size (corrupt, truncated "
                               "or unsupported)")
    if info.width * info.height > MAX_PIXELS:
        raise VideoError(path, f"frame size {info.width}x{info.height} exceeds {MAX_PIXELS} pixels")


# ----------------------------------------------------------------------------- decoding


def decode_frames(path: str | os.PathLike, spec: DecodeSpec, *, chunk_frames: int = 64,
                  timeout_s: float = 600.0, threads: int | None = None,
                  cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
    """Decode a whole video sequentially through one ffmpeg process, in chunks.

    Checks the file right away (:func:`check_input` refusals raise here), then returns an iterator
    of uint8 RGB arrays ``[n, spec.size, spec.size, 3]`` with ``1 <= n <= chunk_frames``; the
    whole video is never held in memory and ffmpeg starts on the first ``next()``. There is no
    probe before decoding: only when ffmpeg fails before its first frame is the file probed, to
    name the reason (no video stream, frame too large, ...). ``timeout_s`` bounds the time spent
    waiting for ffmpeg; time the consumer spends between chunks is not counted. ``threads`` sets
    ffmpeg's decoder and filter threads (None: ffmpeg's default, about one per core). Closing the
    iterator early kills and reaps ffmpeg; so does setting ``cancel`` (then VideoError).
    Raises:
        VideoError: refused, unreadable or broken input, no video stream, no frames, or timeout.
        FFmpegError: no usable ffmpeg (missing, or older than 4.2), raised at the call.
    """
    views = decode_views(path, [spec], chunk_frames=chunk_frames, timeout_s=timeout_s,
                         threads=threads, cancel=cancel)
    return _only_view(views)


def _only_view(views: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """``[n, 1, S, S, 3]`` chunks as ``[n, S, S, 3]``; closing this closes ``views``."""
    with contextlib.closing(views):
        for chunk in views:
            yield chunk[:, 0]


def decode_views(path: str | os.PathLike, specs: Sequence[DecodeSpec], *, chunk_frames: int = 64,
                 timeout_s: float = 600.0, threads: int | None = None,
                 cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
    """Decode several views of a video (crops, flips, scales) in one ffmpeg run.

    The source is decoded once; after the ``fps`` filter a ``split`` sends every frame through
    each view's scale / crop / flip chain, and ``vstack`` puts the views of one frame into one
    rawvideo frame. Each view's frames are identical to :func:`decode_frames` with that spec.
    All specs must share ``fps`` and ``size``. Yields uint8 arrays ``[n, V, size, size, 3]``
    (V = ``len(specs)``, 1 <= n <= chunk_frames); otherwise as :func:`decode_frames`.
    Raises:
        ValueError: no specs, specs with different fps or size, or chunk_frames < 1.
        VideoError: as :func:`decode_frames`.
    """
    specs = list(specs)
    if not specs:
        raise ValueError("decode_views needs at least one DecodeSpec")
    if len({(s.fps, s.size) for s in specs}) > 1:
        raise ValueError(f"decode_views: all specs must share fps and size, got "
                         f"{sorted({(s.fps, s.size) for s in specs}, key=str)}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    path = os.fspath(path)
    check_input(path)
    ffmpeg_exe()        # a missing or too old ffmpeg is refused here (FFmpegError), not per chunk
    return _decode_chunks(path, specs, chunk_frames, _Budget(path, timeout_s, cancel), threads)


def _decode_chunks(path: str, specs: list[DecodeSpec], chunk_frames: int, budget: _Budget,
                   threads: int | None) -> Iterator[np.ndarray]:
    """The chunks of :func:`decode_views`, with the one-frame fallback for very short videos."""
    cmd = _decode_cmd(path, specs, use_fps=True, max_frames=None, threads=threads)
    n = 0
    try:
        with contextlib.closing(_stream_frames(path, cmd, specs, chunk_frames, budget)) as chunks:
            for chunk in chunks:
                n += len(chunk)
                yield chunk
    except _FfmpegFailed as exc:
        _explain_failure(path, budget)   # a probe names the cause when it can; else ffmpeg's
        raise VideoError(path, exc.reason) from None
    if n == 0 and specs[0].fps is not None:
        # The fps filter emits nothing for a source shorter than one output period: keep frame 0.
        logger.debug("%s: fps=%g gave no frame, taking the first source frame", path,
                     specs[0].fps)
        cmd = _decode_cmd(path, specs, use_fps=False, max_frames=1, threads=threads)
        with contextlib.closing(_stream_frames(path, cmd, specs, 1, budget)) as chunks:
            for chunk in chunks:
                n += len(chunk)
                yield chunk
    if n == 0:
        raise VideoError(path, "no frames decoded")


def _explain_failure(path: str, budget: _Budget) -> None:
    """After ffmpeg failed before its first frame: raise the probe's reason if it has one."""
    t0 = time.monotonic()
    info = _probe(path, budget.remaining(), budget.error())
    budget.spend(time.monotonic() - t0)
    _check_decodable(path, info)


def decode_video(path: str | os.PathLike, spec: DecodeSpec, *, timeout_s: float = 600.0,
                 threads: int | None = None) -> np.ndarray:
    """All frames of a video as one uint8 array ``[N, spec.size, spec.size, 3]``, N >= 1.

    Raises:
        VideoError: as :func:`decode_frames` (a video without frames raises "no frames decoded").
    """
    chunks = list(decode_frames(path, spec, chunk_frames=256, timeout_s=timeout_s,
                                threads=threads))
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def count_frames(path: str | os.PathLike, fps: float | None, *, timeout_s: float = 600.0) -> int:
    """Frames ffmpeg itself outputs for this file at ``fps`` (None: every source frame).

    Runs ``-map 0:V:0 [-vf fps=..] -fps_mode passthrough -f null -`` (``-vsync`` on ffmpeg 4) and
    reads the final ``frame=`` of ``-progress``. This is the raw ffmpeg count, for tests and
    benchmarks: where it is 0 but the source has a frame, :func:`decode_frames` still yields one
    frame.
    Raises:
        VideoError: refused or unreadable input, or timeout.
    """
    path = os.fspath(path)
    check_input(path)
    stream = _safe_input(path)["V:0"]
    if fps is not None:
        stream = stream.filter("fps", fps=_fps_arg(fps))
    cmd = (stream.output("-", format="null", **passthrough_option())
           .global_args(*_GLOBAL_ARGS, "-progress", "pipe:1").compile(cmd=ffmpeg_exe()))
    try:
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=max(timeout_s, 0.001), check=False)
    except subprocess.TimeoutExpired:
        raise VideoError(path, f"frame count timed out after {timeout_s:g}s") from None
    counts = re.findall(rb"^frame=(\d+)", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not counts:
        lines = out.stderr.decode("utf-8", "replace").splitlines()
        raise VideoError(path, _failure_reason(out.returncode, lines))
    return int(counts[-1])


def _fps_arg(fps: float) -> str:
    """Frame rate as ffmpeg parses it ("2", "29.97")."""
    return f"{fps:.10g}"


def _decode_cmd(path: str, specs: DecodeSpec | Sequence[DecodeSpec], *, use_fps: bool,
                max_frames: int | None, threads: int | None) -> list[str]:
    """ffmpeg command line: the paper's filter chain per view, raw rgb24 frames on stdout.

    One spec gives frames ``[size, size, 3]``; several (same fps and size) are split after the
    fps filter and stacked top to bottom, one output frame ``[V * size, size, 3]`` per frame.
    """
    specs = [specs] if isinstance(specs, DecodeSpec) else list(specs)
    stream = _safe_input(path, threads=threads)["V:0"]  # first video stream that is not cover art
    if use_fps and specs[0].fps is not None:
        stream = stream.filter("fps", fps=_fps_arg(specs[0].fps))
    if len(specs) == 1:
        stream = _view_chain(stream, specs[0])
    else:
        branches = stream.filter_multi_output("split", len(specs))
        views = [_view_chain(branches.stream(i), spec) for i, spec in enumerate(specs)]
        stream = ffmpeg.filter(views, "vstack", inputs=len(specs))
    out_kwargs: dict[str, object] = {"format": "rawvideo", "pix_fmt": "rgb24",
                                     **passthrough_option()}
    if max_frames is not None:
        out_kwargs["frames:v"] = max_frames
    node = stream.output("pipe:", **out_kwargs).global_args(*_GLOBAL_ARGS)
    if threads is not None:
        node = node.global_args("-filter_complex_threads", str(threads))
    return node.compile(cmd=ffmpeg_exe())


def _view_chain(stream: ffmpeg.nodes.FilterableStream,
                spec: DecodeSpec) -> ffmpeg.nodes.FilterableStream:
    """Scale (shorter side), crop and flip of one view, in RGB."""
    s, out, k = spec.shorter_side, spec.size, CROP_POSITIONS[spec.crop]
    # iw*sar is the displayed width (autorotation has already happened before the graph); trunc
    # keeps the paper's int(long * S / short). Odd sizes are fine: rgb24 has no chroma alignment.
    portrait = "lte(iw*sar,ih)"
    stream = stream.filter("scale", w=f"if({portrait},{s},trunc(iw*sar*{s}/ih))",
                           h=f"if({portrait},trunc(ih*{s}/(iw*sar)),{s})", flags="bicubic")
    stream = stream.filter("setsar", "1").filter("format", "rgb24")  # crop exactly in RGB
    stream = stream.crop(f"trunc({k}*(iw-{out})/2)", f"trunc({k}*(ih-{out})/2)", out, out)
    return stream.hflip() if spec.hflip else stream


_CANCEL_POLL_S = 0.25  # how often a wait on ffmpeg checks the cancel event


class _Budget:
    """Seconds left of one file's time limit; only time spent waiting on ffmpeg is spent."""

    def __init__(self, path: str, seconds: float, cancel: threading.Event | None = None) -> None:
        self.path, self.seconds, self.left, self.cancel = path, seconds, seconds, cancel

    def remaining(self) -> float:
        return max(self.left, 0.0)

    def spend(self, dt: float) -> None:
        self.left -= dt

    def error(self) -> VideoError:
        return VideoError(self.path, f"decode timed out after {self.seconds:g}s")

    def poll_ms(self) -> int:
        """Milliseconds of the next wait on ffmpeg (short slices when it can be cancelled)."""
        wait = self.remaining() if self.cancel is None else min(self.remaining(), _CANCEL_POLL_S)
        return math.ceil(wait * 1000)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise VideoError(self.path, "decode cancelled")


class _FfmpegFailed(VideoError):
    """ffmpeg exited with an error before its first frame (decode_views then asks a probe why)."""


class _StderrTail:
    """Drains a process's stderr in a thread (ffmpeg never blocks on it), keeping the last lines."""

    def __init__(self, stream) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream) -> None:
        with contextlib.suppress(ValueError, OSError):
            for raw in iter(stream.readline, b""):
                self.lines.append(raw.decode("utf-8", "replace").rstrip())

    def join(self) -> list[str]:
        self._thread.join(timeout=10)
        return list(self.lines)


def _spawn(cmd: list[str]) -> subprocess.Popen:
    """Start ffmpeg with stdout (unbuffered) and stderr piped and no stdin."""
    logger.debug("running %s", subprocess.list2cmdline(cmd))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    if hasattr(fcntl, "F_SETPIPE_SZ"):     # Linux: let ffmpeg run ahead of a busy reader
        with contextlib.suppress(OSError):
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    """Kill (if still running) and reap ffmpeg, closing its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _stream_frames(path: str, cmd: list[str], specs: list[DecodeSpec], chunk_frames: int,
                   budget: _Budget) -> Iterator[np.ndarray]:
    """Run ``cmd`` and yield its rawvideo output as ``[n, V, size, size, 3]`` uint8 chunks."""
    shape = (len(specs), specs[0].size, specs[0].size, 3)
    frame_bytes, total = math.prod(shape), 0
    proc = _spawn(cmd)
    tail = _StderrTail(proc.stderr)
    try:
        while True:
            buf = np.empty(chunk_frames * frame_bytes, np.uint8)  # filled by readinto, no zeroing
            filled = _read_into(proc, memoryview(buf), budget)
            n = filled // frame_bytes
            if n:
                frames = buf[:n * frame_bytes].reshape(n, *shape)
                total += n
                yield frames if n == chunk_frames else frames.copy()  # free the unused tail
            if filled < len(buf):
                break
        rc = _wait(proc, budget)
        lines = tail.join()
        if rc != 0:
            reason = _failure_reason(rc, lines)
            if total == 0:
                raise _FfmpegFailed(path, reason)
            logger.warning("%s: ffmpeg exited %d after %d frames (kept them): %s", path, rc,
                           total, reason)
        elif filled % frame_bytes:
            logger.warning("%s: ffmpeg output ended inside a frame (dropped it)", path)
    finally:
        _stop(proc)
        tail.join()


def _read_into(proc: subprocess.Popen, view: memoryview, budget: _Budget) -> int:
    """Fill ``view`` from ffmpeg's stdout; returns the bytes read (< len(view) only at EOF)."""
    filled = 0
    poller = select.poll()
    poller.register(proc.stdout.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    while filled < len(view):
        t0 = time.monotonic()
        ready = poller.poll(budget.poll_ms())
        budget.spend(time.monotonic() - t0)
        budget.check_cancel()
        if not ready:
            if budget.remaining() > 0:
                continue                         # a cancel-check slice ended, time is left
            raise budget.error()
        got = proc.stdout.readinto(view[filled:])
        if not got:
            break
        filled += got
    return filled


def _wait(proc: subprocess.Popen, budget: _Budget) -> int:
    """Exit status of ffmpeg once its output has ended, within the time budget."""
    t0 = time.monotonic()
    try:
        return proc.wait(timeout=max(budget.remaining(), 0.001))
    except subprocess.TimeoutExpired:
        raise budget.error() from None
    finally:
        budget.spend(time.monotonic() - t0)
