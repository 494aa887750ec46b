"""Loader memory benchmark (issues 5d, 22): peak RSS streaming an archive of 1x vs 10x the shards.

Each measurement runs in a fresh subprocess (``python -m benchmarks.memory ARCHIVE FMT MODE``)
that streams one full epoch of :class:`ClipStream` (T5/16x16) and reports its peak RSS (VmHWM)
before and after streaming. Shards have the same size in both archives, so a loader that holds
one shard and its shuffle buffer (shard-buffer mode), or one read window and a bounded cache of
open shard readers (global shuffle), and never the archive, peaks at the same RSS. Target:
10x / 1x <= 1.1 in both modes.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from benchmarks import BenchResult, Scale, ratio_figure
from benchmarks.fixtures import write_token_archive

FRAMES, GRID, BATCH = 5, 16, 32


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited over exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream_epoch(archive: str, fmt: str, shuffle: str) -> dict[str, float]:
    """Stream one epoch; RSS peaks in MiB (after set-up, after streaming) and batches read."""
    import torch

    from vimpac.pretrain.data import ClipStream, StreamSpec

    torch.set_num_threads(1)
    stream = ClipStream([archive], StreamSpec(frames=FRAMES, grid=GRID, batch_size=BATCH,
                                              pad_id=8193, fmt=fmt, shuffle_buffer=256,
                                              shuffle=shuffle))
    batches = stream.catalog.videos // BATCH
    setup = peak_rss_mib()
    it = stream.batches()
    for _ in range(batches):
        next(it)
    peak = peak_rss_mib()
    return {"setup_mib": setup, "peak_mib": peak, "batches": batches}


def measure(archive: Path, fmt: str, shuffle: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", str(archive), fmt, shuffle],
                          capture_output=True, text=True, env=env, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"memory benchmark subprocess failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(scale: Scale, work: Path) -> BenchResult:
    frames = (10, 120)
    archives = {k: write_token_archive(work / f"memory-{k}x", shards=scale.memory_shards * k,
                                       videos_per_shard=scale.loader_videos_per_shard,
                                       frames=frames, formats=("zarr", "webdataset"), seed=k)
                for k in (1, 10)}
    figures, details = [], {}
    for shuffle, fmt in itertools.product(("shard", "global"), ("zarr", "webdataset")):
        one, ten = [], []
        for _ in range(scale.repeats):                   # side by side
            one.append(measure(archives[1], fmt, shuffle))
            ten.append(measure(archives[10], fmt, shuffle))
        details[f"{shuffle}-{fmt}"] = {"1x": one, "10x": ten}
        mode = "shard-buffer" if shuffle == "shard" else "global shuffle"
        figures.append(ratio_figure(
            "loader-memory", f"peak RSS streaming 10x shards vs 1x ({mode}, {fmt})",
            [r["peak_mib"] for r in ten], "MiB", [r["peak_mib"] for r in one],
            f"{scale.memory_shards} shards", ("ratio", "<=", 1.1),
            note=f"growth while streaming: 1x +{one[0]['peak_mib'] - one[0]['setup_mib']:.0f} "
                 f"MiB, 10x +{ten[0]['peak_mib'] - ten[0]['setup_mib']:.0f} MiB; "
                 f"{scale.loader_videos_per_shard} videos/shard"))
    details["shards"] = {"1x": scale.memory_shards, "10x": 10 * scale.memory_shards}
    return BenchResult("loader-memory", figures, details)


if __name__ == "__main__":
    print(json.dumps(stream_epoch(sys.argv[1], sys.argv[2], sys.argv[3])))
