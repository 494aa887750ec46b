"""Where one pre-training step goes: a ``torch.profiler`` breakdown by op and by kind of op.

``python -m benchmarks.profile_step [--preset small --preset base] [--videos 2] [--dtype fp32
--dtype bf16] [--variant now --variant rev:e7d81dd] [--device cpu|cuda] [--top 12]
[--out profile.json]``

For each (variant, preset, dtype) it builds the model as the training benchmark does (T5/16x16,
AdamW, block masking; ``--videos`` videos = 2x clips per micro-batch; variants as in
:mod:`benchmarks.model_ab`: this checkout, one attention kernel, or the model file at a git
revision), runs one warm-up step, then

* times ``--steps`` steps under ``torch.profiler`` (self time per aten op: CPU time, or the
  GPU kernel time of the op on CUDA), and
* runs one more step under a dispatch mode that records, per aten op, the bytes it reads and
  writes (inputs + outputs that are not views of an input) and its FLOPs (PyTorch's own FLOP
  formulas; SDPA on the CPU is counted as its two matmuls).

It prints, per configuration, the share of step time by kind of op (matmul, attention, copies
between layouts, LayerNorm, softmax, dropout, other elementwise, optimizer) and the top ops with
their FLOPs, bytes moved and arithmetic intensity (FLOP per byte): a low intensity with a large
share is a memory-bound op worth removing. ``--out`` writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from benchmarks.training import make_batch, mask, train_step

# Kind of each aten op (names without the "aten::" prefix); anything else is "other".
KINDS: dict[str, str] = {
    **dict.fromkeys(("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "_mkldnn_matmul",
                     "mkldnn_linear", "_addmm_activation"), "matmul"),
    **dict.fromkeys(("_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_flash_attention_for_cpu_backward",
                     "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_flash_attention_backward",
                     "_scaled_dot_product_efficient_attention",
                     "_scaled_dot_product_efficient_attention_backward",
                     "_scaled_dot_product_cudnn_attention",
                     "_scaled_dot_product_cudnn_attention_backward",
                     "_efficient_attention_forward", "_efficient_attention_backward",
                     "_flash_attention_forward", "_flash_attention_backward"), "attention"),
    **dict.fromkeys(("copy_", "cat", "clone", "contiguous", "_to_copy", "stack", "index",
                     "index_put_", "_unsafe_view", "empty_like", "zeros", "zero_", "fill_",
                     "_index_put_impl_", "narrow_copy", "slice_backward", "select_backward",
                     "new_zeros", "index_select", "masked_scatter", "nonzero",
                     "embedding_dense_backward", "embedding"), "copy / layout"),
    **dict.fromkeys(("native_layer_norm", "native_layer_norm_backward"), "LayerNorm"),
    **dict.fromkeys(("_softmax", "_softmax_backward_data", "_log_softmax", "_safe_softmax",
                     "_log_softmax_backward_data"), "softmax"),
    **dict.fromkeys(("native_dropout", "native_dropout_backward", "bernoulli_"), "dropout"),
    **dict.fromkeys(("add", "add_", "mul", "mul_", "div", "div_", "gelu", "gelu_backward",
                     "sub", "neg", "where", "threshold_backward", "relu", "relu_", "mean",
                     "sum", "expand", "masked_fill", "masked_fill_", "sqrt", "exp", "pow",
                     "rsqrt", "logical_not", "eq", "ne", "lt", "gt", "ge", "le", "any",
                     "bitwise_not", "clamp_min", "_native_batch_norm_legit_functional",
                     "native_batch_norm_backward", "_native_batch_norm_legit",
                     "nll_loss_forward", "nll_loss_backward", "norm", "linalg_vector_norm",
                     "_batch_norm_with_update", "batch_norm_backward"), "elementwise / reduce"),
}
OPTIMIZER_PREFIXES = ("_foreach_", "_fused_adamw", "lerp", "addcdiv")


def kind_of(name: str) -> str:
    short = name.removeprefix("aten::")
    if short.startswith(OPTIMIZER_PREFIXES):
        return "optimizer"
    return KINDS.get(short, "other")


@dataclass
class OpCost:
    """What one aten op did over a step: calls, seconds, FLOPs and bytes read + written."""

    calls: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _moved_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes read and written: inputs + new outputs; a view moves nothing; in-place ops write
    their first argument."""
    inputs = _tensors((args, kwargs))
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    outputs = [t for t in _tensors(out) if t.untyped_storage().data_ptr() not in storages]
    if outputs:
        return sum(map(_nbytes, inputs)) + sum(map(_nbytes, outputs))
    if func._schema.is_mutable and inputs:
        return sum(map(_nbytes, inputs)) + _nbytes(inputs[0])
    return 0                                                           # a view


