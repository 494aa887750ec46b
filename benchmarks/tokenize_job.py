"""Tokenize benchmark (issue 4): the job against its two limits, decode-only and encode-only.

On the same real videos in the same run:

* **decode-only**: the job's own ffmpeg command (fps / scale / crop filters, rawvideo on a pipe)
  run by as many concurrent processes as the job has decode workers; gives the decode limit in
  source frames/s and output frames/s.
* **encode-only**: the VQ encoder on the pre-decoded output frames, in the job's batch size.
* **job**: :func:`vimpac.tokenize.job.run_tokenize` with ``decode_workers=2`` into a fresh archive
  (model load, start-up and shard writes included: what a user waits for).

The workload is the scale's videos repeated :data:`JOB_COPIES` times (hard links, so the job
does not merge them): at ``small`` about 8,000 source frames and three encoder batches, so the
job's steady state, not its fixed costs, decides the ratio. The fixed cost is its own figure: the
job on one short video against decode-only of that video.

Targets: with a small encoder (not the bottleneck) the job reaches >= 0.8x the decode-only source
frames/s; in general job time <= 1.15x max(decode-only, encode-only). On a CPU-only machine
decode and encode share the cores, so job time is also shown against decode-only + encode-only
(no target). Also archive bytes per format against raw uint16 tokens and the source video bytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks import BenchResult, Scale, ratio_figure
from benchmarks.fixtures import make_tokenizer, make_videos

FPS, SIZE, WORKERS, BATCH = 2.0, 128, 2, 256
JOB_COPIES = {"tiny": 1, "small": 4, "medium": 2}  # repeats of the scale's videos in the workload


def job_config(**overrides: object) -> object:
    from vimpac.config import TokenizeConfig

    base = dict(fps=FPS, shorter_side=SIZE, size=SIZE, decode_workers=WORKERS,
                batch_frames=BATCH, videos_per_shard=16, device="cpu")
    return TokenizeConfig(**{**base, **overrides})


def decode_one(path: Path) -> np.ndarray:
    """Run the job's ffmpeg command for one video; uint8 frames [n, SIZE, SIZE, 3]."""
    from vimpac.common.video import DecodeSpec, _decode_cmd

    cmd = _decode_cmd(str(path), DecodeSpec(fps=FPS, shorter_side=SIZE, size=SIZE),
                      use_fps=True, max_frames=None, threads=None)
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, SIZE, SIZE, 3)


