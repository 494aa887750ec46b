"""The pre-training loop (paper Sec. 3.3, App. C.1): block-masked token prediction + contrastive.

A short story of short functions: build data, model, optimizer and checkpointer; resume; then
loop over updates (micro-batches accumulated to the target batch), log, save. DDP, compile and
autocast are applied in :func:`wrap_model` and nowhere else. Run it alone or under ``torchrun``.

Two stages, as the authors ran Large-Half (paper Table 4): one linear schedule of
``pretrain.schedule_steps`` updates spans both; stage 1 (128 px) stops at its ``steps`` with the
learning rate still above 0, and stage 2 (256 px) sets ``init_from`` to stage 1's run folder (or
one of its training checkpoints) and continues the update count to its own ``steps``. Stage 2 then
resumes all of stage 1 across the resolution change (:func:`continue_from`): the model with both
heads, the position tables interpolated (1-D linear, as for fine-tuning), the AdamW state with the
moments of those tables interpolated the same way (the official ``utils.interpolate_optimizer``
idea), and the scheduler position. ``init_from`` may also name a ``pretrained.pt``: then only the
weights are taken and the schedule starts at update 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from vimpac.archive import open_archives
from vimpac.common.checkpoint import Checkpointer, CheckpointManager, load_checkpoint
from vimpac.common.config import config_to_yaml
from vimpac.common.distributed import DistInfo, cleanup, finish, init_distributed
from vimpac.common.errors import VimpacError
from vimpac.common.fileio import atomic_write_bytes
from vimpac.common.progress import NULL_PROGRESS, Progress
from vimpac.common.training import (
    MetricsLog,
    autocast_context,
    param_groups,
    warmup_linear,
)
from vimpac.common.workers import worker_options
from vimpac.pretrain.config import PretrainConfig
from vimpac.pretrain.data import ClipStream, Source, StreamSpec
from vimpac.pretrain.export import FORMAT as PRETRAINED_FORMAT
from vimpac.pretrain.export import full_state, load_pretrained, save_pretrained
from vimpac.pretrain.losses import (
    COUNTS,
    changed_from_previous_frame,
    moving_accuracy,
    pretrain_loss,
)
from vimpac.pretrain.masking import MASKS, MaskParams, apply_mask
from vimpac.pretrain.model import (
    PRESETS,
    ModelConfig,
    VimpacPretrainModel,
    interpolate_table,
    to_sync_batchnorm,
)

log = logging.getLogger(__name__)

HEADS = ("mlm_head", "contrastive_head")  # their norm weights are decayed, as officially
POSITIONS = ("pos_t", "pos_h", "pos_w")  # the backbone's factorised position tables
SCHEDULE_KEYS = ("lr", "warmup", "weight_decay", "beta2")  # one schedule over every stage
ARCHITECTURE_KEYS = ("model", "proj_hidden", "proj_layers")  # what a resolution change keeps


class PretrainError(VimpacError):
    """A set-up problem: bad archive, bad batch arithmetic, unreadable checkpoint."""


@dataclass
class Plan:
    """Batch arithmetic of one run."""
    micro_batch: int          # videos per forward pass per process
    accumulation: int         # micro-batches per update per process
    mask: MaskParams          # pretrain.num_blocks and mask_ratio, for MASKS[pretrain.masking]

    @classmethod
    def build(cls, cfg: PretrainConfig, world: int) -> Plan:
        per_update = cfg.micro_batch * world
        if cfg.batch_size % per_update:
            raise PretrainError(f"pretrain.batch_size ({cfg.batch_size}) must be a multiple of "
                                f"micro_batch x processes ({cfg.micro_batch} x {world})")
        return cls(cfg.micro_batch, cfg.batch_size // per_update, MaskParams.of(cfg))


def schedule_length(cfg: PretrainConfig | dict[str, Any]) -> int:
    """Updates of the whole learning-rate schedule, over every stage (0 = ``steps``)."""
    get = cfg.get if isinstance(cfg, dict) else functools.partial(getattr, cfg)
    return int(get("schedule_steps", 0) or get("steps"))


# ------------------------------------------------------------------------------- starting points

@dataclass
class StartPoint:
    """What ``pretrain.init_from`` names: a training checkpoint of an earlier stage (``training``:
    everything resumes) or a ``pretrained.pt`` (weights only)."""
    path: Path
    state: dict[str, Any]
    training: bool


def find_start(init_from: str) -> StartPoint | None:
    """Read ``init_from``: a run folder (its newest checkpoint), a checkpoint or pretrained.pt."""
    if not init_from:
        return None
    path = Path(init_from)
    if path.is_dir():
        latest = CheckpointManager(path / "checkpoints").latest()
        if latest is None:
            raise PretrainError(f"pretrain.init_from = {init_from}: no checkpoints/step-*.pt in "
                                "that folder (name a stage-1 run folder, one of its checkpoints "
                                "or a pretrained.pt)")
        path = latest
    state = load_checkpoint(path)
    if isinstance(state, dict) and state.get("format") == PRETRAINED_FORMAT:
        return StartPoint(path, state, training=False)
    if isinstance(state, dict) and {"model", "optimizer", "scheduler", "step", "config"} <= set(
            state) and isinstance(state["config"], dict):
        return StartPoint(path, state, training=True)
    raise PretrainError(f"{path}: neither a pre-training checkpoint (checkpoints/step-*.pt) nor "
                        "a pretrained.pt")


def check_continuation(start: StartPoint, cfg: PretrainConfig, codebook_size: int) -> None:
    """Stage 2 continues stage 1: same architecture and heads, one schedule, updates left."""
    saved = start.state["config"]
    diff = [f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}"
            for k in ARCHITECTURE_KEYS + SCHEDULE_KEYS if saved.get(k) != getattr(cfg, k)]
    if schedule_length(saved) != schedule_length(cfg):
        diff.append(f"schedule length {schedule_length(saved)} -> {schedule_length(cfg)} "
                    "(pretrain.schedule_steps)")
    model = start.state["model"]
    embed = model.get("backbone.token_embed.weight") if isinstance(model, dict) else None
    rows = embed.shape[0] if isinstance(embed, Tensor) else None
    if rows is None or rows - 5 != codebook_size:
        diff.append(f"codebook size {None if rows is None else rows - 5} -> {codebook_size} "
                    "(the archive's)")
    if diff:
        raise PretrainError(f"{start.path}: a later stage continues the same model and one "
                            f"learning-rate schedule, but {', '.join(diff)}")
    if int(start.state["step"]) >= cfg.steps:
        raise PretrainError(f"{start.path}: already at update {start.state['step']}; "
                            f"pretrain.steps = {cfg.steps} leaves nothing to do (steps counts "
                            "from the first stage's update 0)")


def resized_positions(state: dict[str, Tensor], model: VimpacPretrainModel) -> dict[str, Tensor]:
    """A model state with P_T, P_H, P_W interpolated to ``model``'s grid."""
    out = dict(state)
    for name in POSITIONS:
        key, size = f"backbone.{name}", getattr(model.backbone, name).shape[0]
        if key in out and out[key].shape[0] != size:
            out[key] = interpolate_table(out[key], size)
    return out


