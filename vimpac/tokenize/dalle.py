"""The DALL-E dVAE encoder (the tokenizer VIMPAC uses), re-implemented, and its weight importer.

VIMPAC tokenizes frames with the frozen encoder of OpenAI's DALL-E discrete VAE (paper App. A.1;
pip package ``DALL-E``, module ``dall_e``). Its architecture, as read from that package:

* a 7x7 input conv to ``n_hid`` channels;
* 4 groups of ``n_blk_per_group`` residual blocks with widths n_hid, 2n_hid, 4n_hid, 8n_hid; groups
  1-3 end in a 2x2 max-pool (hence downsampling 8);
* each block: ``id_path(x) + post_gain * res_path(x)`` where id_path is a 1x1 conv when the width
  changes (identity otherwise), res_path is relu-conv3x3-relu-conv3x3-relu-conv3x3-relu-conv1x1 with
  hidden width n_out/4, and post_gain = 1 / (4 * n_blk_per_group)^2;
* relu and a 1x1 conv to ``vocab_size`` (8192) logits; the token is their argmax.

Pixels enter as ``map_pixels(x / 255) = 0.8 * x / 255 + 0.1``. :class:`DalleEncoder` is our
module for that architecture and :class:`DalleTokenizer` the tokenizer around it (the ``"dalle"``
entry of :data:`vimpac.tokenize.tokenizer.TOKENIZERS`; per frame, no decoder).
:func:`import_dalle` copies the weights of a pickled ``dall_e.Encoder`` into it and saves it in our
safetensors format. Using the result needs neither ``dall_e`` nor pickle. Importing does unpickle:
**only import files you trust** (a pickle can run arbitrary code).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vimpac.tokenize.base import FrameTokenizer, TokenizerError, config_fields, save_tokenizer

log = logging.getLogger(__name__)

GROUP_COUNT = 4
MAX_CODEBOOK_SIZE = 65535  # ids are stored as uint16
# Keys every tokenizer config.json held before DALL-E had its own config class, at the values an
# import always wrote. They mean nothing here; they stay in the file and in the fingerprint so that
# tokenizers imported by earlier versions keep their fingerprint (and their archives stay usable).
FORMAT_1_KEYS = {"code_dim": 32, "normalize_codes": True, "commitment": 0.25, "ema_decay": 0.99}


@dataclass
class DalleConfig:
    """Architecture of an imported DALL-E encoder; saved as ``config.json``, hashed in the
    fingerprint."""

    kind: str = "dalle"  # the TOKENIZERS entry that reads this config: always "dalle" here
    codebook_size: int = 8192  # vocab_size: number of codes; at most 65535 (uint16)
    channels: int = 256  # n_hid: width of the first group
    blocks_per_group: int = 2  # n_blk_per_group
    image_size: int = 256  # hint: the frame size DALL-E was trained on
    downsample: int = 8  # three 2x max-pools

    def __post_init__(self) -> None:
        if self.kind != "dalle":
            raise ValueError(f"DalleConfig.kind={self.kind!r}: must be 'dalle'")
        if not 2 <= self.codebook_size <= MAX_CODEBOOK_SIZE:
            raise ValueError(f"DalleConfig.codebook_size={self.codebook_size}: must be in "
                             f"[2, {MAX_CODEBOOK_SIZE}] so ids fit in uint16")
        if self.downsample != 8:
            raise ValueError(f"DalleConfig.downsample={self.downsample}: only 8 is supported")
        for key in ("channels", "blocks_per_group", "image_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"DalleConfig.{key}={getattr(self, key)}: must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), **FORMAT_1_KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DalleConfig:
        """Build from a dict; unknown keys, wrong types, changed format-1 keys name ``source``."""
        data = dict(data) if isinstance(data, dict) else data
        for key, expected in FORMAT_1_KEYS.items():
            if isinstance(data, dict) and key in data:
                value = data.pop(key)
                if value != expected or type(value) is not type(expected):
                    raise TokenizerError(f"{source}: tokenizer config {key}={value!r}: a DALL-E "
                                     f"tokenizer's is always {expected!r}")
        return cls(**config_fields(cls, data, source))


class DalleBlock(nn.Module):
    """DALL-E encoder residual block: [N,n_in,H,W] -> [N,n_out,H,W]."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.skip = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else None
        self.conv1 = nn.Conv2d(n_in, hid, 3, padding=1)
        self.conv2 = nn.Conv2d(hid, hid, 3, padding=1)
        self.conv3 = nn.Conv2d(hid, hid, 3, padding=1)
        self.conv4 = nn.Conv2d(hid, n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.skip is None else self.skip(x)
        h = self.conv1(F.relu(x))
        h = self.conv2(F.relu(h))
        h = self.conv3(F.relu(h))
        h = self.conv4(F.relu(h))
        return identity + self.post_gain * h


class DalleEncoder(nn.Module):
    """[N,3,H,W] map_pixels input -> [N,vocab_size,H/8,W/8] logits."""

    def __init__(self, n_hid: int = 256, blocks_per_group: int = 2, vocab_size: int = 8192) -> None:
        super().__init__()
        n_layers = GROUP_COUNT * blocks_per_group
        self.stem = nn.Conv2d(3, n_hid, 7, padding=3)
        widths = [n_hid * 2**g for g in range(GROUP_COUNT)]  # n_hid, 2n_hid, 4n_hid, 8n_hid
        groups = []
        n_in = n_hid
        for width in widths:
            blocks = []
            for _ in range(blocks_per_group):
                blocks.append(DalleBlock(n_in, width, n_layers))
                n_in = width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        self.head = nn.Conv2d(widths[-1], vocab_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for g, group in enumerate(self.groups):
            x = group(x)
            if g < GROUP_COUNT - 1:
                x = F.max_pool2d(x, kernel_size=2)  # H -> H/2 after groups 1-3
        with torch.autocast(x.device.type, enabled=False):  # like the original: fp32 logits
            return self.head(F.relu(x).float())


class DalleTokenizer(FrameTokenizer):
    """DALL-E's encoder as a tokenizer: uint8 frames [N,H,W,3] -> ids [N,H/8,W/8] (argmax of the
    logits); clips [B,T,H,W,3] too. No decoder."""

    name = "dalle"

    def __init__(self, config: DalleConfig) -> None:
        super().__init__()
        self.config = config
        self.codebook_size = config.codebook_size
        self.downsample = config.downsample
        self.encoder = DalleEncoder(config.channels, config.blocks_per_group,
                                    config.codebook_size)

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> DalleTokenizer:
        return cls(DalleConfig.from_dict(config, source=source))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels 0..255 -> DALL-E's map_pixels (eps 0.1)."""
        return 0.8 * (x / 255.0) + 0.1

    def ids_from_input(self, x: torch.Tensor) -> torch.Tensor:
        """map_pixels input [N,3,H,W] -> int64 ids [N,H/8,W/8]."""
        return self.encoder(x).float().argmax(dim=1)


# --------------------------------------------------------------------------- weight import

_BLOCK_KEY = re.compile(r"blocks\.group_(\d)\.block_(\d+)\.(id_path|res_path\.conv_(\d))\.([wb])$")
_PARAM = {"w": "weight", "b": "bias"}


def dalle_key_to_ours(key: str) -> str:
    """Map a ``dall_e.Encoder`` state-dict key to the matching :class:`DalleEncoder` key."""
    if key in ("blocks.input.w", "blocks.input.b"):
        return f"stem.{_PARAM[key[-1]]}"
    if key in ("blocks.output.conv.w", "blocks.output.conv.b"):
        return f"head.{_PARAM[key[-1]]}"
    m = _BLOCK_KEY.fullmatch(key)
    if m is None:
        raise KeyError(f"unexpected DALL-E encoder weight {key!r}")
    group, block, part, conv, param = m.groups()
    name = "skip" if part == "id_path" else f"conv{conv}"
    return f"groups.{int(group) - 1}.{int(block) - 1}.{name}.{_PARAM[param]}"


def config_from_dalle_state(state: dict[str, torch.Tensor], source: str) -> DalleConfig:
    """Read n_hid, blocks per group and vocab size off the weight shapes of a dall_e encoder."""
    try:
        n_hid, in_ch = state["blocks.input.w"].shape[:2]
        vocab = state["blocks.output.conv.w"].shape[0]
    except KeyError as exc:
        raise TokenizerError(f"{source}: not a DALL-E encoder (missing weight {exc})") from None
    if in_ch != 3:
        raise TokenizerError(f"{source}: encoder takes {in_ch} input channels, only 3 (RGB) "
                             "supported")
    groups = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.fullmatch(k))}
    blocks = {int(m.group(2)) for k in state if (m := _BLOCK_KEY.fullmatch(k))}
    if groups != set(range(1, GROUP_COUNT + 1)):
        raise TokenizerError(f"{source}: expected {GROUP_COUNT} groups, found {sorted(groups)}")
    return DalleConfig(codebook_size=int(vocab), channels=int(n_hid),
                       blocks_per_group=max(blocks), image_size=256)


