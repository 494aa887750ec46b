"""Per-frame VQ-VAE tokenizer: frames -> integer token maps (and back).

VIMPAC (arXiv 2106.11250, App. A.1/B.1) tokenizes every frame independently with a discrete VAE that
downsamples by 8 in each spatial direction: a 128 px frame becomes a 16x16 map of ids. Two kinds of
tokenizer share one interface, :class:`VQTokenizer`:

* ``"vqvae"``: our own small VQ-VAE (van den Oord et al. 2017) with a conv encoder/decoder, an EMA
  codebook (k-means initialised, dead codes restarted) and an optional l2-normalised low-dim lookup
  (Yu et al. 2021, "Vector-quantized image modeling with improved VQGAN"). Trained by
  :mod:`vimpac.tokenize.train_tokenizer`.
* ``"dalle"``: the encoder of OpenAI's DALL-E dVAE, the one the paper uses, re-implemented in
  :mod:`vimpac.tokenize.dalle_import` and filled with imported weights. It has no decoder.

A tokenizer is stored as a directory with ``config.json`` and ``model.safetensors`` (never pickle);
its :meth:`VQTokenizer.fingerprint` (sha256 of config + weights) names it in token archives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
MAX_CODEBOOK_SIZE = 65535  # ids are stored as uint16
KINDS = ("vqvae", "dalle")


@dataclass
class VQConfig:
    """Architecture of a tokenizer; saved as ``config.json`` and hashed into the fingerprint."""

    kind: str = "vqvae"  # "vqvae" (ours: encoder, codebook, decoder) or "dalle" (imported encoder)
    codebook_size: int = 8192  # number of codes K; ids are in [0, K); at most 65535 (uint16)
    channels: int = 64  # base conv width (vqvae) or DALL-E's n_hid (dalle)
    code_dim: int = 32  # dimension of the codebook vectors (vqvae; low-dim lookup)
    normalize_codes: bool = True  # vqvae: l2-normalise encoder outputs and codes (cosine lookup)
    commitment: float = 0.25  # vqvae: weight beta of the commitment loss
    ema_decay: float = 0.99  # vqvae: decay of the EMA codebook statistics
    blocks_per_group: int = 2  # dalle: residual blocks per group (n_blk_per_group)
    image_size: int = 128  # hint: frame size the tokenizer was trained on / is meant for
    downsample: int = 8  # spatial downsampling factor (fixed: three 2x stages)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending key and value."""
        if self.kind not in KINDS:
            raise ValueError(f"VQConfig.kind={self.kind!r}: must be one of {KINDS}")
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
        """Build from a dict; unknown keys are errors that name ``source`` and the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown tokenizer config key(s) {unknown}")
        return cls(**data)


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


class VQTokenizer(nn.Module):
    """Frame tokenizer: uint8 frames [N,H,W,3] <-> int64 ids [N,H/8,W/8].

    ``kind="vqvae"`` holds ``encoder``, ``quantizer`` and ``decoder``; ``kind="dalle"`` holds only
    ``encoder`` (a DALL-E dVAE encoder that returns [N,K,h,w] logits; ids are their argmax).
    """

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.codebook_size = config.codebook_size
        self.downsample = config.downsample
        self.quantizer: VectorQuantizer | None = None
        self.decoder: Decoder | None = None
        if config.kind == "dalle":
            from vimpac.tokenize.dalle_import import DalleEncoder  # avoids an import cycle

            self.encoder: nn.Module = DalleEncoder(config.channels, config.blocks_per_group,
                                                   config.codebook_size)
        else:
            self.encoder = Encoder(config.channels, config.code_dim)
            self.quantizer = VectorQuantizer(
                config.codebook_size, config.code_dim, normalize=config.normalize_codes,
                decay=config.ema_decay, commitment=config.commitment)
            self.decoder = Decoder(config.channels, config.code_dim)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N,H,W,3] -> float32 [N,3,H,W]: [-1,1] for vqvae, DALL-E's map_pixels for dalle."""
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [N,H,W,3], got {frames.dtype} "
                             f"{list(frames.shape)}")
        h, w = frames.shape[1:3]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {self.downsample}")
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if self.config.kind == "dalle":
            return 0.8 * (x / 255.0) + 0.1  # DALL-E map_pixels with eps 0.1
        return x / 127.5 - 1.0

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [N,H,W,3] (any device) -> int64 ids [N,H/8,W/8] on the model's device."""
        return self.ids_from_input(self.preprocess(frames))

    def ids_from_input(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed [N,3,H,W] -> int64 ids [N,H/8,W/8]."""
        if self.config.kind == "dalle":
            return self.encoder(x).float().argmax(dim=1)
        assert self.quantizer is not None
        return self.quantizer.lookup(self.encoder(x))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """int ids [N,h,w] -> uint8 frames [N,8h,8w,3] on the model's device."""
        if self.decoder is None or self.quantizer is None:
            raise NotImplementedError(
                f"tokenizer kind {self.config.kind!r} has no decoder: only 'vqvae' tokenizers "
                "can decode ids back to pixels")
        ids = ids.to(self.device).long()
        if ids.ndim != 3 or int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size:
            raise ValueError(f"ids must be [N,h,w] in [0, {self.codebook_size}), got shape "
                             f"{list(ids.shape)} range [{int(ids.min())}, {int(ids.max())}]")
        return to_uint8(self.decoder(self.quantizer.embed(ids)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizeOutput]:
        """Training forward (vqvae): [N,3,H,W] in [-1,1] -> (reconstruction [N,3,H,W], quant)."""
        if self.decoder is None or self.quantizer is None:
            raise NotImplementedError(f"tokenizer kind {self.config.kind!r} cannot be trained")
        quant = self.quantizer(self.encoder(x))
        return self.decoder(quant.quantized), quant

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON config and the weights (name, dtype, shape, bytes)."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.config.to_dict(), sort_keys=True,
                                 separators=(",", ":")).encode())
        state = self.state_dict()
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            digest.update(f"\n{name}|{t.dtype}|{list(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] in [-1,1] -> uint8 [N,H,W,3]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------- save / load


def save_tokenizer(model: VQTokenizer, out_dir: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` to ``out_dir`` atomically.

    Files go to a temporary sibling directory that is renamed into place; an existing ``out_dir``
    is replaced (moved aside, then deleted), so readers never see a half-written tokenizer.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        meta = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(),
                "fingerprint": model.fingerprint()}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dst: Path) -> None:
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> VQTokenizer:
    """Load a tokenizer directory written by :func:`save_tokenizer`; returns it in eval mode.

    Weights are read with safetensors only (no pickle). A stored fingerprint that does not match
    the loaded weights is an error.
    """
    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (is {path} a tokenizer directory?)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not a tokenizer config ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{cfg_path}: format_version={got!r}, expected {FORMAT_VERSION}")
    model = VQTokenizer(VQConfig.from_dict(meta.get("config", {}), source=str(cfg_path)))
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors/torch errors name no file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{weights_path}: unreadable tokenizer weights ({first})") from None
    stored = meta.get("fingerprint")
    if stored is not None and stored != model.fingerprint():
        raise ValueError(f"{weights_path}: weights do not match the fingerprint in {cfg_path}")
    return model.to(device).eval()


# --------------------------------------------------------------------------- batch encoding


def encode_frames(model: VQTokenizer, frames: np.ndarray | torch.Tensor, *, batch_size: int = 64,
                  device: str | torch.device | None = None) -> np.ndarray:
    """Tokenize uint8 frames [N,H,W,3] in batches -> uint16 ids [N,H/8,W/8] (numpy, on the host).

    ``device`` defaults to the model's. On CUDA the model is moved there in channels_last and run
    under bf16 autocast (codebook distances stay fp32), inputs are copied from pinned memory with
    non_blocking copies and cuDNN is set deterministic. On CPU everything is fp32. For the same
    input, batch size and device the ids are identical from run to run.
    """
    frames_t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) \
        else frames.detach()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    dev = torch.device(device) if device is not None else model.device
    model.eval()
    if dev.type == "cuda":
        return _encode_cuda(model, frames_t, batch_size, dev)
    model.to(dev)
    out = [model.encode(chunk).cpu() for chunk in frames_t.split(batch_size)]
    return _ids_to_uint16(torch.cat(out) if out else _empty_ids(model, frames_t))


def _encode_cuda(model: VQTokenizer, frames: torch.Tensor, batch_size: int,
                 dev: torch.device) -> np.ndarray:
    model.to(dev, memory_format=torch.channels_last)
    n, h, w = len(frames), frames.shape[1] // model.downsample, frames.shape[2] // model.downsample
    host_out = torch.empty((n, h, w), dtype=torch.int32, pin_memory=True)
    flags = torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)
    with flags, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for start in range(0, n, batch_size):
            chunk = frames[start:start + batch_size]
            if chunk.device.type == "cpu":
                chunk = chunk.contiguous().pin_memory()
            x = model.preprocess(chunk).contiguous(memory_format=torch.channels_last)
            ids = model.ids_from_input(x).to(torch.int32)
            host_out[start:start + len(chunk)].copy_(ids, non_blocking=True)
    torch.cuda.synchronize(dev)
    return _ids_to_uint16(host_out)


def _empty_ids(model: VQTokenizer, frames: torch.Tensor) -> torch.Tensor:
    h, w = frames.shape[1] // model.downsample, frames.shape[2] // model.downsample
    return torch.empty((0, h, w), dtype=torch.int64)


def _ids_to_uint16(ids: torch.Tensor) -> np.ndarray:
    return ids.numpy().astype(np.uint16)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Temporarily put ``model`` in eval mode, restoring its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
