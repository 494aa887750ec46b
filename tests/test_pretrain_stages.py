"""Two-stage pre-training as the authors ran it: one learning-rate schedule over both stages, and
stage 2 resuming all of stage 1 (model, both heads, AdamW moments, scheduler) across a resolution
change; the official weight-decay groups."""

import dataclasses
import json

import pytest
import torch
from conftest import write_token_archive

from vimpac.common.training import param_groups
from vimpac.config import PretrainConfig
from vimpac.pretrain.model import PRESETS, VimpacPretrainModel, interpolate_table
from vimpac.pretrain.train import (
    HEADS,
    PretrainError,
    build_model,
    build_optimizer,
    continue_from,
    find_start,
    run_pretrain,
)

N, K = 6, 3  # one schedule of N updates; the resolution changes after update K
ONE = PretrainConfig(model="tiny", frames=5, grid=8, batch_size=8, micro_batch=4, steps=N,
                     num_workers=0, checkpoint_every=2, log_every=1, proj_hidden=32, lr=1e-3,
                     warmup=0.25, shuffle_buffer=8)
STAGE1 = dataclasses.replace(ONE, grid=4, steps=K, schedule_steps=N)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_token_archive(tmp_path_factory.mktemp("a") / "arch", videos=24, grid=8,
                               frames=(2, 14), codebook=64, per_shard=5)


@pytest.fixture(scope="module")
def runs(archive, tmp_path_factory):
    """Stage 1 at grid 4 (updates 1..K of N), stage 2 at grid 8 (K+1..N), and one N-update run."""
    root = tmp_path_factory.mktemp("runs")
    run_pretrain([archive], STAGE1, root / "stage1")
    stage2 = dataclasses.replace(ONE, init_from=str(root / "stage1"))
    run_pretrain([archive], stage2, root / "stage2")
    run_pretrain([archive], ONE, root / "one")
    return root, stage2


def logged(folder, key="lr"):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m[key] for m in map(json.loads, lines)}


def moment_shapes(path):
    state = torch.load(path, weights_only=True)["optimizer"]["state"]
    return {i: {k: tuple(v.shape) for k, v in entry.items()} for i, entry in state.items()}


def test_two_stages_follow_one_schedule_in_learning_rate_at_every_update(runs):
    root, _ = runs
    first, second, one = logged(root / "stage1"), logged(root / "stage2"), logged(root / "one")
    assert sorted(first) == list(range(1, K + 1)) and sorted(second) == list(range(K + 1, N + 1))
    assert {**first, **second} == pytest.approx(one, rel=1e-12, abs=0)
    assert first[K] > 0.0                                   # stage 1 stops with the LR above 0
    assert one[N] == 0.0


def test_stage_two_optimizer_state_has_the_one_schedule_shapes(runs):
    root, _ = runs
    two = moment_shapes(root / "stage2" / "checkpoints" / f"step-{N:09d}.pt")
    assert two == moment_shapes(root / "one" / "checkpoints" / f"step-{N:09d}.pt")
    pretrained = torch.load(root / "stage2" / "pretrained.pt", weights_only=True)
    assert pretrained["step"] == N and pretrained["backbone"]["pos_h"].shape == (8, 128)
    assert set(pretrained["heads"]) >= {"mlm_head", "contrastive_head"}


def test_resuming_the_stage_one_checkpoint_keeps_heads_and_adamw_moments(runs):
    root, stage2 = runs
    start = find_start(str(root / "stage1"))
    assert start.training and start.path.name == f"step-{K:09d}.pt"
    model = build_model(stage2, 64, start)
    optimizer, scheduler = build_optimizer(model, stage2)
    assert continue_from(start, model, optimizer, scheduler) == K
    saved = start.state["model"]
    for key, value in model.state_dict().items():
        if key.startswith(HEADS):
            assert torch.equal(value, saved[key]), key
    assert torch.equal(model.backbone.pos_h, interpolate_table(saved["backbone.pos_h"], 8))
    assert torch.equal(model.backbone.pos_t, saved["backbone.pos_t"])   # T unchanged
    params = dict(model.named_parameters())
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    before, after = start.state["optimizer"]["state"], optimizer.state_dict()["state"]
    for name in ("mlm_head.ln.weight", "contrastive_head.mlp.1.weight", "backbone.pos_t",
                 "backbone.layers.0.mlp.fc1.weight"):
        i = index[id(params[name])]
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after[i][moment], before[i][moment]), (name, moment)
    i = index[id(params["backbone.pos_w"])]
    for moment in ("exp_avg", "exp_avg_sq"):
        assert after[i][moment].shape == (8, 128)
        assert torch.equal(after[i][moment], interpolate_table(before[i][moment], 8))
    assert scheduler.last_epoch == K
    assert optimizer.param_groups[0]["lr"] == start.state["optimizer"]["param_groups"][0]["lr"]


