"""Training benchmarks (issues 5b, 5c): block-mask cost vs a training step, and training clips/s.

* **masking** (5b): :func:`block_mask` + :func:`apply_mask` for one micro-batch against the
  model's forward + backward on the same batch (``small`` at T5/16x16). Target < 1%.
* **training** (5c): clips/s of forward + backward + AdamW step for ``small`` at T5/16x16 in fp32
  and under bf16 autocast (their steps alternate, so the ratio is paired), and ``tiny``
  (positions set to T5/16x16). Model FLOPs are counted with
  :class:`torch.utils.flop_counter.FlopCounterMode` on one step; utilisation (MFU) is given against
  a dense matmul measured on this machine in the same run (CPUs have no datasheet peak we can
  trust), in fp32 and bf16.
* **model vs before** (issue 21): the ``small`` fp32 step now against the model file at
  :data:`benchmarks.model_ab.BASELINE_REV` (before the attention layout change), both in this
  process, steps alternating (:func:`benchmarks.model_ab.paired_step_times`); skipped with a note
  where git or that revision is not available.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch

from benchmarks import BenchResult, Scale, ratio_figure

FRAMES, GRID, NUM_BLOCKS = 5, 16, 5


def build(preset: str, proj_hidden: int = 2048) -> torch.nn.Module:
    from vimpac.pretrain.model import PRESETS, VimpacPretrainModel

    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS[preset], frames=FRAMES, height=GRID, width=GRID)
    return VimpacPretrainModel(cfg, proj_hidden=proj_hidden)


def make_batch(model: torch.nn.Module, videos: int, seed: int = 0) -> torch.Tensor:
    """Token ids [2B, T, H, W] (the two clips of B videos, flattened as training does)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.codebook_size, (2 * videos, FRAMES, GRID, GRID),
                         generator=gen)


def mask(model: torch.nn.Module, tokens: torch.Tensor, gen: torch.Generator
         ) -> tuple[torch.Tensor, torch.Tensor]:
    from vimpac.pretrain.masking import apply_mask, block_mask

    cfg = model.config
    m = block_mask(len(tokens), FRAMES, GRID, GRID, NUM_BLOCKS, generator=gen,
                   device=tokens.device)
    return apply_mask(tokens, m, pad_id=cfg.pad_id, mask_id=cfg.mask_id)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor,
               inputs: torch.Tensor, targets: torch.Tensor, bf16: bool) -> None:
    """Forward + losses + backward + optimizer step, as :func:`vimpac.pretrain.train.micro_step`."""
    from vimpac.pretrain.losses import pretrain_loss

    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(inputs, targets)
        losses = pretrain_loss(out, tokens[targets], mlm_weight=1.0, alpha=1.0, temperature=0.2)
    losses["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_times(preset: str, videos: int, steps: int, modes: tuple[bool, ...] = (False,)
               ) -> tuple[dict[bool, list[float]], float]:
    """Seconds per step, {bf16: [...]}, for ``steps`` timed steps per precision after one
    warm-up each; with two precisions their steps alternate (paired ratios). Also the FLOPs of
    one step (counted on the warm-up)."""
    from torch.utils.flop_counter import FlopCounterMode

    runs = {}
    for bf16 in modes:
        model = build(preset).train()
        runs[bf16] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    gen = torch.Generator().manual_seed(0)
    tokens = make_batch(runs[modes[0]][0], videos)
    counter = FlopCounterMode(display=False)
    for bf16, (model, opt) in runs.items():
        with counter if bf16 == modes[0] else contextlib.nullcontext():
            train_step(model, opt, tokens, *mask(model, tokens, gen), bf16)     # warm-up
    times: dict[bool, list[float]] = {bf16: [] for bf16 in modes}
    for i in range(steps):
        inputs, targets = mask(runs[modes[0]][0], tokens, gen)
        for bf16 in (modes if i % 2 == 0 else modes[::-1]):
            model, opt = runs[bf16]
            t0 = time.perf_counter()
            train_step(model, opt, tokens, inputs, targets, bf16)
            times[bf16].append(time.perf_counter() - t0)
    return times, float(counter.get_total_flops())