def _sdpa_cpu_flops(args: tuple, backward: bool) -> float:
    """q k^T and p v (2 FLOPs a multiply-add each); backward does twice the forward's matmuls."""
    q, k = (args[1], args[2]) if backward else (args[0], args[1])  # backward: grad_out first
    *batch, lq, d = q.shape
    lk = k.shape[-2]
    n = 1
    for b in batch:
        n *= b
    fwd = 2 * 2 * n * lq * lk * d
    return 2 * fwd if backward else fwd


def _flops(func: Any, name: str, args: tuple, kwargs: dict, out: Any) -> float:
    packet = func._overloadpacket
    if packet in flop_registry:
        try:
            return float(flop_registry[packet](*args, **kwargs, out_val=out))
        except (TypeError, ValueError, IndexError, RuntimeError):
            return 0.0
    if "flash_attention_for_cpu" in name:
        return _sdpa_cpu_flops(args, backward=name.endswith("_backward"))
    return 0.0


class CostMode(TorchDispatchMode):
    """Records :class:`OpCost` per aten op (``aten::name``, after autograd: forward and backward
    ops alike) for what runs inside it. Time is wall time around the op on the CPU; on CUDA it is
    the time between two events around the op's kernels (read once at the end: no sync per op)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.cuda = device == "cuda"
        self.costs: dict[str, OpCost] = defaultdict(OpCost)
        self._events: list[tuple[str, Any, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = f"aten::{func._overloadpacket.__name__}"
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = func(*args, **kwargs)
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            self.costs[name].seconds += time.perf_counter() - t0
        cost = self.costs[name]
        cost.calls += 1
        cost.bytes += _moved_bytes(func, args, kwargs, out)
        cost.flops += _flops(func, name, args, kwargs, out)
        return out

    def resolve(self) -> dict[str, OpCost]:
        """The costs, with CUDA event times read (call after the step, once)."""
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.costs[name].seconds += start.elapsed_time(end) / 1e3
            self._events.clear()
        return dict(sorted(self.costs.items(), key=lambda kv: -kv[1].seconds))


@dataclass
class Profile:
    """One configuration: profiled step time, profiler self time per op, dispatch-level costs."""

    preset: str
    dtype: str
    videos: int
    variant: str
    step_s: float
    op_s: dict[str, float]
    costs: dict[str, OpCost] = field(default_factory=dict)
    cost_step_s: float = 0.0                # wall time of the step run under CostMode

    @property
    def label(self) -> str:
        return f"{self.preset} {self.dtype}" + ("" if self.variant == "now" else f" {self.variant}")

    def kinds(self) -> dict[str, float]:
        shares: dict[str, float] = defaultdict(float)
        for name, s in self.op_s.items():
            shares[kind_of(name)] += s
        return dict(sorted(shares.items(), key=lambda kv: -kv[1]))

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.preset, "dtype": self.dtype, "videos": self.videos,
                "variant": self.variant, "step_s": self.step_s, "profiler_self_s": self.op_s,
                "kinds_s": self.kinds(),
                "costs": {k: vars(v) for k, v in self.costs.items()},
                "cost_step_s": self.cost_step_s}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_config(preset: str, dtype: str, videos: int, steps: int, device: str,
                   variant: str = "now") -> Profile:
    """Warm up, profile ``steps`` steps, then cost one more step op by op."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.model_ab import build_variant

    bf16 = dtype == "bf16"
    model = build_variant(variant, preset, {}).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    gen = torch.Generator().manual_seed(0)
    tokens = make_batch(model, videos).to(device)
    batches = [mask(model, tokens, gen) for _ in range(steps + 2)]
    train_step(model, opt, tokens, *batches[0], bf16)                 # warm-up
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for inputs, targets in batches[1:steps + 1]:
            train_step(model, opt, tokens, inputs, targets, bf16)
        _sync(device)
    step_s = (time.perf_counter() - t0) / steps
    op_s = _self_times(prof, device, steps)
    mode = CostMode(device)
    t0 = time.perf_counter()
    with mode:
        train_step(model, opt, tokens, *batches[-1], bf16)
    costs = mode.resolve()
    return Profile(preset, dtype, videos, variant, step_s, op_s, costs,
                   time.perf_counter() - t0)


