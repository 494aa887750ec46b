"""The pre-trained backbone file that fine-tuning starts from.

``pretrained.pt`` = ``{"format", "model_config", "backbone", "tokenizer_fingerprint",
"codebook_size", "step", "pretrain_config"}``: plain containers and tensors only, read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vimpac.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vimpac.pretrain.model import ModelConfig, VimpacBackbone

FORMAT = "vimpac-pretrained-backbone/1"


def save_pretrained(path: str | Path, backbone: VimpacBackbone, *, tokenizer_fingerprint: str,
                    step: int, pretrain_config: dict[str, Any] | None = None) -> None:
    save_checkpoint(path, {
        "format": FORMAT,
        "model_config": dataclasses.asdict(backbone.config),
        "backbone": backbone.state_dict(),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "codebook_size": backbone.config.codebook_size,
        "step": step,
        "pretrain_config": pretrain_config or {},
    })


def load_pretrained(path: str | Path) -> tuple[VimpacBackbone, dict[str, Any]]:
    """The backbone (at its pre-training grid) and the file's metadata."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vimpac pre-trained backbone (expected format "
                              f"{FORMAT}); pass the pretrained.pt written by `vimpac pretrain`")
    backbone = VimpacBackbone(ModelConfig(**state["model_config"]))
    backbone.load_state_dict(state["backbone"])
    meta = {k: v for k, v in state.items() if k != "backbone"}
    return backbone, meta
