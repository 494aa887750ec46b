"""`vimpac run --jobs N`: independent stages run at once, each in its own process, and a stage
starts only once every stage it reads is done; a child's progress, logs and errors reach the
parent as if the stage ran there."""

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest

import vimpac.pipeline as pipeline
from vimpac.common.errors import VimpacError
from vimpac.common.processes import ChildFailed
from vimpac.config import PipelineConfig
from vimpac.pipeline import PipelineError, Stage, run_pipeline

log = logging.getLogger("toy-stage")


# Stage functions run in child processes: module level, so that they pickle by name.

def sleepy(ctx, stage):
    """Records when it ran and which thread count it had; reads what its needs wrote."""
    import torch

    start = time.time()
    task = ctx.progress.task("sleeping", total=2, unit="naps")
    for _ in range(2):
        time.sleep(stage.config.get("seconds", 0.3))
        task.advance(1)
    task.close()
    log.info("%s slept", stage.name)
    seen = {n: ctx.result(n)["name"] for n in stage.needs}
    return {"name": stage.name, "start": start, "end": time.time(), "pid": os.getpid(),
            "threads": torch.get_num_threads(), "seen": seen}


def reports(ctx, stage):
    out = sleepy(ctx, stage)
    return {**out, "report": str(stage.path / "report.md"), "rows": [["d", "slept", "yes"]]}


def refuses(ctx, stage):
    raise PipelineError(f"{stage.name}: bad input /data/x.mp4")


class Unpicklable(VimpacError):
    def __init__(self, path, why):              # pickling calls __init__ with one argument
        super().__init__(f"{path}: {why}")


def refuses_oddly(ctx, stage):
    raise Unpicklable("/data/y.webm", "not a video")


def breaks(ctx, stage):
    raise ZeroDivisionError("an invariant broke")


def lingers(ctx, stage):
    time.sleep(60)
    return {"name": stage.name}


def dies(ctx, stage):
    os.kill(os.getpid(), signal.SIGKILL)


def toy_plan(tmp_path, monkeypatch, fns=None, seconds=0.3, same=()):
    """a -> (b, c) -> d, and the report after them all; stages named in ``same`` have one key."""
    fns = {"report": reports, **(fns or {})}
    needs = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "report": []}

    def build_plan(config, runs):
        stages = [Stage(name, "toy", fns.get(name, sleepy),
                        {"seconds": seconds, "pipeline": "toy",
                         "n": "same" if name in same else name}, deps)
                  for name, deps in needs.items()]
        pipeline._assign_keys(stages, Path(runs))
        return stages

    monkeypatch.setattr(pipeline, "build_plan", build_plan)
    return PipelineConfig(name="toy")