def matmul_peak(bf16: bool, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a dense n x n matmul on this machine (the MFU denominator)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def mask_times(videos: int, reps: int) -> list[float]:
    model = build("tiny")                       # masking does not depend on the model size
    tokens = make_batch(model, videos)
    gen = torch.Generator().manual_seed(0)
    mask(model, tokens, gen)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mask(model, tokens, gen)
        out.append(time.perf_counter() - t0)
    return out


def versus_before(preset: str, videos: int, rounds: int) -> tuple[list, dict]:
    """(figures, details) of this checkout's model against the model before issue 21."""
    from benchmarks.model_ab import BASELINE_REV, paired_step_times

    specs = ("now", f"rev:{BASELINE_REV}")
    try:
        t = paired_step_times(specs, preset, videos, rounds, bf16=False)
    except RuntimeError as exc:             # no git, or a checkout without that revision
        return [], {"versus_before": f"skipped: {exc}"}
    clips = 2 * videos
    fig = ratio_figure("training", f"{preset} fp32 clips/s vs the model at {BASELINE_REV}",
                       [clips / s for s in t[specs[0]]], "clips/s",
                       [clips / s for s in t[specs[1]]], f"model at {BASELINE_REV}",
                       note="same weights and batches, steps alternating in one process; "
                            f"{BASELINE_REV} = before the attention layout change (issue 21)")
    return [fig], {"versus_before_seconds": t}


def run(scale: Scale, work: Path) -> BenchResult:
    b, steps = scale.train_batch, scale.train_steps
    clips = 2 * b
    big = scale.train_model                     # "small" (tiny only at --scale tiny)
    small, flops_small = step_times(big, b, steps, (False, True))
    small32, small16 = small[False], small[True]
    tiny, flops_tiny = step_times("tiny", b, max(steps, 3))
    tiny32 = tiny[False]
    masking = mask_times(b, max(20, 10 * steps))
    peak32 = [matmul_peak(False) for _ in range(scale.repeats)]
    peak16 = [matmul_peak(True) for _ in range(scale.repeats)]
    note = f"micro-batch {b} videos = {clips} clips, T5/16x16, forward+backward+AdamW"
    figures = [
        ratio_figure("masking", f"block mask + apply per micro-batch vs train step ({big})",
                     [m * 1e3 for m in masking], "ms", [s * 1e3 for s in small32],
                     f"{big} fp32 step", ("ratio", "<", 0.01), paired=False, note=note),
        ratio_figure("training", f"{big} fp32 achieved FLOP/s vs fp32 matmul peak (MFU)",
                     [flops_small / s for s in small32], "FLOP/s", peak32, "1024^3 fp32 matmul",
                     paired=False, note=f"{flops_small / 1e9:.0f} GFLOP per step"),
        ratio_figure("training", f"{big} bf16-autocast clips/s vs fp32",
                     [clips / s for s in small16], "clips/s", [clips / s for s in small32],
                     f"{big} fp32", note=note + "; steps alternating"),
        ratio_figure("training", f"{big} bf16 achieved FLOP/s vs bf16 matmul peak (MFU)",
                     [flops_small / s for s in small16], "FLOP/s", peak16, "1024^3 bf16 matmul",
                     paired=False),
        ratio_figure("training", f"tiny fp32 clips/s vs {big} fp32", [clips / s for s in tiny32],
                     "clips/s", [clips / s for s in small32], f"{big} fp32", paired=False,
                     note=f"tiny {flops_tiny / 1e9:.1f} GFLOP per step"),
    ]
    details = {"model": big, "step_seconds": {f"{big}/fp32": small32, f"{big}/bf16": small16,
                                "tiny/fp32": tiny32},
               "mask_seconds": masking, "flops_per_step": {big: flops_small,
                                                           "tiny": flops_tiny},
               "matmul_peak_flops": {"fp32": peak32, "bf16": peak16},
               "micro_batch_videos": b, "torch_threads": torch.get_num_threads()}
    before_figs, before_details = versus_before(big, b, steps + 1)
    details.update(before_details)
    return BenchResult("training", figures + before_figs, details)
