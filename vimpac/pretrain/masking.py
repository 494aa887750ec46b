"""Block masking and i.i.d. masking of token grids (paper Sec. 3.1, App. B.1, Table 2).

Block masking: per sample, exactly ``num_blocks`` axis-aligned cubes, each with lengths
``lt ~ U{1..floor(2T/3)}``, ``lh ~ U{1..floor(H/2)}``, ``lw ~ U{1..floor(W/2)}`` and a uniform start
such that the cube fits; the mask is their union (overlaps allowed). There is no target-ratio loop:
the count is chosen per grid so that the *expected* ratio is near 15 % (:func:`default_num_blocks`).
Masked positions become [MASK]; [PAD] positions are never masked (:func:`apply_mask`).

All functions are pure and vectorised over the batch; randomness comes only from the ``generator``.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio={ratio}: must be in [0, 1]")
    rng_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((batch, frames, height, width), generator=generator, device=rng_device)
    return (u < ratio).to(device)


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
