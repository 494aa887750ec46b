"""The pre-training loop (paper Sec. 3.3, App. C.1): block-masked token prediction + contrastive.

A short story of short functions: build data, model, optimizer and checkpointer; resume; then
loop over updates (micro-batches accumulated to the target batch), log, save. DDP, compile and
autocast are applied in :func:`wrap_model` and nowhere else. Run it alone or under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vimpac.archive import open_archives
from vimpac.common.checkpoint import (
    CheckpointManager,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from vimpac.common.config import PretrainConfig, config_to_yaml
from vimpac.common.distributed import DistInfo, cleanup, init_distributed
from vimpac.common.fileio import atomic_write_bytes
from vimpac.common.progress import NULL_PROGRESS, Progress
from vimpac.common.training import (
    MetricsLog,
    autocast_context,
    param_groups,
    warmup_linear,
)
from vimpac.pretrain.data import ClipStream, Source, StreamSpec
from vimpac.pretrain.export import load_pretrained, save_pretrained
from vimpac.pretrain.losses import (
    COUNTS,
    changed_from_previous_frame,
    moving_accuracy,
    pretrain_loss,
)
from vimpac.pretrain.masking import apply_mask, block_mask, default_num_blocks, iid_mask
from vimpac.pretrain.model import PRESETS, ModelConfig, VimpacPretrainModel, to_sync_batchnorm

log = logging.getLogger(__name__)


class PretrainError(RuntimeError):
    """A set-up problem: bad archive, bad batch arithmetic, unreadable checkpoint."""


@dataclass
class Plan:
    """Batch arithmetic of one run."""
    micro_batch: int          # videos per forward pass per process
    accumulation: int         # micro-batches per update per process
    num_blocks: int           # cubes per sample

    @classmethod
    def build(cls, cfg: PretrainConfig, world: int) -> Plan:
        per_update = cfg.micro_batch * world
        if cfg.batch_size % per_update:
            raise PretrainError(f"pretrain.batch_size ({cfg.batch_size}) must be a multiple of "
                                f"micro_batch x processes ({cfg.micro_batch} x {world})")
        blocks = cfg.num_blocks or default_num_blocks(cfg.frames, cfg.grid)
        return cls(cfg.micro_batch, cfg.batch_size // per_update, blocks)


# -------------------------------------------------------------------------------------- building

def model_config(cfg: PretrainConfig, codebook_size: int) -> ModelConfig:
    return dataclasses.replace(PRESETS[cfg.model], codebook_size=codebook_size,
                               frames=cfg.frames, height=cfg.grid, width=cfg.grid,
                               dropout=cfg.dropout, grad_checkpoint=cfg.grad_checkpoint)


def build_model(cfg: PretrainConfig, codebook_size: int) -> VimpacPretrainModel:
    torch.manual_seed(cfg.seed)                      # same initial weights on every rank
    model = VimpacPretrainModel(model_config(cfg, codebook_size), proj_hidden=cfg.proj_hidden,
                                proj_layers=cfg.proj_layers)
    if cfg.init_from:
        backbone, meta = load_pretrained(cfg.init_from)
        if meta["codebook_size"] != codebook_size:
            raise PretrainError(f"{cfg.init_from}: codebook size {meta['codebook_size']} != "
                                f"archive's {codebook_size}")
        backbone.interpolate_positions(cfg.frames, cfg.grid, cfg.grid)
        model.backbone.load_state_dict(backbone.state_dict())
        log.info("initialised from %s (positions interpolated to T%d/%dx%d)", cfg.init_from,
                 cfg.frames, cfg.grid, cfg.grid)
    return model


def wrap_model(model: nn.Module, cfg: PretrainConfig, dist: DistInfo) -> nn.Module:
    """Device placement, then SyncBatchNorm + DDP (multi-process), then torch.compile."""
    model = model.to(dist.device)
    if dist.world > 1:
        if dist.device.type == "cuda":       # torch's SyncBatchNorm is CUDA-only; on CPU each
            model = to_sync_batchnorm(model)  # process keeps its own batch statistics
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> tuple[Any, Any]:
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, cfg.beta2), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(cfg.steps, cfg.warmup))
    return optimizer, scheduler


def sources_of(archives: list[str], cfg: PretrainConfig) -> list[Source]:
    """The run's archives: the command line's (shares by size) or ``pretrain.sources``."""
    if archives and cfg.sources:
        raise PretrainError(f"archives given twice: on the command line ({', '.join(archives)}) "
                            "and in pretrain.sources; give one of them")
    if archives:
        return [Source(a) for a in archives]
    if not cfg.sources:
        raise PretrainError("no archives: give them on the command line or in pretrain.sources")
    return [Source(s.path, s.weight, s.replacement) for s in cfg.sources]


def build_loader(sources: list[Source], cfg: PretrainConfig, plan: Plan, dist: DistInfo,
                 pad_id: int, fps: float, data: dict[str, Any]) -> DataLoader:
    """The DataLoader of this process, at the global data position ``data["samples"]`` (a
    checkpoint's data state, which also fixes the shard-buffer streams of the run)."""
    spec = StreamSpec(frames=cfg.frames, grid=cfg.grid, batch_size=plan.micro_batch,
                      pad_id=pad_id, seed=cfg.seed, fmt=cfg.format,
                      max_distance=round(cfg.max_clip_distance * fps),
                      shuffle_buffer=cfg.shuffle_buffer, on_corrupt=cfg.on_corrupt_shard,
                      shuffle=cfg.shuffle, window=cfg.read_window, open_shards=cfg.open_shards)
    stream = ClipStream(sources, spec, rank=dist.rank, world=dist.world, start=data["samples"],
                        streams=data.get("streams") or dist.world * max(1, cfg.num_workers),
                        block=data.get("block"), mode=data.get("mode"))
    stream.check_resume(data, data.get("checkpoint", "checkpoint"))
    stream.check_enough_videos(cfg.num_workers)
    generator = torch.Generator().manual_seed(cfg.seed)   # keeps the global RNG untouched
    return DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, generator=generator,
                      pin_memory=dist.device.type == "cuda",
                      multiprocessing_context="spawn" if cfg.num_workers else None,
                      persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)


