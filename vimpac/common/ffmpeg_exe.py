"""Which ffmpeg binary vimpac runs.

Order: the ``VIMPAC_FFMPEG`` environment variable, else ``ffmpeg`` on ``PATH``, else the static
binary bundled in the ``imageio-ffmpeg`` wheel (so no system ffmpeg is needed). ffprobe is never
required.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from vimpac.common.errors import VimpacError


class FFmpegNotFound(VimpacError):
    """No usable ffmpeg binary could be found."""


@functools.cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary to use (cached for the process)."""
    env = os.environ.get("VIMPAC_FFMPEG")
    if env:
        path = shutil.which(env) or env
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise FFmpegNotFound(f"VIMPAC_FFMPEG={env!r} is not an executable file")
        return path
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - imageio-ffmpeg is a hard dependency
        raise FFmpegNotFound("no ffmpeg on PATH and imageio-ffmpeg is not installed") from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_source() -> str:
    """Where :func:`ffmpeg_exe` found its binary: 'VIMPAC_FFMPEG', 'PATH' or 'imageio-ffmpeg'."""
    if os.environ.get("VIMPAC_FFMPEG"):
        return "VIMPAC_FFMPEG"
    return "PATH" if shutil.which("ffmpeg") else "imageio-ffmpeg"


def ffmpeg_version() -> str:
    """First line of ``ffmpeg -version``."""
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-version"], capture_output=True, text=True,
                         timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


@functools.cache
def passthrough_option() -> dict[str, str]:
    """Output option that keeps every frame with its timestamp, for the binary in use.

    ffmpeg >= 5.1 spells it ``-fps_mode passthrough`` and 8.0 drops the old ``-vsync``; 4.x (e.g.
    the system ffmpeg of Ubuntu 22.04, or an older imageio-ffmpeg) knows only ``-vsync``.
    """
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-h", "long"], capture_output=True,
                         text=True, timeout=30, check=False)
    if "-fps_mode" in out.stdout or "-vsync" not in out.stdout:
        return {"fps_mode": "passthrough"}
    return {"vsync": "passthrough"}
