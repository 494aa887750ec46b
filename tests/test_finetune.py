"""Fine-tuning and evaluation on small synthetic labelled archives written with the archive writer
(no video decoding): clip sampling, learning, pre-trained loading, position interpolation, exact
resume, multi-view evaluation and the frozen-feature probes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from vimpac.archive import (
    ArchiveError,
    ArchiveSettings,
    VideoRecord,
    View,
    make_views,
    write_archive,
)
from vimpac.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vimpac.common.training import read_metrics
from vimpac.config import EvaluateConfig, FinetuneConfig
from vimpac.finetune.data import (
    SplitPart,
    TestClips,
    TrainClips,
    clip_starts,
    holdout_unit,
    in_validation,
    pick_test_views,
)
from vimpac.finetune.evaluate import (
    classification_metrics,
    knn_probe,
    linear_probe,
    mean_over_splits,
    run_evaluate,
    run_probes,
    view_averaged_probs,
)
from vimpac.finetune.plateau import Plateau, stop_record
from vimpac.finetune.train import (
    UpdateSampler,
    build_model,
    load_backbone_state,
    load_finetuned,
    run_finetune,
)
from vimpac.pretrain.export import save_pretrained
from vimpac.pretrain.model import PRESETS, VimpacBackbone, interpolate_table, token_mean

CODEBOOK, PAD = 16, 17
SMALL = dataclasses.replace(PRESETS["tiny"], codebook_size=CODEBOOK, layers=1, dim=32, heads=2,
                            mlp_dim=64, frames=4, height=4, width=4, dropout=0.0)
CFG = FinetuneConfig(frames=4, grid=4, fps=4.0, epochs=11, batch_size=8, micro_batch=4, lr=3e-3,
                     dropout=0.0, num_workers=0, val_fraction=0.25)
HELD_OUT = {"train/001", "train/003", "train/012", "train/015", "train/016", "train/017"}
SHIFT = {"top": -1, "center": 0, "bottom": 1}


# ------------------------------------------------------------------------------------ the archive

def motion_video(rng: np.random.Generator, length: int, label: int, grid: tuple[int, int],
                 shift: int, period: int = 4, noise: float = 0.2) -> np.ndarray:
    """A stripe pattern moving right (label 0) or left (label 1), 20 % noise tokens.

    Each class draws its stripes from its own tokens (1-4 vs 5-8), so the label is also visible
    in the token histogram: a one-layer model learns it in a few updates.
    """
    h, w = grid
    direction = 1 - 2 * label
    t = np.arange(length)[:, None, None]
    x = np.arange(w)[None, None, :] + np.zeros((1, h, 1), dtype=int)
    video = 1 + (x + shift - direction * t) % period + period * label
    noisy = rng.random(video.shape) < noise
    video = np.where(noisy, rng.integers(2 * period + 1, CODEBOOK, size=video.shape), video)
    return video.astype(np.uint16)


def make_archive(root: Path, *, n_train: int = 24, n_val: int = 12, grid: tuple[int, int] = (4, 4),
                 fingerprint: str = "fp-test", labelled: bool = True,
                 crops: tuple[str, ...] = ("top", "center", "bottom"),
                 lengths: tuple[int, int] = (3, 12), seed: int = 0) -> Path:
    """A labelled zarr archive (list layout: splits train / val) of synthetic motion tokens."""
    rng = np.random.default_rng(seed)
    dataset = {"name": "list", "root": "/synthetic", "classes": ["right", "left"]}
    settings = ArchiveSettings(
        tokenizer_fingerprint=fingerprint, codebook_size=CODEBOOK, grid=grid, fps=4.0,
        shorter_side=32, size=32, views=make_views([1.0], list(crops), False), formats=["zarr"],
        dataset=dataset if labelled else None)
    specs = [("train", i) for i in range(n_train)] + [("val", i) for i in range(n_val)]

    def videos():
        for split, i in specs:
            length = int(rng.integers(lengths[0], lengths[1] + 1))
            video_seed = int(rng.integers(1 << 30))
            tokens = {v.name: motion_video(np.random.default_rng(video_seed), length, i % 2, grid,
                                           SHIFT[v.crop]) for v in settings.views}
            yield VideoRecord(key=f"{split}/{i:03d}", source=f"{split}/{i:03d}.mp4", size=0,
                              mtime=0.0, label=i % 2, splits=[split]), tokens

    write_archive(root, settings, videos(), videos_per_shard=16, chunk_frames=16)
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def test_preset():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "test", SMALL)
        yield "test"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return make_archive(tmp_path_factory.mktemp("labelled") / "arch")


@pytest.fixture(scope="module")
def finetuned(archive, test_preset, tmp_path_factory) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("finetune")
    return out, run_finetune(archive, CFG, out, model_preset=test_preset)


def pretrained_file(path: Path, config=SMALL, fingerprint: str = "fp-test", seed: int = 1) -> Path:
    torch.manual_seed(seed)
    save_pretrained(path, VimpacBackbone(config), tokenizer_fingerprint=fingerprint, step=10)
    return path


# ------------------------------------------------------------------------------------------- data

def test_train_clips_are_deterministic_random_views_with_padding(archive):
    data = TrainClips(archive, "train", 4, 4, None, PAD, seed=3)
    assert len(data) == 24 and data.views == ["s1_center", "s1_top", "s1_bottom"]
    tokens, label = data[(2, 5)]
    assert tokens.shape == (4, 4, 4) and tokens.dtype == torch.int64 and label == 1
    assert torch.equal(data[(2, 5)][0], tokens)
    data.set_epoch(2)
    assert torch.equal(data[5][0], tokens)
    assert any(not torch.equal(data[(e, 5)][0], tokens) for e in range(3, 8))
    short = next(i for i, e in enumerate(data.entries) if e.frames < 4)
    clip = data[short][0]
    n = data.entries[short].frames
    assert (clip[n:] == PAD).all() and (clip[:n] != PAD).all()
    choices = [data.choose(e, i) for e in range(20) for i in range(len(data))]
    counts = {v: sum(c.view == v for c in choices) for v in data.views}
    assert min(counts.values()) > 0.25 * len(choices)          # uniform over the 3 views
    longest = max(range(len(data)), key=lambda i: data.entries[i].frames)
    starts = {data.choose(e, longest).start for e in range(200)}
    assert starts == set(range(data.entries[longest].frames - 4 + 1))  # [0, len - T], both ends


def test_train_clips_crop_larger_grid_in_token_space(tmp_path):
    root = make_archive(tmp_path / "big", n_train=4, n_val=2, grid=(6, 6))
    data = TrainClips(root, "train", 4, 4, ["s1_center"], PAD, seed=0)
    full = data.shard(data.entries[0].shard).read(data.entries[0].index, "s1_center")
    tokens = data[(0, 0)][0].numpy()
    windows = [(y, x) for y in range(3) for x in range(3)
               for s in range(len(full)) if len(full[s:s + 4]) == 4
               and (full[s:s + 4, y:y + 4, x:x + 4] == tokens).all()]
    assert windows
    with pytest.raises(ArchiveError, match="smaller than the model"):
        TrainClips(root, "train", 4, 8, None, PAD, seed=0)


def test_test_clip_starts_are_the_official_floor_of_uniform_positions():
    assert clip_starts(10, 4, 3) == [0, 3, 6]
    assert clip_starts(11, 4, 4) == [0, 2, 4, 7]       # floor(7 k / 3): 2.33 -> 2, 4.67 -> 4
    assert clip_starts(3, 4, 2) == [0, 0]              # shorter than T: padded, start 0
    assert clip_starts(10, 4, 1) == [0]                # one clip starts at 0, as officially
    assert clip_starts(10, 3, 2, step=2) == [0, 5]     # strided: last start reaches frame 9


def test_the_validation_part_is_a_fixed_key_hash_holdout_of_the_training_split(archive):
    train = TrainClips(archive, SplitPart("train", "train", 0.25), 4, 4, None, PAD, seed=0)
    val = TestClips(archive, SplitPart("train", "val", 0.25), 4, 4, 1, ["center"], PAD)
    assert {e.key for e in val.entries} == HELD_OUT
    assert {e.key for e in train.entries} == {f"train/{i:03d}" for i in range(24)} - HELD_OUT
    assert in_validation("UCF-101/Fencing/v_Fencing_g08_c01", 0.3) == \
        in_validation("UCF-101/Fencing/v_Fencing_g08_c05", 0.3)    # one UCF101 group, one side
    assert holdout_unit("UCF-101/Fencing/v_Fencing_g08_c05") == "UCF-101/Fencing/v_Fencing_g08"
    with pytest.raises(ArchiveError, match="validation part.*val_fraction"):
        TestClips(archive, SplitPart("train", "val", 0.01), 4, 4, 1, ["center"], PAD)


def test_test_clips_views_and_order(archive):
    data = TestClips(archive, "val", 4, 4, num_clips=3, crops=["top", "center", "bottom"],
                     pad_id=PAD)
    assert data.views == ["s1_top", "s1_center", "s1_bottom"]
    index = max(range(len(data)), key=lambda i: data.entries[i].frames)
    entry = data.entries[index]
    tokens, label = data[index]
    assert tokens.shape == (9, 4, 4, 4) and label == entry.label
    top = data.shard(entry.shard).read(entry.index, "s1_top").astype(np.int64)
    assert (tokens[0].numpy() == top[:4]).all()                 # clip 0, crop "top"
    assert (tokens[6].numpy() == top[-4:]).all()                # last clip ends on the last frame
    center = data.shard(entry.shard).read(entry.index, "s1_center").astype(np.int64)
    assert (tokens[7].numpy() == center[-4:]).all()


def test_missing_test_crop_falls_back_to_centre(caplog):
    views = [View("s1_center"), View("s1_top", crop="top"), View("s1.25_bottom", 1.25, "bottom"),
             View("s1_bottom_flip", crop="bottom", hflip=True)]
    with caplog.at_level(logging.WARNING):
        picked = pick_test_views(views, ["top", "center", "bottom"], "ARCH")
    assert picked == ["s1_top", "s1_center", "s1_center"]
    assert "bottom" in caplog.text and "s1_center" in caplog.text


def test_update_sampler_covers_each_epoch_once_and_splits_ranks():
    n, batch = 10, 4
    full = UpdateSampler(n, batch, 3, seed=0, rank=0, world=1, start=0, total=5)
    keys = [k for u in range(5) for k in full.update_keys(u)]
    assert sorted(i for e, i in keys if e == 0) == list(range(10))
    assert [len(m) for m in full.micro_batches(0)] == [3, 1]
    ranks = [UpdateSampler(n, batch, 3, 0, r, 2, 0, 5) for r in range(2)]
    for u in range(5):
        merged = sorted(ranks[0].update_keys(u) + ranks[1].update_keys(u))
        assert merged == sorted(full.update_keys(u))
    resumed = UpdateSampler(n, batch, 3, 0, 0, 1, start=2, total=5)
    assert list(resumed) == list(full)[4:]


# ------------------------------------------------------------------------------------ fine-tuning

def test_finetune_from_scratch_learns(finetuned):
    out, summary = finetuned
    assert summary["complete"] and summary["steps"] == summary["total_steps"] == 25
    assert (summary["train_videos"], summary["val_videos"]) == (18, 6)
    for name in ("best.pt", "final.pt", "config.yaml", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    metrics = read_metrics(out / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2
    lrs = [m["lr"] for m in metrics if "lr" in m]
    assert max(lrs) == pytest.approx(CFG.lr) and lrs[0] < lrs[2] and lrs[-1] < lrs[-5]
    assert summary["best_val_top1"] >= 0.75 > 0.5          # two balanced classes: chance is 0.5
    model, meta = load_finetuned(out / "best.pt")
    assert meta["classes"] == ["right", "left"] and meta["val_top1"] == summary["best_val_top1"]
    assert model.config.frames == 4 and model.config.height == 4


def test_best_is_chosen_on_validation_and_both_files_say_how(finetuned):
    out, summary = finetuned
    _, best = load_finetuned(out / "best.pt")
    _, final = load_finetuned(out / "final.pt")
    vals = {m["step"]: m["val_top1"] for m in read_metrics(out / "metrics.jsonl")
            if "val_top1" in m}
    assert best["checkpoint"] == "best" and best["step"] == summary["best_step"]
    assert vals[best["step"]] == best["val_top1"] == max(vals.values())
    assert best["step"] == min(s for s, v in vals.items() if v == max(vals.values()))
    assert final["checkpoint"] == "final" and final["step"] == 25
    assert final["val_top1"] == vals[25] == summary["final_val_top1"]
    assert "validation" in best["selection"] and "last update" in final["selection"]
    assert best["validation"]["videos"] == 6 and best["eval_split"] == "val"


def test_no_code_path_reads_the_evaluation_split_while_fine_tuning(archive, tmp_path,
                                                                   test_preset, monkeypatch):
    import vimpac.finetune.data as data_module

    read = []
    real = data_module.labelled_entries

    def spy(arch, split):
        entries = real(arch, split)
        read.append((split if isinstance(split, SplitPart) else SplitPart(split), entries))
        return entries

    monkeypatch.setattr(data_module, "labelled_entries", spy)
    summary = run_finetune(archive, dataclasses.replace(CFG, epochs=1), tmp_path / "run",
                           model_preset=test_preset)
    assert {part.tag for part, _ in read} == {"train"}      # the evaluation split is "val"
    val_keys = {e.key for part, entries in read if part.part == "val" for e in entries}
    train_keys = {e.key for part, entries in read if part.part == "train" for e in entries}
    eval_keys = {e.key for e in real(data_module.open_archive(archive), "val")}
    assert val_keys == HELD_OUT and not val_keys & eval_keys and not val_keys & train_keys
    assert summary["best_step"] is not None and summary["eval_split"] == "val"


def test_no_validation_means_no_selection_and_no_best_file(archive, tmp_path, test_preset):
    cfg = dataclasses.replace(CFG, epochs=1, val_fraction=0.0)
    summary = run_finetune(archive, cfg, tmp_path / "run", model_preset=test_preset)
    assert summary["train_videos"] == 24 and summary["val_videos"] == 0
    assert summary["best"] is None and summary["best_step"] is None
    assert not (tmp_path / "run" / "best.pt").exists()
    _, final = load_finetuned(tmp_path / "run" / "final.pt")
    assert final["checkpoint"] == "final" and final["val_top1"] is None
    assert not any("val_top1" in m for m in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_a_mean_pooled_head_reads_the_token_mean_and_its_files_keep_the_choice(
        archive, tmp_path, test_preset):
    cfg = dataclasses.replace(CFG, epochs=1, val_fraction=0.0, pool="mean")
    run_finetune(archive, cfg, tmp_path / "run", model_preset=test_preset)
    final = tmp_path / "run" / "final.pt"
    model, _ = load_finetuned(final)
    assert model.pool == "mean"
    tokens = torch.randint(0, CODEBOOK, (2, 4, 4, 4))
    tokens[1, -1] = model.config.pad_id                          # a padded last frame
    cls, x = model.backbone(tokens)
    assert torch.allclose(model.features(tokens), token_mean(tokens, x, model.config.pad_id))
    assert torch.allclose(model.features(tokens)[1], x[1, :-1].mean((0, 1, 2)), atol=1e-6)
    assert not torch.allclose(model.features(tokens), cls)
    results = run_evaluate(archive, final, EvaluateConfig(test_clips=1, test_crops=["center"]),
                           tmp_path / "eval")
    assert 0.0 <= results["top1"] <= 1.0
    state = load_checkpoint(final)
    del state["pool"]                                            # a file from before the choice
    save_checkpoint(tmp_path / "old.pt", state)
    assert load_finetuned(tmp_path / "old.pt")[0].pool == "cls"
    state["pool"] = "max"
    save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(CheckpointError, match="bad.pt: pool 'max' is not one of cls, mean"):
        load_finetuned(tmp_path / "bad.pt")


def test_pretrained_init_loads_backbone_only_classifier_missing(archive, tmp_path, test_preset):
    init = pretrained_file(tmp_path / "pretrained.pt")
    saved = load_checkpoint(init)["backbone"]
    from vimpac.archive import Archive

    settings = Archive(archive).settings
    model = build_model(settings, 2, CFG, str(init), test_preset, archive)
    for key, value in saved.items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert not model.head.fc.weight.any() and not model.head.fc.bias.any()
    broken = dict(saved)
    broken.pop("pos_w")
    with pytest.raises(CheckpointError, match="pos_w"):
        load_backbone_state(model, broken, "broken.pt")
    summary = run_finetune(archive, CFG, tmp_path / "out", init=str(init), stop_after=2)
    assert summary["steps"] == 2 and not summary["complete"]


def test_mismatched_tokenizer_is_refused(archive, tmp_path):
    init = pretrained_file(tmp_path / "pretrained.pt", fingerprint="another-tokenizer")
    with pytest.raises(ArchiveError, match="tokenizer"):
        run_finetune(archive, CFG, tmp_path / "out", init=str(init))


def test_positions_interpolated_when_grid_and_frames_differ(archive, tmp_path, test_preset):
    small = dataclasses.replace(SMALL, frames=3, height=2, width=2)
    init = pretrained_file(tmp_path / "pretrained.pt", config=small)
    saved = load_checkpoint(init)["backbone"]
    from vimpac.archive import Archive

    model = build_model(Archive(archive).settings, 2, CFG, str(init), test_preset, archive)
    assert model.backbone.pos_t.shape == (4, 32) and model.backbone.pos_h.shape == (4, 32)
    assert torch.allclose(model.backbone.pos_h, interpolate_table(saved["pos_h"], 4))
    assert torch.equal(model.backbone.pos_cls, saved["pos_cls"])
    summary = run_finetune(archive, CFG, tmp_path / "out", init=str(init), stop_after=1)
    assert summary["steps"] == 1


def test_resume_gives_bitwise_identical_weights(archive, tmp_path, test_preset):
    cfg = dataclasses.replace(CFG, epochs=2.5, dropout=0.1, micro_batch=3)  # 6 updates, RNG used
    whole = run_finetune(archive, cfg, tmp_path / "whole", model_preset=test_preset)
    first = run_finetune(archive, cfg, tmp_path / "split", model_preset=test_preset, stop_after=4)
    assert first["steps"] == 4 and not (tmp_path / "split" / "final.pt").exists()
    second = run_finetune(archive, cfg, tmp_path / "split", model_preset=test_preset)
    assert whole["steps"] == second["steps"] == 6
    a = load_checkpoint(tmp_path / "whole" / "final.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in read_metrics(tmp_path / "split" / "metrics.jsonl") if "loss" in m]
    assert steps == list(range(1, 7))
    with pytest.raises(CheckpointError, match="lr"):
        run_finetune(archive, dataclasses.replace(cfg, lr=1e-2), tmp_path / "split",
                     model_preset=test_preset)


def test_unlabelled_archive_and_wrong_fps_are_clear_errors(archive, tmp_path, test_preset):
    plain = make_archive(tmp_path / "plain", n_train=2, n_val=0, labelled=False)
    with pytest.raises(ArchiveError, match="not a labelled archive"):
        run_finetune(plain, CFG, tmp_path / "o1", model_preset=test_preset)
    with pytest.raises(ArchiveError, match="finetune.fps = 3"):
        run_finetune(archive, dataclasses.replace(CFG, fps=3.0), tmp_path / "o2",
                     model_preset=test_preset)


# ------------------------------------------------------------------------------- the plateau rule

def test_the_plateau_rule_counts_validations_without_a_rise_of_min_delta():
    rule = Plateau(patience=3, min_delta=0.05)
    steps = [(10, 0.20), (20, 0.30), (30, 0.34), (40, 0.40), (50, 0.39), (60, 0.44)]
    assert [rule.observe(s, v) for s, v in steps] == [False] * 6
    # 0.34 rose 0.04 < 0.05 over 0.30: not an improvement; 0.40 is (0.10 over 0.30)
    assert (rule.best, rule.best_step, rule.since_best) == (0.40, 40, 2)
    assert rule.observe(70, 0.44) and rule.stopped_at == 70
    record = stop_record(rule, 70, 100, validated=True)
    assert record["stopped"] == "plateau" and record["stopped_step"] == 70
    assert "plateau at update 70 of 100" in record["stop_reason"]


def test_a_run_that_ends_on_a_rise_is_still_improving_and_off_means_never_stop():
    rule = Plateau(patience=0, min_delta=0.01)
    for step, top1 in [(1, 0.5)] + [(s, 0.5) for s in range(2, 40)]:
        assert not rule.observe(step, top1)                    # patience 0: only watches
    assert stop_record(rule, 40, 40, validated=True)["stopped"] == "budget"
    rule.observe(41, 0.52)                                    # a new best by >= min_delta
    record = stop_record(rule, 41, 41, validated=True)
    assert record["stopped"] == "budget-still-improving" and "by 2.0%" in record["stop_reason"]
    one = Plateau(patience=0, min_delta=0.01)
    one.observe(5, 0.9)                                        # one validation: no trend yet
    assert stop_record(one, 5, 5, validated=True)["stopped"] == "budget"
    assert stop_record(Plateau(0, 0.01), 5, 5, validated=False)["stopped"] == "budget"


def test_a_minimum_budget_holds_the_stop_until_its_update_and_moves_no_later_stop():
    flat = [(s, 0.125) for s in range(10, 70, 10)]             # best at the first, then nothing
    plain, held = Plateau(patience=2, min_delta=0.01), Plateau(2, 0.01, min_step=55)
    assert [plain.observe(s, v) for s, v in flat[:3]] == [False, False, True]   # stops at 30
    assert [held.observe(s, v) for s, v in flat] == [False] * 5 + [True]        # first at 60
    assert held.stopped_at == 60 and held.since_best == 5 and held.best_step == 10
    assert "; no stop before update 55" in stop_record(held, 60, 100, True)["stop_reason"]
    curve = [(10, 0.2), (20, 0.3), (30, 0.5), (40, 0.5), (50, 0.51), (60, 0.5)]
    for minimum in (0, 25, 60):                                  # the stop at 60 is >= each
        rule = Plateau(patience=3, min_delta=0.02, min_step=minimum)
        assert [rule.observe(s, v) for s, v in curve][-1] and rule.stopped_at == 60
    assert "no stop before" not in stop_record(Plateau(3, 0.02), 60, 100, True)["stop_reason"]


def test_the_plateau_state_round_trips_and_refuses_another_rule():
    rule = Plateau(patience=2, min_delta=0.1)
    rule.observe(3, 0.5)
    rule.observe(6, 0.55)
    copy = Plateau(patience=2, min_delta=0.1)
    copy.load_state_dict(rule.state_dict())
    assert copy == rule
    with pytest.raises(ValueError, match="patience 2"):
        Plateau(patience=3, min_delta=0.1).load_state_dict(rule.state_dict())
    with pytest.raises(ValueError, match="min_step 0 does not fit .* 0.1, 9"):
        Plateau(patience=2, min_delta=0.1, min_step=9).load_state_dict(rule.state_dict())
    older = {k: v for k, v in rule.state_dict().items() if k != "min_step"}
    copy.load_state_dict(older)                                # saved before the minimum existed
    assert copy == rule


PLATEAU_CFG = dataclasses.replace(CFG, epochs=20, plateau_patience=6)    # 45 updates at most


def test_fine_tuning_stops_on_a_plateau_and_the_summary_says_why(archive, tmp_path, test_preset):
    summary = run_finetune(archive, PLATEAU_CFG, tmp_path / "run", model_preset=test_preset)
    vals = [(m["step"], m["val_top1"]) for m in read_metrics(tmp_path / "run" / "metrics.jsonl")
            if "val_top1" in m]
    assert summary["stopped"] == "plateau" and summary["complete"]
    assert summary["stopped_step"] == summary["steps"] == vals[-1][0] < summary["total_steps"]
    assert summary["plateau"]["since_best"] == 6 and summary["plateau"]["stopped_at"] == vals[-1][0]
    best = summary["plateau"]["best"]
    assert all(v < best + 0.01 for _, v in vals[-6:])        # six validations without a rise
    assert (tmp_path / "run" / "final.pt").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped"] == "plateau"
    _, final = load_finetuned(tmp_path / "run" / "final.pt")
    assert final["step"] == summary["stopped_step"]


def test_an_interrupted_run_resumes_into_the_same_plateau_stop(archive, tmp_path, test_preset):
    whole = run_finetune(archive, PLATEAU_CFG, tmp_path / "whole", model_preset=test_preset)
    stop = whole["stopped_step"]
    assert whole["stopped"] == "plateau" and stop >= 6
    cut = stop - 3                                             # between validations, mid-count
    first = run_finetune(archive, PLATEAU_CFG, tmp_path / "split", model_preset=test_preset,
                         stop_after=cut)
    assert first["steps"] == cut and first["stopped"] is None and not first["complete"]
    assert 0 < first["plateau"]["since_best"] < 6
    second = run_finetune(archive, PLATEAU_CFG, tmp_path / "split", model_preset=test_preset)
    assert {k: second[k] for k in ("stopped", "stopped_step", "stop_reason", "plateau", "steps")} \
        == {k: whole[k] for k in ("stopped", "stopped_step", "stop_reason", "plateau", "steps")}
    a = load_checkpoint(tmp_path / "whole" / "final.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = run_finetune(archive, PLATEAU_CFG, tmp_path / "split", model_preset=test_preset)
    assert again["steps"] == stop and again["stopped"] == "plateau"   # a stopped run stays so


def test_a_minimum_budget_runs_on_past_the_plain_stop_and_a_lower_one_changes_nothing(
        archive, tmp_path, test_preset):
    plain = run_finetune(archive, PLATEAU_CFG, tmp_path / "plain", model_preset=test_preset)
    stop, per_epoch = plain["stopped_step"], plain["total_steps"] / PLATEAU_CFG.epochs
    assert plain["stopped"] == "plateau" and stop < plain["total_steps"] - 4
    below = dataclasses.replace(PLATEAU_CFG, plateau_min_epochs=(stop - 1) / per_epoch)
    same = run_finetune(archive, below, tmp_path / "below", model_preset=test_preset)
    assert {k: same[k] for k in ("steps", "stopped", "best_val_top1", "final_val_top1")} \
        == {k: plain[k] for k in ("steps", "stopped", "best_val_top1", "final_val_top1")}
    a = load_checkpoint(tmp_path / "plain" / "final.pt")["model"]
    b = load_checkpoint(tmp_path / "below" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    above = dataclasses.replace(PLATEAU_CFG, plateau_min_epochs=(stop + 2) / per_epoch)
    later = run_finetune(archive, above, tmp_path / "above", model_preset=test_preset)
    assert later["steps"] >= stop + 2 > stop and later["plateau"]["min_step"] == stop + 2
    assert later["stopped"] == "plateau" and later["plateau"]["best_step"] < stop
    assert later["stop_reason"].endswith(f"no stop before update {stop + 2}")


@pytest.mark.parametrize(("curve", "stopped"), [
    ([0.2, 0.3, 0.4], "budget-still-improving"),       # the last validation is a new best
    ([0.2, 0.4, 0.405], "budget"),                      # it rose by less than min_delta
])
def test_a_budget_that_ends_while_validation_rises_is_a_warning(archive, tmp_path, test_preset,
                                                                monkeypatch, caplog, curve,
                                                                stopped):
    import vimpac.finetune.train as train_module

    values = iter(curve)
    monkeypatch.setattr(train_module, "validate", lambda *args: next(values))
    cfg = dataclasses.replace(CFG, epochs=2, eval_every=0.8)        # validations at 2, 4, 5
    with caplog.at_level(logging.INFO, logger="vimpac.finetune.train"):
        summary = run_finetune(archive, cfg, tmp_path / "run", model_preset=test_preset)
    assert summary["stopped"] == stopped and summary["stopped_step"] == summary["steps"] == 5
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ([summary["stop_reason"]] if stopped == "budget-still-improving" else [])
    assert stopped != "budget-still-improving" or "by 10.0% to 40.0%" in summary["stop_reason"]


def test_the_cli_says_in_one_line_why_fine_tuning_stopped(archive, tmp_path, test_preset,
                                                          cli_runner):
    from vimpac.cli import cli

    config = tmp_path / "pipelines.yaml"
    config.write_text(
        "pipelines:\n  p:\n    pretrain: {model: test}\n"
        "    finetune: {frames: 4, grid: 4, fps: 4.0, epochs: 20, batch_size: 8, micro_batch: 4,"
        " lr: 3.0e-3, dropout: 0.0, num_workers: 0, val_fraction: 0.25, plateau_patience: 6}\n")
    result = cli_runner.invoke(cli, ["-q", "--config", str(config), "--pipeline", "p", "finetune",
                                     str(archive), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("stopped: ")]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert lines == [f"stopped: {summary['stop_reason']}"]
    assert lines[0].startswith(f"stopped: plateau at update {summary['stopped_step']} of ")


# ------------------------------------------------------------------------------------- evaluation

def test_classification_metrics_hand_made():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([0, 1, 1, 1])
    result = classification_metrics(probs, labels, ["a", "b", "c"])
    assert result["top1"] == 0.5 and result["top5"] == 1.0
    assert result["per_class"] == {"a": 1.0, "b": pytest.approx(1 / 3), "c": None}
    assert result["confusion"] == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert result["mean_class_accuracy"] == pytest.approx(2 / 3)


class _LookupModel(nn.Module):
    """Logits looked up by the first token of each clip (a model with known outputs)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0, 0, 0]]


