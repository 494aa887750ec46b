"""Masking: Table 2 ratios, cube shapes, uniform placement, determinism, [PAD]; the MASKS table
(block, iid, tube) as training, the config and the report use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vimpac.pretrain.masking import (
    MASKS,
    Masking,
    MaskParams,
    _cover_probability,
    apply_mask,
    block_mask,
    default_num_blocks,
    expected_block_ratio,
    iid_mask,
    tube_cells,
    tube_mask,
)

# Paper Table 2: expected masked ratio (%) for 4..8 blocks.
TABLE_2 = {
    (5, 16): [11.9, 14.5, 17.0, 19.4, 21.7],
    (5, 32): [10.6, 13.1, 15.2, 17.5, 19.5],
    (10, 16): [10.4, 12.8, 15.0, 17.1, 19.2],
    (10, 32): [9.3, 11.4, 13.4, 15.4, 17.2],
}
BOLD = {(5, 16): 5, (5, 32): 6, (10, 16): 6, (10, 32): 7}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("grid", list(TABLE_2))
def test_expected_ratio_reproduces_table_2(grid: tuple[int, int]) -> None:
    frames, side = grid
    ours = [100 * expected_block_ratio(frames, side, side, k) for k in range(4, 9)]
    assert ours == pytest.approx(TABLE_2[grid], abs=0.15)


@pytest.mark.parametrize(("grid", "blocks"), list(BOLD.items()))
def test_default_num_blocks_is_table_2_bold(grid: tuple[int, int], blocks: int) -> None:
    assert default_num_blocks(*grid) == blocks


@pytest.mark.parametrize(("grid", "blocks"), list(BOLD.items()))
def test_sampled_ratio_matches_table_2(grid: tuple[int, int], blocks: int) -> None:
    frames, side = grid
    mask = block_mask(20_000, frames, side, side, blocks, generator=_gen(0))
    paper = TABLE_2[grid][blocks - 4]
    assert 100 * mask.float().mean().item() == pytest.approx(paper, abs=0.3)


def test_one_block_is_one_box_with_lengths_in_range() -> None:
    frames, height, width = 5, 16, 12
    mask = block_mask(2000, frames, height, width, 1, generator=_gen(1))
    extents = []
    for dims in ((2, 3), (1, 3), (1, 2)):  # collapse to T, H, W profiles
        covered = mask.any(dim=dims)  # [B, n]
        first = covered.float().argmax(dim=1)
        length = covered.sum(dim=1)
        last = covered.shape[1] - 1 - covered.flip(1).float().argmax(dim=1)
        assert torch.equal(last - first + 1, length)  # contiguous along this axis
        extents.append(length)
    lt, lh, lw = extents
    # The mask is exactly the box spanned by its profiles.
    assert torch.equal(mask.sum(dim=(1, 2, 3)), lt * lh * lw)
    for length, cap in ((lt, 3), (lh, 8), (lw, 6)):  # floor(2T/3), floor(H/2), floor(W/2)
        assert set(length.tolist()) == set(range(1, cap + 1))  # every length occurs, none more


def test_each_cell_is_covered_with_the_exact_probability() -> None:
    """Uniform lengths and uniform starts give a known per-cell coverage of one cube."""
    frames, side = 5, 8
    mask = block_mask(40_000, frames, side, side, 1, generator=_gen(2)).float().mean(dim=0)
    pt, ph = _cover_probability(frames, 3), _cover_probability(side, 4)
    expected = (pt[:, None, None] * ph[None, :, None] * ph[None, None, :]).float()
    torch.testing.assert_close(mask, expected, atol=0.01, rtol=0)


def test_same_seed_same_mask_other_seed_other_mask() -> None:
    a = block_mask(16, 5, 16, 16, 5, generator=_gen(7))
    b = block_mask(16, 5, 16, 16, 5, generator=_gen(7))
    c = block_mask(16, 5, 16, 16, 5, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.bool and a.shape == (16, 5, 16, 16)
    assert torch.equal(iid_mask(4, 5, 8, 8, 0.3, generator=_gen(3)),
                       iid_mask(4, 5, 8, 8, 0.3, generator=_gen(3)))


def test_zero_blocks_mask_nothing() -> None:
    assert not block_mask(3, 5, 8, 8, 0, generator=_gen(0)).any()


def test_iid_ratio() -> None:
    mask = iid_mask(2000, 5, 16, 16, 0.145, generator=_gen(4))
    assert mask.float().mean().item() == pytest.approx(0.145, abs=0.003)


def test_pad_is_never_masked_and_masked_tokens_become_mask_id() -> None:
    pad_id, mask_id = 513, 516
    tokens = torch.randint(0, 512, (8, 5, 8, 8), generator=_gen(5))
    tokens[:, 3:] = pad_id
    mask = torch.ones_like(tokens, dtype=torch.bool)
    inputs, predicted = apply_mask(tokens, mask, pad_id=pad_id, mask_id=mask_id)
    assert not predicted[:, 3:].any() and predicted[:, :3].all()
    assert (inputs[:, :3] == mask_id).all() and (inputs[:, 3:] == pad_id).all()
    mask = block_mask(8, 5, 8, 8, 4, generator=_gen(6))
    inputs, predicted = apply_mask(tokens, mask, pad_id=pad_id, mask_id=mask_id)
    assert torch.equal(predicted, mask & (tokens != pad_id))
    assert torch.equal(inputs[~predicted], tokens[~predicted])


def test_small_grids_and_bad_arguments() -> None:
    assert block_mask(2, 1, 1, 1, 1, generator=_gen(0)).all()  # caps never drop below 1
    assert default_num_blocks(5, 8) == 4  # the demo grid: 14.5 % expected
    with pytest.raises(ValueError, match="num_blocks=-1"):
        block_mask(1, 5, 8, 8, -1)
    with pytest.raises(ValueError, match="ratio=1.5"):
        iid_mask(1, 5, 8, 8, 1.5)


# ------------------------------------------------------------------------------ the MASKS table

@pytest.mark.parametrize("name", list(MASKS))
def test_every_strategy_is_a_pure_function_of_grid_params_and_generator(name: str) -> None:
    sample, params = MASKS[name].sample, MaskParams(ratio=0.3)
    a = sample((6, 5, 8, 12), params, _gen(11))
    assert a.shape == (6, 5, 8, 12) and a.dtype == torch.bool and a.any()
    assert torch.equal(a, sample((6, 5, 8, 12), params, _gen(11)))
    assert not torch.equal(a, sample((6, 5, 8, 12), params, _gen(12)))
    assert MASKS[name].name == name


def test_table_entries_are_the_paper_functions_with_the_configs_settings() -> None:
    grid = (16, 5, 16, 16)
    assert torch.equal(MASKS["block"].sample(grid, MaskParams(), _gen(1)),
                       block_mask(*grid, default_num_blocks(5, 16), generator=_gen(1)))
    assert torch.equal(MASKS["block"].sample(grid, MaskParams(num_blocks=9), _gen(1)),
                       block_mask(*grid, 9, generator=_gen(1)))
    assert torch.equal(MASKS["iid"].sample(grid, MaskParams(ratio=0.2), _gen(1)),
                       iid_mask(*grid, 0.2, generator=_gen(1)))


def test_tube_masks_the_same_cells_on_every_frame() -> None:
    mask = tube_mask(500, 5, 8, 8, 0.5, generator=_gen(2))
    assert torch.equal(mask, mask[:, :1].expand_as(mask))            # a tube through time
    assert (mask[:, 0].sum(dim=(1, 2)) == 32).all()                  # exactly the ratio, per clip
    assert len({m.tobytes() for m in mask[:, 0].numpy()}) == 500      # a new plane per clip


@pytest.mark.parametrize(("ratio", "cells"), [(0.9, 230), (0.145, 37), (0.001, 1), (1.0, 256)])
def test_tube_ratio_is_the_configured_one(ratio: float, cells: int) -> None:
    assert tube_cells(16, 16, ratio) == cells
    mask = MASKS["tube"].sample((64, 5, 16, 16), MaskParams(ratio=ratio), _gen(3))
    assert mask.float().mean().item() == pytest.approx(cells / 256)
    assert (mask.sum(dim=(1, 2, 3)) == 5 * cells).all()


def test_every_cell_is_equally_likely_in_a_tube() -> None:
    coverage = tube_mask(20_000, 1, 6, 6, 0.25, generator=_gen(4))[:, 0].float().mean(dim=0)
    torch.testing.assert_close(coverage, torch.full((6, 6), 9 / 36), atol=0.015, rtol=0)


def test_tube_on_the_generators_device_and_bad_ratios() -> None:
    assert tube_mask(2, 3, 4, 4, 0.5).device.type == "cpu"
    with pytest.raises(ValueError, match="ratio=1.5"):
        tube_mask(1, 5, 8, 8, 1.5)
    with pytest.raises(ValueError, match="T=0"):
        MASKS["tube"].sample((1, 0, 8, 8), MaskParams(), _gen(0))


def _pretrain_cfg(**kw):
    from vimpac.config import PretrainConfig

    return PretrainConfig(**{**dict(frames=5, grid=8, model="tiny", batch_size=4,
                                    micro_batch=4), **kw})


def test_the_configs_masking_choices_are_the_table(monkeypatch) -> None:
    from vimpac.common.config import ConfigError
    from vimpac.config import load_pipeline

    assert load_pipeline("demo", overrides=["pretrain.masking=tube"]).pretrain.masking == "tube"
    with pytest.raises(ConfigError, match="pretrain.masking = 'cubes': expected one of "
                                          "block, iid, tube"):
        load_pipeline("demo", overrides=["pretrain.masking=cubes"])
    monkeypatch.setitem(MASKS, "all", Masking("all", lambda g, p, gen: torch.ones(g, dtype=bool),
                                              lambda g, p: "everything"))
    assert load_pipeline("demo", overrides=["pretrain.masking=all"]).pretrain.masking == "all"


@pytest.mark.parametrize("name", list(MASKS))
def test_training_masks_with_the_configured_strategy(name: str) -> None:
    from vimpac.pretrain.train import Plan, mask_batch, model_config

    cfg = _pretrain_cfg(masking=name, mask_ratio=0.3)
    model_cfg = model_config(cfg, 64)
    tokens = torch.randint(0, 64, (8, 5, 8, 8), generator=_gen(5))
    tokens[:2, 4:] = model_cfg.pad_id
    inputs, mask = mask_batch(tokens, cfg, Plan.build(cfg, 1), model_cfg, _gen(6))
    expected = MASKS[name].sample((8, 5, 8, 8), MaskParams.of(cfg), _gen(6))
    assert torch.equal(mask, expected & (tokens != model_cfg.pad_id))
    assert torch.equal(inputs[mask], torch.full_like(inputs[mask], model_cfg.mask_id))


def test_the_report_draws_the_selected_strategy(tmp_path, monkeypatch) -> None:
    from vimpac import report
    from vimpac.tokenize import visualize

    drawn = {}

    def capture(frames, mask, png, title):
        drawn[title.split(" ")[0]] = mask
        return png

    monkeypatch.setattr(visualize, "mask_overlay_png", capture)
    frames = np.zeros((5, 64, 64, 3), np.uint8)
    for name in MASKS:
        report.draw_mask(_pretrain_cfg(masking=name, mask_ratio=0.4), frames, (8, 8),
                         tmp_path / "m.png")
    assert set(drawn) == set(MASKS)
    tube, block = drawn["tube"], drawn["block"]
    assert (tube == tube[:1]).all() and tube.mean() == pytest.approx(26 / 64)
    assert not (block == block[:1]).all()
