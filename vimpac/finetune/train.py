"""Fine-tuning a VIMPAC backbone for action recognition (paper Sec. 4.1, App. A.2 / C.1, Table 4).

:func:`run_finetune` reads as the paper's recipe:

    open the labelled archive (classes, train / eval split, frame step)
    -> model: the pre-trained backbone (positions interpolated to (frames, grid)) + a
       zero-initialised classifier, loaded non-strictly with only the classifier missing; or the
       same architecture from scratch (the paper's non-pre-trained baseline)
    -> DDP -> AdamW (0.9, 0.999), eps 1e-8, wd 0.01 off biases / norms, 10 % warm-up then linear
       decay per update -> resume from the newest checkpoint
    -> per update: accumulate micro-batches, clip the gradient norm, step; log; validate every
       ``eval_every`` epochs on one centre clip per video; checkpoint every epoch
    -> stop at the end of the budget (``epochs``) or, with ``plateau_patience`` > 0, once
       validation top-1 stops rising (:mod:`vimpac.finetune.plateau`)
    -> ``final.pt`` (the last update: what the paper reports), ``best.pt`` (best validation
       top-1), ``summary.json`` (with why the run stopped).

Model selection never sees the evaluation split. The validation set is carved out of the training
split (``finetune.val_fraction`` of it, chosen by a hash of the video key: see
:func:`vimpac.finetune.data.in_validation`) and is not trained on; ``best.pt`` is the update with
the best top-1 on it. With ``val_fraction = 0`` nothing is held out, nothing is validated and no
``best.pt`` is written. The evaluation split (the dataset's test list) is only read by
``vimpac evaluate``.

Updates: ``ceil(epochs * n_train / batch_size)``. The training stream is the concatenation of
per-epoch permutations seeded by ``(seed, epoch)``; update ``u`` takes stream positions
``[u*B, (u+1)*B)`` and rank ``r`` every ``W``-th of them. The stream is therefore a pure function of
the update index and a checkpoint only needs the update count; with model, optimizer, scheduler,
the plateau rule's state and every rank's RNG saved too, a resumed run stops at the same update
with bitwise the same weights on CPU as an uninterrupted one. The learning-rate schedule spans the
whole budget, also when the plateau rule stops the run earlier.

Outputs (``out_dir``): ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step-*.pt``, ``best.pt``,
``final.pt``, ``summary.json``. ``best.pt`` / ``final.pt`` hold the whole model plus what
evaluation needs (classes, grid, frame step, tokenizer fingerprint) and how the model was chosen
(``checkpoint``: final or best, ``selection``, ``step``, ``val_top1``); :func:`load_finetuned`
reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, Subset

from vimpac.archive import Archive, ArchiveError, ArchiveSettings
from vimpac.common.checkpoint import (
    Checkpointer,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from vimpac.common.distributed import DistInfo, cleanup, finish, init_distributed
from vimpac.common.fileio import atomic_write_json
from vimpac.common.progress import NULL_PROGRESS, Progress
from vimpac.common.training import MetricsLog, autocast_context, param_groups, warmup_linear
from vimpac.data.datasets import standard_splits
from vimpac.finetune.config import FinetuneConfig
from vimpac.finetune.data import ItemKey, SplitPart, TestClips, TrainClips, clip_workers
from vimpac.finetune.plateau import STILL_IMPROVING, Plateau, stop_record
from vimpac.pretrain.export import load_pretrained
from vimpac.pretrain.model import (
    POOLS,
    PRESETS,
    ClassifierHead,
    ModelConfig,
    VimpacBackbone,
)

log = logging.getLogger(__name__)

FORMAT = "vimpac-finetuned/1"


# ------------------------------------------------------------------------------------------ model

class FinetuneModel(nn.Module):
    """Backbone CLS (or another entry of :data:`POOLS`) -> classifier head (paper App. A.2)."""

    def __init__(self, backbone: VimpacBackbone, head: ClassifierHead, pool: str = "cls") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pool = pool

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def features(self, tokens: Tensor) -> Tensor:
        """tokens [B, T, H, W] -> the features the head reads [B, D] (``pool``)."""
        cls, x = self.backbone(tokens)
        return POOLS[self.pool](tokens, cls, x, self.config.pad_id)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, T, H, W] -> logits [B, classes]."""
        return self.head(self.features(tokens))


