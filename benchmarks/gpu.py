"""Single-GPU check (issues 9, 21): pre-training and tokenization at the hardware's speed.

``python -m benchmarks.gpu [--dry-run] [--out DIR] [--checks a,b] [--budget-s S]``
(``benchmarks/gpu_check.sh`` calls it). On one CUDA GPU, in under 8 minutes, it measures, in this
order (cheap and most telling first; the JSON is rewritten after every check, so a run cut short
keeps what it measured, and a check that would start past ``--budget-s`` is skipped):

1. **pretrain**: clips/s, model FLOPs utilisation (MFU), peak GPU memory and the warm-up steps'
   time for ``small``, ``base`` and ``large-half`` at T5/16x16 under bf16 autocast, eager; and
   whether attention runs on a fused SDPA kernel (a forward restricted to flash / efficient);
2. **profile**: a ``torch.profiler`` breakdown (GPU kernel time by kind of op; top ops with FLOPs,
   bytes moved and FLOP per byte) of one ``small`` and one ``base`` step
   (:mod:`benchmarks.profile_step`);
3. **attention**: the ``small`` training step with each attention kernel: SDPA left to choose,
   SDPA restricted to flash, efficient, cuDNN or math, and the plain matmul + softmax kernel;
4. **max_batch**: the largest micro-batch (videos, doubling) whose eager bf16 step fits in GPU
   memory per preset, and ``small``'s clips/s and MFU at that batch;
5. **loader**: the real :class:`ClipStream` DataLoader (workers, pinned memory) feeding ``small``:
   the fraction of step time spent waiting for data (target < 5 %);
6. **tokenize**: the tokenize job (the DALL-E-size encoder, random weights, bf16 on the GPU; one
   decode worker per core) on a steady workload: synthetic 30 s 360p videos made here with
   ffmpeg, repeated until decode-only takes >= ``tokenize_min_decode_s``; against decode-only
   (the job's ffmpeg command, same workers) and encode-only; with the encoder's busy fraction
   inside the job;
7. **pretrain compiled**: the same presets with ``torch.compile`` on every transformer layer
   (regional: one layer is compiled and reused), and ``small`` with the whole model compiled, with
   compile time (the warm-up steps).

It prints one summary table and writes ``gpu.json``. ``--dry-run`` runs the same code on the CPU
at tiny sizes (compile with the ``aot_eager`` backend: traced, not code-generated), so the script
is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import Stat
from vimpac.common.environment import describe_machine, machine
from vimpac.common.workers import worker_options

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by device name; else measured.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
             "A10": 125e12, "L4": 121e12, "4090": 165e12}
# Attention kernels compared (see attention_variant()).
ATTENTION_VARIANTS = ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "matmul")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (``dry`` = CPU smoke test)."""

    dry: bool
    device: str
    presets: tuple[str, ...]
    batch: dict[str, int]       # videos per step (2 clips each) per preset
    compiled: tuple[tuple[str, str], ...]   # (preset, compile mode) of the compiled check
    steps: int                  # timed steps per configuration
    warmup: int                 # untimed steps before them (compilation happens here)
    short_steps: int            # timed steps per attention kernel and at the largest batch
    attention_variants: tuple[str, ...]   # see attention_variant()
    profile_presets: tuple[str, ...]
    max_batch_limit: int        # largest micro-batch (videos) tried
    decode_workers: int
    encoder_channels: int       # DALL-E n_hid (256 is the real encoder)
    synth_videos: int           # distinct synthetic videos made for the tokenize workload
    synth_seconds: float
    synth_size: tuple[int, int]  # (width, height)
    tokenize_min_decode_s: float  # the workload is repeated until decode-only takes this long
    encode_only_max_frames: int   # encode-only runs on at most this many decoded frames
    loader_workers: int
    loader_steps: int
    compile_backend: str = "inductor"
    budget_s: float = 450.0


