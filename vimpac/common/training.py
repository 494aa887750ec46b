"""Training pieces both training stages use: optimizer groups, schedule, precision, metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vimpac.common.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


NORM_TYPES = (nn.LayerNorm, nn.BatchNorm1d, nn.SyncBatchNorm, nn.GroupNorm)


def param_groups(model: nn.Module, weight_decay: float,
                 decay_norms_in: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and normalisation weights (the official rule),
    except the norm weights of the submodules named in ``decay_norms_in``, which are decayed.

    The official code matches parameter names (``.bias``, ``LayerNorm.weight``, ``.ln.weight``,
    ``ln_pre.weight``...). That exempts every LayerNorm of the backbone, but not the masked-token
    head's LayerNorm (``mlm_head.transform.2.weight``) nor the projection head's BatchNorms
    (``cls_head.mlp.bn_*.weight``): pre-training passes ``("mlm_head", "contrastive_head")`` to
    decay them as it did.
    """
    decayed = tuple(f"{name}." for name in decay_norms_in)
    no_decay: set[int] = set()
    for module_name, module in model.named_modules():
        norm_exempt = isinstance(module, NORM_TYPES) and not (module_name + ".").startswith(
            decayed)
        for name, p in module.named_parameters(recurse=False):
            if norm_exempt or name.endswith("bias"):
                no_decay.add(id(p))
    decay, plain, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (plain if id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def warmup_linear(total_steps: int, warmup: float) -> Any:
    """LR multiplier: linear warm-up over ``warmup`` of the steps, then linear decay to 0."""
    warm = max(1, round(total_steps * warmup)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return factor


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU for ``auto``/``bf16``; fp32 (no autocast) on CPU unless ``bf16``."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class MetricsLog:
    """Metrics as JSON lines (always) and TensorBoard scalars (when installed)."""

    def __init__(self, folder: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(folder) / "tensorboard"))
        except ImportError:
            log.debug("tensorboard not installed: metrics go to %s only", self.path)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue                     # a line cut short by a crash or a full disk
        atomic_write_bytes(self.path, "".join(line + "\n" for line in keep).encode())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