# -------------------------------------------------------------------------------------- one step

def mask_batch(tokens: torch.Tensor, cfg: PretrainConfig, plan: Plan, model_cfg: ModelConfig,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [N,T,H,W] -> (inputs with [MASK], mask of positions to predict)."""
    n, t, h, w = tokens.shape
    if cfg.masking == "block":
        mask = block_mask(n, t, h, w, plan.num_blocks, generator=generator, device=tokens.device)
    else:
        mask = iid_mask(n, t, h, w, cfg.mask_ratio, generator=generator, device=tokens.device)
    return apply_mask(tokens, mask, pad_id=model_cfg.pad_id, mask_id=model_cfg.mask_id)


def micro_seed(seed: int, micro_batch: int, purpose: int) -> int:
    """A seed for one global micro-batch (see :mod:`vimpac.pretrain.data`), whichever process
    computes it: masks and dropout repeat exactly on resume, also with another world size."""
    return int(np.random.SeedSequence([seed, micro_batch, purpose]).generate_state(1)[0])


def mask_generator(cfg: PretrainConfig, dist: DistInfo, micro_batch: int) -> torch.Generator:
    """Masking randomness keyed by (seed, global micro-batch)."""
    gen = torch.Generator(device=dist.device)
    gen.manual_seed(micro_seed(cfg.seed, micro_batch, 0))
    return gen


def micro_step(model: nn.Module, batch: torch.Tensor, cfg: PretrainConfig, plan: Plan,
               model_cfg: ModelConfig, dist: DistInfo, gen: torch.Generator
               ) -> dict[str, torch.Tensor]:
    """Forward + loss for one micro-batch [B, 2, T, H, W]; both clips masked (paper Sec. 3.3)."""
    tokens = batch.to(dist.device, non_blocking=True).transpose(0, 1).flatten(0, 1)  # [2B,T,H,W]
    inputs, mask = mask_batch(tokens, cfg, plan, model_cfg, gen)
    with autocast_context(cfg.precision, dist.device):
        outputs = model(inputs, mask)
        losses = pretrain_loss(outputs, tokens[mask], mlm_weight=cfg.mlm_weight,
                               alpha=cfg.contrastive_weight, temperature=cfg.temperature,
                               moving=changed_from_previous_frame(tokens)[mask])
    return losses


def train_update(model: nn.Module, batches: Any, optimizer: Any, scheduler: Any,
                 cfg: PretrainConfig, plan: Plan, model_cfg: ModelConfig, dist: DistInfo,
                 step: int) -> dict[str, torch.Tensor]:
    """One optimizer update over ``plan.accumulation`` micro-batches.

    Returns the update's mean losses and accuracies as device tensors: reading them (a
    host-device sync) is left to the caller, which does it only when it logs.
    """
    sums: dict[str, torch.Tensor] = {}
    for micro in range(plan.accumulation):
        batch = next(batches)["tokens"]
        sync = micro == plan.accumulation - 1 or not isinstance(
            model, nn.parallel.DistributedDataParallel)
        u = (step * plan.accumulation + micro) * dist.world + dist.rank   # global micro-batch
        torch.manual_seed(micro_seed(cfg.seed, u, 1))                   # dropout
        with model.no_sync() if not sync else contextlib.nullcontext():
            losses = micro_step(model, batch, cfg, plan, model_cfg, dist,
                                mask_generator(cfg, dist, u))
            (losses["loss"] / plan.accumulation).backward()
        for key, value in losses.items():
            share = 1.0 if key in COUNTS else 1.0 / plan.accumulation  # counts add up
            sums[key] = sums.get(key, 0.0) + value.detach().float() * share
    if cfg.grad_clip > 0:
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


# --------------------------------------------------------------------------------- checkpointing

def unwrap(model: nn.Module) -> VimpacPretrainModel:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def checkpoint_state(model: nn.Module, optimizer: Any, scheduler: Any, step: int,
                     data: dict[str, Any], cfg: PretrainConfig) -> dict[str, Any]:
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "rng": rng_state(),
            "data": data, "config": dataclasses.asdict(cfg)}


def data_position(step: int, saved: dict[str, Any] | None, path: Path | None,
                  cfg: PretrainConfig) -> dict[str, Any]:
    """The global data position to continue from, with the order's settings a checkpoint
    fixed (shard-buffer streams and block); checked against the step."""
    position = step * cfg.batch_size
    if not saved or "samples" not in saved:
        if saved:
            log.warning("%s: checkpoint of an older data order; continuing at sample %d of the "
                        "global order", path, position)
        return {"samples": position}
    for key, valid in DATA_STATE.items():
        value = saved.get(key)
        if not valid(value):
            raise PretrainError(f"{path}: data.{key} = {value!r} is not a valid data position")
    if saved["samples"] != position:
        raise PretrainError(f"{path}: data position {saved['samples']} does not match step "
                            f"{step} x batch_size {cfg.batch_size}")
    return {**saved, "checkpoint": str(path)}


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= 1 << 50


DATA_STATE = {  # what a checkpoint's data position may hold (checkpoints are read from disk)
    "samples": lambda v: _whole(v, 0),
    "mode": lambda v: v in ("global", "shard"),
    "streams": lambda v: v is None or _whole(v, 1),
    "block": lambda v: v is None or _whole(v, 1),
    "sources": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
}


def resume(ckpts: CheckpointManager, model: nn.Module, optimizer: Any, scheduler: Any,
           cfg: PretrainConfig) -> tuple[int, dict[str, Any]]:
    """Restore the newest checkpoint, if any; return the step to continue from and the data
    position (see :func:`data_position`)."""
    path = ckpts.latest()
    if path is None:
        return 0, data_position(0, None, None, cfg)
    state = load_checkpoint(path)
    saved = {k: v for k, v in state["config"].items() if k not in RESUME_MAY_CHANGE}
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_MAY_CHANGE}
    if saved != now:
        diff = ", ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items()
                         if saved.get(k) != v)
        raise PretrainError(f"{path}: run was started with other settings ({diff}); use a new "
                            "output folder or restore the settings")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", path, state["step"])
    step = int(state["step"])
    return step, data_position(step, state.get("data"), path, cfg)


RESUME_MAY_CHANGE = {"checkpoint_every", "keep_checkpoints", "log_every", "num_workers",
                     "on_corrupt_shard", "compile", "micro_batch", "read_window", "open_shards"}


# ------------------------------------------------------------------------------------------ run

@dataclass
class PretrainResult:
    step: int
    out_dir: Path
    pretrained: Path
    last_metrics: dict[str, float]


def run_pretrain(archives: list[str | Path], cfg: PretrainConfig, out_dir: str | Path, *,
                 progress: Progress = NULL_PROGRESS,
                 stop_after: int | None = None) -> PretrainResult:
    """Pre-train on token archives into ``out_dir`` (resumes from its newest checkpoint).

    ``stop_after`` ends the run early after that many updates (for tests and time-boxed jobs);
    rerunning continues where it stopped.
    """
    sources = sources_of(list(map(str, archives)), cfg)
    dist = init_distributed()
    out = Path(out_dir)
    try:
        return _run(sources, cfg, out, dist, progress, stop_after)
    finally:
        cleanup()


def _run(sources: list[Source], cfg: PretrainConfig, out: Path, dist: DistInfo,
         progress: Progress, stop_after: int | None) -> PretrainResult:
    archives = [s.path for s in sources]
    opened = open_archives(archives)
    settings = opened[0].settings
    plan = Plan.build(cfg, dist.world)
    model = build_model(cfg, settings.codebook_size)
    model_cfg = model.config
    wrapped = wrap_model(model, cfg, dist)
    optimizer, scheduler = build_optimizer(wrapped, cfg)
    ckpts = CheckpointManager(out / "checkpoints", cfg.keep_checkpoints)
    step, data = resume(ckpts, wrapped, optimizer, scheduler, cfg)
    metrics = MetricsLog(out, enabled=dist.is_main)
    metrics.truncate_after(step)
    if dist.is_main:
        atomic_write_bytes(out / "config.yaml", config_to_yaml(
            {"pretrain": dataclasses.asdict(cfg), "archives": archives,
             "tokenizer_fingerprint": settings.tokenizer_fingerprint}).encode())
    loader = build_loader(sources, cfg, plan, dist, model_cfg.pad_id, settings.fps, data)
    last = _loop(wrapped, loader, optimizer, scheduler, cfg, plan, model_cfg, dist, ckpts,
                 metrics, step, progress, stop_after)
    metrics.close()
    pretrained = out / "pretrained.pt"
    final_step = last.pop("_step")
    if dist.is_main and final_step >= cfg.steps:
        save_pretrained(pretrained, unwrap(wrapped).backbone,
                        tokenizer_fingerprint=settings.tokenizer_fingerprint, step=final_step,
                        pretrain_config=dataclasses.asdict(cfg))
    return PretrainResult(step=final_step, out_dir=out, pretrained=pretrained, last_metrics=last)


def _loop(model: nn.Module, loader: DataLoader, optimizer: Any, scheduler: Any,
          cfg: PretrainConfig, plan: Plan, model_cfg: ModelConfig, dist: DistInfo,
          ckpts: CheckpointManager, metrics: MetricsLog, step: int, progress: Progress,
          stop_after: int | None) -> dict[str, float]:
    task = progress.task("pretrain", total=cfg.steps, unit="updates") if dist.is_main else None
    if task:
        task.update(completed=step)
    batches, values = iter(loader), {}
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    model.train()
    tick, clips = time.perf_counter(), 0
    stream, logged = loader.dataset, step * cfg.batch_size
    while step < end:
        tensors = train_update(model, batches, optimizer, scheduler, cfg, plan, model_cfg,
                               dist, step)
        step += 1
        clips += 2 * plan.micro_batch * plan.accumulation * dist.world
        if step % cfg.log_every == 0 or step == end:
            values = global_means(tensors, dist)              # the one sync per log line
            moving_accuracy(values)
            check_finite(values, step)
            elapsed = time.perf_counter() - tick
            values.update(lr=scheduler.get_last_lr()[0], clips_per_s=clips / max(elapsed, 1e-9))
            values.update({f"epochs/{name}": epochs for name, epochs
                           in stream.source_epochs(step * cfg.batch_size).items()})
            if dist.is_main:
                stream.log_epochs(logged, step * cfg.batch_size)
            logged = step * cfg.batch_size
            metrics.write(step, values)
            tick, clips = time.perf_counter(), 0
            if task:
                task.update(completed=step, loss=values["loss"], mlm_acc=values["mlm_acc"],
                            nce_acc=values["nce_acc"])
        if step % cfg.checkpoint_every == 0 or step == end:
            if dist.is_main:
                ckpts.save(step, checkpoint_state(model, optimizer, scheduler, step,
                                                  stream.state(step * cfg.batch_size), cfg))
    if task:
        task.close()
    values["_step"] = step
    return values


def global_means(tensors: dict[str, torch.Tensor], dist: DistInfo) -> dict[str, float]:
    """The update's metrics over all processes: means (counts summed), as floats."""
    keys = list(tensors)                                # the same order on every rank
    if dist.world > 1:
        stacked = torch.stack([tensors[k].detach().float().reshape(()) for k in keys])
        torch.distributed.all_reduce(stacked)
        share = torch.tensor([1.0 if k in COUNTS else 1.0 / dist.world for k in keys],
                             device=stacked.device)
        return dict(zip(keys, (stacked * share).tolist(), strict=True))
    return {k: float(tensors[k]) for k in keys}


def check_finite(values: dict[str, float], step: int) -> None:
    if not math.isfinite(values.get("loss", 0.0)):
        raise PretrainError(f"loss became {values['loss']} at step {step}: lower pretrain.lr")