def test_views_average_probabilities_not_logits():
    table = torch.tensor([[10.0, 0.0], [0.0, 3.0]])
    video = torch.tensor([0, 1, 1]).view(3, 1, 1, 1).expand(3, 2, 2, 2)  # views: A, B, B
    loader = DataLoader([(video, 1)], batch_size=1)
    probs, labels = view_averaged_probs(_LookupModel(table), loader, torch.device("cpu"))
    # mean logits [3.3, 2.0] would say class 0; mean probabilities say class 1.
    assert probs.argmax(1).tolist() == [1] and labels.tolist() == [1]


def test_evaluate_writes_results_and_confusion_png(archive, finetuned, tmp_path):
    out, summary = finetuned
    cfg = EvaluateConfig(test_clips=2, test_crops=["top", "center", "bottom"])
    results = run_evaluate(archive, out / "best.pt", cfg, tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["top1"] == results["top1"] and saved["split"] == "val"
    assert saved["videos"] == 12 and saved["views_per_video"] == 6
    assert saved["checkpoint_kind"] == "best" and saved["step"] == summary["best_step"]
    assert saved["val_top1"] == summary["best_val_top1"] and "validation" in saved["selection"]
    assert len(saved["correct"]) == len(saved["keys"]) == 12
    assert sum(saved["correct"]) / 12 == pytest.approx(saved["top1"])
    confusion = np.array(saved["confusion"])
    assert confusion.sum() == 12 and confusion.trace() / 12 == pytest.approx(saved["top1"])
    assert saved["top1"] >= 0.75 and saved["top5"] == 1.0
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CheckpointError, match="fine-tuned"):
        run_evaluate(archive, out / "checkpoints" / "step-000000024.pt", cfg, tmp_path / "x")


