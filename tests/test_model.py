"""The VIMPAC backbone and heads: vocabulary ids, paper parameter counts, shapes, gradients, [PAD]
isolation, position interpolation, layouts, and equality with the official model's outputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vimpac.pretrain.losses import pretrain_loss
from vimpac.pretrain.masking import apply_mask, block_mask
from vimpac.pretrain.model import (
    ATTENTION_KERNELS,
    PRESETS,
    AxialAttention,
    ClassifierHead,
    ModelConfig,
    VimpacBackbone,
    VimpacPretrainModel,
    count_backbone_params,
    interpolate_table,
    to_sync_batchnorm,
)

TINY = PRESETS["tiny"]


def _tokens(batch: int, config: ModelConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.frames, config.height, config.width)
    return torch.randint(0, config.codebook_size, shape, generator=g)


def _meta_count(config: ModelConfig, **heads) -> tuple[int, int]:
    """(backbone params, params with both heads) without allocating memory."""
    with torch.device("meta"):
        model = VimpacPretrainModel(config, **heads)
    return count_backbone_params(model), sum(p.numel() for p in model.parameters())


def test_vocabulary_ids_follow_the_paper_layout() -> None:
    paper = ModelConfig(codebook_size=8192)
    assert (paper.pad_id, paper.mask_id, paper.vocab_size) == (8193, 8196, 8197)
    small = ModelConfig(codebook_size=512)
    assert (small.pad_id, small.mask_id, small.vocab_size) == (513, 516, 517)


@pytest.mark.parametrize(("name", "changes", "millions"), [
    ("small", {}, 29.4),
    ("base", {"layers": 6}, 63.0),
    ("small", {"layers": 12}, 54.7),
    ("base", {}, 119.7),
    ("large-half", {}, 210.1),
    ("large-half", {"att_dim": None, "mlp_dim": 4096}, 411.6),  # "without halving"
    ("small", {"layout": "THW"}, 23.1),  # Table 13 layouts
    ("small", {"layout": "T,H,W"}, 35.8),
])
def test_backbone_parameter_counts_match_the_paper(name: str, changes: dict,
                                                   millions: float) -> None:
    config = dataclasses.replace(PRESETS[name], **changes)
    assert (config.frames, config.height, config.width, config.codebook_size) == (5, 16, 16, 8192)
    backbone, _ = _meta_count(config)
    assert round(backbone / 1e6, 1) == millions


def test_totals_with_heads_match_the_paper() -> None:
    _, small = _meta_count(PRESETS["small"], proj_hidden=2048, proj_layers=2)
    _, large = _meta_count(PRESETS["large-half"], proj_hidden=4096, proj_layers=3)
    assert (round(small / 1e6, 1), round(large / 1e6, 1)) == (31.3, 233.2)


def test_forward_shapes_and_logits_only_at_masked_positions() -> None:
    torch.manual_seed(0)
    model = VimpacPretrainModel(TINY, proj_hidden=64)
    tokens = _tokens(4, TINY)
    mask = block_mask(4, TINY.frames, TINY.height, TINY.width, 3,
                      generator=torch.Generator().manual_seed(1))
    inputs, mask = apply_mask(tokens, mask, pad_id=TINY.pad_id, mask_id=TINY.mask_id)
    out = model(inputs, mask)
    assert out["mlm_logits"].shape == (int(mask.sum()), TINY.vocab_size)
    assert out["cls"].shape == (4, TINY.dim)
    assert out["proj"].shape == (4, 256)
    cls, features = model.backbone(inputs)
    assert features.shape == (4, TINY.frames, TINY.height, TINY.width, TINY.dim)


def test_decoder_is_tied_to_the_token_embedding() -> None:
    model = VimpacPretrainModel(TINY, proj_hidden=64).to(torch.float64)
    assert model.mlm_head.decoder_weight is model.backbone.token_embed.weight
    names = [n for n, _ in model.named_parameters()]
    assert "mlm_head.decoder_weight" not in names  # counted (and optimised) once


def test_every_parameter_gets_a_gradient_from_the_combined_loss() -> None:
    torch.manual_seed(0)
    model = VimpacPretrainModel(TINY, proj_hidden=64)
    tokens = _tokens(8, TINY)  # 4 videos x 2 clips
    tokens[1, 3:] = TINY.pad_id  # a short clip
    mask = block_mask(8, TINY.frames, TINY.height, TINY.width, 4,
                      generator=torch.Generator().manual_seed(2))
    inputs, mask = apply_mask(tokens, mask, pad_id=TINY.pad_id, mask_id=TINY.mask_id)
    losses = pretrain_loss(model(inputs, mask), tokens[mask])
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    assert torch.isfinite(losses["loss"])


def test_padding_does_not_influence_other_tokens_or_cls() -> None:
    torch.manual_seed(0)
    backbone = VimpacBackbone(TINY).eval()
    tokens = _tokens(2, TINY)
    tokens[:, 3:] = TINY.pad_id  # two padded frames
    tokens[1, 1, 2:5, 4] = TINY.pad_id  # and scattered pad positions
    pad = tokens == TINY.pad_id
    with torch.no_grad():
        cls_a, feat_a = backbone(tokens)
        # Change what a [PAD] token looks like: its embedding row and the positions of the padded
        # frames (only pad tokens use P_T[3:] here).
        backbone.token_embed.weight[TINY.pad_id].normal_()
        backbone.pos_t[3:].normal_()
        cls_b, feat_b = backbone(tokens)
    torch.testing.assert_close(cls_a, cls_b)
    torch.testing.assert_close(feat_a[~pad], feat_b[~pad])
    assert not torch.allclose(feat_a[pad], feat_b[pad])
    with torch.no_grad():  # control: a non-pad change does propagate
        tokens[0, 0, 0, 0] = (tokens[0, 0, 0, 0] + 1) % TINY.codebook_size
        cls_c, _ = backbone(tokens)
    assert not torch.allclose(cls_b[0], cls_c[0])


def test_interpolate_positions_changes_the_grid_and_keeps_cls() -> None:
    torch.manual_seed(0)
    model = VimpacPretrainModel(TINY, proj_hidden=64).eval()
    pos_cls = model.backbone.pos_cls.detach().clone()
    model.backbone.interpolate_positions(6, 12, 10)
    assert model.config.frames == 6 and model.config.height == 12 and model.config.width == 10
    assert PRESETS["tiny"].height == 8  # the preset itself is untouched
    bb = model.backbone
    assert (bb.pos_t.shape, bb.pos_h.shape, bb.pos_w.shape) == ((6, 128), (12, 128), (10, 128))
    torch.testing.assert_close(bb.pos_cls, pos_cls)
    tokens = torch.randint(0, TINY.codebook_size, (2, 6, 12, 10))
    cls, features = bb(tokens)
    assert features.shape == (2, 6, 12, 10, 128) and cls.shape == (2, 128)


def test_interpolate_table_is_linear_with_half_pixel_centres() -> None:
    table = torch.tensor([[0.0], [1.0]])  # centres at 0.25 and 0.75 of the axis
    out = interpolate_table(table, 4)  # centres 1/8, 3/8, 5/8, 7/8
    torch.testing.assert_close(out[:, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    same = torch.randn(5, 3)
    torch.testing.assert_close(interpolate_table(same, 5), same)


def test_wrong_grid_is_a_clear_error() -> None:
    backbone = VimpacBackbone(TINY)
    with pytest.raises(ValueError, match="do not match the model grid"):
        backbone(torch.zeros(1, TINY.frames, 16, 16, dtype=torch.long))


def test_joint_thw_layout_runs_and_differs_from_factorised() -> None:
    config = dataclasses.replace(TINY, layout="THW")
    model = VimpacBackbone(config).eval()
    tokens = _tokens(2, config)
    tokens[0, 4] = config.pad_id
    cls, features = model(tokens)
    assert cls.shape == (2, config.dim) and features.shape[1:4] == (5, 8, 8)
    assert len(model.layers[0].attention) == 1
    assert count_backbone_params(model) < count_backbone_params(VimpacBackbone(TINY))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    config = dataclasses.replace(TINY, dropout=0.0)
    torch.manual_seed(0)
    plain = VimpacBackbone(config)
    ckpt = VimpacBackbone(dataclasses.replace(config, grad_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    tokens = _tokens(2, config)
    for model in (plain, ckpt):
        cls, features = model(tokens)
        (cls.square().sum() + features.mean()).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("layout", ["T,H|W", "THW", "H|W,T"])
def test_attention_kernels_give_the_same_outputs_and_gradients(layout: str) -> None:
    """The plain matmul + softmax kernel and PyTorch's SDPA agree in float64, [PAD] included."""
    config = dataclasses.replace(TINY, dropout=0.0, layout=layout)
    tokens = _tokens(3, config)
    tokens[1, 3:] = config.pad_id
    tokens[2, :, 2, 5] = config.pad_id
    results = []
    for kernel in ATTENTION_KERNELS:
        torch.manual_seed(0)
        model = VimpacBackbone(config).double()
        for module in model.modules():
            if isinstance(module, AxialAttention):
                module.kernel = kernel
        cls, features = model(tokens)
        (cls.square().sum() + features.sin().mean()).backward()
        results.append((cls, features, {n: p.grad for n, p in model.named_parameters()}))
    (cls_a, feat_a, grads_a), (cls_b, feat_b, grads_b) = results
    torch.testing.assert_close(cls_a, cls_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(feat_a, feat_b, rtol=0, atol=1e-12)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-10, atol=1e-12, msg=name)