def head_keys(model: FinetuneModel) -> set[str]:
    return {f"head.{k}" for k in model.head.state_dict()}


def load_backbone_state(model: FinetuneModel, state: dict[str, Tensor], source: str) -> None:
    """Load a backbone state non-strictly; only the new classifier may be missing."""
    result = model.load_state_dict({f"backbone.{k}": v for k, v in state.items()}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != head_keys(model):
        extra = sorted(set(result.missing_keys) - head_keys(model))
        raise CheckpointError(f"{source}: backbone weights do not fit the model: missing "
                              f"{extra[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")


def check_tokenizer(meta: dict[str, Any], settings: ArchiveSettings, init: str,
                    archive_root: Path) -> None:
    """The backbone must have been pre-trained on tokens of the archive's tokenizer."""
    if meta.get("tokenizer_fingerprint") != settings.tokenizer_fingerprint:
        raise ArchiveError(
            f"{archive_root}: tokenized with tokenizer {settings.tokenizer_fingerprint[:16]}, but "
            f"{init} was pre-trained on tokens of {str(meta.get('tokenizer_fingerprint'))[:16]}: "
            "tokenize the dataset with the pre-training tokenizer")
    if meta.get("codebook_size") != settings.codebook_size:
        raise ArchiveError(f"{archive_root}: codebook size {settings.codebook_size} differs from "
                           f"{init}'s {meta.get('codebook_size')}")


def build_model(settings: ArchiveSettings, num_classes: int, cfg: FinetuneConfig,
                init: str | None, model_preset: str, archive_root: str | Path) -> FinetuneModel:
    """Pre-trained backbone (positions interpolated) or from-scratch, plus a zero classifier."""
    grid = dict(frames=cfg.frames, height=cfg.grid, width=cfg.grid, dropout=cfg.dropout,
                grad_checkpoint=False)
    if init is None:
        if model_preset not in PRESETS:
            raise ValueError(f"model preset {model_preset!r}: expected one of {', '.join(PRESETS)}")
        config = dataclasses.replace(PRESETS[model_preset], codebook_size=settings.codebook_size,
                                     **grid)
        backbone = VimpacBackbone(config)
        return FinetuneModel(backbone, ClassifierHead(config.dim, num_classes), cfg.pool)
    pretrained, meta = load_pretrained(init)
    check_tokenizer(meta, settings, init, archive_root)
    if (pretrained.config.frames, pretrained.config.height) != (cfg.frames, cfg.grid):
        log.info("interpolating positions from T=%d, %dx%d to T=%d, %dx%d",
                 pretrained.config.frames, pretrained.config.height, pretrained.config.width,
                 cfg.frames, cfg.grid, cfg.grid)
    pretrained.interpolate_positions(cfg.frames, cfg.grid, cfg.grid)
    config = dataclasses.replace(pretrained.config, **grid)
    model = FinetuneModel(VimpacBackbone(config), ClassifierHead(config.dim, num_classes),
                          cfg.pool)
    load_backbone_state(model, pretrained.state_dict(), init)
    return model


def save_finetuned(path: str | Path, model: FinetuneModel, info: dict[str, Any]) -> None:
    """``best.pt`` / ``final.pt``: the whole model and what evaluation needs (``info``)."""
    save_checkpoint(path, {"format": FORMAT, "model_config": dataclasses.asdict(model.config),
                           "pool": model.pool, "model": model.state_dict(), **info})


def load_finetuned(path: str | Path) -> tuple[FinetuneModel, dict[str, Any]]:
    """A fine-tuned model file -> (model in eval mode, metadata)."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vimpac fine-tuned model (expected format {FORMAT}); "
                              "pass best.pt or final.pt written by `vimpac finetune`")
    config = ModelConfig(**state["model_config"])
    pool = state.get("pool", "cls")  # files from before the choice: the CLS
    if pool not in POOLS:
        raise CheckpointError(f"{path}: pool {pool!r} is not one of {', '.join(POOLS)}")
    model = FinetuneModel(VimpacBackbone(config), ClassifierHead(config.dim, len(state["classes"])),
                          pool)
    model.load_state_dict(state["model"])
    return model.eval(), {k: v for k, v in state.items() if k != "model"}


# ------------------------------------------------------------------------------------------- data

@dataclass
class FinetuneData:
    """What the archive gives the run: classes, split tags, frame step and the datasets.

    ``train`` and ``val`` are the two parts of the training split ``train_tag``; ``eval_tag``
    (the test list) is only recorded, for ``vimpac evaluate``, and never read here.
    """
    archive: Archive
    classes: list[str]
    train_tag: str
    eval_tag: str
    step: int
    train: TrainClips
    val: TestClips | None
    val_part: SplitPart | None


def frame_step(archive_fps: float, fps: float, root: Path) -> int:
    """Keep every ``step``-th archive frame so clips run at ``fps`` (paper App. C.1: 2 or 4 fps)."""
    ratio = archive_fps / fps
    if ratio < 1 - 1e-6 or abs(ratio - round(ratio)) > 1e-6:
        raise ArchiveError(f"{root}: tokens are at {archive_fps:g} fps; finetune.fps = {fps:g} "
                           "needs an archive at that rate or an integer multiple of it "
                           f"(set finetune.fps={archive_fps:g} or re-tokenize)")
    return int(round(ratio))


def resolve_splits(settings: ArchiveSettings, split: str, root: Path) -> tuple[str, str]:
    """(train tag, eval tag) of the dataset's standard protocol for split id ``split``."""
    if not settings.dataset:
        raise ArchiveError(f"{root}: not a labelled archive (tokenize a dataset, e.g. "
                           "`vimpac tokenize ucf101:ROOT ...`)")
    if not split.isdigit():
        raise ValueError(f"finetune.split = {split!r}: expected a split number such as 1")
    return standard_splits(settings.dataset["name"], int(split))


def open_finetune_data(archive_path: str | Path, cfg: FinetuneConfig,
                       splits: tuple[str, str] | None = None) -> FinetuneData:
    """The training split's two parts: training videos and the held-out validation videos."""
    archive = Archive(archive_path)
    pad_id = ModelConfig(codebook_size=archive.settings.codebook_size).pad_id
    train_tag, eval_tag = splits or resolve_splits(archive.settings, cfg.split, archive.root)
    step = frame_step(archive.settings.fps, cfg.fps, archive.root)
    if cfg.val_fraction > 0:
        train_part = SplitPart(train_tag, "train", cfg.val_fraction)
        val_part: SplitPart | None = SplitPart(train_tag, "val", cfg.val_fraction)
    else:
        train_part, val_part = SplitPart(train_tag), None
    train = TrainClips(archive, train_part, cfg.frames, cfg.grid, None, pad_id, cfg.seed, step)
    val = None if val_part is None else TestClips(archive, val_part, cfg.frames, cfg.grid, 1,
                                                  ["center"], pad_id, step)
    classes = list(archive.settings.dataset["classes"])
    return FinetuneData(archive, classes, train_tag, eval_tag, step, train, val, val_part)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the training videos in ``epoch`` (seeded by (seed, epoch))."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class UpdateSampler(Sampler[list[ItemKey]]):
    """This rank's micro-batches of ``(epoch, index)`` keys, update after update from ``start``."""

    def __init__(self, n: int, batch_size: int, micro_batch: int, seed: int, rank: int,
                 world: int, start: int, total: int) -> None:
        if batch_size < world:
            raise ValueError(f"finetune.batch_size = {batch_size}: expected >= the number of "
                             f"processes ({world})")
        self.n, self.batch_size, self.micro_batch, self.seed = n, batch_size, micro_batch, seed
        self.rank, self.world, self.start, self.total = rank, world, start, total

    def update_keys(self, update: int) -> list[tuple[int, int]]:
        """This rank's ``(epoch, index)`` keys of one update."""
        keys = []
        for pos in range(update * self.batch_size + self.rank, (update + 1) * self.batch_size,
                         self.world):
            epoch, i = divmod(pos, self.n)
            keys.append((epoch, int(epoch_order(self.n, self.seed, epoch)[i])))
        return keys

    def micro_batches(self, update: int) -> list[list[tuple[int, int]]]:
        keys = self.update_keys(update)
        return [keys[i:i + self.micro_batch] for i in range(0, len(keys), self.micro_batch)]

    def __iter__(self) -> Iterator[list[ItemKey]]:
        for update in range(self.start, self.total):
            yield from self.micro_batches(update)

    def __len__(self) -> int:
        return sum(len(self.micro_batches(u)) for u in range(self.start, self.total))


# ------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def view_averaged_probs(model: nn.Module, loader: DataLoader, device: torch.device,
                        precision: str = "auto",
                        progress: Progress = NULL_PROGRESS) -> tuple[Tensor, Tensor]:
    """Batches of ``[B, V, T, G, G]`` views -> softmax averaged over the V views [N, C], labels
    [N] (the paper's multi-view test: probabilities, not logits, are averaged)."""
    model.eval()
    task = progress.task("evaluate", len(loader.dataset), "video")
    probs, labels = [], []
    for tokens, label in loader:
        b, v = tokens.shape[:2]
        with autocast_context(precision, device):
            logits = model(tokens.flatten(0, 1).to(device, non_blocking=True))  # [B*V, C]
        probs.append(logits.float().softmax(-1).view(b, v, -1).mean(1).cpu())  # [B, C]
        labels.append(label)
        task.advance(b)
    task.close()
    if not probs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(probs), torch.cat(labels)