def test_mean_over_splits():
    runs = [{"split": f"test{k}", "top1": v, "top5": 1.0, "mean_class_accuracy": v}
            for k, v in ((1, 0.6), (2, 0.7), (3, 0.8))]
    mean = mean_over_splits(runs)
    assert mean["top1"] == pytest.approx(0.7) and mean["splits"] == ["test1", "test2", "test3"]
    assert mean["top1_per_split"] == [0.6, 0.7, 0.8] and mean["top5"] == 1.0


def test_knn_and_linear_probe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 4

    def sample(n):
        labels = torch.arange(n) % 3
        return centres[labels] + torch.randn(n, 16, generator=g), labels

    (x, y), (xt, yt) = sample(90), sample(30)
    assert knn_probe(x, y, xt, yt, k=10, temperature=0.07) == pytest.approx(1.0)
    assert linear_probe(x, y, xt, yt, steps=50) == pytest.approx(1.0)
    assert knn_probe(x, y, xt, torch.zeros_like(yt) + 5, k=10, num_classes=6) == 0.0


def test_run_probes_on_finetuned_and_pretrained(archive, finetuned, tmp_path):
    out, _ = finetuned
    cfg = EvaluateConfig(knn_k=5, linear_probe_epochs=30)
    tuned = run_probes(archive, out / "best.pt", cfg, tmp_path / "p1")
    assert json.loads((tmp_path / "p1" / "probes.json").read_text()) == tuned
    assert (tuned["train_videos"], tuned["test_videos"], tuned["feature_dim"]) == (24, 12, 32)
    assert tuned["knn_top1"] >= 0.75 and tuned["linear_top1"] >= 0.75
    init = pretrained_file(tmp_path / "pretrained.pt",
                           config=dataclasses.replace(SMALL, frames=3, height=2, width=2))
    fresh = run_probes(archive, init, cfg, tmp_path / "p2", frames=4, grid=4)
    assert fresh["grid"] == 4 and 0.0 <= fresh["knn_top1"] <= 1.0
    assert set(tuned["time_reversal"]["backbones"]) == {"fine-tuned", "random init"}
    assert set(fresh["time_reversal"]["backbones"]) == {"pre-trained", "random init"}
    assert fresh["time_reversal"]["clips"] == fresh["test_videos"] == 12