def load_start_weights(model: VimpacPretrainModel, start: StartPoint, cfg: PretrainConfig,
                       codebook_size: int) -> None:
    """Weights of ``start`` into ``model`` (positions interpolated to the model's grid)."""
    if start.training:
        check_continuation(start, cfg, codebook_size)
        with _unfit(start.path, "model weights"):
            model.load_state_dict(resized_positions(start.state["model"], model))
        log.info("continuing %s from update %d: model and both heads (positions at T%d/%dx%d)",
                 start.path, start.state["step"], cfg.frames, cfg.grid, cfg.grid)
        return
    backbone, meta = load_pretrained(start.path)
    if meta["codebook_size"] != codebook_size:
        raise PretrainError(f"{start.path}: codebook size {meta['codebook_size']} != "
                            f"archive's {codebook_size}")
    mine = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in FREE_KEYS}
    theirs = {k: v for k, v in dataclasses.asdict(backbone.config).items() if k not in FREE_KEYS}
    if mine != theirs:
        raise PretrainError(f"{start.path}: a backbone of another shape ({theirs}) than "
                            f"pretrain.model = {cfg.model} ({mine})")
    backbone.interpolate_positions(cfg.frames, cfg.grid, cfg.grid)
    model.backbone.load_state_dict(backbone.state_dict())
    heads = start.state.get("heads")
    fits = isinstance(heads, dict) and (heads.get("proj_layers"), heads.get("proj_hidden")) == (
        cfg.proj_layers, cfg.proj_hidden if cfg.proj_layers > 1 else 0)
    if fits:
        with _unfit(start.path, "head weights"):
            model.load_state_dict(full_state(model.backbone.state_dict(), heads))
    log.info("initialised from %s (positions interpolated to T%d/%dx%d; heads %s)", start.path,
             cfg.frames, cfg.grid, cfg.grid, "loaded" if fits else "new")


FREE_KEYS = ("frames", "height", "width", "dropout", "grad_checkpoint")  # may differ on init


