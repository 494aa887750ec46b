"""The tokenizer seam: what vimpac needs of a tokenizer, the table of tokenizers, loading, encoding.

A tokenizer turns clips of RGB frames into a grid of integer ids (paper Sec. 3.1: VIMPAC uses
DALL-E's per-frame dVAE, 8x8 pixels per token). It is an ``nn.Module`` implementing
:class:`Tokenizer`; :data:`TOKENIZERS` maps the name stored in a tokenizer folder's ``config.json``
(``config.kind``) to its class. Adding a tokenizer is one module plus one entry here (see
``docs/extending.md``); nothing else in vimpac names a tokenizer.

The tokenize job hands each video to :func:`encode_clips` as clips of consecutive frames, so a
tokenizer may compress time: ``stride`` is (time, height, width) pixels per token and the archive
records the temporal stride.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from safetensors.torch import load_file

from vimpac.tokenize.base import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    TokenizerError,
    save_tokenizer,
)
from vimpac.tokenize.dalle import DalleTokenizer
from vimpac.tokenize.vqvae import VQTokenizer

__all__ = ["TOKENIZERS", "Tokenizer", "TokenizerError", "encode_clips", "encode_frames",
           "load_tokenizer", "save_tokenizer"]


class Tokenizer(Protocol):
    """A tokenizer: an ``nn.Module`` (weights are saved with safetensors) with these members."""

    name: ClassVar[str]             # its TOKENIZERS key, stored as config.json's "kind"
    can_decode: ClassVar[bool]      # whether decode() exists
    clip_frames: ClassVar[int]      # frames per clip it encodes at once: a multiple of stride[0]
    codebook_size: int              # ids are in [0, codebook_size); at most 65535 (uint16)

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width): frames and pixels per token."""

    def fingerprint(self) -> str:
        """sha256 hex of config and weights: names the tokenizer in the archives it writes."""

    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 clips [B,T,H,W,3] -> int64 ids [B,T/t,H/h,W/w] (T a multiple of t)."""

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B,T',h',w'] -> uint8 clips [B,T'*t,h'*h,w'*w,3]; NotImplementedError without a
        decoder."""

    def config_dict(self) -> dict[str, Any]:
        """The architecture, JSON-serialisable, with ``"kind": name``: ``config.json``'s config."""

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> Tokenizer:
        """A fresh (untrained) tokenizer from :meth:`config_dict`'s output; errors name
        ``source``."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> Any: ...


TOKENIZERS: dict[str, type] = {cls.name: cls for cls in (VQTokenizer, DalleTokenizer)}


# -------------------------------------------------------------------------------------- loading

def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Load a tokenizer folder written by :func:`save_tokenizer`; returns it in eval mode.

    ``config.json``'s ``config.kind`` picks the class in :data:`TOKENIZERS`. Weights are read with
    safetensors only (no pickle). A stored fingerprint that does not match the loaded weights is an
    error; every error names the file.
    """
    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (is {path} a tokenizer directory?)")
    config = _read_config(cfg_path)
    try:
        model = _tokenizer_class(config, cfg_path).from_config(config["config"], str(cfg_path))
    except TokenizerError:
        raise
    except (ValueError, TypeError) as exc:      # a value the config class refuses
        raise TokenizerError(f"{cfg_path}: {exc}") from None
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except Exception as exc:  # safetensors/torch errors name no file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(f"{weights_path}: unreadable tokenizer weights ({first})") from None
    stored = config.get("fingerprint")
    if stored is not None and stored != model.fingerprint():
        raise TokenizerError(f"{weights_path}: weights do not match the fingerprint in {cfg_path}")
    return model.to(device).eval()