# ------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import dataclasses, json, sys
import torch
from vimpac.config import FinetuneConfig
from vimpac.finetune.train import run_finetune
from vimpac.pretrain.model import PRESETS
torch.set_num_threads(1)
PRESETS["test"] = dataclasses.replace(PRESETS["tiny"], codebook_size=16, layers=1, dim=32,
                                      heads=2, mlp_dim=64, frames=4, height=4, width=4)
cfg = FinetuneConfig(frames=4, grid=4, fps=4.0, epochs=2, batch_size=8, micro_batch=4, lr=3e-3,
                     dropout=0.0, num_workers=0)
summary = run_finetune(sys.argv[1], cfg, sys.argv[2], model_preset="test")
print(json.dumps(summary))
"""


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(archive, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(archive), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 6
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoints" / "step-000000006.pt")
    assert len(ckpt["rng"]) == 2


def test_finetune_and_evaluate_from_an_object_store_equal_local(test_preset, tmp_path):
    import fsspec

    url = "memory://vimpac-finetune-test/arch"
    try:
        make_archive(url)
        local = make_archive(tmp_path / "arch")
        cfg = dataclasses.replace(CFG, epochs=2)
        remote_run = run_finetune(url, cfg, tmp_path / "from-url", model_preset=test_preset)
        local_run = run_finetune(local, cfg, tmp_path / "from-disk", model_preset=test_preset)
        assert remote_run["best_val_top1"] == local_run["best_val_top1"]
        a = load_checkpoint(tmp_path / "from-url" / "final.pt")["model"]
        b = load_checkpoint(tmp_path / "from-disk" / "final.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        ecfg = EvaluateConfig(test_clips=2, test_crops=["center"])
        got = run_evaluate(url, tmp_path / "from-url" / "final.pt", ecfg, tmp_path / "eval-url")
        want = run_evaluate(local, tmp_path / "from-disk" / "final.pt", ecfg, tmp_path / "eval")
        assert got["archive"] == url and got["confusion"] == want["confusion"]
    finally:
        fsspec.filesystem("memory").rm("vimpac-finetune-test", recursive=True)