def test_an_interrupted_second_stage_resumes_to_the_same_weights(archive, runs, tmp_path):
    root, stage2 = runs
    run_pretrain([archive], stage2, tmp_path / "parts", stop_after=1)
    resumed = run_pretrain([archive], stage2, tmp_path / "parts")
    assert resumed.step == N
    a = torch.load(root / "stage2" / "pretrained.pt", weights_only=True)["backbone"]
    b = torch.load(resumed.pretrained, weights_only=True)["backbone"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(logged(tmp_path / "parts")) == list(range(K + 1, N + 1))


def test_a_second_stage_that_breaks_the_schedule_is_refused(archive, runs, tmp_path):
    root, stage2 = runs
    with pytest.raises(PretrainError, match="lr 0.001 -> 0.002"):
        run_pretrain([archive], dataclasses.replace(stage2, lr=2e-3), tmp_path / "a")
    with pytest.raises(PretrainError, match="schedule length 6 -> 8"):
        run_pretrain([archive], dataclasses.replace(stage2, steps=8), tmp_path / "b")
    with pytest.raises(PretrainError, match="nothing to do"):
        run_pretrain([archive], dataclasses.replace(stage2, steps=K, schedule_steps=N),
                     tmp_path / "c")
    with pytest.raises(PretrainError, match="no checkpoints"):
        run_pretrain([archive], dataclasses.replace(stage2, init_from=str(tmp_path)),
                     tmp_path / "d")


def test_a_pretrained_file_gives_weights_and_heads_but_a_fresh_schedule(archive, runs, tmp_path):
    root, _ = runs
    cfg = dataclasses.replace(ONE, steps=2, init_from=str(root / "stage1" / "pretrained.pt"))
    start = find_start(cfg.init_from)
    assert not start.training
    model = build_model(cfg, 64, start)
    heads = start.state["heads"]
    assert torch.equal(model.contrastive_head.mlp[0].weight,
                       heads["contrastive_head"]["mlp.0.weight"])
    assert torch.equal(model.backbone.pos_w, interpolate_table(start.state["backbone"]["pos_w"], 8))
    result = run_pretrain([archive], cfg, tmp_path / "run")
    assert result.step == 2 and sorted(logged(tmp_path / "run")) == [1, 2]


def test_weight_decay_groups_are_the_official_ones():
    model = VimpacPretrainModel(PRESETS["tiny"], proj_hidden=32)
    decay, plain = (set(map(id, g["params"])) for g in param_groups(model, 0.05, HEADS))
    params = dict(model.named_parameters())
    decayed = {"mlm_head.ln.weight", "contrastive_head.mlp.1.weight", "backbone.pos_t",
               "backbone.cls_param", "backbone.token_embed.weight", "mlm_head.dense.weight"}
    exempt = {"backbone.embed_ln.weight", "backbone.layers.0.mlp.ln.weight",
              "backbone.layers.0.attention.0.ln.weight", "mlm_head.bias", "mlm_head.ln.bias",
              "contrastive_head.mlp.1.bias", "backbone.layers.0.mlp.fc1.bias"}
    assert all(id(params[n]) in decay for n in decayed)
    assert all(id(params[n]) in plain for n in exempt)
    backbone_only = param_groups(model, 0.05)        # fine-tuning: every norm exempt
    assert id(params["mlm_head.ln.weight"]) in set(map(id, backbone_only[1]["params"]))
