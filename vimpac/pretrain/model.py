"""The VIMPAC transformer: a video-token backbone and its masked-token, contrastive and class heads.

Paper: VIMPAC (arXiv 2106.11250) Sec. 3 and App. A.1 (eqs. 7-17), Table 3 / 6 (sizes), Table 13
(layouts). Read top to bottom: config, attention along one axis, attention block, MLP block, layer,
backbone, heads, the pre-training model.

- Input: VQ token ids ``[B, T, H, W]``; codes ``0..K-1``, ``[PAD] = K+1``, ``[MASK] = K+4``, and the
  embedding has ``K+5`` rows (K = 8192 gives the paper's 8193 / 8196 / 8197).
- Embedding: ``h0 = Dropout(LN(embed(x) + P_T[t] + P_H[h] + P_W[w]))``; the [CLS] vector is a
  learned ``cls_param`` plus its own position, through the same LN and dropout.
- Layer ``"T,H|W"`` (paper default): temporal attention (all heads) -> dense -> residual + LN; then
  attention along H and along W in parallel (half the heads and half the attention width each,
  outputs concatenated) -> dense -> residual + LN; then MLP (GELU) -> residual + LN (post-LN).
  A comma separates sequential blocks, a pipe parallel branches; ``"THW"`` is full joint attention.
- [CLS] (TimeSformer style): before every attention the current CLS vector is prepended to every 1-D
  sequence; afterwards its outputs are averaged over the sequences. Its q, k, v are projected once
  and copied in front of every sequence (the same numbers as projecting every copy).
- Tokens stay in one ``[B, T, H, W, C]`` layout; each attention copies its q, k, v once into
  sequence order and its output once back (see ``benchmarks/OPTIMISATIONS.md``).
- [PAD] keys are excluded from attention; CLS is always attendable, so no row is fully masked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-12  # BERT LayerNorm epsilon, used everywhere
INIT_STD = 0.02  # BERT initialisation
AXES = ("T", "H", "W", "THW")  # attention axes a layout may name
_AXIS_DIM = {"T": 1, "H": 2, "W": 3}  # dim of each axis in [B, T, H, W, C]


# ------------------------------------------------------------------------------------------ config

@dataclass
class ModelConfig:
    """Backbone hyper-parameters (paper Table 3 / 6)."""

    codebook_size: int = 8192  # K: VQ codes 0..K-1 (DALL-E: 8192)
    layers: int = 6  # transformer layers
    dim: int = 512  # hidden width d
    heads: int = 8  # attention heads of a full-width attention (paper: dim // 64)
    mlp_dim: int = 2048  # MLP width (4d; 2d when "halved")
    att_dim: int | None = None  # total q/k/v width; None = dim ("halved" attention: dim // 2)
    frames: int = 5  # T of the position tables
    height: int = 16  # H of the position tables (token grid rows)
    width: int = 16  # W of the position tables (token grid columns)
    dropout: float = 0.1  # dropout on embeddings, attention probabilities, residual branches
    layout: str = "T,H|W"  # "," sequential blocks, "|" parallel branches; "THW" = joint attention
    grad_checkpoint: bool = False  # activation checkpointing per layer (training only)

    def __post_init__(self) -> None:
        for name in ("codebook_size", "layers", "dim", "heads", "mlp_dim", "frames", "height",
                     "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout={self.dropout}: must be in [0, 1)")
        for group in parse_layout(self.layout):
            n = len(group)
            if self.heads % n or self.attention_dim % self.heads:
                raise ValueError(
                    f"ModelConfig.layout={self.layout!r}: {n} parallel branches need heads "
                    f"({self.heads}) divisible by {n} and att_dim ({self.attention_dim}) divisible "
                    f"by the heads")

    @property
    def attention_dim(self) -> int:
        """Total q/k/v width of a full attention block."""
        return self.dim if self.att_dim is None else self.att_dim

    @property
    def pad_id(self) -> int:
        """[PAD] id: K + 1 (8193 for K = 8192)."""
        return self.codebook_size + 1

    @property
    def mask_id(self) -> int:
        """[MASK] id: K + 4 (8196 for K = 8192)."""
        return self.codebook_size + 4

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding: K + 5 (8197 for K = 8192); K, K+2, K+3 are unused."""
        return self.codebook_size + 5