def validate(model: nn.Module, dataset: TestClips, dist_info: DistInfo, batch: int,
             precision: str, workers: int) -> float:
    """Top-1 on one centre clip per video, this rank's share, summed over ranks."""
    share = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world))
    loader = DataLoader(share, batch_size=batch, num_workers=workers,
                        **clip_workers(dataset.archive, workers),
                        generator=torch.Generator().manual_seed(0))
    probs, labels = view_averaged_probs(model, loader, dist_info.device, precision)
    correct = (probs.argmax(-1) == labels).sum() if len(labels) else torch.tensor(0)
    counts = torch.tensor([float(correct), float(len(labels))], device=dist_info.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    model.train()
    return float(counts[0] / counts[1].clamp(min=1))


# ---------------------------------------------------------------------------------------- trainer

class Finetuner:
    """Model, optimizer, schedule, the update count and the plateau rule's state: everything a
    checkpoint restores."""

    def __init__(self, model: FinetuneModel, cfg: FinetuneConfig, dist_info: DistInfo,
                 total: int, init: str, plateau_from: int = 0) -> None:
        self.cfg, self.dist, self.total, self.init = cfg, dist_info, total, init
        self.raw = model.to(dist_info.device)
        # Order: device -> DDP -> optimizer over the unwrapped parameters.
        self.model: nn.Module = self.raw
        if dist_info.world > 1:
            ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.raw, device_ids=ids)
        self.optimizer = torch.optim.AdamW(param_groups(self.raw, cfg.weight_decay), lr=cfg.lr,
                                           betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_linear(total, cfg.warmup))
        self.step = 0
        self.best_top1, self.best_step, self.last_top1 = -1.0, -1, -1.0
        self.plateau = Plateau(cfg.plateau_patience, cfg.plateau_min_delta, plateau_from)

    def parts(self) -> dict[str, Any]:
        """What a checkpoint holds state dicts of."""
        return {"model": self.raw, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def save(self, ckpt: Checkpointer) -> None:
        """A resumable checkpoint (a collective: every rank calls it, rank 0 writes)."""
        ckpt.save(self.step, self.parts(), {"best_top1": self.best_top1,
                                            "best_step": self.best_step,
                                            "last_top1": self.last_top1,
                                            "plateau": self.plateau.state_dict()},
                  main=self.dist.is_main)

    def resume(self, ckpt: Checkpointer) -> bool:
        """Continue from the newest checkpoint of this run, if any."""
        resumed = ckpt.resume(self.parts(), rank=self.dist.rank, world=self.dist.world)
        if resumed is None:
            return False
        state = resumed.state
        self.step, self.best_top1 = resumed.step, float(state["best_top1"])
        self.best_step, self.last_top1 = int(state["best_step"]), float(state["last_top1"])
        if "plateau" in state:          # checkpoints written before the rule start it afresh
            self.plateau.load_state_dict(state["plateau"])
        return True

    def finished(self, total: int) -> bool:
        """The whole budget is done, or the plateau rule stopped the run."""
        return self.step == total or self.plateau.stopped

    def train_update(self, micro_batches: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
        """One optimizer update over this rank's micro-batches; loss / accuracy over all ranks."""
        sums = torch.zeros(3, device=self.dist.device)  # loss sum, correct, videos
        for i, (tokens, labels) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            alone = last or self.dist.world == 1  # DDP all-reduces on the last micro-batch only
            with contextlib.nullcontext() if alone else self.model.no_sync():
                sums += self._micro_step(tokens, labels)
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.raw.parameters(), self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.dist.world > 1:
            dist.all_reduce(sums)
        return {"loss": float(sums[0] / sums[2]), "acc": float(sums[1] / sums[2]), "lr": lr}

    def _micro_step(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Forward + backward of one micro-batch; the loss is scaled so that DDP's mean over
        ranks gives the mean over the whole update."""
        device = self.dist.device
        tokens, labels = tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast_context(self.cfg.precision, device):
            logits = self.model(tokens)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum",
                               label_smoothing=self.cfg.label_smoothing)
        (loss * self.dist.world / self.cfg.batch_size).backward()
        correct = (logits.argmax(-1) == labels).sum()
        return torch.stack([loss.detach(), correct.float(), labels.new_tensor(len(labels)).float()])


# -------------------------------------------------------------------------------------------- run

@dataclass
class Schedule:
    """Updates in the run and the update intervals of validation and checkpoints."""
    total: int
    eval_every: int
    save_every: int
    updates_per_epoch: float
    plateau_from: int = 0       # the plateau rule's minimum budget, in updates

    @classmethod
    def of(cls, cfg: FinetuneConfig, n_train: int) -> Schedule:
        per_epoch = n_train / cfg.batch_size
        return cls(total=math.ceil(cfg.epochs * per_epoch),
                   eval_every=max(1, round(cfg.eval_every * per_epoch)),
                   save_every=max(1, round(per_epoch)), updates_per_epoch=per_epoch,
                   plateau_from=math.ceil(cfg.plateau_min_epochs * per_epoch))


def write_run_config(out: Path, cfg: FinetuneConfig, archive: str | Path, init: str | None,
                     preset: str) -> None:
    doc = {"archive": str(archive), "init": init or "scratch",
           "model_preset": None if init else preset, "finetune": dataclasses.asdict(cfg)}
    (out / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


SELECTION = {
    "final": "the last update (the paper reports the last model)",
    "best": "the update with the best top-1 on the validation split",
}


def validation_info(data: FinetuneData) -> dict[str, Any]:
    """Where the validation videos came from (none when ``val_fraction`` is 0)."""
    if data.val_part is None or data.val is None:
        return {"split": None, "videos": 0}
    return {"split": data.val_part.describe(), "from_split": data.train_tag,
            "fraction": data.val_part.val_fraction, "videos": len(data.val),
            "rule": "sha256 of the video key (UCF101: of its group) below the fraction"}


def model_info(data: FinetuneData, cfg: FinetuneConfig, init: str | None,
               trainer: Finetuner, kind: str, top1: float | None) -> dict[str, Any]:
    """What ``best.pt`` / ``final.pt`` carry besides the weights: which model it is (``kind``:
    final or best), how it was chosen, at which update, and its validation top-1."""
    settings = data.archive.settings
    return {"classes": data.classes, "tokenizer_fingerprint": settings.tokenizer_fingerprint,
            "codebook_size": settings.codebook_size, "dataset": settings.dataset["name"],
            "train_split": data.train_tag, "eval_split": data.eval_tag, "frame_step": data.step,
            "finetune_config": dataclasses.asdict(cfg), "init": init, "step": trainer.step,
            "checkpoint": kind, "selection": SELECTION[kind], "val_top1": top1,
            "validation": validation_info(data)}


def train_loader(data: FinetuneData, cfg: FinetuneConfig, sampler: UpdateSampler,
                 device: torch.device) -> DataLoader:
    return DataLoader(data.train, batch_sampler=sampler, num_workers=cfg.num_workers,
                      **clip_workers(data.archive, cfg.num_workers),
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      generator=torch.Generator().manual_seed(cfg.seed))


def run_finetune(archive_path: str | Path, cfg: FinetuneConfig, out_dir: str | Path, *,
                 init: str | None = None, model_preset: str = "tiny",
                 progress: Progress = NULL_PROGRESS, splits: tuple[str, str] | None = None,
                 stop_after: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Fine-tune on a labelled archive; resumes from ``out_dir/checkpoints`` when present.

    ``init``: a ``pretrained.pt`` (None = from scratch with ``PRESETS[model_preset]``).
    ``splits``: (train tag, eval tag), default the dataset's standard split ``cfg.split``.
    ``stop_after``: stop (with a checkpoint) once this many updates are done, as if interrupted.
    Returns the summary also written to ``summary.json``.
    """
    owns_group = not (dist.is_available() and dist.is_initialized())
    dist_info = init_distributed(device)
    try:
        result = _run(str(archive_path), cfg, Path(out_dir), init, model_preset, progress, splits,
                      stop_after, dist_info)
        if owns_group:
            finish()
        return result
    finally:
        if owns_group:  # leave a process group the caller set up
            cleanup()


def _run(archive_path: str, cfg: FinetuneConfig, out: Path, init: str | None, preset: str,
         progress: Progress, splits: tuple[str, str] | None, stop_after: int | None,
         dist_info: DistInfo) -> dict[str, Any]:
    data = open_finetune_data(archive_path, cfg, splits)
    torch.manual_seed(cfg.seed)
    model = build_model(data.archive.settings, len(data.classes), cfg, init, preset, archive_path)
    torch.manual_seed(cfg.seed + 7919 * (dist_info.rank + 1))  # each rank its own dropout
    schedule = Schedule.of(cfg, len(data.train))
    start = str(Path(init).resolve()) if init else f"scratch:{preset}"
    trainer = Finetuner(model, cfg, dist_info, schedule.total, start, schedule.plateau_from)
    ckpt = Checkpointer(out / "checkpoints", cfg, keep=2,
                        identity={"total": schedule.total, "init": start})
    metrics = MetricsLog(out, enabled=dist_info.is_main)
    if dist_info.is_main:
        write_run_config(out, cfg, archive_path, init, preset)
    if trainer.resume(ckpt):
        metrics.truncate_after(trainer.step)
        log.info("at update %d / %d", trainer.step, schedule.total)
    log.info("fine-tuning %d updates on %d videos (%s), %d classes; validation on %s",
             schedule.total, len(data.train), data.train_tag, len(data.classes),
             f"{len(data.val)} videos, the {data.val_part.describe()}"
             if data.val is not None and data.val_part is not None else "nothing")
    end = schedule.total if stop_after is None else min(stop_after, schedule.total)
    _train_loop(trainer, data, cfg, schedule, end, ckpt, metrics, progress, init, out)
    metrics.close()
    last = trainer.last_top1 if data.val is not None else None
    summary = _summary(trainer, schedule, data, out)
    finished = trainer.finished(schedule.total)
    if finished:
        _log_stop(summary)
    if finished and dist_info.is_main:
        save_finetuned(out / "final.pt", trainer.raw,
                       model_info(data, cfg, init, trainer, "final", last))
        atomic_write_json(out / "summary.json", summary)
    return summary


def _log_stop(summary: dict[str, Any]) -> None:
    """Why the run stopped; a warning when the budget ran out while validation still rose."""
    if summary["stopped"] == STILL_IMPROVING:
        log.warning("%s", summary["stop_reason"])
    else:
        log.info("%s", summary["stop_reason"])


def _train_loop(trainer: Finetuner, data: FinetuneData, cfg: FinetuneConfig, schedule: Schedule,
                end: int, ckpt: Checkpointer, metrics: MetricsLog, progress: Progress,
                init: str | None, out: Path) -> None:
    """Updates ``trainer.step .. end``: train, log, validate, checkpoint."""
    info = trainer.dist
    sampler = UpdateSampler(len(data.train), cfg.batch_size, cfg.micro_batch, cfg.seed, info.rank,
                            info.world, trainer.step, end)
    batches = iter(train_loader(data, cfg, sampler, info.device))
    task = progress.task("fine-tune", schedule.total, "update")
    task.update(completed=trainer.step)
    while trainer.step < end and not trainer.plateau.stopped:
        micro = [next(batches) for _ in sampler.micro_batches(trainer.step)]
        stats = trainer.train_update(micro)
        epoch = trainer.step / schedule.updates_per_epoch
        metrics.write(trainer.step, {**stats, "epoch": epoch})
        task.advance(1, loss=stats["loss"])
        if data.val is not None and (trainer.step % schedule.eval_every == 0
                                     or trainer.step == schedule.total):
            _validate_and_keep_best(trainer, data, cfg, metrics, init, out)
        if (trainer.step % schedule.save_every == 0 or trainer.step == end
                or trainer.plateau.stopped):
            trainer.save(ckpt)
    task.close()


def _validate_and_keep_best(trainer: Finetuner, data: FinetuneData, cfg: FinetuneConfig,
                            metrics: MetricsLog, init: str | None, out: Path) -> None:
    """Top-1 on the validation part of the training split; ``best.pt`` when it improves; the
    plateau rule sees it."""
    top1 = validate(trainer.raw, data.val, trainer.dist, cfg.micro_batch, cfg.precision,
                    cfg.num_workers)
    metrics.write(trainer.step, {"val_top1": top1})
    log.info("update %d: validation top-1 %.4f", trainer.step, top1)
    trainer.last_top1 = top1
    trainer.plateau.observe(trainer.step, top1)
    if top1 > trainer.best_top1:
        trainer.best_top1, trainer.best_step = top1, trainer.step
        if trainer.dist.is_main:
            save_finetuned(out / "best.pt", trainer.raw,
                           model_info(data, cfg, init, trainer, "best", top1))


def _summary(trainer: Finetuner, schedule: Schedule, data: FinetuneData,
             out: Path) -> dict[str, Any]:
    validated = data.val is not None and trainer.best_step >= 0
    finished = trainer.finished(schedule.total)
    stop = stop_record(trainer.plateau, trainer.step, schedule.total, validated) if finished \
        else {"stopped": None, "stopped_step": None, "stop_reason": None}
    return {"complete": finished, "steps": trainer.step,
            "total_steps": schedule.total, "train_videos": len(data.train),
            "val_videos": len(data.val) if data.val is not None else 0,
            "validation": validation_info(data),
            "train_split": data.train_tag, "eval_split": data.eval_tag,
            "eval_split_use": "none during fine-tuning (vimpac evaluate reads it)",
            "classes": len(data.classes),
            "best_val_top1": trainer.best_top1 if validated else None,
            "best_step": trainer.best_step if validated else None,
            "final_val_top1": trainer.last_top1 if validated else None,
            "best": str(out / "best.pt") if validated else None,
            "final": str(out / "final.pt"), **stop,
            "plateau": trainer.plateau.state_dict()}
