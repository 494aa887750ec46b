"""`vimpac run`: plans, content-addressed reuse across pipelines, --force, ls and gc."""

import textwrap

import pytest

from vimpac.cli import cli
from vimpac.common.config import PACKAGED_CONFIG
from vimpac.config import load_pipeline, pipeline_names
from vimpac.pipeline import (
    PipelineError,
    build_plan,
    collect_garbage,
    dependents,
    list_outputs,
    run_pipeline,
)


def plan(name, runs, overrides=(), path=PACKAGED_CONFIG):
    return {s.name: s for s in build_plan(load_pipeline(name, path, overrides), runs)}


def test_every_packaged_pipeline_plans(tmp_path):
    for name in pipeline_names(PACKAGED_CONFIG):
        stages = plan(name, tmp_path)
        assert "report" in stages and all(s.key for s in stages.values())


def test_paper_recipes_dry_run_through_the_cli(cli_runner, tmp_path):
    for name in ("howto100m-large-half", "howto100m-large-half-256", "ssv2-large-half",
                 "diving48-large-half", "ucf101-large-half", "hmdb51-large-half",
                 "kinetics400-large-half", "ucf101-from-official"):
        result = cli_runner.invoke(cli, ["--config", str(PACKAGED_CONFIG), "run", name,
                                         "--dry-run", "--runs", str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert "planned" in result.output and "pretrain" in result.output


def test_pretrain_only_change_reuses_the_archives(tmp_path):
    a = plan("demo", tmp_path)
    b = plan("demo", tmp_path, ["pretrain.lr=3e-4"])
    for shared in ("data", "tokenizer", "tokens-pretrain", "tokens-finetune"):
        assert a[shared].path == b[shared].path
    for redone in ("pretrain", "finetune", "evaluate"):
        assert a[redone].path != b[redone].path
    assert a["finetune-scratch"].path == b["finetune-scratch"].path   # scratch needs no pretrain
    c = plan("demo", tmp_path, ["tokenize.decode_workers=1"])       # speed knobs: same outputs
    assert c["tokens-pretrain"].path == a["tokens-pretrain"].path


def test_finetune_recipes_share_the_pretraining_stage(tmp_path):
    ssv2, ucf = plan("ssv2-large-half", tmp_path), plan("ucf101-large-half", tmp_path)
    assert ssv2["pretrain"].path == ucf["pretrain"].path
    assert ssv2["tokens-finetune"].path != ucf["tokens-finetune"].path


def test_dependents_of_a_forced_stage(tmp_path):
    stages = build_plan(load_pipeline("demo", PACKAGED_CONFIG), tmp_path)
    assert dependents(stages, {"pretrain"}) == {"pretrain", "finetune", "evaluate", "probes",
                                                "report"}
    with pytest.raises(PipelineError, match="no such stage"):
        run_pipeline(load_pipeline("demo", PACKAGED_CONFIG), tmp_path, force=("bogus",),
                     dry_run=True)


def test_ls_and_gc(tmp_path):
    cfg = load_pipeline("demo", PACKAGED_CONFIG)
    stages = {s.name: s for s in build_plan(cfg, tmp_path)}
    stages["tokens-pretrain"].path.mkdir(parents=True)
    (stages["tokens-pretrain"].path / "DONE.json").write_text('{"result": {}}')
    stale = tmp_path / "tokens" / "0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "x.bin").write_bytes(b"x" * 100)
    rows = {r.path: r for r in list_outputs([cfg], tmp_path)}
    assert rows[stages["tokens-pretrain"].path].pipelines == ["demo"]
    assert rows[stale].pipelines == [] and rows[stale].bytes == 100
    removed = collect_garbage([cfg], tmp_path)
    assert [r.path for r in removed] == [stale] and not stale.exists()
    assert stages["tokens-pretrain"].path.exists()


def test_gc_keeps_an_output_a_running_stage_is_building(tmp_path):
    """An output no listed pipeline uses (a run with other --set values) is kept while its
    builder holds its lock, and removed with its lock once it is free."""
    from vimpac.pipeline import lock_path, output_lock

    cfg = load_pipeline("demo", PACKAGED_CONFIG)
    building = tmp_path / "pretrain" / "0123456789abcdef"
    building.mkdir(parents=True)
    with output_lock(building):
        assert collect_garbage([cfg], tmp_path) == [] and building.exists()
    assert lock_path(building).exists()
    assert [r.path for r in collect_garbage([cfg], tmp_path)] == [building]
    assert not building.exists() and not lock_path(building).exists()


def test_user_data_pipeline_needs_inputs(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""
        pipelines:
          mine: {data: {synthetic: false}}
    """))
    with pytest.raises(PipelineError, match="pretrain_inputs"):
        build_plan(load_pipeline("mine", path), tmp_path)


def test_packaged_pretraining_variant_shares_the_demo_archives(tmp_path):
    demo, variant = plan("demo", tmp_path), plan("demo-mp-only", tmp_path)
    for shared in ("data", "tokenizer", "tokens-pretrain", "tokens-finetune", "finetune-scratch"):
        assert demo[shared].path == variant[shared].path
    assert demo["pretrain"].path != variant["pretrain"].path


def test_the_two_large_half_stages_are_one_schedule(tmp_path):
    from vimpac.common.training import warmup_linear
    from vimpac.pretrain.train import SCHEDULE_KEYS, schedule_length

    one = load_pipeline("howto100m-large-half", PACKAGED_CONFIG).pretrain
    two = load_pipeline("howto100m-large-half-256", PACKAGED_CONFIG).pretrain
    assert schedule_length(one) == schedule_length(two) == two.steps == 120_900
    assert one.steps == 108_810 < two.steps                 # epoch 90 of 100, 1,209 updates each
    assert all(getattr(one, k) == getattr(two, k) for k in SCHEDULE_KEYS)
    assert (one.grid, two.grid, one.num_blocks, two.num_blocks) == (16, 32, 5, 6)
    lr_at_switch = one.lr * warmup_linear(schedule_length(one), one.warmup)(one.steps)
    assert lr_at_switch == pytest.approx(3.16e-5, abs=1e-7)
    assert two.init_from and not one.init_from


def test_the_from_official_recipe_imports_instead_of_pre_training(tmp_path):
    stages = plan("ucf101-from-official", tmp_path)
    assert "tokens-pretrain" not in stages and "official" in stages["pretrain"].settings
    assert stages["pretrain"].needs == ["tokenizer"]
    assert stages["finetune"].needs == ["tokens-finetune", "pretrain"]
    other = plan("ucf101-from-official", tmp_path, ["pretrain.official_checkpoint=other.pt"])
    assert other["pretrain"].path != stages["pretrain"].path
    assert other["tokens-finetune"].path == stages["tokens-finetune"].path


def test_the_packaged_pipelines_are_the_repository_ones():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "pipelines.yaml"
    assert PACKAGED_CONFIG.resolve() == root.resolve()


def test_the_probes_stage_reads_the_pretrained_backbone_and_the_finetuning_clips(tmp_path):
    stages = plan("demo", tmp_path)
    assert stages["probes"].needs == ["tokens-finetune", "pretrain"]
    assert stages["probes"].settings["clips"] == {"split": "1", "frames": 5, "grid": 8,
                                                  "fps": 4.0}
    assert "probes" in plan("ucf101-from-official", tmp_path)


def test_the_evaluated_checkpoint_is_part_of_the_evaluate_key(tmp_path):
    final, best = plan("demo", tmp_path), plan("demo", tmp_path, ["evaluate.checkpoint=best"])
    assert final["finetune"].path == best["finetune"].path
    assert final["evaluate"].path != best["evaluate"].path


def test_a_stage_runs_with_exactly_the_settings_its_key_hashes(tmp_path):
    """Each stage carries the resolved settings it runs with, and its key hashes them: the
    labelled archive's tokenize settings take fine-tuning's fps and views in one place."""
    import dataclasses

    from vimpac.common.config import result_fields

    config = load_pipeline("demo", PACKAGED_CONFIG)
    stages = {s.name: s for s in build_plan(config, tmp_path)}
    labelled = stages["tokens-finetune"].config["tokenize"]
    ft = config.finetune
    assert (labelled.fps, labelled.scales, labelled.crops, labelled.hflip) == \
        (ft.fps, ft.view_scales, ft.view_crops, ft.view_hflip)
    assert stages["tokens-finetune"].settings["tokenize"] == result_fields(labelled)
    assert stages["tokens-pretrain"].config["tokenize"] is config.tokenize
    assert stages["finetune"].config["finetune"] is config.finetune
    for stage in stages.values():
        for value in stage.config.values():
            if dataclasses.is_dataclass(value):
                assert "decode_workers" not in result_fields(value)   # volatile: not hashed


@pytest.mark.parametrize(("change", "moves"), [
    ("tokenize.decode_workers=7", set()),                    # volatile: how, not what
    ("pretrain.num_workers=5", set()),
    ("pretrain.log_every=3", set()),
    ("finetune.num_workers=3", set()),
    ("pretrain.lr=0.0007", {"pretrain", "finetune", "evaluate", "probes"}),
    ("finetune.view_crops=[center]", {"tokens-finetune", "finetune", "finetune-scratch",
                                      "evaluate", "evaluate-scratch", "probes"}),
    ("evaluate.test_clips=3", {"evaluate", "evaluate-scratch"}),    # probes use one centre clip
    ("finetune.plateau_patience=0", set()),                   # the default: off, as before
    ("finetune.plateau_patience=4", {"finetune", "finetune-scratch", "evaluate",
                                     "evaluate-scratch"}),
    ("finetune.pool=cls", set()),                             # the default, as before
    ("finetune.pool=mean", {"finetune", "finetune-scratch", "evaluate", "evaluate-scratch"}),
])
def test_only_non_volatile_settings_move_the_keys(tmp_path, change, moves):
    """(The report folder is named by the pipeline, so it never moves.)"""
    base = plan("demo", tmp_path, ["finetune.compare_scratch=true"])
    changed = plan("demo", tmp_path, ["finetune.compare_scratch=true", change])
    assert {n for n in base if base[n].path != changed[n].path} == moves


def test_a_pipeline_with_pretrain_sources_pre_trains_on_them(tmp_path):
    """Archives tokenized before, listed with weights in pretrain.sources, replace the
    pipeline's own pre-training tokens (no tokens-pretrain stage)."""
    from conftest import write_token_archive

    first = write_token_archive(tmp_path / "a", videos=8, grid=8, frames=(5, 9), codebook=64)
    second = write_token_archive(tmp_path / "b", videos=8, grid=8, frames=(5, 9), codebook=64,
                                 seed=1)
    config = tmp_path / "pipelines.yaml"
    config.write_text(textwrap.dedent(f"""\
        pipelines:
          mixed:
            data: {{synthetic: false}}
            tokenizer: {{source: path, path: {tmp_path}}}
            pretrain:
              model: tiny
              frames: 5
              grid: 8
              batch_size: 4
              micro_batch: 4
              steps: 2
              num_workers: 0
              proj_hidden: 16
              sources: [{{path: {first}, weight: 0.75}}, {{path: {second}, weight: 0.25}}]
        """))
    stages = plan("mixed", tmp_path / "runs", path=config)
    assert list(stages) == ["pretrain", "report"]
    outcomes = run_pipeline(load_pipeline("mixed", config), tmp_path / "runs")
    ran = {o.name: o for o in outcomes}
    assert ran["pretrain"].status == "ran" and ran["pretrain"].result["step"] == 2
    assert (stages["pretrain"].path / "pretrained.pt").is_file()


def test_pre_training_on_the_training_split_reads_its_videos_without_labels(tmp_path):
    """data.synth_pretrain_on: train feeds the tokenizer and pre-training the labelled task's
    training split (as plain files: no labels) instead of the uncurated videos."""
    from vimpac.data.inputs import collect_inputs
    from vimpac.data.synth import spec_from_config, write_corpus
    from vimpac.pipeline import RunContext, _inputs

    small = ["data.synth_classes=[move_left, move_right]", "data.synth_train_per_class=2",
             "data.synth_val_per_class=1", "data.synth_size=32", "data.synth_uncurated_videos=0"]
    with pytest.raises(Exception, match="data.synth_uncurated_videos = 0"):
        plan("demo", tmp_path, small)
    train = plan("demo", tmp_path, [*small, "data.synth_pretrain_on=train"])
    inputs = train["tokens-pretrain"].config["inputs"]
    assert inputs == {"from": "data", "dataset": "ucf101", "split": "train1", "labels": False}
    assert train["tokenizer"].config["inputs"] == inputs
    default = plan("demo", tmp_path, [*small[:-1]])
    assert default["tokens-pretrain"].config["inputs"] == {"from": "data", "path": "uncurated"}
    config = load_pipeline("demo", PACKAGED_CONFIG, [*small, "data.synth_pretrain_on=train"])
    stages = {s.name: s for s in build_plan(config, tmp_path)}
    write_corpus(stages["data"].path / "corpus", spec_from_config(config.data))
    ctx = RunContext(config, tmp_path, stages)
    for layout, tag, suffix in (("ucf101", "train1", ".avi"), ("ssv2", "train", ".webm")):
        paths = _inputs(ctx, {**inputs, "dataset": layout, "split": tag})
        assert len(paths) == 4 and all(p.endswith(suffix) for p in paths)   # 2 classes x 2
        found = collect_inputs(paths)
        assert found.dataset is None and {v.label for v in found.videos} == {-1}


def test_a_finished_stage_records_the_machine_and_thread_count_it_ran_on(tmp_path):
    import torch

    from vimpac.config import PipelineConfig
    from vimpac.pipeline import RunContext, Stage, _run_stage

    stage = Stage("toy", "toy", lambda ctx, s: {"answer": 42}, {}, key="k",
                  path=tmp_path / "toy" / "k")
    _run_stage(RunContext(PipelineConfig(name="demo"), tmp_path, {"toy": stage}), stage,
               fresh=True)
    assert stage.result() == {"answer": 42}
    machine = stage.machine()
    assert machine["torch_threads"] == torch.get_num_threads()
    assert machine["torch"] == torch.__version__ and machine["cpu"]


@pytest.mark.parametrize("record", ["{\"result\": {\"ok\": 1", "[1, 2]", "{\"seconds\": 3}",
                                    "{\"result\": [1]}", "\udcff"])
def test_a_damaged_stage_record_is_one_error_naming_the_file(tmp_path, record):
    stages = plan("demo", tmp_path)
    done = stages["data"].path / "DONE.json"
    done.parent.mkdir(parents=True)
    done.write_bytes(record.encode("utf-8", "surrogateescape"))
    with pytest.raises(PipelineError, match=r"DONE\.json: .*--force data"):
        stages["data"].result()


def test_a_damaged_stage_record_exits_2_through_the_cli(cli_runner, tmp_path):
    stages = plan("demo", tmp_path)
    done = stages["data"].path / "DONE.json"
    done.parent.mkdir(parents=True)
    done.write_text("{not json")
    result = cli_runner.invoke(cli, ["--config", str(PACKAGED_CONFIG), "run", "demo",
                                     "--dry-run", "--runs", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "DONE.json" in result.output and "Traceback" not in result.output