def parse_layout(layout: str) -> list[list[str]]:
    """``"T,H|W"`` -> ``[["T"], ["H", "W"]]``: sequential blocks of parallel attention axes."""
    groups = [[axis.strip() for axis in block.split("|")] for block in layout.split(",")]
    for group in groups:
        for axis in group:
            if axis not in AXES:
                raise ValueError(f"ModelConfig.layout={layout!r}: unknown axis {axis!r}; "
                                 f"use {', '.join(AXES)} joined by ',' and '|'")
        if len(set(group)) != len(group):
            raise ValueError(f"ModelConfig.layout={layout!r}: axis repeated within {group}")
    return groups


PRESETS: dict[str, ModelConfig] = {
    # Tests and the CPU demo: tiny, fast.
    "tiny": ModelConfig(codebook_size=512, layers=2, dim=128, heads=4, mlp_dim=256,
                        frames=5, height=8, width=8),
    # Paper's analysis model (29.4M).
    "small": ModelConfig(layers=6, dim=512, heads=8, mlp_dim=2048),
    # 119.7M.
    "base": ModelConfig(layers=12, dim=768, heads=12, mlp_dim=3072),
    # Paper's final model: halved attention (head dim 32) and halved MLP (210.1M).
    "large-half": ModelConfig(layers=24, dim=1024, heads=16, mlp_dim=2048, att_dim=512),
}


def init_bert_(module: nn.Module) -> None:
    """BERT init for one module: Linear/Embedding N(0, 0.02), zero biases, norms 1 / 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------- attention

# [B, T, H, W] dims -> [B, a, b, L]: the two other axes, then the attended one (a view of x).
_SEQUENCE_DIMS = {"T": (0, 2, 3, 1), "H": (0, 1, 3, 2), "W": (0, 1, 2, 3)}


def _sequences(x: Tensor, axis: str) -> Tensor:
    """[B, T, H, W, ...] -> [B, a, b, L, ...]: the 1-D sequences along ``axis``, as a view.

    ``a, b`` are the two other axes in T, H, W order; ``"THW"`` is one sequence of T*H*W.
    """
    if axis == "THW":
        return x.flatten(1, 3)[:, None, None]  # [B, 1, 1, T*H*W, ...]
    return x.permute(*_SEQUENCE_DIMS[axis], *range(4, x.dim()))


def _from_sequences(y: Tensor, axis: str, grid: tuple[int, int, int]) -> Tensor:
    """Inverse of :func:`_sequences` (a view): [B, a, b, L, ...] -> [B, T, H, W, ...]."""
    if axis == "THW":
        return y.reshape(y.shape[0], *grid, *y.shape[4:])
    inverse = sorted(range(4), key=_SEQUENCE_DIMS[axis].__getitem__)
    return y.permute(*inverse, *range(4, y.dim()))


def _cls_first(tokens: Tensor, cls: Tensor, axis: str) -> Tensor:
    """tokens [B, T, H, W, heads, hd], cls [B, heads, hd] -> [B*a*b, heads, 1+L, hd]: every
    sequence along ``axis`` with the CLS in front, in one copy."""
    seq = _sequences(tokens, axis).transpose(3, 4)  # [B, a, b, heads, L, hd], a view
    cls = cls[:, None, None, :, None].expand(*seq.shape[:4], 1, -1)  # [B, a, b, heads, 1, hd]
    return torch.cat([cls, seq], dim=4).flatten(0, 2)


def _attend_matmul(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, dropout: float
                   ) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with [PAD] keys masked, as the paper and official code compute
    it (eqs. 10-12). q, k, v [N, heads, 1+L, hd] contiguous; keep [N, 1, 1, 1+L] or None."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [N, heads, 1+L, 1+L]
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), dropout, training=dropout > 0)
    return torch.matmul(probs, v)


def _attend_sdpa(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, dropout: float) -> Tensor:
    """The same attention through ``F.scaled_dot_product_attention`` (fused kernels on CUDA)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout)


# Attention kernels by name, and the default per device type (measured: benchmarks/
# OPTIMISATIONS.md); set ``AxialAttention.kernel`` to override.
ATTENTION_KERNELS = {"matmul": _attend_matmul, "sdpa": _attend_sdpa}
DEFAULT_KERNEL = {"cpu": "matmul", "cuda": "sdpa"}


