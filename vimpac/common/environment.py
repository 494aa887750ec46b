"""What vimpac runs on: ffmpeg binary, torch build, devices, package versions."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from vimpac.common.ffmpeg_exe import FFmpegNotFound, ffmpeg_exe, ffmpeg_source, ffmpeg_version

PACKAGES = ("vimpac", "torch", "numpy", "zarr", "numcodecs", "webdataset", "ffmpeg-python",
            "imageio-ffmpeg", "safetensors", "click", "rich", "fsspec")
# Object-store back-ends for archive URLs (extras vimpac[s3], vimpac[gcs]): shown when missing too.
STORES = {"s3fs": "s3://", "gcsfs": "gs://"}


def environment_report() -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        report["ffmpeg"] = f"{ffmpeg_exe()} ({ffmpeg_source()})"
        report["ffmpeg version"] = ffmpeg_version()
    except FFmpegNotFound as exc:
        report["ffmpeg"] = f"NOT FOUND: {exc}"
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