def make_plan(dry: bool, budget_s: float | None = None) -> Plan:
    if dry:
        return Plan(True, "cpu", ("tiny",), {"tiny": 1}, (("tiny", "layers"),), steps=1,
                    warmup=1, short_steps=1, attention_variants=("sdpa-math", "matmul"),
                    profile_presets=("tiny",), max_batch_limit=1,
                    decode_workers=1, encoder_channels=8, synth_videos=2, synth_seconds=2.0,
                    synth_size=(96, 64), tokenize_min_decode_s=0.0, encode_only_max_frames=64,
                    loader_workers=0, loader_steps=2, compile_backend="aot_eager",
                    budget_s=budget_s or 600.0)
    cores = os.cpu_count() or 2
    return Plan(False, "cuda", ("small", "base", "large-half"),
                {"small": 32, "base": 32, "large-half": 16},
                (("small", "layers"), ("base", "layers"), ("large-half", "layers"),
                 ("small", "model")), steps=15, warmup=2, short_steps=6,
                attention_variants=ATTENTION_VARIANTS, profile_presets=("small", "base"),
                max_batch_limit=512, decode_workers=cores, encoder_channels=256,
                synth_videos=2 * cores, synth_seconds=30.0, synth_size=(640, 360),
                tokenize_min_decode_s=60.0, encode_only_max_frames=16384,
                loader_workers=min(4, max(1, cores - 2)), loader_steps=60,
                budget_s=budget_s or 450.0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ pretrain

def peak_flops(device: str) -> tuple[float, str]:
    """Dense bf16 peak FLOP/s of the device: datasheet for known GPUs, else a measured matmul."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, value in PEAK_BF16.items():
            if key in name:
                return value, f"{name} datasheet"
    n = 4096 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    sync(device)
    return 5 * 2 * n ** 3 / (time.perf_counter() - t0), "measured bf16 matmul"


def fused_attention_ok(model: torch.nn.Module, inputs: torch.Tensor, mask: torch.Tensor,
                       device: str) -> bool | None:
    """Whether the forward pass runs with SDPA restricted to the flash / mem-efficient kernels."""
    if device != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), \
                torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            model(inputs, mask)
        return True
    except RuntimeError:
        return False


def compiled(model: torch.nn.Module, mode: str, backend: str) -> torch.nn.Module:
    """``model`` run eagerly, with every transformer layer compiled (in place; the layers share
    one compiled graph), or compiled whole (a wrapper)."""
    if mode == "layers":
        for layer in model.backbone.layers:
            layer.compile(backend=backend)
        return model
    if mode == "model":
        return torch.compile(model, backend=backend)
    return model


@dataclass
class Trainer:
    """One preset's model, optimizer and batch on the device, ready to time steps."""

    preset: str
    videos: int
    device: str
    model: torch.nn.Module
    runner: torch.nn.Module
    opt: torch.optim.Optimizer
    tokens: torch.Tensor
    gen: torch.Generator

    @classmethod
    def build(cls, preset: str, videos: int, device: str) -> Trainer:
        from benchmarks.training import build, make_batch

        model = build(preset).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        tokens = make_batch(model, videos).to(device)
        return cls(preset, videos, device, model, model, opt, tokens,
                   torch.Generator().manual_seed(0))

    def compile(self, mode: str, backend: str) -> None:
        """Steps from now on run ``compiled(model, mode)`` (count FLOPs before this)."""
        self.runner = compiled(self.model, mode, backend)

    def step(self) -> float:
        """One masked bf16 training step; seconds (device synchronised)."""
        from benchmarks.training import mask, train_step

        inputs, targets = mask(self.model, self.tokens, self.gen)
        t0 = time.perf_counter()
        train_step(self.runner, self.opt, self.tokens, inputs, targets, bf16=True)
        sync(self.device)
        return time.perf_counter() - t0

    def flops(self) -> float:
        """FLOPs of one step (counted eagerly, before any compile)."""
        from torch.utils.flop_counter import FlopCounterMode

        from benchmarks.training import mask, train_step

        inputs, targets = mask(self.model, self.tokens, self.gen)
        counter = FlopCounterMode(display=False)
        with counter:
            train_step(self.model, self.opt, self.tokens, inputs, targets, bf16=True)
        return float(counter.get_total_flops())


def time_steps(trainer: Trainer, steps: int, warmup: int) -> tuple[Stat, float]:
    """(step seconds over ``steps`` steps, seconds of the ``warmup`` steps before them)."""
    warmup_s = sum(trainer.step() for _ in range(warmup))
    return Stat.of([trainer.step() for _ in range(steps)]), warmup_s


def pretrain_config(plan: Plan, preset: str, mode: str = "eager") -> dict[str, Any]:
    """Clips/s, MFU, peak memory and warm-up (compile) time of bf16 training for one preset."""
    dev, videos = plan.device, plan.batch[preset]
    _reset_memory(dev)
    trainer = Trainer.build(preset, videos, dev)
    flops = trainer.flops()
    inputs, targets = _masked(trainer)
    fused = fused_attention_ok(trainer.model, inputs, targets, dev)
    graphs = _compiled_graphs()
    trainer.compile(mode, plan.compile_backend)
    _reset_peak(dev)
    step, warmup_s = time_steps(trainer, plan.steps, plan.warmup)
    graphs = _compiled_graphs() - graphs
    peak, peak_src = peak_flops(dev)
    out = {"preset": preset, "compile": mode, "videos": videos, "clips": 2 * videos,
           "clips_per_s": 2 * videos / step.median, "step_s": step.to_json(),
           "flops_per_step": flops, "mfu": flops / step.median / peak, "peak_flops": peak,
           "peak_source": peak_src, "fused_sdpa": fused, "peak_mem_gib": _peak_gib(dev),
           "warmup_s": warmup_s, "graphs_compiled": graphs}
    del trainer
    _reset_memory(dev)
    return out


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process (regional compile: one per layer shape)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _masked(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    from benchmarks.training import mask

    return mask(trainer.model, trainer.tokens, trainer.gen)


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


# ------------------------------------------------------------------- attention kernels, batch

@contextlib.contextmanager
def attention_variant(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with one attention kernel: "matmul", "sdpa" (PyTorch chooses) or
    "sdpa-<flash|efficient|cudnn|math>" (SDPA restricted to that backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vimpac.pretrain.model import AxialAttention

    kernel, _, backend = name.partition("-")
    for m in model.modules():
        if isinstance(m, AxialAttention):
            m.kernel = kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    try:
        with (sdpa_kernel([backends[backend]]) if backend else contextlib.nullcontext()):
            yield
    finally:
        for m in model.modules():
            if isinstance(m, AxialAttention):
                m.kernel = None


def attention_check(plan: Plan) -> dict[str, Any]:
    """The first preset's eager bf16 step time with each attention kernel (errors recorded)."""
    preset = plan.presets[0]
    trainer = Trainer.build(preset, plan.batch[preset], plan.device)
    rows = {}
    for name in plan.attention_variants:
        try:
            with attention_variant(trainer.model, name):
                step, _ = time_steps(trainer, plan.short_steps, plan.warmup)
            rows[name] = {"step_s": step.to_json(),
                          "clips_per_s": 2 * trainer.videos / step.median}
        except RuntimeError as exc:
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"preset": preset, "videos": trainer.videos, "kernels": rows}


def max_batch_check(plan: Plan) -> dict[str, Any]:
    """Per preset, the largest micro-batch (doubling from the plan's) whose step fits in memory;
    then the first preset's clips/s and MFU at its largest batch."""
    fits = {preset: _largest_batch(plan, preset) for preset in plan.presets}
    first = plan.presets[0]
    best = fits[first]["videos"]
    out: dict[str, Any] = {"largest": fits}
    if best:
        dev = plan.device
        trainer = Trainer.build(first, best, dev)
        flops = trainer.flops()
        _reset_peak(dev)
        step, _ = time_steps(trainer, plan.short_steps, plan.warmup)
        peak, _ = peak_flops(dev)
        out["at_largest"] = {"preset": first, "videos": best, "clips_per_s": 2 * best / step.median,
                             "mfu": flops / step.median / peak, "peak_mem_gib": _peak_gib(dev)}
        del trainer
        _reset_memory(dev)
    return out


def _largest_batch(plan: Plan, preset: str) -> dict[str, Any]:
    videos, best, peak = plan.batch[preset], 0, None
    while videos <= plan.max_batch_limit:
        used = _step_peak_gib(plan, preset, videos)
        _reset_memory(plan.device)          # the failed step's frames are gone by now
        if used is False:
            break
        best, peak = videos, used
        videos *= 2
    return {"videos": best, "peak_mem_gib": peak, "tried_up_to": min(videos, plan.max_batch_limit)}


def _step_peak_gib(plan: Plan, preset: str, videos: int) -> float | None | bool:
    """Peak GiB of one training step at ``videos`` (None on the CPU), False when it runs out of
    GPU memory."""
    _reset_memory(plan.device)
    try:
        Trainer.build(preset, videos, plan.device).step()
    except torch.OutOfMemoryError:
        return False
    return _peak_gib(plan.device)


def profile_check(plan: Plan) -> dict[str, Any]:
    """The profiler breakdown of one step per profiled preset (bf16, the plan's batch)."""
    from benchmarks.profile_step import kinds_table, profile_config, top_table

    profiles = [profile_config(p, "bf16", plan.batch[p], plan.warmup, plan.device)  # steps
                for p in plan.profile_presets]
    return {"tables": [kinds_table(profiles)] + [top_table(p, 15) for p in profiles],
            "profiles": [p.to_json() for p in profiles]}


# ------------------------------------------------------------------------------------ tokenize

def make_synthetic_videos(plan: Plan, folder: Path) -> list[Path]:
    """``plan.synth_videos`` distinct H.264 videos (test pattern + moving noise), made with the
    project's ffmpeg, all at once on the CPU cores."""
    from vimpac.common.ffmpeg_exe import ffmpeg_exe

    folder.mkdir(parents=True, exist_ok=True)
    w, h = plan.synth_size
    paths = [folder / f"synth_{i:03d}.mp4" for i in range(plan.synth_videos)]

    def make(i: int) -> None:
        src = (f"testsrc2=size={w}x{h}:rate=30:duration={plan.synth_seconds},"
               f"hue=h={37 * i % 360},noise=alls=12:allf=t+u:all_seed={i}")
        subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-f",
                        "lavfi", "-i", src, "-c:v", "libx264", "-preset", "veryfast",
                        "-pix_fmt", "yuv420p", "-threads", "1", str(paths[i])],
                       check=True, capture_output=True)

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(make, range(len(paths))))
    return paths


