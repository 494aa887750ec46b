"""Building blocks of tokenizer modules: the folder format, the fingerprint, config checks and the
per-frame tokenizer base class.

The seam itself (the :class:`~vimpac.tokenize.tokenizer.Tokenizer` protocol, the ``TOKENIZERS``
table, loading) is :mod:`vimpac.tokenize.tokenizer`; tokenizer modules import this module and never
that one, so the table imports every tokenizer module without an import cycle.

A tokenizer is stored as a folder with ``config.json`` (``{"format_version": 1, "config": {...,
"kind": <TOKENIZERS name>}, "fingerprint": ...}``) and ``model.safetensors`` (never pickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from safetensors.torch import save_file

from vimpac.common.errors import VimpacError
from vimpac.common.fileio import fsync_dir, fsync_tree, make_temp_dir, usual_mode

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


class TokenizerError(VimpacError, ValueError):
    """A tokenizer folder or weights file that cannot be used; the message names the file."""


def fingerprint_of(config: dict[str, Any], module: nn.Module) -> str:
    """sha256 hex of the canonical JSON ``config`` and the weights (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"\n{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_fields(cls: type, data: Any, source: str) -> dict[str, Any]:
    """``data`` checked against the fields of config dataclass ``cls``: an object with known keys
    whose values have their defaults' types (an int is a float too). Errors name ``source``."""
    if not isinstance(data, dict):
        raise TokenizerError(f"{source}: tokenizer config must be an object, got "
                         f"{type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise TokenizerError(f"{source}: unknown tokenizer config key(s) {unknown}")
    for key, value in data.items():
        want = type(fields[key].default)
        if not _has_type(value, want):
            raise TokenizerError(f"{source}: tokenizer config {key}={value!r}: expected "
                                 f"{want.__name__}")
    return dict(data)


def _has_type(value: Any, want: type) -> bool:
    if isinstance(value, bool) or want is bool:
        return isinstance(value, bool) and want is bool
    return isinstance(value, want) or (want is float and isinstance(value, int))


class FrameTokenizer(nn.Module):
    """Base of tokenizers that encode every frame on its own (temporal stride 1).

    A subclass sets ``name``, ``codebook_size``, ``downsample`` and ``config`` (a dataclass with
    ``to_dict``/``from_dict``), and implements :meth:`normalize` (pixels to the network's input) and
    :meth:`ids_from_input` (network input to ids); :meth:`decode` where it has a decoder. This base
    turns clips into frames and back, checks the pixels and computes the fingerprint.
    """

    name: ClassVar[str]
    can_decode: ClassVar[bool] = False
    clip_frames: ClassVar[int] = 1          # frames per encoded clip: each frame stands alone
    codebook_size: int
    downsample: int
    config: Any

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) pixels per token: one frame, ``downsample`` x ``downsample``."""
        return 1, self.downsample, self.downsample

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def config_dict(self) -> dict[str, Any]:
        """What ``config.json`` stores (and the fingerprint hashes)."""
        return self.config.to_dict()

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON config and the weights: names the tokenizer."""
        return fingerprint_of(self.config_dict(), self)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [N,3,H,W] pixels in 0..255 -> the network's input."""
        raise NotImplementedError

    def ids_from_input(self, x: torch.Tensor) -> torch.Tensor:
        """Network input [N,3,H,W] -> int64 ids [N,H/d,W/d]."""
        raise NotImplementedError

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N,H,W,3] -> float32 [N,3,H,W] network input on the model's device."""
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [N,H,W,3], got {frames.dtype} "
                             f"{list(frames.shape)}")
        h, w = frames.shape[1:3]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {self.downsample}")
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return self.normalize(x)

    @torch.no_grad()
    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 clips [B,T,H,W,3] (or frames [N,H,W,3]) -> int64 ids [B,T,H/d,W/d] (or
        [N,H/d,W/d]) on the model's device."""
        frames = clips.flatten(0, 1) if clips.ndim == 5 else clips
        x = self.preprocess(frames)
        if x.is_cuda:  # the layout cuDNN is fastest in; CPU numerics stay as they were
            x = x.contiguous(memory_format=torch.channels_last)
        ids = self.ids_from_input(x)
        return ids.unflatten(0, clips.shape[:2]) if clips.ndim == 5 else ids

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """int ids [B,T,h,w] (or [N,h,w]) -> uint8 pixels [B,T,dh,dw,3] (or [N,dh,dw,3])."""
        raise NotImplementedError(
            f"tokenizer {self.name!r} has no decoder: it cannot turn ids back into pixels")


def save_tokenizer(model: Any, out_dir: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` of a tokenizer to ``out_dir`` atomically.

    Files go to a temporary sibling directory that is fsynced and renamed into place; an existing
    ``out_dir`` is replaced (moved aside, then deleted), so readers never see a half-written
    tokenizer.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, prefix=f".{out.name}.tmp-")
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        os.chmod(tmp / WEIGHTS_FILE, usual_mode())          # safetensors writes it owner-only
        meta = {"format_version": FORMAT_VERSION, "config": model.config_dict(),
                "fingerprint": model.fingerprint()}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        fsync_tree(tmp)
        _replace_dir(tmp, out)
        fsync_dir(out.parent)
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
