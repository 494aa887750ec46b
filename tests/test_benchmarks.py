"""The benchmark harness: every benchmark yields numbers at --scale tiny; gpu_check.sh dry-runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {"tokenize", "loader", "training", "loader-memory"}


def _run(cmd, tmp_path, timeout):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
           "PYTHON": sys.executable}                 # gpu_check.sh runs this interpreter
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _finite(stat):
    return all(math.isfinite(stat[k]) for k in ("median", "min", "max")) and stat["n"] >= 1


def test_harness_tiny_writes_every_benchmark(tmp_path):
    out = tmp_path / "out"
    _run([sys.executable, "-m", "benchmarks", "--scale", "tiny", "--out", str(out),
          "--work", str(tmp_path / "work")], tmp_path, timeout=400)
    data = json.loads((out / "bench.json").read_text())
    assert data["errors"] == {}
    assert set(data["benchmarks"]) == EXPECTED
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"]
    figures = [f for b in data["benchmarks"].values() for f in b["figures"]]
    names = " | ".join(f["figure"] for f in figures)
    for needle in ("decode-only", "encode-only", "webdataset", "zarr", "on-the-fly",
                   "block mask", "MFU", "bf16", "peak RSS"):
        assert needle in names, needle
    for fig in figures:
        assert _finite(fig["value"]) and fig["value"]["median"] > 0, fig
        if fig["baseline"] is not None:
            assert _finite(fig["baseline"]) and _finite(fig["ratio"]), fig
        if fig["target"] is not None:
            assert fig["met"] in (True, False), fig
    assert sum(f["baseline"] is not None for f in figures) >= len(figures) - 1
    md = (out / "bench.md").read_text()
    assert "| benchmark | figure | value | baseline | ratio | target | met? |" in md
    assert data["machine"]["cpu"] in md
    assert not (tmp_path / "RESULTS.md").exists()      # tiny runs never overwrite RESULTS.md


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    proc = _run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out",
                 str(out)], tmp_path, timeout=400)
    data = json.loads((out / "gpu.json").read_text())
    assert data["dry_run"] is True and data["errors"] == {} and data["skipped"] == []
    tok = data["tokenize"]
    assert tok["failed"] == 0 and tok["job_src_fps"] > 0 and tok["decode_only_src_fps"] > 0
    assert tok["encoder_calls"] >= 1 and 0 < tok["encoder_busy_fraction"] < 1
    modes = {(r["preset"], r["compile"]) for r in data["pretrain"]}
    assert modes == {("tiny", "eager"), ("tiny", "layers")}
    assert all(r["clips_per_s"] > 0 and r["mfu"] > 0 for r in data["pretrain"])
    assert 0 <= data["loader"]["wait_fraction"] < 1
    kernels = data["attention"]["kernels"]
    assert set(kernels) == {"sdpa-math", "matmul"}
    assert all(k["clips_per_s"] > 0 for k in kernels.values())
    assert data["max_batch"]["largest"]["tiny"]["videos"] >= 1
    assert data["max_batch"]["at_largest"]["clips_per_s"] > 0
    assert "| kind of op | tiny bf16 |" in data["profile"]["tables"][0]
    assert "clips/s" in proc.stdout and "decode limit" in proc.stdout
    assert "FLOP/byte" in proc.stdout


@pytest.mark.parametrize("flag", ["--scale", "--only"])
def test_harness_rejects_bad_arguments(tmp_path, flag):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", flag, "nope"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_profile_step_tables_share_time_by_kind_and_count_bytes_and_flops(tmp_path):
    out = tmp_path / "profile.json"
    proc = _run([sys.executable, "-m", "benchmarks.profile_step", "--preset", "tiny", "--dtype",
                 "fp32", "--videos", "1", "--steps", "1", "--out", str(out)], tmp_path,
                timeout=300)
    assert "| kind of op | tiny fp32 |" in proc.stdout and "FLOP/byte" in proc.stdout
    (profile,) = json.loads(out.read_text())
    shares = profile["kinds_s"]
    assert {"matmul", "copy / layout", "LayerNorm", "dropout"} <= set(shares)
    assert abs(sum(shares.values()) - sum(profile["profiler_self_s"].values())) < 1e-6
    mm = profile["costs"]["aten::mm"]
    assert mm["flops"] > 0 and mm["bytes"] > 0 and mm["seconds"] > 0
    assert profile["costs"]["aten::view"]["bytes"] == 0          # views move nothing


def table7_rows():
    """Two seeds of three arms on one task: scratch 20 / 30 %, MP 30 / 50 %, MP + CL 40 / 60 %."""
    rows = []
    for arm, top1 in (("scratch", (0.2, 0.3)), ("mp", (0.3, 0.5)), ("mp+cl", (0.4, 0.6))):
        for seed, value in enumerate(top1):
            rows.append({"task": "directions", "layout": "ssv2", "seed": seed, "arm": arm,
                         "top1": value, "chance": 0.125, "steps": 100 + seed,
                         "stopped": "plateau" if seed == 0 else "budget-still-improving"})
    return rows


def test_table7_pairs_each_arms_gain_with_scratch_and_mp_plus_cl_with_mp_by_seed(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.table7 import markdown, summarise

    summary = {s["arm"]: s for s in summarise(table7_rows())}
    assert summary["scratch"]["gain_vs_scratch"] is None
    mp = summary["mp"]
    assert mp["top1"]["mean"] == pytest.approx(0.4) and mp["top1"]["n"] == 2
    assert mp["gain_vs_scratch"]["mean"] == pytest.approx(0.15)            # +10 and +20 points
    low, high = mp["gain_vs_scratch"]["ci95"]          # t(0.975, 1) = 12.706, sd 0.0707 / sqrt 2
    assert (low, high) == (pytest.approx(0.15 - 0.6353, abs=1e-3),
                           pytest.approx(0.15 + 0.6353, abs=1e-3))
    assert summary["mp+cl"]["stopped"] == {"plateau": 1, "budget-still-improving": 1}
    assert mp["gain_vs_mp"] is None and summary["scratch"]["gain_vs_mp"] is None
    assert summary["mp+cl"]["gain_vs_mp"]["mean"] == pytest.approx(0.1)    # +10 in both seeds
    lines = markdown(list(summary.values()), ["scratch", "mp", "mp+cl"], "final")
    assert lines[2] == "| arm | eight directions (ssv2) |"
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| scratch", "| MP", "| MP + CL",
                                                            "| chance"]
    assert lines[5].startswith("| MP | 40.0 [") and "; gain +15.0 [" in lines[5]
    assert "stopped: budget-still-improving 1, plateau 1" in lines[5]
    assert "; gain +25.0 [" in lines[6] and "; over MP +10.0 [+10.0, +10.0]" in lines[6]
    assert "over MP" not in lines[5]
    assert lines[-1] == "| chance | 12.5 % |"


def test_table7_fine_tunes_five_under_its_40_epoch_rule_and_directions_under_the_pipelines(
        monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.table7 import CONVERGE, Setting, overrides
    from vimpac.config import load_pipeline

    setting = Setting(None, "runs", 3, "final", False, ["finetune.epochs=2"])
    five = overrides(setting, "five", "ssv2", 0, "mp", True)
    directions = overrides(setting, "directions", "ssv2", 0, "mp", True)
    assert set(CONVERGE) <= set(five) and not set(CONVERGE) & set(directions)
    assert five[-1] == directions[-1] == "finetune.epochs=2"        # --set comes last, and wins
    rule = load_pipeline("demo-direction").finetune
    assert (rule.epochs, rule.eval_every, rule.plateau_patience, rule.plateau_min_epochs) == (
        16, 0.5, 6, 8)


def test_table7_combines_results_run_side_by_side_into_one_table(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.table7 import main

    ssv2 = table7_rows()
    ucf101 = [{**r, "layout": "ucf101", "top1": r["top1"] / 2} for r in ssv2]
    for name, rows in (("a.json", ssv2), ("b.json", ucf101)):
        (tmp_path / name).write_text(json.dumps({"complete": True, "rows": rows}))
    out = tmp_path / "t.json"
    main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)])
    table = capsys.readouterr().out
    assert "| arm | eight directions (ssv2) | eight directions (ucf101) |" in table
    assert "| MP | 40.0 [" in table and "| 20.0 [" in table
    assert len(json.loads(out.read_text())["rows"]) == 12


def test_table7_refuses_to_combine_files_run_with_other_settings(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.table7 import main

    rows = table7_rows()
    setting = {"corpus_seed": 3, "checkpoint": "final", "extra": ["finetune.epochs=8"],
               "runs": "a", "seeds": [0]}
    parts = {"a.json": (setting, rows[:3]),
             "b.json": ({**setting, "runs": "b", "seeds": [1]}, rows[3:]),  # per part: fine
             "c.json": ({**setting, "extra": ["finetune.epochs=16"]}, rows[3:])}
    for name, (s, r) in parts.items():
        (tmp_path / name).write_text(json.dumps({"complete": True, "setting": s, "rows": r}))
    out = tmp_path / "t.json"
    main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)])
    assert [s["runs"] for s in json.loads(out.read_text())["settings"]] == ["a", "b"]
    with pytest.raises(SystemExit, match=r"c.json: ran with other settings than .*a.json "
                                          r"\(extra: \['finetune.epochs=8'\] against "):
        main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(out)])


def minimum_files(tmp_path, new_rows, old_rows, extra=("finetune.plateau_min_epochs=8",),
                  old_extra=()):
    setting = {"corpus_seed": 3, "checkpoint": "final", "extra": list(old_extra), "runs": "a",
               "arms": []}
    (tmp_path / "old.json").write_text(json.dumps({"complete": True, "setting": setting,
                                                   "rows": old_rows}))
    (tmp_path / "new.json").write_text(json.dumps({
        "complete": True, "setting": {**setting, "extra": list(extra), "arms": ["scratch"]},
        "rows": new_rows}))
    return ["--combine", str(tmp_path / "new.json"), "--over", str(tmp_path / "old.json"),
            "--out", str(tmp_path / "t.json")]


def test_table7_over_keeps_the_runs_a_minimum_budget_cannot_change_and_refuses_the_rest(
        tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.table7 import main

    old = [{**r, "stopped_step": 50 if r["arm"] == "scratch" else 90} for r in table7_rows()]
    old[-1]["stopped_step"] = 80                       # MP + CL seed 1: stopped at the minimum
    rerun = [{**r, "min_step": 80, "stopped_step": 80} for r in old if r["arm"] == "scratch"]
    rerun[0]["top1"] = 0.35                            # scratch seed 0 learned with the minimum
    rerun.append({**old[4], "min_step": 80})           # MP + CL seed 0, stopped later: the same
    main(minimum_files(tmp_path, rerun, old))
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["min_step"] == 80 and result["rerun_changed"] == [
        ["directions", "ssv2", 0, "scratch"], ["directions", "ssv2", 1, "scratch"]]
    assert result["rerun_same_as_before"] == [["directions", "ssv2", 0, "mp+cl"]]
    assert len(result["kept"]) == 3 and len(result["rows"]) == 6
    assert {r["source"] for r in result["rows"] if r["arm"] == "scratch"} == {"rerun"}
    gains = {s["arm"]: s["gain_vs_scratch"]["mean"] for s in result["summary"]
             if s["gain_vs_scratch"]}
    assert gains["mp+cl"] == pytest.approx(((0.4 - 0.35) + (0.6 - 0.3)) / 2)  # the new scratch
    out = capsys.readouterr().out
    assert "no plateau stop before update 80; 3 runs of" in out
    assert "1 the same as before, 2 changed" in out
    early = [dict(r) for r in old]
    early[2]["stopped_step"] = 79                      # MP seed 0 stopped before the minimum
    with pytest.raises(SystemExit, match=r"old.json: \('directions', 'ssv2', 0, 'mp'\) stopped "
                                         r"at update 79, before the minimum budget's update 80"):
        main(minimum_files(tmp_path, rerun, early))
    with pytest.raises(SystemExit, match="differ from it by more than finetune.plateau_min_epo"):
        main(minimum_files(tmp_path, rerun, old, extra=["finetune.epochs=8"]))
    with pytest.raises(SystemExit, match="do not share one minimum budget .*min_step: 0"):
        main(minimum_files(tmp_path, [{**r, "min_step": 0} for r in rerun], old))
    with pytest.raises(SystemExit, match=r"old.json: \('directions', 'ssv2', 0, 'scratch'\) ran "
                                         r"with a minimum budget at update 80, not below"):
        main(minimum_files(tmp_path, rerun, [{**r, "min_step": 80} for r in old]))


def test_table7_over_takes_the_minimum_from_the_runs_however_it_was_set(tmp_path, monkeypatch):
    """The pipeline's own minimum against a result run with --set ...=0: the same overlay."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.table7 import main

    old = [{**r, "stopped_step": 50 if r["arm"] == "scratch" else 90} for r in table7_rows()]
    rerun = [{**r, "min_step": 80, "stopped_step": 80} for r in old if r["arm"] == "scratch"]
    main(minimum_files(tmp_path, rerun, old, extra=(),
                       old_extra=["finetune.plateau_min_epochs=0"]))
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["min_step"] == 80 and len(result["kept"]) == 4 and len(result["rows"]) == 6
    with pytest.raises(SystemExit, match="--over goes with --combine"):
        main(["--over", str(tmp_path / "old.json")])


