"""What the fine-tuning benchmarks share: one pipeline run per set of overrides, and means over
seeds with their 95 % Student t-intervals.

Every run goes through :func:`vimpac.pipeline.run_pipeline`, so stages whose settings match an
earlier run (the corpus, the tokenizer, the archives, one seed's pre-training, the scratch arm)
come from the pipeline cache, and an interrupted benchmark continues where it stopped when the
same command is run again: finished stages are reused and a half-done one resumes from its
checkpoint.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vimpac.config import PipelineConfig, load_pipeline
from vimpac.pipeline import DONE, StageOutcome, read_stage_record, run_pipeline
from vimpac.report import t_interval


@dataclass
class PipelineRun:
    """One pipeline run: its resolved config, each stage's outcome, and the call's wall time
    (cached stages cost nothing here; :meth:`stage_seconds` says what they cost when they ran)."""

    config: PipelineConfig
    outcomes: dict[str, StageOutcome]
    seconds: float

    def result(self, stage: str) -> dict[str, Any]:
        return self.outcomes[stage].result

    def stage_seconds(self, stages: Iterable[str]) -> dict[str, float | None]:
        """Seconds each of ``stages`` took when it ran (from its ``DONE.json``)."""
        out: dict[str, float | None] = {}
        for name in stages:
            outcome = self.outcomes.get(name)
            done = outcome is not None and (outcome.path / DONE).is_file()
            out[name] = read_stage_record(outcome.path, name).get("seconds") if done else None
        return out


def run_with(pipeline: str, config_path: str | None, runs: str,
             overrides: Sequence[str]) -> PipelineRun:
    """Run pipeline ``pipeline`` with ``--set`` style ``overrides``, reusing cached stages."""
    cfg = load_pipeline(pipeline, config_path, list(overrides))
    start = time.perf_counter()
    outcomes = {o.name: o for o in run_pipeline(cfg, runs)}
    return PipelineRun(cfg, outcomes, time.perf_counter() - start)


def seed_overrides(seed: int, seed_pretraining: bool = True) -> list[str]:
    """Seed ``seed`` for fine-tuning and (unless ``seed_pretraining`` is false) pre-training."""
    return ([f"pretrain.seed={seed}"] if seed_pretraining else []) + [f"finetune.seed={seed}"]


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean of ``values`` (one per seed) with its 95 % Student t-interval (n - 1 degrees of
    freedom; None with fewer than two values), min and max."""
    n = len(values)
    low, high = t_interval(values)[1:] if n > 1 else (None, None)
    return {"mean": statistics.mean(values), "ci95": [low, high],
            "ci95_method": f"Student t over {n} seeds, {n - 1} degrees of freedom",
            "min": min(values), "max": max(values), "n": n}


def interval_text(stats: dict[str, Any], scale: float = 100.0, sign: bool = False) -> str:
    """E.g. ``41.3 [35.0, 47.5]`` (``scale`` 100: fractions as percentages / points)."""
    fmt = "{:+.1f}" if sign else "{:.1f}"
    low, high = stats["ci95"]
    text = fmt.format(scale * stats["mean"])
    if low is None:
        return text + " (one seed)"
    return f"{text} [{fmt.format(scale * low)}, {fmt.format(scale * high)}]"


def csv_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def run_main(main: Callable[[], Any]) -> None:
    """Run a benchmark's ``main`` as a command: a ``SystemExit`` carrying a message (bad input,
    named in one line) is that line on stderr and exit status 2, as the ``vimpac`` command does."""
    try:
        code = main()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise
    raise SystemExit(code)
