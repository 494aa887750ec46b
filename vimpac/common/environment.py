"""What vimpac runs on: ffmpeg binary, torch build, devices, package versions."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from vimpac.common.ffmpeg_exe import (
    MIN_VERSION,
    FFmpegBuild,
    FFmpegError,
    inspect_ffmpeg,
    locate_ffmpeg,
    require_supported,
)

PACKAGES = ("vimpac", "torch", "numpy", "zarr", "numcodecs", "webdataset", "ffmpeg-python",
            "imageio-ffmpeg", "safetensors", "click", "rich", "fsspec")
# Object-store back-ends for archive URLs (extras vimpac[s3], vimpac[gcs]): shown when missing too.
STORES = {"s3fs": "s3://", "gcsfs": "gs://"}


def ffmpeg_report() -> dict[str, str]:
    """The ffmpeg binary in use: path, where it came from, version, and whether it is usable."""
    try:
        path, source = locate_ffmpeg()
        build = inspect_ffmpeg(path, source)
    except FFmpegError as exc:
        return {"ffmpeg": f"NOT FOUND: {exc}"}
    return {"ffmpeg": f"{path} (from {source})",
            "ffmpeg version": f"{build.describe()}, {_verdict(build)}"}


def _verdict(build: FFmpegBuild) -> str:
    minimum = ".".join(map(str, MIN_VERSION))
    if not build.recognized:
        return "REFUSED: not an ffmpeg binary"
    if build.too_old:
        return f"REFUSED: too old, vimpac needs ffmpeg {minimum} or newer"
    return f"supported (vimpac needs {minimum} or newer)"


def check_ffmpeg() -> None:
    """Raise :class:`FFmpegError` (one line) when the ffmpeg in use is missing or too old."""
    require_supported(inspect_ffmpeg(*locate_ffmpeg()))


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_summary() -> dict[str, Any]:
    """What a training stage's numbers depend on beyond its settings: floats summed in another
    order (another CPU or GPU, another thread count, another torch build) end a short training
    run elsewhere. Recorded with every pipeline stage and shown in the report."""
    import torch

    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    return {"cpu": cpu_model(), "cpu threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda device": device}


def environment_report() -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    report.update(ffmpeg_report())
    report["torch build"] = f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"
    report["cpu threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report[f"cuda:{i}"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        report["cuda devices"] = "none"
    for name in PACKAGES:
        try:
            report[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            report[name] = "not installed"
    for name, scheme in STORES.items():
        try:
            report[name] = f"{importlib.metadata.version(name)} ({scheme} archives)"
        except importlib.metadata.PackageNotFoundError:
            report[name] = f"not installed ({scheme} archives need it)"
    return report