ROW = {"task": "directions", "layout": "ssv2", "seed": 0, "arm": "scratch", "top1": 0.2,
       "chance": 0.125, "stopped": "plateau", "steps": 100}


@pytest.mark.parametrize("content, message", [
    ({"complete": False, "rows": []}, "has not finished"),
    ({"complete": True}, "not a table7 result"),
    ([{"complete": True}], "not a table7 result"),
    ({"complete": True, "rows": 5}, "not a table7 result .*rows is a int"),
    ({"complete": True, "rows": [{"task": "directions"}]}, "a row without 'layout'"),
    ({"complete": True, "rows": [7]}, "a row is a int, not an object"),
    ({"complete": True, "rows": [{**ROW, "seed": [0]}]}, r"'seed' is \[0\], not a whole number"),
    ({"complete": True, "rows": [{**ROW, "top1": "x"}]}, "'top1' is 'x', not a number"),
    ({"complete": True, "rows": [{**ROW, "top1": 7.5}]}, "outside 0..1"),
    ({"complete": True, "rows": [{**ROW, "arm": "mae"}]}, "'arm' is 'mae', not one of scratch"),
    ({"complete": True, "rows": [{**ROW, "corpus_seed": [6]}]}, "'corpus_seed' is \\[6\\]"),
    ({"complete": True, "setting": ["x"], "rows": []}, "its setting is a list, not an object"),
])
def test_table7_refuses_to_combine_an_unfinished_or_foreign_file(tmp_path, monkeypatch, content,
                                                                  message):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.table7 import main

    (tmp_path / "a.json").write_text(json.dumps(content))
    with pytest.raises(SystemExit, match=message):
        main(["--combine", str(tmp_path / "a.json"), "--out", str(tmp_path / "t.json")])