class AxialAttention(nn.Module):
    """Multi-head self-attention along one axis, CLS prepended to every sequence (eqs. 9-13).

    q, k, v are projected once per token and once for the CLS (its projection is the same in
    every sequence), then each is copied once into sequence order with the CLS in front (their
    gradients meet again in the projection's own layout, with no copy back). Returns the
    attention outputs before the output projection: tokens ``[B, T, H, W, heads, head_dim]``
    (a view) and the CLS outputs averaged over all sequences ``[B, heads * head_dim]``.
    """

    def __init__(self, axis: str, dim: int, att_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.axis, self.heads, self.att_dim, self.dropout = axis, heads, att_dim, dropout
        self.qkv = nn.Linear(dim, 3 * att_dim)  # q, k, v each d -> att_dim
        self.kernel: str | None = None  # a key of ATTENTION_KERNELS; None = DEFAULT_KERNEL

    def forward(self, x: Tensor, cls: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor]:
        """x [B,T,H,W,D], cls [B,D], pad [B,T,H,W] (True = [PAD] key) or None."""
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(4)  # 3 x [B,T,H,W,heads,hd]
        qkv_cls = self.qkv(cls).unflatten(-1, (3, self.heads, -1)).unbind(1)  # 3 x [B,heads,hd]
        q, k, v = (_cls_first(t, c, self.axis) for t, c in zip(qkv, qkv_cls, strict=True))
        b, na, nb, length = _sequences(x, self.axis).shape[:4]
        keep = None
        if pad is not None:
            keep = ~_sequences(pad, self.axis).flatten(0, 2)  # [N, L]
            keep = F.pad(keep, (1, 0), value=True)[:, None, None]  # [N, 1, 1, 1+L]: CLS kept
        attend = ATTENTION_KERNELS[self.kernel or DEFAULT_KERNEL.get(x.device.type, "sdpa")]
        out = attend(q, k, v, keep, self.dropout if self.training else 0.0)
        cls_out, tokens = out.unflatten(0, (b, na, nb)).split([1, length], dim=4)
        cls_out = cls_out.mean(dim=(1, 2)).flatten(1)  # [B, A]: the average over the sequences
        tokens = tokens.transpose(3, 4)  # [B, a, b, heads, L, hd] -> [B, a, b, L, heads, hd]
        return _from_sequences(tokens, self.axis, tuple(x.shape[1:4])), cls_out


class AttentionBlock(nn.Module):
    """Parallel axial attentions (heads and width split evenly), dense, dropout, residual + LN."""

    def __init__(self, config: ModelConfig, axes: list[str]) -> None:
        super().__init__()
        n = len(axes)
        att_dim = config.attention_dim
        self.branches = nn.ModuleList(
            AxialAttention(axis, config.dim, att_dim // n, config.heads // n, config.dropout)
            for axis in axes)
        self.dense = nn.Linear(att_dim, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.ln = nn.LayerNorm(config.dim, eps=LN_EPS)

    def forward(self, x: Tensor, cls: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor]:
        """x [B,T,H,W,D], cls [B,D] -> same shapes."""
        outs = [branch(x, cls, pad) for branch in self.branches]
        tok = torch.cat([o[0] for o in outs], dim=-2).flatten(-2)  # [B, T, H, W, att_dim]
        cls_att = torch.cat([o[1] for o in outs], dim=-1)  # [B, att_dim]
        x = self.ln(x + self.drop(self.dense(tok)))
        cls = self.ln(cls + self.drop(self.dense(cls_att)))
        return x, cls


class MLPBlock(nn.Module):
    """Linear d -> mlp_dim, GELU (exact), Linear back, dropout, residual + LN."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mlp_dim, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.ln = nn.LayerNorm(config.dim, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]."""
        return self.ln(x + self.drop(self.fc2(self.act(self.fc1(x)))))


class VimpacLayer(nn.Module):
    """One transformer layer: the layout's attention blocks in sequence, then the MLP block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = nn.ModuleList(
            AttentionBlock(config, axes) for axes in parse_layout(config.layout))
        self.mlp = MLPBlock(config)

    def forward(self, x: Tensor, cls: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor]:
        """x [B,T,H,W,D], cls [B,D], pad [B,T,H,W] or None -> (x, cls)."""
        for block in self.attention:
            x, cls = block(x, cls, pad)
        return self.mlp(x), self.mlp(cls)


# ---------------------------------------------------------------------------------------- backbone

def interpolate_table(table: Tensor, size: int) -> Tensor:
    """1-D linear interpolation of a ``[n, D]`` table to ``[size, D]`` (align_corners=False).

    Also usable on optimizer moment tensors of the same shape.
    """
    if table.shape[0] == size:
        return table.clone()
    out = F.interpolate(table.detach().t().unsqueeze(0).float(), size=size, mode="linear",
                        align_corners=False)  # [1, D, size]
    return out[0].t().to(table.dtype).contiguous()


class VimpacBackbone(nn.Module):
    """Token embedding + factorised positions + CLS + layers; returns (CLS, token features)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = dataclasses.replace(config)  # own copy: interpolate_positions edits it
        d = config.dim
        self.token_embed = nn.Embedding(config.vocab_size, d)
        self.pos_t = nn.Parameter(torch.empty(config.frames, d))
        self.pos_h = nn.Parameter(torch.empty(config.height, d))
        self.pos_w = nn.Parameter(torch.empty(config.width, d))
        self.pos_cls = nn.Parameter(torch.empty(d))
        self.cls_param = nn.Parameter(torch.empty(d))
        self.embed_ln = nn.LayerNorm(d, eps=LN_EPS)
        self.embed_drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(VimpacLayer(config) for _ in range(config.layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT init; P_T, P_H, P_W ~ N(0, 0.02/sqrt(3)) so their sum has std 0.02."""
        self.apply(init_bert_)
        for table in (self.pos_t, self.pos_h, self.pos_w):
            nn.init.normal_(table, std=INIT_STD / math.sqrt(3))
        nn.init.normal_(self.pos_cls, std=INIT_STD)
        nn.init.normal_(self.cls_param, std=INIT_STD)

    def embed(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B,T,H,W] -> h0 tokens [B,T,H,W,D] and h0 CLS [B,D] (eqs. 7-8)."""
        pos = self.pos_t[:, None, None] + self.pos_h[None, :, None] + self.pos_w[None, None]
        x = self.embed_drop(self.embed_ln(self.token_embed(tokens) + pos))  # [B,T,H,W,D]
        cls = self.embed_drop(self.embed_ln(self.cls_param + self.pos_cls))  # [D]
        return x, cls.expand(tokens.shape[0], -1)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B,T,H,W] (long) -> CLS [B,D], token features [B,T,H,W,D]."""
        grid = (self.config.frames, self.config.height, self.config.width)
        if tokens.dim() != 4 or tuple(tokens.shape[1:]) != grid:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not match the model grid "
                             f"[B, {grid[0]}, {grid[1]}, {grid[2]}]; use interpolate_positions")
        pad = tokens == self.config.pad_id
        pad = pad if bool(pad.any()) else None  # None lets SDPA use its fused kernels
        x, cls = self.embed(tokens)
        for layer in self.layers:
            if self.config.grad_checkpoint and self.training and torch.is_grad_enabled():
                x, cls = checkpoint(layer, x, cls, pad, use_reentrant=False)
            else:
                x, cls = layer(x, cls, pad)
        return cls, x

    @torch.no_grad()
    def interpolate_positions(self, frames: int, height: int, width: int) -> None:
        """Resize P_T, P_H, P_W to a new grid (1-D linear, align_corners=False); CLS untouched.

        The tables become new Parameters: rebuild the optimizer (or interpolate its state with
        :func:`interpolate_table`) afterwards.
        """
        for name, size in (("pos_t", frames), ("pos_h", height), ("pos_w", width)):
            old = getattr(self, name)
            if old.shape[0] != size:
                setattr(self, name, nn.Parameter(interpolate_table(old, size),
                                                 requires_grad=old.requires_grad))
        self.config.frames, self.config.height, self.config.width = frames, height, width


def count_backbone_params(model: nn.Module) -> int:
    """Parameters of the backbone (token embedding included, heads excluded), as in Table 3."""
    backbone = getattr(model, "backbone", model)
    return sum(p.numel() for p in backbone.parameters())


# ------------------------------------------------------------------------------------------- heads

class MaskedTokenHead(nn.Module):
    """Linear d->d, GELU, LN, then a decoder tied to the token embedding plus its own bias.

    Only the features at masked positions go in (eqs. 16-17), so logits are ``[M, vocab]``,
    not ``[B, T, H, W, vocab]``.
    """

    def __init__(self, config: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim)
        self.act = nn.GELU()
        self.ln = nn.LayerNorm(config.dim, eps=LN_EPS)
        self.decoder_weight = embedding.weight  # tied: the same Parameter as the embedding
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        init_bert_(self.dense)

    def forward(self, features: Tensor) -> Tensor:
        """features at masked positions [M, D] -> logits [M, vocab]."""
        return F.linear(self.ln(self.act(self.dense(features))), self.decoder_weight, self.bias)


class ContrastiveHead(nn.Module):
    """SimCLR projection: (Linear -> BatchNorm1d -> ReLU) x (layers-1), Linear (no bias) -> out.

    Under DDP the BatchNorms should be synchronised: call :func:`to_sync_batchnorm` on the model
    before wrapping it.
    """

    def __init__(self, dim: int, hidden: int = 2048, out_dim: int = 256, layers: int = 2) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"ContrastiveHead layers={layers}: must be >= 1")
        mods: list[nn.Module] = []
        width = dim
        for _ in range(layers - 1):
            mods += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        mods.append(nn.Linear(width, out_dim, bias=False))
        self.mlp = nn.Sequential(*mods)
        self.apply(init_bert_)

    def forward(self, cls: Tensor) -> Tensor:
        """cls [N, D] -> projections [N, out_dim] (not normalised)."""
        return self.mlp(cls)


def to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Convert every BatchNorm (the contrastive head's) to SyncBatchNorm; do it before DDP."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class ClassifierHead(nn.Module):
    """Fine-tuning head: Dropout (p = 0 in the paper) -> Linear(d, classes), zero-initialised."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, cls: Tensor) -> Tensor:
        """cls [B, D] -> logits [B, classes]."""
        return self.fc(self.drop(cls))


def token_mean(tokens: Tensor, x: Tensor, pad_id: int) -> Tensor:
    """The mean of the token features x [B, T, H, W, D] over the real (non-[PAD]) tokens of
    ``tokens`` [B, T, H, W] -> [B, D]."""
    keep = (tokens != pad_id)[..., None].to(x.dtype)  # [B, T, H, W, 1]
    return (x * keep).sum((1, 2, 3)) / keep.sum((1, 2, 3)).clamp(min=1)


# What a classifier reads from the backbone: name -> (token ids, CLS [B, D], token features
# [B, T, H, W, D], pad id) -> [B, D]. ``cls`` is the paper's (App. A.2); ``mean`` averages the
# token features, as MAE fine-tunes its ViT ("global pool").
POOLS: dict[str, Callable[[Tensor, Tensor, Tensor, int], Tensor]] = {
    "cls": lambda tokens, cls, x, pad_id: cls,
    "mean": lambda tokens, cls, x, pad_id: token_mean(tokens, x, pad_id),
}


# -------------------------------------------------------------------------------- pre-train model

class VimpacPretrainModel(nn.Module):
    """Backbone + masked-token head + contrastive head: one forward pass for both losses."""

    def __init__(self, config: ModelConfig, *, proj_hidden: int = 2048, proj_layers: int = 2,
                 proj_dim: int = 256) -> None:
        super().__init__()
        self.backbone = VimpacBackbone(config)
        self.mlm_head = MaskedTokenHead(config, self.backbone.token_embed)
        self.contrastive_head = ContrastiveHead(config.dim, proj_hidden, proj_dim, proj_layers)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def forward(self, inputs: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """inputs [B,T,H,W] (with [MASK]), mask [B,T,H,W] bool (positions to predict).

        Returns ``mlm_logits`` [M, vocab] at the M masked positions (row-major order of ``mask``),
        ``cls`` [B, D] and ``proj`` [B, proj_dim].
        """
        cls, features = self.backbone(inputs)
        return {"mlm_logits": self.mlm_head(features[mask]),  # [M, D] -> [M, vocab]
                "cls": cls,
                "proj": self.contrastive_head(cls)}