def test_independent_stages_overlap_and_a_stage_waits_for_what_it_reads(tmp_path, monkeypatch):
    config = toy_plan(tmp_path, monkeypatch, seconds=0.5)
    finished = []
    outcomes = run_pipeline(config, tmp_path, jobs=2, on_stage=lambda o: finished.append(o.name))
    assert [o.name for o in outcomes] == ["a", "b", "c", "d", "report"]   # plan order
    assert finished[0] == "a" and finished[-2:] == ["d", "report"]
    r = {o.name: o.result for o in outcomes}
    assert all(o.status == "ran" for o in outcomes)
    assert r["b"]["start"] < r["c"]["end"] and r["c"]["start"] < r["b"]["end"]   # at once
    assert r["b"]["start"] >= r["a"]["end"] and r["c"]["start"] >= r["a"]["end"]
    assert r["d"]["start"] >= max(r["b"]["end"], r["c"]["end"])
    assert r["d"]["seen"] == {"b": "b", "c": "c"}
    assert len({r[n]["pid"] for n in "abcd"} | {os.getpid()}) == 5     # each in its own process
    import torch

    cores = torch.get_num_threads()
    assert {n: r[n]["threads"] for n in "abcd"} == {"a": cores, "b": max(1, cores // 2),
                                                    "c": max(1, cores // 2), "d": cores}
    done = json.loads((outcomes[3].path / "DONE.json").read_text())
    assert done["result"]["name"] == "d"
    again = run_pipeline(config, tmp_path, jobs=2)
    assert [o.status for o in again] == ["reused"] * 4 + ["ran"]


def test_a_stage_that_can_run_beside_another_gets_its_share_of_the_cores(tmp_path):
    """Fixed by the plan, not by timing: a rerun or a resumed stage gets the same count."""
    from vimpac.common.config import PACKAGED_CONFIG
    from vimpac.config import load_pipeline
    from vimpac.pipeline import build_plan, threads_of

    stages = build_plan(load_pipeline("demo-direction", PACKAGED_CONFIG), tmp_path)
    threads = threads_of(stages, jobs=2, cores=8)
    assert {n for n, t in threads.items() if t == 8} == {"data", "tokenizer", "report"}
    assert {n for n, t in threads.items() if t == 4} == {
        "tokens-pretrain", "tokens-finetune", "pretrain", "finetune", "evaluate",
        "finetune-scratch", "evaluate-scratch", "probes"}
    assert set(threads_of(stages, jobs=4, cores=2).values()) == {1, 2}


def test_one_job_runs_every_stage_in_this_process(tmp_path, monkeypatch):
    config = toy_plan(tmp_path, monkeypatch, seconds=0.01)
    outcomes = run_pipeline(config, tmp_path, jobs=1)
    assert {o.result["pid"] for o in outcomes if o.name != "report"} == {os.getpid()}


def test_a_childs_progress_and_logs_reach_the_parent(tmp_path, monkeypatch, caplog):
    config = toy_plan(tmp_path, monkeypatch, seconds=0.01)
    calls = []

    class Recorder:
        def task(self, description, total=None, unit=""):
            calls.append(("task", description, total, unit))
            return self

        def advance(self, n=1, **fields):
            calls.append(("advance", n))

        def update(self, **fields):
            calls.append(("update", fields))

        def close(self):
            calls.append(("close",))

    with caplog.at_level(logging.INFO):
        run_pipeline(config, tmp_path, jobs=2, progress=Recorder())
    assert ("task", "b: sleeping", 2, "naps") in calls
    assert calls.count(("advance", 1)) == 2 * 5                    # a, b, c, d and the report
    assert "b: b slept" in caplog.text and "d: d slept" in caplog.text


def test_an_input_error_in_a_child_is_the_same_one_line_error(tmp_path, monkeypatch):
    config = toy_plan(tmp_path, monkeypatch, fns={"c": refuses}, seconds=0.01)
    with pytest.raises(PipelineError, match=r"^c: bad input /data/x\.mp4$") as info:
        run_pipeline(config, tmp_path, jobs=2)
    assert isinstance(info.value, VimpacError)


def test_an_input_error_that_does_not_pickle_is_still_an_input_error(tmp_path, monkeypatch):
    config = toy_plan(tmp_path, monkeypatch, fns={"b": refuses_oddly}, seconds=0.01)
    with pytest.raises(VimpacError, match=r"^/data/y\.webm: not a video$"):
        run_pipeline(config, tmp_path, jobs=2)


def test_a_bug_in_a_child_keeps_its_traceback_and_stops_the_others(tmp_path, monkeypatch):
    config = toy_plan(tmp_path, monkeypatch, fns={"b": lingers, "c": breaks}, seconds=0.01)
    start = time.time()
    with pytest.raises(ChildFailed, match="ZeroDivisionError: an invariant broke") as info:
        run_pipeline(config, tmp_path, jobs=2)
    assert "Traceback" in str(info.value) and "in breaks" in str(info.value)
    assert not isinstance(info.value, VimpacError)
    stages = {s.name: s for s in pipeline.build_plan(config, tmp_path)}
    assert not stages["b"].done() and not stages["d"].done()   # b stopped, d never started
    assert time.time() - start < 40                              # b's minute was not waited for


def test_a_child_killed_by_a_signal_is_named_with_its_signal(tmp_path, monkeypatch):
    config = toy_plan(tmp_path, monkeypatch, fns={"b": dies}, seconds=0.01)
    with pytest.raises(ChildFailed, match=r"b: its process ended with signal SIGKILL"):
        run_pipeline(config, tmp_path, jobs=2)
    config = toy_plan(tmp_path, monkeypatch, seconds=0.01)     # its lock died with it
    outcomes = {o.name: o.status for o in run_pipeline(config, tmp_path, jobs=2)}
    assert outcomes["a"] == "reused" and outcomes["b"] == outcomes["d"] == "ran"


@pytest.mark.parametrize("jobs", [1, 2])
def test_two_stages_with_one_output_build_it_once(tmp_path, monkeypatch, jobs):
    config = toy_plan(tmp_path, monkeypatch, same=("b", "c"))
    outcomes = {o.name: o for o in run_pipeline(config, tmp_path, jobs=jobs)}
    assert outcomes["b"].path == outcomes["c"].path
    assert sorted(outcomes[n].status for n in "bc") == ["ran", "reused"]
    assert outcomes["b"].result == outcomes["c"].result


def test_two_runs_on_one_runs_folder_build_each_output_once(tmp_path, monkeypatch):
    import threading

    config = toy_plan(tmp_path, monkeypatch, seconds=0.2)
    results = []
    runs = [threading.Thread(target=lambda: results.append(run_pipeline(config, tmp_path)))
            for _ in range(2)]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join()
    for name in "abcd":
        statuses = sorted(o.status for r in results for o in r if o.name == name)
        assert statuses == ["ran", "reused"], (name, statuses)


def test_jobs_must_be_at_least_one(tmp_path, monkeypatch):
    config = toy_plan(tmp_path, monkeypatch)
    with pytest.raises(PipelineError, match="--jobs 0"):
        run_pipeline(config, tmp_path, jobs=0)


def test_the_cli_runs_stages_at_once_and_a_childs_input_error_exits_2(cli_runner, tmp_path,
                                                                      monkeypatch):
    from vimpac.cli import cli

    toy_plan(tmp_path, monkeypatch, seconds=0.01)
    result = cli_runner.invoke(cli, ["run", "demo", "--jobs", "2", "--runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "running up to 2 stages at once" in result.output
    assert "d: ran" in result.output and "d: d slept" in result.output
    toy_plan(tmp_path, monkeypatch, fns={"d": refuses}, seconds=0.02)
    result = cli_runner.invoke(cli, ["run", "demo", "-j", "2", "--runs", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "error: d: bad input /data/x.mp4" in result.output
    assert "Traceback" not in result.output
    result = cli_runner.invoke(cli, ["run", "demo", "-j", "0", "--runs", str(tmp_path)])
    assert result.exit_code == 2 and "--jobs" in result.output


TINY = [
    "data.synth_train_per_class=4", "data.synth_val_per_class=2", "data.synth_size=32",
    "data.synth_uncurated_videos=0", "data.synth_pretrain_on=train",
    "tokenizer.codebook_size=32", "tokenizer.channels=8", "tokenizer.image_size=32",
    "tokenizer.frames_per_video=4", "tokenizer.steps=2", "tokenizer.batch_size=4",
    "tokenizer.checkpoint_every=2", "tokenize.shorter_side=32", "tokenize.size=32",
    "tokenize.decode_workers=0", "tokenize.batch_frames=32", "pretrain.grid=4",
    "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.micro_batch=4",
    "pretrain.proj_hidden=16", "pretrain.checkpoint_every=2", "finetune.grid=4",
    "finetune.epochs=2", "finetune.plateau_min_epochs=1", "finetune.batch_size=8",
    "finetune.micro_batch=8", "finetune.view_scales=[1.0]", "finetune.view_crops=[center]",
    "finetune.val_fraction=0.25", "evaluate.test_clips=1"]


@pytest.mark.slow
def test_demo_direction_runs_end_to_end_with_two_jobs(cli_runner, tmp_path):
    """The real stages in child processes: pre-training beside fine-tuning from scratch, both
    arms evaluated and reported; run again, every stage is reused."""
    from vimpac.cli import cli

    sets = [arg for s in TINY for arg in ("--set", s)]
    argv = [*sets, "run", "demo-direction", "-j", "2", "--runs", str(tmp_path)]
    result = cli_runner.invoke(cli, argv)
    assert result.exit_code == 0, result.output
    for stage in ("pretrain", "finetune-scratch", "evaluate", "evaluate-scratch", "probes"):
        assert f"{stage}: ran" in result.output
    report = (tmp_path / "reports" / "demo-direction" / "report.md").read_text()
    assert "from scratch" in report and "fine-tuned from pre-training" in report
    again = cli_runner.invoke(cli, argv)
    assert again.exit_code == 0 and again.output.count(": reused") == 10, again.output