def test_table7_as_a_command_says_bad_input_in_one_line_with_exit_2(tmp_path):
    (tmp_path / "a.json").write_text('{"complete": tr')                   # truncated
    done = subprocess.run([sys.executable, "-m", "benchmarks.table7", "--combine",
                           str(tmp_path / "a.json"), "--out", str(tmp_path / "t.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"{tmp_path / 'a.json'}: not a table7 result "
                                        "(Expecting value: line 1 column 14 (char 13))"]


def test_table7_refuses_to_combine_the_same_run_twice(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.table7 import main

    (tmp_path / "a.json").write_text(json.dumps({"complete": True, "rows": table7_rows()}))
    with pytest.raises(SystemExit, match="in more than one file"):
        main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "a.json"),
              "--out", str(tmp_path / "t.json")])


def test_table7_pools_corpora_pairing_each_gain_within_its_corpus_and_seed(
        tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.table7 import main

    setting = {"corpus_seed": 5, "checkpoint": "final", "extra": [], "runs": "a"}
    five = [{**r, "corpus_seed": 5} for r in table7_rows()]
    # corpus 6: scratch 50 / 60 %, so the pre-trained arms gain -20 and -10 (MP)
    six = [{**r, "corpus_seed": 6, "top1": r["top1"] + (0.3 if r["arm"] == "scratch" else 0)}
           for r in table7_rows()]
    for name, corpus, rows in (("c5.json", 5, five), ("c6.json", 6, six)):
        (tmp_path / name).write_text(json.dumps({
            "complete": True, "setting": {**setting, "corpus_seed": corpus}, "rows": rows}))
    files = [str(tmp_path / "c5.json"), str(tmp_path / "c6.json")]
    out = tmp_path / "t.json"
    with pytest.raises(SystemExit, match=r"c6.json: ran with other settings .*corpus_seed: 5 "):
        main(["--combine", *files, "--out", str(out)])
    main(["--combine", *files, "--pool-corpora", "--out", str(out)])
    summary = {s["arm"]: s for s in json.loads(out.read_text())["summary"]}
    mp = summary["mp"]
    assert mp["top1"]["n"] == 4 and mp["corpus_seeds"] == [5, 6]
    assert mp["gain_vs_scratch"]["mean"] == pytest.approx((0.1 + 0.2 - 0.2 - 0.1) / 4)
    assert summary["mp+cl"]["gain_vs_mp"]["mean"] == pytest.approx(0.1)
    table = capsys.readouterr().out
    assert "mean of 4 runs, seeds on corpus seeds 5, 6" in table and "by corpus and seed" in table
    (tmp_path / "c6b.json").write_text(json.dumps({
        "complete": True, "setting": {**setting, "corpus_seed": 6, "extra": ["x=1"]},
        "rows": six}))
    with pytest.raises(SystemExit, match=r"c6b.json: ran with other settings"):
        main(["--combine", files[0], str(tmp_path / "c6b.json"), "--pool-corpora",
              "--out", str(out)])


TABLE7_TINY = [
    "data.synth_train_per_class=4", "data.synth_val_per_class=2", "data.synth_size=32",
    "data.synth_uncurated_videos=0", "data.synth_pretrain_on=train",
    "tokenizer.codebook_size=32", "tokenizer.channels=8", "tokenizer.image_size=32",
    "tokenizer.frames_per_video=4", "tokenizer.steps=2", "tokenizer.batch_size=4",
    "tokenizer.checkpoint_every=2", "tokenize.shorter_side=32", "tokenize.size=32",
    "tokenize.decode_workers=0", "tokenize.batch_frames=32", "pretrain.model=bench-test",
    "pretrain.grid=4", "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.micro_batch=4",
    "pretrain.proj_hidden=16", "pretrain.checkpoint_every=2", "finetune.grid=4",
    "finetune.epochs=3", "finetune.plateau_min_epochs=1", "finetune.batch_size=8",
    "finetune.micro_batch=8", "finetune.view_scales=[1.0]", "finetune.view_crops=[center]",
    "finetune.val_fraction=0.25", "finetune.plateau_patience=1", "evaluate.test_clips=1"]


@pytest.mark.slow
def test_table7_runs_every_arm_and_task_through_the_pipeline(tmp_path, monkeypatch, capsys):
    """Tiny budgets: the table has a row per arm, a column per task, and the JSON a row per
    (task, seed, arm) with why its fine-tuning stopped."""
    import dataclasses

    from vimpac.pretrain.model import PRESETS

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setitem(PRESETS, "bench-test", dataclasses.replace(
        PRESETS["tiny"], layers=1, dim=32, heads=2, mlp_dim=64))
    from benchmarks.table7 import main

    out = tmp_path / "table7.json"
    argv = ["--seeds", "0,1", "--corpus-seed", "5", "--runs", str(tmp_path / "runs"),
            "--out", str(out)]
    main(argv + [arg for s in TABLE7_TINY for arg in ("--set", s)])
    data = json.loads(out.read_text())
    assert data["complete"] and data["setting"]["corpus_seed"] == 5
    assert data["machine"]["torch_threads"] >= 1 and data["machine"]["cpu"]
    keys = {(r["task"], r["seed"], r["arm"]) for r in data["rows"]}
    assert keys == {(t, s, a) for t in ("five", "directions") for s in (0, 1)
                    for a in ("scratch", "mp", "mp+cl")}
    for row in data["rows"]:
        assert row["corpus_seed"] == 5 and row["pretrain_seed"] == row["seed"]
        assert row["evaluated"] == "final" and row["layout"] == "ssv2"
        assert row["stopped"] in ("plateau", "budget", "budget-still-improving")
        assert row["stopped_step"] == row["steps"] <= row["total_steps"]
        assert 0 <= row["top1"] <= 1 and row["stage_seconds"]["evaluate" if row["arm"] != "scratch"
                                                              else "evaluate-scratch"] > 0
    chance = {r["task"]: r["chance"] for r in data["rows"]}
    assert chance == {"five": 0.2, "directions": 0.125}
    table = capsys.readouterr().out
    assert "| arm | five kinds of motion (ssv2) | eight directions (ssv2) |" in table
    for arm in ("scratch", "MP", "MP + CL"):
        assert f"\n| {arm} | " in table
    assert "| chance | 20.0 % | 12.5 % |" in table and "; gain " in table
    alone = tmp_path / "scratch.json"                    # the scratch arm alone: the same runs
    main(["--tasks", "directions", "--arms", "scratch", "--out", str(alone)] + argv[:-2]
         + [arg for s in TABLE7_TINY for arg in ("--set", s)])
    again = {r["seed"]: r for r in json.loads(alone.read_text())["rows"]}
    for row in data["rows"]:
        if row["task"] == "directions" and row["arm"] == "scratch":
            assert (again[row["seed"]]["top1"], again[row["seed"]]["stopped_step"]) \
                == (row["top1"], row["stopped_step"])


def test_arrow_of_time_clips_differ_only_by_the_order_of_their_frames(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))

    from benchmarks.arrow_of_time import OBJECT_CODES, direction_clips

    clips, labels = direction_clips(64, (5, 8, 8), 512, torch.Generator().manual_seed(0))
    assert clips.shape == (64, 5, 8, 8) and set(labels.tolist()) == {0, 1}
    for clip, label in zip(clips, labels, strict=True):
        is_object = clip < OBJECT_CODES                                       # [T, H, W]
        assert is_object.flatten(1).sum(1).tolist() == [4] * 5              # one 2x2 object
        columns = [int(torch.nonzero(frame)[:, 1].min()) for frame in is_object]
        step = 1 if label == 1 else -1                                      # 1 = right
        assert columns == [columns[0] + step * t for t in range(5)]
        assert torch.equal(clip[is_object].view(5, 4)[0].repeat(5, 1),      # same object codes
                           clip[is_object].view(5, 4))
        assert torch.equal(clip[0][~is_object[0] & ~is_object[-1]],         # a still background
                           clip[-1][~is_object[0] & ~is_object[-1]])
        reverse = clip.flip(0)                                              # the other class
        back = [int(torch.nonzero(f < OBJECT_CODES)[:, 1].min()) for f in reverse]
        assert back == columns[::-1]
    # both classes visit the same cells: the first frame's column of one is the last's of the other
    firsts = {int(lab): set() for lab in labels}
    for clip, label in zip(clips, labels, strict=True):
        firsts[int(label)].add(int(torch.nonzero(clip[0] < OBJECT_CODES)[:, 1].min()))
    assert firsts[1] == {0, 1, 2} and firsts[0] == {4, 5, 6}