def repeat_links(paths: list[Path], copies: int, folder: Path) -> list[Path]:
    """``paths`` ``copies`` times under distinct names (hard links, else byte copies)."""
    from benchmarks.tokenize_job import job_inputs

    return job_inputs(paths, copies, folder) if copies > 1 else list(paths)


@contextlib.contextmanager
def encoder_timer() -> Iterator[list[float]]:
    """Seconds of every ``encode_clips`` call made inside (the job's encoder; CUDA calls
    synchronise before returning, so these are busy times)."""
    import vimpac.tokenize.tokenizer as tk

    original, spans = tk.encode_clips, []

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spans.append(time.perf_counter() - t0)

    tk.encode_clips = timed
    try:
        yield spans
    finally:
        tk.encode_clips = original


def tokenize_check(plan: Plan, work: Path) -> dict[str, Any]:
    """Job source frames/s vs decode-only (same ffmpeg command and workers) and encode-only, on a
    workload repeated until decode-only takes at least ``plan.tokenize_min_decode_s``."""
    import benchmarks.tokenize_job as tb
    from vimpac.common.video import count_frames
    from vimpac.tokenize.job import run_tokenize

    t0 = time.perf_counter()
    base = make_synthetic_videos(plan, work / "synth")
    make_s = time.perf_counter() - t0
    tb.WORKERS = plan.decode_workers
    probe_s, _ = tb.decode_only(base)
    copies = max(1, math.ceil(plan.tokenize_min_decode_s / max(probe_s, 1e-3)))
    paths = repeat_links(base, copies, work / "workload")
    src_frames = sum(count_frames(p, None) for p in base) * copies
    decode_s, frames = tb.decode_only(paths)
    tok = _dalle_tokenizer(plan, work / "tok-dalle")
    sample = frames[:plan.encode_only_max_frames]
    encode_s = tb.encode_only(tok, sample, plan.device) * len(frames) / max(len(sample), 1)
    del frames
    out = work / "tok-archive"
    shutil.rmtree(out, ignore_errors=True)
    cfg = tb.job_config(decode_workers=plan.decode_workers, device=plan.device)
    with encoder_timer() as spans:
        t0 = time.perf_counter()
        summary = run_tokenize([str(p) for p in paths], tok, out, cfg)
        job_s = time.perf_counter() - t0
    return {"videos": len(paths), "distinct_videos": len(base), "copies": copies,
            "video": f"{plan.synth_size[0]}x{plan.synth_size[1]}, {plan.synth_seconds:g} s, "
                     "30 fps H.264", "make_videos_s": make_s, "source_frames": src_frames,
            "output_frames": summary.frames, "decode_workers": plan.decode_workers,
            "decode_only_s": decode_s, "job_s": job_s, "encode_only_s": encode_s,
            "encode_only_frames_measured": len(sample),
            "decode_only_src_fps": src_frames / decode_s, "job_src_fps": src_frames / job_s,
            "job_vs_decode": decode_s / job_s,
            "job_vs_max_decode_encode": job_s / max(decode_s, encode_s),
            "job_vs_sum_decode_encode": job_s / (decode_s + encode_s),
            "encoder_busy_s": sum(spans), "encoder_calls": len(spans),
            "encoder_busy_fraction": sum(spans) / job_s, "failed": summary.failed,
            "encoder": f"dalle n_hid={plan.encoder_channels}, bf16 on {plan.device}"}