@contextlib.contextmanager
def _unfit(path: Path, what: str) -> Any:
    """A checkpoint's content that does not fit the model is the file's problem: one line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        if isinstance(exc, PretrainError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretrainError(f"{path}: {what} do not fit this model ({first[:300]})") from None


def resized_moments(saved: dict[str, Any], optimizer: Any, resizable: set[int],
                    source: Path) -> dict[str, Any]:
    """A saved AdamW state dict fitted to ``optimizer``'s parameters: the moments of the
    parameters in ``resizable`` (ids: the position tables) are interpolated like the tables."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if [len(g["params"]) for g in saved["param_groups"]] != \
            [len(g["params"]) for g in optimizer.param_groups]:
        raise PretrainError(f"{source}: optimizer parameter groups do not fit this model")
    state = {}
    for index, entry in saved["state"].items():
        param = params[int(index)]
        state[index] = {k: _fit_moment(v, param, id(param) in resizable, source)
                        for k, v in entry.items()}
    return {"state": state, "param_groups": saved["param_groups"]}


def _fit_moment(value: Any, param: Tensor, resizable: bool, source: Path) -> Any:
    if not isinstance(value, Tensor) or value.dim() == 0 or value.shape == param.shape:
        return value
    if resizable and value.dim() == 2 and value.shape[1:] == param.shape[1:]:
        return interpolate_table(value, param.shape[0])  # [n, D] -> [n', D]
    raise PretrainError(f"{source}: optimizer state of shape {tuple(value.shape)} does not fit "
                        f"a parameter of shape {tuple(param.shape)}")


def continue_from(start: StartPoint, model: VimpacPretrainModel, optimizer: Any,
                  scheduler: Any) -> int:
    """Resume a stage-1 checkpoint's AdamW state and schedule position; return its step.

    The model weights were loaded by :func:`load_start_weights`; this interpolates the moments
    of the position tables (``exp_avg``, ``exp_avg_sq``) to the new grid, keeps every other
    moment as it was, and puts the scheduler at the checkpoint's update, so the learning rate
    continues the one schedule.
    """
    tables = {id(getattr(model.backbone, name)) for name in POSITIONS}
    with _unfit(start.path, "optimizer / scheduler state"):
        optimizer.load_state_dict(resized_moments(start.state["optimizer"], optimizer, tables,
                                                  start.path))
        scheduler.load_state_dict(start.state["scheduler"])
    step = int(start.state["step"])
    log.info("schedule continues at update %d of %d, learning rate %.3g", step,
             schedule_length(start.state["config"]), optimizer.param_groups[0]["lr"])
    return step


# -------------------------------------------------------------------------------------- building

def model_config(cfg: PretrainConfig, codebook_size: int) -> ModelConfig:
    return dataclasses.replace(PRESETS[cfg.model], codebook_size=codebook_size,
                               frames=cfg.frames, height=cfg.grid, width=cfg.grid,
                               dropout=cfg.dropout, grad_checkpoint=cfg.grad_checkpoint)


def build_model(cfg: PretrainConfig, codebook_size: int,
                start: StartPoint | None = None) -> VimpacPretrainModel:
    torch.manual_seed(cfg.seed)                      # same initial weights on every rank
    model = VimpacPretrainModel(model_config(cfg, codebook_size), proj_hidden=cfg.proj_hidden,
                                proj_layers=cfg.proj_layers)
    if start is not None:
        load_start_weights(model, start, cfg, codebook_size)
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
    """AdamW with the official decay groups; warm-up + linear decay over the whole schedule."""
    optimizer = torch.optim.AdamW(param_groups(unwrap(model), cfg.weight_decay, HEADS), lr=cfg.lr,
                                  betas=(0.9, cfg.beta2), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear(schedule_length(cfg), cfg.warmup))
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
                      **worker_options(cfg.num_workers),
                      persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)


# -------------------------------------------------------------------------------------- one step