def _self_times(prof: Any, device: str, steps: int) -> dict[str, float]:
    """Profiler self time (s) per aten op and step: CPU time, or GPU kernel time on CUDA."""
    op_s = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if event.key.startswith("aten::") and us > 0:
            op_s[event.key] = us / 1e6 / steps
    return dict(sorted(op_s.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------- tables

def kinds_table(profiles: list[Profile]) -> str:
    """Share of profiled op time by kind, one column per configuration."""
    kinds = sorted({k for p in profiles for k in p.kinds()},
                   key=lambda k: -sum(p.kinds().get(k, 0.0) for p in profiles))
    head = " | ".join(p.label for p in profiles)
    lines = [f"| kind of op | {head} |", "|---" * (len(profiles) + 1) + "|"]
    for kind in kinds:
        cells = []
        for p in profiles:
            total = sum(p.op_s.values())
            cells.append(f"{100 * p.kinds().get(kind, 0.0) / total:.1f} %")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    steps = " | ".join(f"{p.step_s * 1e3:,.0f} ms" for p in profiles)
    lines.append(f"| step time (profiled) | {steps} |")
    return "\n".join(lines)


def top_table(p: Profile, top: int) -> str:
    """The ``top`` ops (after autograd) by time, with FLOPs, bytes moved and FLOP per byte."""
    total = sum(c.seconds for c in p.costs.values())
    lines = [f"`{p.label}`, {2 * p.videos} clips: ops timed one by one "
             f"({total * 1e3:,.0f} ms of a {p.cost_step_s * 1e3:,.0f} ms step)", "",
             "| op | kind | calls | ms | share | GFLOP | MB moved | FLOP/byte | GB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, cost in list(p.costs.items())[:top]:
        intensity = f"{cost.flops / cost.bytes:.1f}" if cost.bytes and cost.flops else "-"
        gflop = f"{cost.flops / 1e9:.1f}" if cost.flops else "-"
        rate = f"{cost.bytes / cost.seconds / 1e9:.1f}" if cost.seconds else "-"
        lines.append(f"| `{name.removeprefix('aten::')}` | {kind_of(name)} | {cost.calls} | "
                     f"{cost.seconds * 1e3:,.1f} | {100 * cost.seconds / total:.1f} % | {gflop} | "
                     f"{cost.bytes / 1e6:,.0f} | {intensity} | {rate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=("tiny", "small", "base",
                                                               "large-half"))
    parser.add_argument("--dtype", action="append", choices=("fp32", "bf16"))
    parser.add_argument("--videos", type=int, default=2, help="videos per micro-batch (default 2)")
    parser.add_argument("--variant", action="append",
                        help="now (default), now:<kernel> or rev:<git revision>")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON")
    args = parser.parse_args(argv)
    if args.videos < 1 or args.steps < 1:
        parser.error("--videos and --steps must be >= 1")
    profiles = [profile_config(preset, dtype, args.videos, args.steps, args.device, variant)
                for preset in args.preset or ["small", "base"]
                for dtype in args.dtype or ["fp32", "bf16"]
                for variant in args.variant or ["now"]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}\n")
    print(kinds_table(profiles) + "\n")
    for p in profiles:
        print(top_table(p, args.top) + "\n")
    if args.out is not None:
        args.out.write_text(json.dumps([p.to_json() for p in profiles], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
