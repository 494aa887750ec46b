"""What vimpac runs on: ffmpeg binary, torch build, devices, package versions."""

from __future__ import annotations

import importlib.metadata
import os
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


def _cpuinfo() -> tuple[str, list[str]]:
    """The CPU's model name and feature flags (Linux ``/proc/cpuinfo``; else what ``platform``
    knows and no flags)."""
    cpu, flags = platform.processor() or platform.machine() or "unknown", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return cpu, flags


def machine() -> dict[str, Any]:
    """CPU model, cores, SIMD, memory, torch build and threads and (if any) GPU of this machine.

    A short training run's numbers depend on it beyond its settings: floats summed in another
    order (another CPU or GPU, thread count or torch build) end the run elsewhere. Every pipeline
    stage records it, the report lists it, and the benchmarks print it.
    """
    import torch

    cpu, flags = _cpuinfo()
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": simd, "memory_gib": mem_gib,
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "platform": platform.platform()}


def describe_machine(info: dict[str, Any]) -> str:
    """One line for a :func:`machine` record. Records are read back from disk (a stage's
    DONE.json, a benchmark's JSON), so a missing or older field is left out, never an error."""
    host = [f"{info['cores']} cores" if info.get("cores") else None,
            "/".join(map(str, info["simd"])) if isinstance(info.get("simd"), list) and info["simd"]
            else ("no AVX" if "simd" in info else None),
            f"{info['memory_gib']} GiB" if info.get("memory_gib") else None]
    host_text = ", ".join(h for h in host if h)
    threads = info.get("torch_threads")
    build = [f"CUDA {info['torch_cuda']}" if info.get("torch_cuda") else
             ("CPU build" if "torch_cuda" in info else None),
             f"{threads} thread{'' if threads == 1 else 's'}" if threads else None]
    build_text = ", ".join(b for b in build if b)
    python = f"Python {info['python']}, " if info.get("python") else ""
    gpu = f"GPU {info['gpu']}" if info.get("gpu") else "no GPU"
    host_text = f" ({host_text})" if host_text else ""
    build_text = f" ({build_text})" if build_text else ""
    return (f"{info.get('cpu', 'unknown CPU')}{host_text}, {gpu}; "
            f"{python}torch {info.get('torch', '?')}{build_text}")


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
