"""Masking strategies for token grids and the ``MASKS`` table that names them.

* **block** (the paper's, Sec. 3.1, App. B.1, Table 2): per sample, exactly ``num_blocks``
  axis-aligned cubes, each with lengths ``lt ~ U{1..floor(2T/3)}``, ``lh ~ U{1..floor(H/2)}``,
  ``lw ~ U{1..floor(W/2)}`` and a uniform start such that the cube fits; the mask is their union
  (overlaps allowed). There is no target-ratio loop: the count is chosen per grid so that the
  *expected* ratio is near 15 % (:func:`default_num_blocks`).
* **iid** (the paper's ablation): every token masked independently with probability ``ratio``.
* **tube** (VideoMAE, Tong et al. 2022, Sec. 3.3): one random 2-D mask of ``ratio`` of the cells
  per sample, the same on every frame, so a masked token cannot be copied from the same place in
  the next frame.

:data:`MASKS` maps each name (``pretrain.masking``) to a :class:`Masking`: a pure, vectorised
``sample(grid, params, generator) -> bool [B, T, H, W]`` and the caption of its picture in the
report. Training, the config's choices and the report take strategies from the table only.
Masked positions become [MASK]; [PAD] positions are never masked (:func:`apply_mask`).

Randomness comes only from the ``generator``: a seed gives the same mask on every device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vimpac.pretrain.config import PretrainConfig

TARGET_RATIO = 0.15  # BERT's masking ratio, the target of default_num_blocks


def _max_lengths(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Largest cube extents: floor(2T/3), floor(H/2), floor(W/2), at least 1."""
    return max(1, 2 * frames // 3), max(1, height // 2), max(1, width // 2)


def _check_grid(frames: int, height: int, width: int) -> None:
    if min(frames, height, width) < 1:
        raise ValueError(f"mask grid (T={frames}, H={height}, W={width}): sizes must be >= 1")


def _uniform_int(low: Tensor, high: Tensor, generator: torch.Generator | None) -> Tensor:
    """Elementwise uniform integers in [low, high] (inclusive), on ``low``'s device."""
    u = torch.rand(low.shape, generator=generator, device=low.device)
    return torch.minimum(low + (u * (high - low + 1)).long(), high)


def _axis_cover(starts: Tensor, lengths: Tensor, size: int) -> Tensor:
    """[B, k] starts and lengths -> [B, k, size] float: 1 where start <= i < start + length."""
    i = torch.arange(size, device=starts.device)
    s, n = starts.unsqueeze(-1), lengths.unsqueeze(-1)
    return ((i >= s) & (i < s + n)).float()


def block_mask(batch: int, frames: int, height: int, width: int, num_blocks: int, *,
               generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """Union of ``num_blocks`` random cubes per sample -> bool mask [B, T, H, W].

    Random numbers are drawn on the generator's device (CPU by default) and the mask is built on
    ``device``, so a seed gives the same mask on every device.
    """
    _check_grid(frames, height, width)
    if num_blocks < 0:
        raise ValueError(f"num_blocks={num_blocks}: must be >= 0")
    rng_device = generator.device if generator is not None else torch.device("cpu")
    shape = (batch, num_blocks)
    covers = []
    for size, cap in zip((frames, height, width), _max_lengths(frames, height, width),
                         strict=True):
        ones = torch.ones(shape, dtype=torch.long, device=rng_device)
        length = _uniform_int(ones, ones * cap, generator)  # [B, k] in 1..cap
        start = _uniform_int(torch.zeros_like(length), size - length, generator)  # 0..size-len
        covers.append(_axis_cover(start.to(device), length.to(device), size))
    # Cube k covers (t,h,w) iff all three axes do; the union is "some cube covers it".
    hits = torch.einsum("bkt,bkh,bkw->bthw", *covers)  # [B, T, H, W]: cubes covering each cell
    return hits > 0


def iid_mask(batch: int, frames: int, height: int, width: int, ratio: float, *,
             generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor:
    """Each token masked independently with probability ``ratio`` -> bool mask [B, T, H, W]."""
    _check_grid(frames, height, width)
    _check_ratio(ratio)
    rng_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((batch, frames, height, width), generator=generator, device=rng_device)
    return (u < ratio).to(device)


def tube_mask(batch: int, frames: int, height: int, width: int, ratio: float, *,
              generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> Tensor:
    """Per sample one 2-D mask of exactly ``tube_cells`` cells, repeated over time -> bool
    [B, T, H, W]. The cells are a uniform random subset (ranks of i.i.d. uniform scores)."""
    _check_grid(frames, height, width)
    _check_ratio(ratio)
    rng_device = generator.device if generator is not None else torch.device("cpu")
    cells = height * width
    scores = torch.rand((batch, cells), generator=generator, device=rng_device)
    chosen = scores.argsort(dim=1)[:, :tube_cells(height, width, ratio)]  # [B, k] distinct cells
    plane = torch.zeros((batch, cells), dtype=torch.bool, device=rng_device)
    plane.scatter_(1, chosen, True)
    return plane.view(batch, 1, height, width).expand(-1, frames, -1, -1).contiguous().to(device)


def tube_cells(height: int, width: int, ratio: float) -> int:
    """Cells per frame a tube mask covers: round(ratio * H * W), at least one if ratio > 0.
    (VideoMAE truncates; rounding keeps small grids nearer the ratio.)"""
    return min(height * width, max(int(ratio > 0), round(ratio * height * width)))


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio={ratio}: must be in [0, 1]")


def _cover_probability(size: int, cap: int) -> Tensor:
    """[size] float64: probability that one random segment (length U{1..cap}) covers index i."""
    i = torch.arange(size, dtype=torch.float64)
    prob = torch.zeros(size, dtype=torch.float64)
    for length in range(1, cap + 1):
        starts = size - length + 1  # uniform start in 0..size-length
        lo = torch.clamp(i - length + 1, min=0)  # first start that covers i
        hi = torch.clamp(i, max=size - length)  # last start that covers i
        prob += (hi - lo + 1).clamp(min=0) / starts
    return prob / cap


def expected_block_ratio(frames: int, height: int, width: int, num_blocks: int) -> float:
    """Exact expected masked fraction of :func:`block_mask` (cubes are independent)."""
    _check_grid(frames, height, width)
    caps = _max_lengths(frames, height, width)
    sizes = (frames, height, width)
    pt, ph, pw = (_cover_probability(n, c) for n, c in zip(sizes, caps, strict=True))
    p_cube = pt[:, None, None] * ph[None, :, None] * pw[None, None, :]  # [T, H, W]
    return float((1 - (1 - p_cube) ** num_blocks).mean())


@functools.lru_cache(maxsize=64)
def default_num_blocks(frames: int, height: int, width: int | None = None) -> int:
    """Cube count whose expected ratio is nearest 15 % (paper Table 2: T5/16 -> 5, T5/32 -> 6,
    T10/16 -> 6, T10/32 -> 7; this formula reproduces those)."""
    width = height if width is None else width
    best, best_gap, k = 1, float("inf"), 1
    while True:
        ratio = expected_block_ratio(frames, height, width, k)
        if abs(ratio - TARGET_RATIO) < best_gap:
            best, best_gap = k, abs(ratio - TARGET_RATIO)
        if ratio >= TARGET_RATIO or ratio >= 1.0 - 1e-12:
            return best
        k += 1


def apply_mask(tokens: Tensor, mask: Tensor, *, pad_id: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """Replace masked, non-pad tokens with [MASK].

    tokens [B,T,H,W] long, mask [B,T,H,W] bool -> (inputs [B,T,H,W] long, mask & ~pad [B,T,H,W]).
    The returned mask marks the positions to predict; their targets are ``tokens[mask]``.
    """
    if mask.shape != tokens.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != tokens shape {tuple(tokens.shape)}")
    mask = mask & (tokens != pad_id)
    return tokens.masked_fill(mask, mask_id), mask


# --------------------------------------------------------------------------------- the table

Grid = tuple[int, int, int, int]  # (B, T, H, W)


@dataclass(frozen=True)
class MaskParams:
    """The config's masking settings."""
    num_blocks: int = 0        # block: cubes per sample; 0 = the paper's Table 2 count for the grid
    ratio: float = 0.145       # iid, tube: masked fraction

    @classmethod
    def of(cls, cfg: PretrainConfig) -> MaskParams:
        return cls(num_blocks=cfg.num_blocks, ratio=cfg.mask_ratio)


@dataclass(frozen=True)
class Masking:
    """A masking strategy: a pure, vectorised sampler and the caption of its report picture."""
    name: str
    sample: Callable[[Grid, MaskParams, torch.Generator | None], Tensor]
    caption: Callable[[Grid, MaskParams], str]


def _blocks(grid: Grid, params: MaskParams) -> int:
    return params.num_blocks or default_num_blocks(*grid[1:])


def sample_block(grid: Grid, params: MaskParams, generator: torch.Generator | None) -> Tensor:
    """(B, T, H, W) -> bool [B, T, H, W] on the generator's device: :func:`block_mask`."""
    device = generator.device if generator is not None else None
    return block_mask(*grid, _blocks(grid, params), generator=generator, device=device)


def sample_iid(grid: Grid, params: MaskParams, generator: torch.Generator | None) -> Tensor:
    """(B, T, H, W) -> bool [B, T, H, W] on the generator's device: :func:`iid_mask`."""
    return iid_mask(*grid, params.ratio, generator=generator)


def sample_tube(grid: Grid, params: MaskParams, generator: torch.Generator | None) -> Tensor:
    """(B, T, H, W) -> bool [B, T, H, W] on the generator's device: :func:`tube_mask`."""
    return tube_mask(*grid, params.ratio, generator=generator)


def _grid_text(grid: Grid) -> str:
    return f"T={grid[1]}, {grid[2]}x{grid[3]} tokens"


MASKS: dict[str, Masking] = {m.name: m for m in (
    Masking("block", sample_block,
            lambda g, p: f"{_blocks(g, p)} blocks over {_grid_text(g)}"),
    Masking("iid", sample_iid,
            lambda g, p: f"each token with probability {p.ratio:g}, {_grid_text(g)}"),
    Masking("tube", sample_tube,
            lambda g, p: f"the same {tube_cells(g[2], g[3], p.ratio)} of {g[2] * g[3]} cells "
                         f"on every frame, {_grid_text(g)}"),
)}