def mask_batch(tokens: torch.Tensor, cfg: PretrainConfig, plan: Plan, model_cfg: ModelConfig,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [N,T,H,W] -> (inputs with [MASK], mask of positions to predict)."""
    grid = tuple(tokens.shape)
    mask = MASKS[cfg.masking].sample(grid, plan.mask, generator).to(tokens.device)
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


@dataclass
class Position:
    """Where a run stands: its update count, and the update its own stage started at (0, or
    the stage-1 checkpoint's step); its data stream has served ``step - stage_start`` updates."""
    step: int = 0
    stage_start: int = 0


def checkpoint_parts(model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """What a pre-training checkpoint holds state dicts of."""
    return {"model": unwrap(model), "optimizer": optimizer, "scheduler": scheduler}


def data_position(served: int, saved: dict[str, Any] | None, path: Path | None,
                  cfg: PretrainConfig) -> dict[str, Any]:
    """The global data position to continue from after ``served`` updates of this stage's
    stream, with the order's settings a checkpoint fixed (shard-buffer streams and block);
    checked against the step."""
    position = served * cfg.batch_size
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
        raise PretrainError(f"{path}: data position {saved['samples']} does not match "
                            f"{served} updates of this stage x batch_size {cfg.batch_size}")
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


def resume(ckpt: Checkpointer, model: nn.Module, optimizer: Any, scheduler: Any,
           cfg: PretrainConfig, dist: DistInfo) -> tuple[Position, dict[str, Any]] | None:
    """Restore the run's own newest checkpoint, if any; return where it stands and its data
    position (see :func:`data_position`)."""
    resumed = ckpt.resume(checkpoint_parts(model, optimizer, scheduler), rank=dist.rank,
                          world=dist.world)
    if resumed is None:
        return None
    position = Position(resumed.step, int(resumed.state.get("stage_start", 0)))
    if not 0 <= position.stage_start <= position.step:
        raise PretrainError(f"{resumed.path}: stage_start {position.stage_start} is not a step "
                            f"before {position.step}")
    served = position.step - position.stage_start
    return position, data_position(served, resumed.state.get("data"), resumed.path, cfg)


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
        result = _run(sources, cfg, out, dist, progress, stop_after)
        finish()
        return result
    finally:
        cleanup()


def _run(sources: list[Source], cfg: PretrainConfig, out: Path, dist: DistInfo,
         progress: Progress, stop_after: int | None) -> PretrainResult:
    archives = [s.path for s in sources]
    opened = open_archives(archives)
    settings = opened[0].settings
    plan = Plan.build(cfg, dist.world)
    start = find_start(cfg.init_from)
    model = build_model(cfg, settings.codebook_size, start)
    model_cfg = model.config
    wrapped = wrap_model(model, cfg, dist)
    optimizer, scheduler = build_optimizer(wrapped, cfg)
    ckpt = Checkpointer(out / "checkpoints", cfg, keep=cfg.keep_checkpoints)
    resumed = resume(ckpt, wrapped, optimizer, scheduler, cfg, dist)
    if resumed is not None:
        position, data = resumed
    else:
        position, data = Position(), data_position(0, None, None, cfg)
        if start is not None and start.training:
            step = continue_from(start, unwrap(wrapped), optimizer, scheduler)
            position = Position(step, step)
    step = position.step
    metrics = MetricsLog(out, enabled=dist.is_main)
    metrics.truncate_after(step)
    if dist.is_main:
        atomic_write_bytes(out / "config.yaml", config_to_yaml(
            {"pretrain": dataclasses.asdict(cfg), "archives": archives,
             "tokenizer_fingerprint": settings.tokenizer_fingerprint}).encode())
    loader = build_loader(sources, cfg, plan, dist, model_cfg.pad_id, settings.fps, data)
    last = _loop(wrapped, loader, optimizer, scheduler, cfg, plan, model_cfg, dist, ckpt,
                 metrics, position, progress, stop_after)
    metrics.close()
    pretrained = out / "pretrained.pt"
    final_step = last.pop("_step")
    if dist.is_main and final_step >= cfg.steps:
        save_pretrained(pretrained, unwrap(wrapped),
                        tokenizer_fingerprint=settings.tokenizer_fingerprint, step=final_step,
                        pretrain_config=dataclasses.asdict(cfg))
    return PretrainResult(step=final_step, out_dir=out, pretrained=pretrained, last_metrics=last)


def _loop(model: nn.Module, loader: DataLoader, optimizer: Any, scheduler: Any,
          cfg: PretrainConfig, plan: Plan, model_cfg: ModelConfig, dist: DistInfo,
          ckpt: Checkpointer, metrics: MetricsLog, position: Position, progress: Progress,
          stop_after: int | None) -> dict[str, float]:
    step = position.step
    task = progress.task("pretrain", total=cfg.steps, unit="updates") if dist.is_main else None
    if task:
        task.update(completed=step)
    batches, values = iter(loader), {}
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    model.train()
    tick, clips = time.perf_counter(), 0
    def served(at: int) -> int:
        """Samples this stage's stream has served after update ``at``."""
        return (at - position.stage_start) * cfg.batch_size

    stream, logged = loader.dataset, served(step)
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
                           in stream.source_epochs(served(step)).items()})
            if dist.is_main:
                stream.log_epochs(logged, served(step))
            logged = served(step)
            metrics.write(step, values)
            tick, clips = time.perf_counter(), 0
            if task:
                task.update(completed=step, loss=values["loss"], mlm_acc=values["mlm_acc"],
                            nce_acc=values["nce_acc"])
        if step % cfg.checkpoint_every == 0 or step == end:         # collective
            ckpt.save(step, checkpoint_parts(model, optimizer, scheduler),
                      {"stage_start": position.stage_start, "data": stream.state(served(step))},
                      main=dist.is_main)
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