def test_bad_layouts_are_rejected_with_the_value() -> None:
    with pytest.raises(ValueError, match="unknown axis 'X'"):
        ModelConfig(layout="T,X")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(heads=3, dim=96, layout="T,H|W")


def test_classifier_head_starts_at_zero_and_sync_bn_conversion() -> None:
    head = ClassifierHead(TINY.dim, 7)
    assert not head(torch.randn(3, TINY.dim)).any()
    model = to_sync_batchnorm(VimpacPretrainModel(TINY, proj_hidden=64))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


# ------------------------------------------------------------------ the official model's outputs

OFFICIAL = Path(__file__).parent / "fixtures" / "official-vimpac"


def _official_model(folder: Path) -> VimpacPretrainModel:
    """The official checkpoint as our model, through the importer's renaming and q/k/v fusion
    (``vimpac pretrain import-official``)."""
    from vimpac.pretrain.official import convert, read_official

    path = folder / "classifier.pt"
    heads = json.loads((folder / "args.txt").read_text())["heads"]   # 2: below the 64-wide rule
    model, _ = convert(read_official(path), path, heads=heads)
    return model


@pytest.mark.parametrize("variant", ["normal", "halved"])
def test_official_weights_give_the_official_outputs_in_float32(variant: str) -> None:
    model = _official_model(OFFICIAL / variant)
    arrays = np.load(OFFICIAL / variant / "expected.npz")
    expected = {k: torch.from_numpy(v) for k, v in arrays.items()}
    tokens = expected["tokens"]
    assert (tokens == model.config.pad_id).any() and (tokens == model.config.mask_id).any()
    with torch.no_grad():
        out = model(tokens, tokens == model.config.mask_id)
        _, hidden = model.backbone(tokens)
    for ours, theirs in (("cls", "cls"), ("proj", "projection"),
                         ("mlm_logits", "mlm_logits_at_mask")):
        torch.testing.assert_close(out[ours], expected[theirs], rtol=0, atol=4e-6, msg=ours)
    torch.testing.assert_close(hidden, expected["hidden"], rtol=0, atol=4e-6)