def _read_config(cfg_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{cfg_path}: not a tokenizer config ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise TokenizerError(f"{cfg_path}: format_version={got!r}, expected {FORMAT_VERSION}")
    if not isinstance(meta.get("config"), dict):
        raise TokenizerError(f"{cfg_path}: 'config' must be an object")
    return meta


def _tokenizer_class(meta: dict[str, Any], cfg_path: Path) -> type:
    kind = meta["config"].get("kind")
    if not isinstance(kind, str) or kind not in TOKENIZERS:
        raise TokenizerError(f"{cfg_path}: config.kind={kind!r} is not a known tokenizer (known: "
                         f"{', '.join(TOKENIZERS)})")
    return TOKENIZERS[kind]


# ------------------------------------------------------------------------------------- encoding

def encode_clips(model: Any, clips: np.ndarray | torch.Tensor, *, batch_size: int = 64,
                 device: str | torch.device | None = None) -> np.ndarray:
    """Tokenize uint8 clips [B,T,H,W,3], ``batch_size`` clips per call -> uint16 ids
    [B,T/t,H/h,W/w] (numpy, on the host).

    ``device`` defaults to the model's. On CUDA the model's 2-D conv weights are put in
    channels_last and it runs under bf16 autocast (codebook distances stay fp32), inputs are copied
    from pinned memory with non_blocking copies and cuDNN is set deterministic. On CPU everything is
    fp32. For the same input, batch size and device the ids are identical from run to run.
    """
    clips_t = torch.from_numpy(np.ascontiguousarray(clips)) if isinstance(clips, np.ndarray) \
        else clips.detach()
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    _check_clips(model, clips_t)
    dev = torch.device(device) if device is not None else _device_of(model)
    model.eval()
    if dev.type == "cuda":
        return _encode_cuda(model, clips_t, batch_size, dev)
    model.to(dev)
    out = [model.encode(chunk).cpu() for chunk in clips_t.split(batch_size)]
    return _ids_to_uint16(torch.cat(out) if out else _empty_ids(model, clips_t))


def encode_frames(model: Any, frames: np.ndarray | torch.Tensor, *, batch_size: int = 64,
                  device: str | torch.device | None = None) -> np.ndarray:
    """Tokenize uint8 frames [N,H,W,3] with a per-frame tokenizer (temporal stride 1) ->
    uint16 ids [N,H/h,W/w]: :func:`encode_clips` on one-frame clips."""
    if model.stride[0] != 1:
        raise ValueError(f"tokenizer {model.name!r} has temporal stride {model.stride[0]}: "
                         "encode clips (encode_clips), not single frames")
    return encode_clips(model, frames[:, None], batch_size=batch_size, device=device)[:, 0]


def _check_clips(model: Any, clips: torch.Tensor) -> None:
    t, h, w = model.stride
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"clips must be uint8 [B,T,H,W,3], got {clips.dtype} "
                         f"{list(clips.shape)}")
    if clips.shape[1] % t or clips.shape[2] % h or clips.shape[3] % w:
        raise ValueError(f"clip shape {list(clips.shape[1:4])} (T, H, W) is not a multiple of "
                         f"tokenizer {model.name!r}'s stride {[t, h, w]}")


def _device_of(model: Any) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _encode_cuda(model: Any, clips: torch.Tensor, batch_size: int,
                 dev: torch.device) -> np.ndarray:
    model.to(dev)
    _channels_last_2d(model)
    host_out = torch.empty(_ids_shape(model, clips), dtype=torch.int32, pin_memory=True)
    flags = torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True)
    with flags, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for start in range(0, len(clips), batch_size):
            chunk = clips[start:start + batch_size]
            if chunk.device.type == "cpu":
                chunk = chunk.contiguous().pin_memory()
            ids = model.encode(chunk).to(torch.int32)
            host_out[start:start + len(chunk)].copy_(ids, non_blocking=True)
    torch.cuda.synchronize(dev)
    return _ids_to_uint16(host_out)


def _channels_last_2d(model: Any) -> None:
    """2-D conv weights in channels_last (cuDNN's fastest layout); other tensors as they are."""
    for param in model.parameters():
        if param.ndim == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)


def _ids_shape(model: Any, clips: torch.Tensor) -> tuple[int, int, int, int]:
    t, h, w = model.stride
    return len(clips), clips.shape[1] // t, clips.shape[2] // h, clips.shape[3] // w


def _empty_ids(model: Any, clips: torch.Tensor) -> torch.Tensor:
    return torch.empty(_ids_shape(model, clips), dtype=torch.int64)


def _ids_to_uint16(ids: torch.Tensor) -> np.ndarray:
    return ids.numpy().astype(np.uint16)


def dalle_folder(folder: str | Path) -> tuple[str, int]:
    """(fingerprint, codebook size) of a ``vimpac tokenizer import-dalle`` folder: the tokens the
    paper's released weights were pre-trained on; any other folder is refused in one line."""
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{folder}: not a tokenizer folder ({exc})") from None
    if getattr(tokenizer, "name", None) != DalleTokenizer.name:
        raise TokenizerError(f"{folder}: a {getattr(tokenizer, 'name', '?')!r} tokenizer; the "
                             "official weights were pre-trained on DALL-E tokens: pass the "
                             "folder written by `vimpac tokenizer import-dalle`")
    return tokenizer.fingerprint(), tokenizer.codebook_size
