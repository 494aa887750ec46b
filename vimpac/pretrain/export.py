"""The pre-trained model file that fine-tuning (and further pre-training) starts from.

``pretrained.pt`` = ``{"format", "model_config", "backbone", "tokenizer_fingerprint",
"codebook_size", "step", "pretrain_config"}`` plus, when written from a whole pre-training model,
``"heads"`` (the masked-token head without its decoder, which is the tied token embedding, and the
contrastive projection head, with its shape) and, for imported weights, ``"provenance"``. Plain
containers and tensors only, read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vimpac.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vimpac.pretrain.model import ModelConfig, VimpacBackbone, VimpacPretrainModel

FORMAT = "vimpac-pretrained-backbone/1"
TIED = "decoder_weight"  # the masked-token head's decoder: the token embedding itself


def heads_state(model: VimpacPretrainModel) -> dict[str, Any]:
    """Both heads' weights (the tied decoder left out) and the projection head's shape."""
    proj = model.contrastive_head
    linears = [m for m in proj.mlp if isinstance(m, nn.Linear)]
    return {"mlm_head": {k: v for k, v in model.mlm_head.state_dict().items() if k != TIED},
            "contrastive_head": proj.state_dict(),
            "proj_layers": len(linears), "proj_dim": int(linears[-1].weight.shape[0]),
            "proj_hidden": int(linears[0].weight.shape[0]) if len(linears) > 1 else 0}


def save_pretrained(path: str | Path, model: VimpacBackbone | VimpacPretrainModel, *,
                    tokenizer_fingerprint: str, step: int,
                    pretrain_config: dict[str, Any] | None = None,
                    provenance: dict[str, Any] | None = None) -> None:
    """Write ``pretrained.pt``: the backbone, and both heads when ``model`` has them."""
    backbone = model.backbone if isinstance(model, VimpacPretrainModel) else model
    state: dict[str, Any] = {
        "format": FORMAT,
        "model_config": dataclasses.asdict(backbone.config),
        "backbone": backbone.state_dict(),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "codebook_size": backbone.config.codebook_size,
        "step": step,
        "pretrain_config": pretrain_config or {},
    }
    if isinstance(model, VimpacPretrainModel):
        state["heads"] = heads_state(model)
    if provenance is not None:
        state["provenance"] = provenance
    save_checkpoint(path, state)


def _read(path: str | Path) -> dict[str, Any]:
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vimpac pre-trained backbone (expected format "
                              f"{FORMAT}); pass the pretrained.pt written by `vimpac pretrain`")
    return state


def _backbone(state: dict[str, Any], path: str | Path) -> VimpacBackbone:
    try:
        backbone = VimpacBackbone(ModelConfig(**state["model_config"]))
        backbone.load_state_dict(state["backbone"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: backbone weights do not fit its model_config "
                              f"({first})") from None
    return backbone


def load_pretrained(path: str | Path) -> tuple[VimpacBackbone, dict[str, Any]]:
    """The backbone (at its pre-training grid) and the file's metadata (weights left out)."""
    state = _read(path)
    meta = {k: v for k, v in state.items() if k not in ("backbone", "heads")}
    meta["has_heads"] = "heads" in state
    return _backbone(state, path), meta


def load_pretrained_model(path: str | Path) -> tuple[VimpacPretrainModel, dict[str, Any]]:
    """Backbone and both heads (the file must carry them), in eval mode; and the metadata."""
    state = _read(path)
    heads = state.get("heads")
    if not isinstance(heads, dict):
        raise CheckpointError(f"{path}: has the backbone only, not the pre-training heads")
    backbone = _backbone(state, path)
    try:
        model = VimpacPretrainModel(backbone.config, proj_hidden=heads["proj_hidden"] or 1,
                                    proj_layers=heads["proj_layers"], proj_dim=heads["proj_dim"])
        model.load_state_dict(full_state(backbone.state_dict(), heads), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: head weights do not fit ({first})") from None
    meta = {k: v for k, v in state.items() if k not in ("backbone", "heads")}
    return model.eval(), meta


def full_state(backbone: dict[str, Tensor], heads: dict[str, Any]) -> dict[str, Tensor]:
    """A :class:`VimpacPretrainModel` state dict from backbone and head states (decoder tied)."""
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state.update({f"mlm_head.{k}": v for k, v in heads["mlm_head"].items()})
    state[f"mlm_head.{TIED}"] = backbone["token_embed.weight"]
    state.update({f"contrastive_head.{k}": v for k, v in heads["contrastive_head"].items()})
    return state
