"""The ``pretrain`` section of a pipeline: masked-token + contrastive pre-training."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vimpac.archive import FORMATS
from vimpac.archive.formats import STREAM_DEFAULT
from vimpac.common.config import TableChoices, Where, param


def _masking_names() -> Iterable[str]:
    """``pretrain.masking``'s choices: the MASKS table, which stays beside the strategies (read
    when a value is checked, so loading a config imports no torch)."""
    from vimpac.pretrain.masking import MASKS

    return MASKS


def _presets() -> Iterable[str]:
    """``pretrain.model``'s choices: the model presets (read when a value is checked)."""
    from vimpac.pretrain.model import PRESETS

    return PRESETS


@dataclass
class SourceConfig:
    """One archive of ``pretrain.sources``: where it is, its share of the samples, and how it
    is drawn."""
    path: str = param("", "archive folder or URL (s3://bucket/prefix)")
    weight: float = param(0.0, "share of the samples drawn from this archive (normalised over "
                               "the sources); 0 for every source: shares by size", ge=0)
    replacement: bool = param(False, "draw videos independently (with replacement) instead of "
                                     "epoch by epoch")


@dataclass
class PretrainConfig:
    """Stage 2: masked-token prediction + contrastive learning on token archives."""
    format: str = param(STREAM_DEFAULT, "archive format to stream: " + ", ".join(FORMATS),
                        choices=tuple(FORMATS))
    model: str = param("small", "model preset: tiny, small, base, large-half",
                       choices=TableChoices(_presets))
    frames: int = param(5, "token frames per clip T (paper: 5)", ge=1, le=256)
    grid: int = param(16, "token grid side H=W of the model (16 at 128 px, 32 at 256 px)",
                      ge=1, le=256)
    masking: str = param("block", "masking strategy, a name in vimpac.pretrain.masking.MASKS: "
                               "block (paper), iid (ablation), tube (VideoMAE)",
                         choices=TableChoices(_masking_names))
    num_blocks: int = param(0, "cubes per sample; 0 = the paper's Table 2 count for (T, grid)",
                            ge=0, le=1000)
    mask_ratio: float = param(0.145, "masked fraction for iid and tube masking", gt=0, le=1)
    mlm_weight: float = param(1.0, "weight of the masked-token loss", ge=0)
    contrastive_weight: float = param(1.0, "alpha: weight of the contrastive loss", ge=0)
    temperature: float = param(0.2, "gamma: NT-Xent temperature", gt=0)
    proj_hidden: int = param(2048, "contrastive head hidden width (paper: 2048 small, 4096 large)",
                             ge=1)
    proj_layers: int = param(2, "contrastive head layers (paper: 2 small, 3 large)", ge=1, le=8)
    max_clip_distance: float = param(0.0, "max start distance of the two clips in seconds; "
                                           "0 = unlimited (paper default)", ge=0)
    dropout: float = param(0.1, "dropout everywhere in the backbone", ge=0, le=1)
    batch_size: int = param(1024, "videos per optimizer update (via accumulation)", ge=1)
    micro_batch: int = param(8, "videos per forward pass per process", ge=1, volatile=True)
    steps: int = param(12000, "update count at which this run stops (counted from 0 across "
                              "stages: a run continuing a stage-1 checkpoint continues its "
                              "count)", ge=1)
    schedule_steps: int = param(0, "updates of the whole linear LR schedule (warm-up + decay to "
                                   "0) over every stage; 0 = steps (a single-stage run)", ge=0)
    lr: float = param(1e-3, "peak learning rate (paper: 1e-3 small, 3e-4 large)", gt=0)
    warmup: float = param(0.1, "warm-up fraction of the schedule (schedule_steps)", ge=0, le=1)
    weight_decay: float = param(0.05, "AdamW weight decay (not on biases and norms)", ge=0)
    beta2: float = param(0.98, "AdamW beta2 (beta1 = 0.9)", gt=0, le=1)
    grad_clip: float = param(1.0, "gradient-norm clip; 0 = off", ge=0)
    precision: str = param("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp32",
                           choices=("auto", "bf16", "fp32"), volatile=True)
    compile: bool = param(False, "torch.compile the model", volatile=True)
    grad_checkpoint: bool = param(False, "activation checkpointing per layer", volatile=True)
    num_workers: int = param(2, "DataLoader workers per process", ge=0, le=64, volatile=True)
    sources: list[SourceConfig] = param([], "archives to mix, each {path, weight, replacement} "
                                            "(instead of ARCHIVES on the command line)")
    shuffle: str = param("auto", "global: one seeded order over every clip, read by random "
                                 "access; shard: shards streamed through a shuffle buffer; auto: "
                                 "global when every archive is local", choices=("auto", "global",
                                                                               "shard"))
    shuffle_buffer: int = param(256, "videos in the shard-buffer mode's shuffle buffer", ge=1)
    read_window: int = param(2048, "global shuffle: samples read together, grouped by shard "
                                   "(each shard opened, each chunk decoded once per window; "
                                   "10 MiB per DataLoader worker at T5, 16x16)",
                             ge=1, le=1 << 20, volatile=True)
    open_shards: int = param(64, "global shuffle: shard readers kept open per DataLoader "
                                 "worker", ge=1, le=1 << 16, volatile=True)
    checkpoint_every: int = param(500, "updates between checkpoints", ge=1, volatile=True)
    keep_checkpoints: int = param(3, "checkpoints kept", ge=1, volatile=True)
    log_every: int = param(10, "updates between metric lines", ge=1, volatile=True)
    init_from: str = param("", "start from: a stage-1 run folder or training checkpoint "
                                "(resumes model, both heads, AdamW state and the schedule across "
                                "a resolution change), or a pretrained.pt (weights only); "
                                "position tables are interpolated to (frames, grid)")
    official_checkpoint: str = param("", "the authors' released classifier.pt: when set, the "
                                          "pipeline's pretrain stage imports it instead of "
                                          "training (see `vimpac pretrain import-official`)")
    on_corrupt_shard: str = param("stop", "stop or skip (with a warning) on a bad checksum",
                                  choices=("stop", "skip"), volatile=True)
    seed: int = param(0, "seed of data order, masking and init", ge=0)

    def check(self, where: Where) -> None:
        """Rules across this section's fields."""
        if self.schedule_steps and self.schedule_steps < self.steps:
            raise where.error("pretrain.schedule_steps", self.schedule_steps,
                              f"expected 0 or >= pretrain.steps ({self.steps})")
        for i, source in enumerate(self.sources):
            if not source.path:
                raise where.error(f"pretrain.sources[{i}].path", source.path,
                                  "expected an archive folder or URL")
        weighted = [s.weight > 0 for s in self.sources]
        if any(weighted) and not all(weighted):
            raise where.error("pretrain.sources", [s.weight for s in self.sources],
                              "expected a weight > 0 for every source, or none (shares by size)")
        if self.micro_batch > self.batch_size:
            raise where.error("pretrain.micro_batch", self.micro_batch,
                              f"expected <= pretrain.batch_size ({self.batch_size})")
