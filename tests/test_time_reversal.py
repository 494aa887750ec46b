"""The time-reversal probe: how far features move when a token clip is played backwards, against
two different clips, for a backbone and a random one of the same preset (a diagnostic)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_finetune import SMALL, make_archive, pretrained_file

from vimpac.finetune.time_reversal import (
    backbone_features,
    between_clip_partners,
    random_backbone,
    reverse_time,
    time_reversal_probe,
)

PAD = SMALL.pad_id
GRID = dataclasses.replace(SMALL, frames=4, height=4, width=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def clips(n: int, seed: int = 0) -> torch.Tensor:
    """n random token clips [n, 4, 4, 4] of real codes."""
    return torch.randint(0, SMALL.codebook_size, (n, 4, 4, 4),
                         generator=torch.Generator().manual_seed(seed))


def palindrome(clip: torch.Tensor) -> torch.Tensor:
    """[T, H, W] -> a clip of the same length equal to its own reverse."""
    half = clip[: (len(clip) + 1) // 2]
    return torch.cat([half, half[: len(clip) // 2].flip(0)])


def time_averaging_features(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stub whose features cannot see frame order: code histograms summed over time."""
    hist = torch.nn.functional.one_hot(tokens, SMALL.vocab_size).float()  # [B, T, H, W, V]
    return {"cls": hist.sum((1, 2, 3)), "tokens": hist.sum(1).flatten(1)}


def test_reversing_flips_the_frames_and_keeps_the_padding_at_the_end():
    clip = torch.arange(4)[:, None, None].expand(4, 2, 2).clone()  # frame t holds code t
    assert reverse_time(clip[None])[0, :, 0, 0].tolist() == [3, 2, 1, 0]
    clip[3] = PAD                                                    # a 3-frame video, padded
    assert reverse_time(clip[None], PAD)[0, :, 0, 0].tolist() == [2, 1, 0, PAD]
    assert torch.equal(reverse_time(reverse_time(clip[None], PAD), PAD), clip[None])


def test_a_clip_that_is_its_own_reverse_is_at_distance_zero():
    x = torch.stack([palindrome(c) for c in clips(6)])
    assert torch.equal(reverse_time(x), x)
    probe = time_reversal_probe(backbone_features(random_backbone(GRID)), [x[:3], x[3:]], PAD)
    for entry in probe["features"].values():
        assert entry["reversal"]["mean"] == pytest.approx(0.0, abs=1e-9)
        assert entry["between_clips"]["mean"] > 0 and entry["ratio"] < 1e-6


def test_features_blind_to_frame_order_are_at_distance_zero_on_any_clip():
    probe = time_reversal_probe(time_averaging_features, [clips(5)], PAD)
    assert probe["clips"] == 5
    for entry in probe["features"].values():
        assert entry["reversal"]["mean"] == pytest.approx(0.0, abs=1e-9)
        assert entry["reversal"]["q90"] == pytest.approx(0.0, abs=1e-9)
        assert entry["between_clips"]["mean"] > 0.01


def test_a_random_backbone_sees_the_arrow_of_time_on_a_clip_that_is_not_a_palindrome():
    """At BERT init the CLS barely depends on the clip (distances near 1e-8, between clips near
    1e-6), so the ratio, not the absolute distance, is the figure to read."""
    probe = time_reversal_probe(backbone_features(random_backbone(GRID)), [clips(4)], PAD)
    for entry in probe["features"].values():
        assert entry["reversal"]["mean"] > 0 and entry["reversal"]["q10"] > 0
        assert entry["ratio"] > 1e-3


def test_the_random_backbone_and_the_pairing_are_seeded_and_never_pair_a_clip_with_itself():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = random_backbone(GRID, seed=3), random_backbone(GRID, seed=3)
    assert torch.equal(torch.get_rng_state(), state)                # global RNG untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.pos_t, random_backbone(GRID, seed=4).pos_t)
    for n in (2, 3, 10):
        partner = between_clip_partners(n, seed=5)
        assert sorted(partner.tolist()) == list(range(n))
        assert (partner != torch.arange(n)).all()
        assert torch.equal(partner, between_clip_partners(n, seed=5))


def test_probes_json_and_the_cli_show_the_section(cli_runner, tmp_path):
    from vimpac.cli import cli

    archive = make_archive(tmp_path / "arch", n_train=8, n_val=6)
    checkpoint = pretrained_file(tmp_path / "pretrained.pt")
    result = cli_runner.invoke(cli, ["--set", "evaluate.knn_k=3", "--set",
                                     "evaluate.linear_probe_epochs=5", "evaluate", str(archive),
                                     "--checkpoint", str(checkpoint),
                                     "--out", str(tmp_path / "out"), "--probes"])
    assert result.exit_code == 0, result.output
    section = json.loads((tmp_path / "out" / "probes.json").read_text())["time_reversal"]
    assert section["clips"] == 6 and section["exact"] is True
    assert set(section["backbones"]) == {"pre-trained", "random init"}
    for feats in section["backbones"].values():
        assert set(feats) == {"cls", "tokens"}
        assert all(0 <= e["reversal"]["mean"] <= 2 and e["ratio"] is not None
                   for e in feats.values())
    assert "time reversal, a diagnostic (pre-trained)" in result.output
    assert "time reversal, a diagnostic (random init)" in result.output