def _dalle_tokenizer(plan: Plan, folder: Path) -> Path:
    from vimpac.tokenize.dalle import DalleConfig, DalleTokenizer
    from vimpac.tokenize.tokenizer import save_tokenizer

    torch.manual_seed(0)
    save_tokenizer(DalleTokenizer(DalleConfig(channels=plan.encoder_channels,
                                              blocks_per_group=1 if plan.dry else 2)), folder)
    return folder


# -------------------------------------------------------------------------------------- loader

def loader_check(plan: Plan, work: Path) -> dict[str, Any]:
    """Fraction of step time spent waiting for the DataLoader while training the first preset."""
    from torch.utils.data import DataLoader

    from benchmarks.fixtures import write_token_archive
    from benchmarks.training import build, mask, train_step
    from vimpac.pretrain.data import ClipStream, StreamSpec

    dev, preset = plan.device, plan.presets[0]
    model = build(preset).to(dev).train()
    archive = write_token_archive(work / "gpu-archive", shards=4 if plan.dry else 8,
                                  videos_per_shard=16 if plan.dry else 128, frames=(10, 240),
                                  codebook=model.config.codebook_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    spec = StreamSpec(frames=5, grid=16, batch_size=plan.batch[preset],
                      pad_id=model.config.pad_id)
    loader = DataLoader(ClipStream([archive], spec), batch_size=None,
                        num_workers=plan.loader_workers, pin_memory=dev == "cuda",
                        **worker_options(plan.loader_workers),
                        prefetch_factor=4 if plan.loader_workers else None)
    gen = torch.Generator().manual_seed(0)
    it = iter(loader)
    waits, totals = [], []
    for i in range(plan.loader_steps + 3):
        t0 = time.perf_counter()
        batch = next(it)["tokens"]
        t1 = time.perf_counter()
        tokens = batch.to(dev, non_blocking=True).transpose(0, 1).flatten(0, 1)
        inputs, targets = mask(model, tokens, gen)
        train_step(model, opt, tokens, inputs, targets, bf16=True)
        sync(dev)
        if i >= 3:                                       # skip worker start-up
            waits.append(t1 - t0)
            totals.append(time.perf_counter() - t0)
    del it
    return {"preset": preset, "workers": plan.loader_workers, "steps": len(totals),
            "wait_fraction": sum(waits) / sum(totals), "step_s": Stat.of(totals).to_json()}


# ---------------------------------------------------------------------------------------- main

def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for r in result.get("pretrain", []):
        mem = f", {r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else ""
        how = {"eager": "", "layers": " compiled (layers)", "model": " compiled (model)"}
        rows.append((f"pretrain {r['preset']} bf16{how[r['compile']]}, {r['clips']} clips",
                     f"{r['clips_per_s']:.1f} clips/s{mem}",
                     f"MFU {r['mfu']:.1%}, warm-up {r['warmup_s']:.0f} s, "
                     f"fused SDPA {r['fused_sdpa']}"))
    att = result.get("attention")
    if att:
        cells = [f"{k} {v['clips_per_s']:.0f}" if "clips_per_s" in v else f"{k} failed"
                 for k, v in att["kernels"].items()]
        rows.append((f"attention kernels, {att['preset']} clips/s", ", ".join(cells[:3]),
                     ", ".join(cells[3:])))
    mb = result.get("max_batch")
    if mb:
        text = ", ".join(f"{p} {v['videos']}" for p, v in mb["largest"].items())
        at = mb.get("at_largest")
        note = (f"{at['preset']} at {at['videos']}: {at['clips_per_s']:.0f} clips/s, MFU "
                f"{at['mfu']:.1%}") if at else "-"
        rows.append(("largest micro-batch (videos)", text, note))
    ld = result.get("loader")
    if ld:
        rows.append((f"loader feeding {ld['preset']} ({ld['workers']} workers)",
                     f"wait {ld['wait_fraction']:.1%} of step", "target < 5%"))
    tok = result.get("tokenize")
    if tok:
        rows.append(("tokenize job vs ffmpeg decode limit (source frames/s)",
                     f"{tok['job_src_fps']:.0f} vs {tok['decode_only_src_fps']:.0f}",
                     f"{tok['job_vs_decode']:.2f}x (target >= 0.8), decode limit "
                     f"{tok['decode_only_s']:.0f} s"))
        rows.append(("tokenize job time vs max(decode only, encode only)",
                     f"{tok['job_s']:.1f} s vs {tok['decode_only_s']:.1f} / "
                     f"{tok['encode_only_s']:.1f} s",
                     f"{tok['job_vs_max_decode_encode']:.2f}x (target <= 1.15), encoder busy "
                     f"{tok['encoder_busy_fraction']:.0%}"))
    return rows


CHECKS = ("pretrain", "profile", "attention", "max_batch", "loader", "tokenize", "compiled")


def check_list(plan: Plan, work: Path) -> list[tuple[str, Callable[[], Any]]]:
    """(name, thunk) of every check, in running order."""
    checks: list[tuple[str, Callable[[], Any]]] = [
        (f"pretrain {p}", functools.partial(pretrain_config, plan, p)) for p in plan.presets]
    checks += [("profile", lambda: profile_check(plan)),
               ("attention", lambda: attention_check(plan)),
               ("max_batch", lambda: max_batch_check(plan)),
               ("loader", lambda: loader_check(plan, work)),
               ("tokenize", lambda: tokenize_check(plan, work))]
    checks += [(f"compiled {p} {mode}", functools.partial(pretrain_config, plan, p, mode))
               for p, mode in plan.compiled]
    return checks


def run(plan: Plan, work: Path, out: Path, only: tuple[str, ...] = CHECKS) -> dict[str, Any]:
    """Every check in turn; ``out/gpu.json`` is rewritten after each, so a run cut short by a
    time limit still leaves what it measured. A check that raises is recorded, not fatal; a
    check that would start after ``plan.budget_s`` is skipped and listed."""
    result: dict[str, Any] = {"dry_run": plan.dry, "machine": machine(), "plan": plan.__dict__,
                              "errors": {}, "skipped": [], "check_seconds": {}}
    start = time.perf_counter()
    for name, check in check_list(plan, work):
        if name.split()[0] not in only:
            continue
        if time.perf_counter() - start > plan.budget_s:
            result["skipped"].append(name)
            print(f"[{name}] skipped: past the {plan.budget_s:.0f} s budget", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            value = check()
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
            result["errors"][name] = f"{type(exc).__name__}: {str(exc)[:500]}"
            print(f"[{name}] failed: {result['errors'][name]}", flush=True)
            continue
        finally:
            result["check_seconds"][name] = time.perf_counter() - t0
        key = "pretrain" if name.split()[0] in ("pretrain", "compiled") else name
        if key == "pretrain":
            result.setdefault("pretrain", []).append(value)
        else:
            result[key] = value
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        save(out, result)
    result["met"] = targets_met(result)
    return result


# MFU targets of issue 21 (bf16, one GPU).
MFU_TARGETS = {"small": 0.25, "base": 0.35, "large-half": 0.40}


def targets_met(result: dict[str, Any]) -> dict[str, bool]:
    tok, ld = result.get("tokenize"), result.get("loader")
    met = {"tokenize_vs_decode_ge_0.8": tok is not None and tok["job_vs_decode"] >= 0.8,
           "tokenize_vs_max_le_1.15": tok is not None and tok["job_vs_max_decode_encode"] <= 1.15,
           "loader_wait_lt_5pct": ld is not None and ld["wait_fraction"] < 0.05,
           "fused_sdpa": bool(result.get("pretrain")) and all(
               r["fused_sdpa"] is not False for r in result["pretrain"])}
    for preset, target in MFU_TARGETS.items():
        best = max((r["mfu"] for r in result.get("pretrain", []) if r["preset"] == preset),
                   default=None)
        if best is not None:
            met[f"{preset}_mfu_ge_{target:.0%}"] = best >= target
    return met


def save(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=_json) + "\n")
    tmp.replace(out / "gpu.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no check after this many seconds (default 450; dry run 600)")
    args = parser.parse_args(argv)
    only = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    unknown = sorted(set(only) - set(CHECKS))
    if unknown or not only:
        parser.error(f"--checks {args.checks!r}: choose from {','.join(CHECKS)}")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (use --dry-run on a CPU machine)",
              file=sys.stderr)
        return 2
    if not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = True
    plan = make_plan(args.dry_run, args.budget_s)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vimpac-gpu-") as tmp:
        result = run(plan, Path(tmp), args.out, only)
    result["seconds"] = time.perf_counter() - t0
    print_summary(result)
    save(args.out, result)
    return 1 if result["errors"] else 0


def print_summary(result: dict[str, Any]) -> None:
    print(describe_machine(result["machine"]))
    rows = summary_rows(result)
    width = max((len(r[0]) for r in rows), default=10)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<28}  {note}")
    for table in result.get("profile", {}).get("tables", []):
        print("\n" + table)
    for name, error in result["errors"].items():
        print(f"{name}: FAILED {error}")
    if result["skipped"]:
        print(f"skipped (time budget): {', '.join(result['skipped'])}")
    print(f"targets met: {result['met']}")
    print(f"total {result['seconds']:.0f} s")


def _json(x: object) -> object:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (tuple, Path)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    sys.exit(main())