def decode_only(paths: list[Path]) -> tuple[float, np.ndarray]:
    """(seconds, all output frames) decoding every video with WORKERS concurrent ffmpegs."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        frames = list(pool.map(decode_one, paths))
    return time.perf_counter() - t0, np.concatenate(frames)


def encode_only(tokenizer: Path, frames: np.ndarray, device: str = "cpu") -> float:
    """Seconds to encode ``frames`` on ``device`` in the job's batch size (model loaded, one
    warm-up batch; CUDA work is synchronised before the clock stops)."""
    import torch

    from vimpac.tokenize.tokenizer import encode_frames, load_tokenizer

    model = load_tokenizer(tokenizer, device=device)
    encode_frames(model, frames[:BATCH], batch_size=BATCH, device=device)   # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    encode_frames(model, frames, batch_size=BATCH, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def job_once(paths: list[Path], tokenizer: Path, out: Path) -> tuple[float, object]:
    from vimpac.tokenize.job import run_tokenize

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_tokenize([str(p) for p in paths], tokenizer, out, job_config())
    seconds = time.perf_counter() - t0
    if summary.failed:
        raise RuntimeError(f"tokenize benchmark: {summary.failed} video(s) failed: "
                           f"{summary.failures[:3]}")
    return seconds, summary


def source_frames(paths: list[Path]) -> int:
    from vimpac.common.video import count_frames

    return sum(count_frames(p, None) for p in paths)


def job_inputs(paths: list[Path], copies: int, folder: Path) -> list[Path]:
    """``paths`` repeated ``copies`` times under distinct names (hard links, else byte copies)."""
    if copies == 1:
        return list(paths)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(copies):
        for src in paths:
            dst = folder / f"{src.stem}_r{k}{src.suffix}"
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            out.append(dst)
    return out


def run(scale: Scale, work: Path) -> BenchResult:
    base = make_videos(work / "videos", scale)
    paths = job_inputs(base, JOB_COPIES.get(scale.name, 1), work / "job-videos")
    src_frames = source_frames(base) * (len(paths) // len(base))
    src_bytes = sum(p.stat().st_size for p in paths)
    tokenizers = {k: make_tokenizer(work / f"tok-{k}", k)
                  for k in ("small-encoder", "default-encoder")}
    short = min(base, key=lambda p: p.stat().st_size)
    t: dict[str, list[float]] = {"decode": [], "decode/one-video": []}
    out_frames = 0
    summary = None
    for _ in range(scale.repeats):
        seconds, frames = decode_only(paths)
        t["decode"].append(seconds)
        out_frames = len(frames)
        t["decode/one-video"].append(decode_only([short])[0])
        for kind, tok in tokenizers.items():
            t.setdefault(f"encode/{kind}", []).append(encode_only(tok, frames))
            seconds, summary = job_once(paths, tok, work / f"archive-{kind}")
            t.setdefault(f"job/{kind}", []).append(seconds)
            t.setdefault(f"job/one-video/{kind}", []).append(
                job_once([short], tok, work / f"archive-one-{kind}")[0])
    figures = [ratio_figure(
        "tokenize", "decode-only limit (source frames/s)", [src_frames / s for s in t["decode"]],
        "frames/s", None, "-", note=f"{out_frames / np.median(t['decode']):.0f} output frames/s, "
        f"{WORKERS} ffmpeg processes, {len(paths)} videos, {src_frames} source frames")]
    for kind in tokenizers:
        figures += _job_figures(kind, t, src_frames, out_frames, short.name)
    figures += _size_figures(work / "archive-small-encoder", summary, src_bytes)
    details = {"seconds": t, "videos": [p.name for p in paths], "source_frames": src_frames,
               "output_frames": out_frames, "source_bytes": src_bytes, "short_video": short.name,
               "config": dict(fps=FPS, size=SIZE, decode_workers=WORKERS, batch_frames=BATCH,
                              copies=len(paths) // len(base))}
    return BenchResult("tokenize", figures, details)


def _job_figures(kind: str, t: dict[str, list[float]], src_frames: int, out_frames: int,
                 short: str) -> list:
    """The job against decode-only, max(decode, encode), their sum, and its fixed cost."""
    job, enc, dec = t[f"job/{kind}"], t[f"encode/{kind}"], t["decode"]
    return [
        ratio_figure(
            "tokenize", f"job vs decode-only, source frames/s ({kind})",
            [src_frames / s for s in job], "frames/s", [src_frames / s for s in dec],
            "decode-only", ("ratio", ">=", 0.8) if kind == "small-encoder" else None,
            note=f"encode-only {out_frames / np.median(enc):.0f} output frames/s"),
        ratio_figure(
            "tokenize", f"job time vs max(decode-only, encode-only) ({kind})", job, "s",
            [max(d, e) for d, e in zip(dec, enc, strict=True)], "max(decode, encode)",
            ("ratio", "<=", 1.15)),
        ratio_figure(
            "tokenize", f"job time vs decode-only + encode-only ({kind})", job, "s",
            [d + e for d, e in zip(dec, enc, strict=True)], "decode + encode",
            note="CPU-only: decoders and encoder share the cores"),
        ratio_figure(
            "tokenize", f"job fixed cost: one short video ({kind})", t[f"job/one-video/{kind}"],
            "s", t["decode/one-video"], f"decode-only {short}",
            note="model load, start-up, one encoder batch, shard write"),
    ]


def _size_figures(archive: Path, summary: object, src_bytes: int) -> list:
    from vimpac.archive import Archive

    arch = Archive(archive)
    h, w = arch.settings.grid
    frames = sum(e.frames for e in arch.entries)
    raw = frames * h * w * 2
    out = []
    for fmt in ("zarr", "webdataset"):
        nbytes = sum(s.bytes.get(fmt, 0) for s in arch.shards.values())
        out.append(ratio_figure("tokenize", f"archive bytes, {fmt} vs raw uint16", [nbytes],
                                "bytes", [raw], "raw uint16 tokens",
                                note=f"{nbytes / src_bytes:.4f}x the source video bytes "
                                     f"({src_bytes} B); untrained tokenizer ids"))
    return out