def test_arrow_of_time_train_clips_go_through_one_fixed_set_per_seed_in_shuffled_epochs(
        monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.arrow_of_time import Settings, clip_stream, direction_clips

    fresh = clip_stream(Settings(batch=4), 0, torch.Generator().manual_seed(7))
    same = direction_clips(4, Settings().grid, 512, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(fresh(), same, strict=True))  # as before

    def batches(seed: int, order: int, n: int) -> tuple[list[bytes], torch.Tensor]:
        draw = clip_stream(Settings(batch=4, train_clips=6), seed,
                           torch.Generator().manual_seed(order))
        drawn = [draw() for _ in range(n)]
        clips = torch.cat([c for c, _ in drawn])
        labels = torch.cat([y for _, y in drawn])
        for clip, label in zip(clips, labels, strict=True):  # each clip keeps its own label
            first = int(torch.nonzero(clip[0] < 8)[:, 1].min())
            last = int(torch.nonzero(clip[-1] < 8)[:, 1].min())
            assert (last > first) == bool(label)
        return [c.numpy().tobytes() for c in clips], labels

    tuning, _ = batches(0, order=0, n=3)            # 12 clips: two epochs of the 6
    assert len(set(tuning)) == 6 and all(tuning.count(c) == 2 for c in tuning)
    assert len(set(tuning[:6])) == 6               # the first epoch has every clip once
    pretraining, _ = batches(0, order=10_000, n=3)
    assert set(pretraining) == set(tuning) and pretraining != tuning  # same set, other order
    assert not set(batches(1, order=0, n=3)[0]) & set(tuning)         # another seed, other set


def test_arrow_of_time_reads_results_from_before_a_setting_and_refuses_unknown_ones(
        tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.arrow_of_time import main, read_result

    out = tmp_path / "old.json"
    common = ["--arms", "conv3d", "--seeds", "0", "--steps", "2", "--eval-every", "2",
              "--val-clips", "8", "--batch", "2", "--out", str(out)]
    assert main(common) == 0
    data = json.loads(out.read_text())
    del data["settings"]["train_clips"]            # as files written before it existed
    out.write_text(json.dumps(data))
    assert read_result(out)["settings"]["train_clips"] == 0
    assert main(common) == 0                       # continues: the same settings
    with pytest.raises(SystemExit, match="old.json: written with other settings"):
        main([*common, "--train-clips", "16"])
    data["settings"]["colour"] = 1
    out.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="old.json: not an arrow_of_time result .settings "
                                         "'colour' unknown"):
        main(["--combine", str(out), "--out", str(tmp_path / "all.json")])
    with pytest.raises(SystemExit):
        main([*common[:-2], "--train-clips", "-1", "--out", str(tmp_path / "new.json")])


def test_arrow_of_time_moving_code_accuracy_counts_the_last_hundred_updates(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.arrow_of_time import _moving_tail

    assert _moving_tail([(0, 50)] + [(1, 4), (3, 4)] * 50) == 0.5     # the first update is out
    assert _moving_tail([(0, 0)]) is None                               # nothing moving masked


def test_arrow_of_time_trains_every_arm_and_writes_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.arrow_of_time import ARMS, main

    out = tmp_path / "arrow.json"
    assert main(["--seeds", "0,1", "--steps", "3", "--pretrain-steps", "2", "--eval-every", "2",
                 "--val-clips", "16", "--batch", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["machine"]["cpu"]
    assert [(r["arm"], r["seed"]) for r in result["runs"]] == [
        (arm, seed) for seed in (0, 1) for arm in ARMS]
    for run in result["runs"]:
        assert [step for step, _ in run["curve"]] == [0, 2, 3]
        assert all(0.0 <= acc <= 1.0 for _, acc in run["curve"])
        assert run["final_acc"] == run["curve"][-1][1]
    assert result["runs"][1]["pretrain_steps"] == 2                     # the pretrained arm
    assert 0.0 <= result["runs"][1]["mlm_acc_moving_last100"] <= 1.0
    assert result["summary"]["conv3d"]["final_acc"]["n"] == 2
    printed = capsys.readouterr().out
    assert "| scratch | " in printed and "chance 50 %" in printed


def test_arrow_of_time_combines_arms_run_side_by_side_and_refuses_a_repeat(tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.arrow_of_time import main

    common = ["--steps", "2", "--eval-every", "2", "--val-clips", "8", "--batch", "2"]
    for arm in ("scratch", "conv3d"):
        assert main(["--arms", arm, "--seeds", "0", *common,
                     "--out", str(tmp_path / f"{arm}.json")]) == 0
    parts = [str(tmp_path / "scratch.json"), str(tmp_path / "conv3d.json")]
    assert main(["--combine", *parts, "--out", str(tmp_path / "all.json")]) == 0
    result = json.loads((tmp_path / "all.json").read_text())
    assert [r["arm"] for r in result["runs"]] == ["scratch", "conv3d"]
    assert set(result["summary"]) == {"scratch", "conv3d"} and len(result["machines"]) == 2
    assert "| conv3d | " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="in more than one file"):
        main(["--combine", parts[0], parts[0], "--out", str(tmp_path / "twice.json")])
    (tmp_path / "bad.json").write_text('{"benchmark": "table7"}')
    with pytest.raises(SystemExit, match="bad.json: not an arrow_of_time result"):
        main(["--combine", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.json")])
    again = main(["--combine", str(tmp_path / "all.json"), "--out", str(tmp_path / "re.json")])
    assert again == 0 and len(json.loads((tmp_path / "re.json").read_text())["machines"]) == 2


def test_arrow_of_time_tests_learning_more_often_than_scratch_with_fishers_exact_test(
        monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.arrow_of_time import fisher_one_sided, summarise

    assert fisher_one_sided(4, 5, 0, 5) == pytest.approx(6 / 252)    # C(4,4) C(6,1) / C(10,5)
    assert fisher_one_sided(3, 3, 0, 3) == pytest.approx(1 / 20)
    assert fisher_one_sided(0, 3, 0, 3) == 1.0 and fisher_one_sided(1, 2, 2, 2) == 1.0
    rows = [{"arm": arm, "seed": seed, "final_acc": 1.0 if learned else 0.5,
             "learned_at": 200 if learned else None}
            for arm, outcomes in (("scratch", (0, 0, 0)), ("pretrained", (1, 1, 0)))
            for seed, learned in enumerate(outcomes)]
    summary = summarise(rows, ["scratch", "pretrained"])
    assert "learned_vs_scratch_p" not in summary["scratch"]
    assert summary["pretrained"]["learned_vs_scratch_p"] == pytest.approx(0.2)
    assert summary["pretrained"]["learned"] == 2


def test_arrow_of_time_run_again_keeps_finished_runs_and_refuses_a_foreign_out(tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.arrow_of_time as arrow

    out = tmp_path / "arrow.json"
    common = ["--steps", "2", "--eval-every", "2", "--val-clips", "8", "--batch", "2",
              "--out", str(out)]
    assert arrow.main(["--arms", "scratch,conv3d", "--seeds", "0", *common]) == 0
    first = json.loads(out.read_text())["runs"]
    trained: list[tuple[str, int]] = []
    run_arm = arrow.run_arm
    monkeypatch.setattr(arrow, "run_arm", lambda arm, seed, settings: trained.append(
        (arm, seed)) or run_arm(arm, seed, settings))
    assert arrow.main(["--arms", "scratch,conv3d", "--seeds", "0,1", *common]) == 0
    assert trained == [("scratch", 1), ("conv3d", 1)]                 # seed 0 was not redone
    result = json.loads(out.read_text())
    assert result["complete"] and result["runs"][:2] == first and len(result["runs"]) == 4
    assert "continuing, 2 finished run(s) kept" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="arrow.json: written with other settings"):
        arrow.main(["--arms", "scratch", "--seeds", "0", *common, "--lr", "0.1"])
    out.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="arrow.json: not an arrow_of_time result"):
        arrow.main(["--arms", "scratch", "--seeds", "0", *common])