def load_dalle_state(encoder_pkl_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Unpickle a whole ``dall_e.Encoder`` module and return its float32 CPU state dict.

    SECURITY: this runs ``torch.load(weights_only=False)``, i.e. pickle, which can execute arbitrary
    code: only use it on files you trust (e.g. OpenAI's ``encoder.pkl``). The ``dall_e`` classes
    are replaced by inert stand-ins while unpickling, so the ``dall_e`` package is not needed.
    """
    try:
        obj = torch.load(encoder_pkl_path, map_location="cpu", weights_only=False,
                         pickle_module=_StubbingPickle)
    except Exception as exc:  # torch and pickle raise many types; none names the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(f"{encoder_pkl_path}: not a pickled DALL-E encoder ({first})"
                             ) from None
    if not isinstance(obj, nn.Module):
        raise TokenizerError(f"{encoder_pkl_path}: expected a pickled dall_e.Encoder module, got "
                         f"{type(obj).__name__}")
    return {k: v.detach().float().contiguous() for k, v in obj.state_dict().items()}


def import_dalle(encoder_pkl_path: str | os.PathLike, out_dir: str | os.PathLike
                 ) -> DalleTokenizer:
    """Convert a pickled DALL-E dVAE encoder into our ``"dalle"`` tokenizer saved at out_dir.

    Trusted files only (see :func:`load_dalle_state`). Returns the tokenizer in eval mode; its
    tokens equal the original module's argmax tokens.
    """
    source = str(encoder_pkl_path)
    state = load_dalle_state(encoder_pkl_path)
    model = DalleTokenizer(config_from_dalle_state(state, source))
    ours = {dalle_key_to_ours(k): v for k, v in state.items()}
    missing, unexpected = model.encoder.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise TokenizerError(f"{source}: weights do not fit the DALL-E encoder architecture "
                         f"(missing {missing}, unexpected {unexpected})")
    model.eval()
    save_tokenizer(model, out_dir)
    log.info("imported DALL-E encoder %s -> %s (fingerprint %s)", source, out_dir,
             model.fingerprint()[:12])
    return model


class _DalleStub(nn.Module):
    """Stand-in for any ``dall_e`` class while unpickling: keeps parameters and submodules only."""

    def forward(self, *args: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("stand-in for a dall_e module; use DalleEncoder instead")


class _StubbingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "dall_e" or module.startswith("dall_e."):
            return _DalleStub
        return super().find_class(module, name)


class _StubbingPickle:
    """A ``pickle_module`` for torch.load whose Unpickler swaps ``dall_e`` classes for stubs."""

    Unpickler = _StubbingUnpickler
    load = pickle.load
    __name__ = "vimpac_dalle_stub_pickle"

