"""Two variants of the model's training step side by side: now vs an earlier git revision, or
one attention kernel vs another.

``python -m benchmarks.model_ab [--a now] [--b rev:e7d81dd] [--preset small] [--dtype fp32]
[--videos 2] [--rounds 5] [--threads N] [--clock wall|cpu]``

Variants: ``now`` (this checkout), ``now:matmul`` / ``now:sdpa`` (one attention kernel),
``rev:<revision>`` (``vimpac/pretrain/model.py`` at that git revision). Both models are built in
this process with the same weights, batch and masks; their steps alternate (A B, B A, A B, ...)
so load on the shared machine hits both alike, and each round gives one paired ratio. Prints the
median step time of each and the median [min-max] of the per-round ratios of clips/s (A / B).
:func:`paired_step_times` is what the training benchmark uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from benchmarks import Stat
from benchmarks.training import FRAMES, GRID, make_batch, mask, train_step

ROOT = Path(__file__).resolve().parent.parent
MODEL_PATH = "vimpac/pretrain/model.py"
# The last revision before the axial-attention layout change (issue 21).
BASELINE_REV = "e7d81dd"


def model_module_at(rev: str) -> ModuleType:
    """``vimpac/pretrain/model.py`` as it was at git revision ``rev``, imported under its own
    name (raises RuntimeError when git or the revision is not available)."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:{MODEL_PATH}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"cannot read {MODEL_PATH} at git revision {rev!r}: {exc}") from exc
    name = f"vimpac_model_at_{rev}"
    folder = Path(tempfile.mkdtemp(prefix="vimpac-model-"))
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                     # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def build_variant(spec: str, preset: str, modules: dict[str, ModuleType]) -> torch.nn.Module:
    """A model for ``spec``: ``now`` / ``now:<kernel>`` (this checkout's model, optionally with
    one attention kernel) or ``rev:<git revision>`` (the model file at that revision). Every
    variant gets the same weights (seed 0 in this checkout's model, then copied)."""
    from vimpac.pretrain.model import PRESETS, AxialAttention, VimpacPretrainModel

    torch.manual_seed(0)
    now = VimpacPretrainModel(dataclasses.replace(PRESETS[preset], frames=FRAMES, height=GRID,
                                                  width=GRID))
    kind, _, arg = spec.partition(":")
    if kind == "now":
        for m in now.modules():
            if isinstance(m, AxialAttention):
                m.kernel = arg or None
        return now
    if kind != "rev" or not arg:
        raise ValueError(f"variant {spec!r}: use now, now:<kernel> or rev:<git revision>")
    module = modules.setdefault(arg, model_module_at(arg))
    cfg = module.ModelConfig(**dataclasses.asdict(module.PRESETS[preset]))
    model = module.VimpacPretrainModel(dataclasses.replace(cfg, frames=FRAMES, height=GRID,
                                                           width=GRID))
    model.load_state_dict(now.state_dict())
    return model


def paired_step_times(specs: tuple[str, str], preset: str, videos: int, rounds: int, bf16: bool,
                      clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per training step of two variants (see :func:`build_variant`), alternating which
    goes first; round 0 is a warm-up. ``clock``: "wall" or "cpu" (process CPU time: with one
    thread, time the process spent descheduled by other load does not count)."""
    timer = time.perf_counter if clock == "wall" else time.process_time
    modules: dict[str, ModuleType] = {}
    models = {spec: build_variant(spec, preset, modules).train() for spec in specs}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    first = models[specs[0]]
    tokens = make_batch(first, videos)
    gen = torch.Generator().manual_seed(0)
    batches = [mask(first, tokens, gen) for _ in range(rounds + 1)]
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    for i, batch in enumerate(batches):
        for spec in (specs if i % 2 else specs[::-1]):
            t0 = timer()
            train_step(models[spec], opts[spec], tokens, *batch, bf16)
            if i:
                times[spec].append(timer() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", default="now", help="variant A (default: now)")
    parser.add_argument("--b", default=f"rev:{BASELINE_REV}",
                        help=f"variant B (default: rev:{BASELINE_REV})")
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t = paired_step_times((args.a, args.b), args.preset, args.videos, args.rounds,
                          args.dtype == "bf16", args.clock)
    a, b = Stat.of(t[args.a]), Stat.of(t[args.b])
    ratios = Stat.of([tb / ta for ta, tb in zip(t[args.a], t[args.b], strict=True)])
    print(f"{args.preset} {args.dtype}, {2 * args.videos} clips, {torch.get_num_threads()} "
          f"threads, {args.clock} clock, {args.rounds} rounds: {args.a} "
          f"{a.median * 1e3:,.0f} ms, {args.b} {b.median * 1e3:,.0f} ms; clips/s {args.a} / "
          f"{args.b} = {ratios.median:.3f} [{ratios.min:.3f}-{ratios.max:.3f}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
