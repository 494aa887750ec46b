"""Our per-frame VQ-VAE tokenizer: frames -> integer token maps (and back).

VIMPAC (arXiv 2106.11250, App. A.1/B.1) tokenizes every frame independently with a discrete VAE that
downsamples by 8 in each spatial direction: a 128 px frame becomes a 16x16 map of ids. This module
is our own small VQ-VAE (van den Oord et al. 2017) with a conv encoder/decoder, an EMA codebook
(k-means initialised, dead codes restarted) and an optional l2-normalised low-dim lookup (Yu et al.
2021, "Vector-quantized image modeling with improved VQGAN"), trained by
:mod:`vimpac.tokenize.train_tokenizer`. The encoder the paper uses, DALL-E's, is
:mod:`vimpac.tokenize.dalle`; both are entries of :data:`vimpac.tokenize.tokenizer.TOKENIZERS`,
which also saves and loads them (``config.json`` + ``model.safetensors``, never pickle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vimpac.tokenize.base import FrameTokenizer, config_fields

log = logging.getLogger(__name__)

MAX_CODEBOOK_SIZE = 65535  # ids are stored as uint16


@dataclass
class VQConfig:
    """Architecture of a tokenizer; saved as ``config.json`` and hashed into the fingerprint."""

    kind: str = "vqvae"  # the TOKENIZERS entry that reads this config: always "vqvae" here
    codebook_size: int = 8192  # number of codes K; ids are in [0, K); at most 65535 (uint16)
    channels: int = 64  # base conv width
    code_dim: int = 32  # dimension of the codebook vectors (low-dim lookup)
    normalize_codes: bool = True  # l2-normalise encoder outputs and codes (cosine lookup)
    commitment: float = 0.25  # weight beta of the commitment loss
    ema_decay: float = 0.99  # decay of the EMA codebook statistics
    blocks_per_group: int = 2  # unused here; in every config.json so fingerprints stay the same
    image_size: int = 128  # hint: frame size the tokenizer was trained on / is meant for
    downsample: int = 8  # spatial downsampling factor (fixed: three 2x stages)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending key and value."""
        if self.kind != "vqvae":
            raise ValueError(f"VQConfig.kind={self.kind!r}: must be 'vqvae' (other tokenizers "
                             "have their own config class)")
        if not 2 <= self.codebook_size <= MAX_CODEBOOK_SIZE:
            raise ValueError(f"VQConfig.codebook_size={self.codebook_size}: must be in "
                             f"[2, {MAX_CODEBOOK_SIZE}] so ids fit in uint16")
        if self.downsample != 8:
            raise ValueError(f"VQConfig.downsample={self.downsample}: only 8 is supported")
        for key in ("channels", "code_dim", "blocks_per_group", "image_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"VQConfig.{key}={getattr(self, key)}: must be >= 1")
        if self.image_size % self.downsample:
            raise ValueError(f"VQConfig.image_size={self.image_size}: must be a multiple of "
                             f"{self.downsample}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"VQConfig.ema_decay={self.ema_decay}: must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> VQConfig:
        """Build from a dict; unknown keys and wrong types are errors naming ``source`` and key."""
        return cls(**config_fields(cls, data, source))


# --------------------------------------------------------------------------- encoder / decoder


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv1x1(relu(conv3x3(relu(x)))); shape-preserving."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Encoder(nn.Module):
    """[N,3,H,W] pixels in [-1,1] -> [N,code_dim,H/8,W/8] continuous latents."""

    def __init__(self, channels: int, code_dim: int) -> None:
        super().__init__()
        c, c2 = channels, 2 * channels
        self.layers = nn.Sequential(  # no full-resolution layer: cheap enough for CPU training
            nn.Conv2d(3, c, 4, stride=2, padding=1), ResBlock(c),  # H/2
            nn.Conv2d(c, c2, 4, stride=2, padding=1), ResBlock(c2),  # H/4
            nn.Conv2d(c2, c2, 4, stride=2, padding=1), ResBlock(c2), ResBlock(c2),  # H/8
            nn.ReLU(),
            nn.Conv2d(c2, code_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """[N,code_dim,h,w] quantised latents -> [N,3,8h,8w] pixels in about [-1,1]."""

    def __init__(self, channels: int, code_dim: int) -> None:
        super().__init__()
        c, c2 = channels, 2 * channels
        self.layers = nn.Sequential(
            nn.Conv2d(code_dim, c2, 3, padding=1), ResBlock(c2), ResBlock(c2),
            nn.ConvTranspose2d(c2, c2, 4, stride=2, padding=1), ResBlock(c2),  # 2h
            nn.ConvTranspose2d(c2, c, 4, stride=2, padding=1), ResBlock(c),  # 4h
            nn.ReLU(),
            nn.ConvTranspose2d(c, 3, 4, stride=2, padding=1),  # 8h
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


# --------------------------------------------------------------------------- codebook


class QuantizeOutput(NamedTuple):
    quantized: torch.Tensor  # [N,D,h,w] straight-through quantised latents
    ids: torch.Tensor  # [N,h,w] int64 code ids
    commit_loss: torch.Tensor  # scalar: beta * ||z - sg(e)||^2
    latents: torch.Tensor  # [N*h*w,D] float32 (normalised) encoder outputs, detached


class VectorQuantizer(nn.Module):
    """EMA codebook with k-means initialisation and dead-code restarts.

    All state lives in buffers so that it is saved, fingerprinted and restored with the module:
    ``codebook`` [K,D], ``ema_count`` [K], ``ema_sum`` [K,D], ``steps_unused`` [K] (training steps
    since each code was last selected) and ``initialized`` (scalar bool).
    """

    def __init__(self, codebook_size: int, code_dim: int, *, normalize: bool, decay: float,
                 commitment: float) -> None:
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.normalize, self.decay, self.commitment = normalize, decay, commitment
        codebook = torch.randn(codebook_size, code_dim)
        if normalize:
            codebook = F.normalize(codebook, dim=1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(False))

    def flatten(self, z: torch.Tensor) -> torch.Tensor:
        """[N,D,h,w] -> [N*h*w,D] float32, l2-normalised if configured."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.code_dim).float()
        return F.normalize(flat, dim=1) if self.normalize else flat

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """[M,D] float32 latents -> [M] int64 ids of the nearest codes (cosine if normalised)."""
        codebook = self.codebook.float()
        if self.normalize:
            return (flat @ codebook.t()).argmax(dim=1)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
        return dist.argmin(dim=1)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """[N,D,h,w] latents -> [N,h,w] int64 ids (fp32 distances even under autocast)."""
        n, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            return self.nearest(self.flatten(z)).view(n, h, w)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[N,h,w] ids -> [N,D,h,w] code vectors."""
        return self.codebook[ids].permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> QuantizeOutput:
        """Quantise [N,D,h,w]; in training mode also update the EMA codebook."""
        n, _, h, w = z.shape
        flat = self.flatten(z)  # [M,D], differentiable
        ids = self.nearest(flat.detach())
        if self.training:
            self._ema_update(flat.detach(), ids)
        codes = self.codebook[ids]  # [M,D]
        commit = self.commitment * F.mse_loss(flat, codes.detach())
        quantized = flat + (codes - flat).detach()  # straight-through estimator
        quantized = quantized.view(n, h, w, self.code_dim).permute(0, 3, 1, 2)
        return QuantizeOutput(quantized, ids.view(n, h, w), commit, flat.detach())

    @torch.no_grad()
    def init_codebook(self, latents: torch.Tensor, generator: torch.Generator,
                      iters: int = 10) -> None:
        """k-means (``iters`` Lloyd steps) on [M,D] flattened latents; random rows if M < K."""
        k = self.codebook_size
        idx = torch.randint(len(latents), (k,), generator=generator) if len(latents) < k else \
            torch.randperm(len(latents), generator=generator)[:k]
        centers = latents[idx].clone()
        for _ in range(iters):
            assign = _nearest_rows(latents, centers, self.normalize)
            counts = torch.bincount(assign, minlength=k).float()
            sums = torch.zeros_like(centers).index_add_(0, assign, latents)
            filled = counts > 0
            centers[filled] = sums[filled] / counts[filled, None]
            if self.normalize:
                centers = F.normalize(centers, dim=1)
        self._set_codes(torch.arange(k), centers, count=1.0)
        self.steps_unused.zero_()
        self.initialized.fill_(True)
        log.debug("codebook initialised by k-means on %d latents", len(latents))

    @torch.no_grad()
    def restart_dead_codes(self, latents: torch.Tensor, generator: torch.Generator,
                           dead_after: int) -> int:
        """Re-seed codes unused for ``dead_after`` steps with random rows of [M,D] ``latents``.

        Returns how many codes were restarted.
        """
        dead = (self.steps_unused >= dead_after).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        rows = torch.randint(len(latents), (dead.numel(),), generator=generator)
        self._set_codes(dead, latents[rows], count=1.0)
        self.steps_unused[dead] = 0
        return int(dead.numel())

    def _set_codes(self, idx: torch.Tensor, vectors: torch.Tensor, count: float) -> None:
        self.codebook[idx] = vectors.to(self.codebook.dtype)
        self.ema_sum[idx] = vectors.to(self.ema_sum.dtype) * count
        self.ema_count[idx] = count

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        if not bool(self.initialized):
            return  # the trainer initialises by k-means first; until then the codebook is frozen
        k = self.codebook_size
        counts = torch.bincount(ids, minlength=k).to(self.ema_count.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, flat)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + k * 1e-5) * total  # Laplace smoothing
        codebook = self.ema_sum / smoothed[:, None]
        self.codebook.copy_(F.normalize(codebook, dim=1) if self.normalize else codebook)
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)


def _nearest_rows(x: torch.Tensor, centers: torch.Tensor, normalize: bool) -> torch.Tensor:
    """[M,D] x [K,D] -> [M] index of the nearest center, in chunks to bound memory."""
    out = []
    for chunk in x.split(8192):
        if normalize:
            out.append((chunk @ centers.t()).argmax(1))
        else:
            out.append(torch.cdist(chunk, centers).argmin(1))
    return torch.cat(out)


# --------------------------------------------------------------------------- tokenizer


class VQTokenizer(FrameTokenizer):
    """Frame tokenizer: uint8 frames [N,H,W,3] <-> int64 ids [N,H/8,W/8] (clips [B,T,...] too).

    Holds ``encoder``, ``quantizer`` and ``decoder``; the training forward is :meth:`forward`.
    """

    name = "vqvae"
    can_decode = True

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.codebook_size = config.codebook_size
        self.downsample = config.downsample
        self.encoder = Encoder(config.channels, config.code_dim)
        self.quantizer = VectorQuantizer(
            config.codebook_size, config.code_dim, normalize=config.normalize_codes,
            decay=config.ema_decay, commitment=config.commitment)
        self.decoder = Decoder(config.channels, config.code_dim)

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> VQTokenizer:
        return cls(VQConfig.from_dict(config, source=source))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels 0..255 -> [-1, 1]."""
        return x / 127.5 - 1.0

    def ids_from_input(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed [N,3,H,W] -> int64 ids [N,H/8,W/8]."""
        return self.quantizer.lookup(self.encoder(x))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """int ids [N,h,w] (or clips [B,T,h,w]) -> uint8 frames [N,8h,8w,3] on the model's
        device (or [B,T,8h,8w,3])."""
        ids = ids.to(self.device).long()
        if ids.ndim not in (3, 4) or ids.numel() == 0 or int(ids.min()) < 0 or \
                int(ids.max()) >= self.codebook_size:
            span = f"[{int(ids.min())}, {int(ids.max())}]" if ids.numel() else "empty"
            raise ValueError(f"ids must be [N,h,w] in [0, {self.codebook_size}), got shape "
                             f"{list(ids.shape)} range {span}")
        flat = ids.flatten(0, 1) if ids.ndim == 4 else ids
        pixels = to_uint8(self.decoder(self.quantizer.embed(flat)))
        return pixels.unflatten(0, ids.shape[:2]) if ids.ndim == 4 else pixels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizeOutput]:
        """Training forward: [N,3,H,W] in [-1,1] -> (reconstruction [N,3,H,W], quant)."""
        quant = self.quantizer(self.encoder(x))
        return self.decoder(quant.quantized), quant


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] in [-1,1] -> uint8 [N,H,W,3]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Temporarily put ``model`` in eval mode, restoring its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
