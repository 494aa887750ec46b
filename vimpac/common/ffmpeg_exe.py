"""Which ffmpeg binary vimpac runs, and whether it is new enough.

Order: the ``VIMPAC_FFMPEG`` environment variable, else ``ffmpeg`` on ``PATH``, else the static
binary bundled in the ``imageio-ffmpeg`` wheel (so no system ffmpeg is needed). ffprobe is never
required. Any ffmpeg from 4.2 (:data:`MIN_VERSION`) to the newest release works; an older one is
refused with one line (:class:`FFmpegTooOld`) before any video is touched.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from vimpac.common.errors import VimpacError

MIN_VERSION = (4, 2)  # oldest ffmpeg release vimpac supports and tests (CI runs 4.2.2)
# libavformat's version in the oldest supported release: builds from git ("N-113000-g...") or
# with a date for a version print no release number, only their library versions.
MIN_LIBAVFORMAT = (58, 29)
_RELEASE_RE = re.compile(r"^ffmpeg version n?(\d+)\.(\d+)(?:\.(\d+))?(?=[^\d.]|$)")
_LIBAVFORMAT_RE = re.compile(r"^libavformat\s+(\d+)\.\s*(\d+)\.\s*(\d+)", re.MULTILINE)
_VERSION_WORD_RE = re.compile(r"^ffmpeg version (\S+)")


class FFmpegError(VimpacError):
    """The ffmpeg binary cannot be used (missing, not ffmpeg, or too old): a set-up problem."""


class FFmpegNotFound(FFmpegError):
    """No usable ffmpeg binary could be found."""


class FFmpegTooOld(FFmpegError):
    """The ffmpeg found is older than :data:`MIN_VERSION`."""


@dataclass(frozen=True)
class FFmpegBuild:
    """What ``ffmpeg -version`` says about a binary."""

    path: str
    source: str  # "VIMPAC_FFMPEG", "PATH" or "imageio-ffmpeg"
    version: str  # the word after "ffmpeg version", e.g. "4.2.2-static", "N-113000-gabc"
    release: tuple[int, ...] | None  # (4, 2, 2); None for builds from git
    libavformat: tuple[int, ...] | None  # (58, 29, 100)

    @property
    def too_old(self) -> bool:
        if self.release is not None:
            return self.release[:2] < MIN_VERSION
        return self.libavformat is not None and self.libavformat[:2] < MIN_LIBAVFORMAT

    @property
    def recognized(self) -> bool:
        """Whether ``-version`` printed an ffmpeg version line at all."""
        return bool(self.version)

    def describe(self) -> str:
        """``4.2.2-static (libavformat 58.29.100)``."""
        lavf = ".".join(map(str, self.libavformat)) if self.libavformat else "unknown"
        return f"{self.version or 'unknown'} (libavformat {lavf})"


def locate_ffmpeg() -> tuple[str, str]:
    """(path, source) of the ffmpeg binary to use, without running it.

    Raises:
        FFmpegNotFound: ``VIMPAC_FFMPEG`` names no executable file, or nothing is found.
    """
    env = os.environ.get("VIMPAC_FFMPEG")
    if env:
        path = shutil.which(env) or env
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise FFmpegNotFound(f"VIMPAC_FFMPEG={env!r} is not an executable file")
        return path, "VIMPAC_FFMPEG"
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path, "PATH"
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - imageio-ffmpeg is a hard dependency
        raise FFmpegNotFound("no ffmpeg on PATH and imageio-ffmpeg is not installed") from exc
    return imageio_ffmpeg.get_ffmpeg_exe(), "imageio-ffmpeg"


def parse_version(text: str, path: str = "", source: str = "") -> FFmpegBuild:
    """An :class:`FFmpegBuild` from the output of ``ffmpeg -version``."""
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    word = m.group(1) if (m := _VERSION_WORD_RE.match(first)) else ""
    release = tuple(int(g) for g in m.groups() if g is not None) \
        if (m := _RELEASE_RE.match(first)) else None
    lavf = tuple(int(g) for g in m.groups()) if (m := _LIBAVFORMAT_RE.search(text)) else None
    return FFmpegBuild(path, source, word, release, lavf)


def inspect_ffmpeg(path: str, source: str = "") -> FFmpegBuild:
    """Run ``path -version`` and describe the build.

    Raises:
        FFmpegNotFound: the binary cannot be run.
    """
    try:
        out = subprocess.run([path, "-hide_banner", "-version"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FFmpegNotFound(f"ffmpeg at {path} ({source or 'given'}) cannot be run: {exc}") \
            from None
    return parse_version(out.stdout, path, source)


def require_supported(build: FFmpegBuild) -> FFmpegBuild:
    """Return ``build`` if vimpac can use it.

    Raises:
        FFmpegTooOld: older than :data:`MIN_VERSION`.
        FFmpegNotFound: ``-version`` printed no ffmpeg version (not an ffmpeg binary).
    """
    where = f"{build.path} (from {build.source})" if build.source else build.path
    minimum = ".".join(map(str, MIN_VERSION))
    if not build.recognized:
        raise FFmpegNotFound(f"{where} does not look like ffmpeg: '-version' printed no "
                             "'ffmpeg version' line; set VIMPAC_FFMPEG to an ffmpeg binary")
    if build.too_old:
        raise FFmpegTooOld(f"ffmpeg {build.describe()} at {where} is too old: vimpac needs "
                           f"ffmpeg {minimum} or newer; install a newer one or set "
                           "VIMPAC_FFMPEG (the imageio-ffmpeg wheel bundles one)")
    return build


@functools.cache
def ffmpeg_build() -> FFmpegBuild:
    """The build :func:`ffmpeg_exe` runs, checked to be supported (cached for the process).

    Raises:
        FFmpegError: none found, not ffmpeg, or too old.
    """
    return require_supported(inspect_ffmpeg(*locate_ffmpeg()))


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary to use; refuses a missing or too old one (:class:`FFmpegError`)."""
    return ffmpeg_build().path


def clear_caches() -> None:
    """Forget the binary found (after changing ``VIMPAC_FFMPEG`` or ``PATH`` in-process)."""
    ffmpeg_build.cache_clear()
    _help_text.cache_clear()


@functools.cache
def _help_text() -> str:
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-h", "long"], capture_output=True,
                         text=True, timeout=30, check=False)
    return out.stdout


def fps_mode_option(mode: str) -> dict[str, str]:
    """Output option that sets the frame-rate mode (``passthrough``, ``vfr``, ``cfr``).

    ffmpeg >= 5.1 spells it ``-fps_mode`` and 8.0 drops the old ``-vsync``; 4.x (e.g. the system
    ffmpeg of Ubuntu 22.04, or an older imageio-ffmpeg) knows only ``-vsync``.
    """
    text = _help_text()
    if "-fps_mode" in text or "-vsync" not in text:
        return {"fps_mode": mode}
    return {"vsync": mode}


def passthrough_option() -> dict[str, str]:
    """Output option that keeps every frame with its timestamp, for the binary in use."""
    return fps_mode_option("passthrough")


def fps_mode_args(mode: str) -> list[str]:
    """:func:`fps_mode_option` as command-line words, e.g. ``["-vsync", "vfr"]``."""
    ((key, value),) = fps_mode_option(mode).items()
    return [f"-{key}", value]
