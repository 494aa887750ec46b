"""The run report: what its results table says about pre-trained vs scratch."""

from dataclasses import dataclass, field
from pathlib import Path

from vimpac.report import plot_comparison, results_table


@dataclass
class FakeStage:
    path: Path
    outcome: dict = field(default_factory=dict)
    where: dict | None = None

    def done(self) -> bool:
        return True

    def result(self) -> dict:
        return self.outcome

    def machine(self) -> dict | None:
        return self.where


@dataclass
class FakeContext:
    stages: dict

    def path(self, name: str) -> Path:
        return self.stages[name].path


def evaluated(tmp_path, pre, scratch, classes=5):
    per_class = [0.5] * classes
    return FakeContext({
        "evaluate": FakeStage(tmp_path, {"top1": pre, "top5": 1.0, "per_class": per_class}),
        "evaluate-scratch": FakeStage(tmp_path, {"top1": scratch, "top5": 1.0,
                                                 "per_class": per_class})})


def test_table_states_the_gain_and_chance(tmp_path):
    rows = results_table(evaluated(tmp_path, 0.4, 0.275))
    assert ("fine-tuned from pre-training", "top-1 (multi-view)", "40.0%") in rows
    assert ("from scratch", "top-1 (multi-view)", "27.5%") in rows
    assert ("pre-trained - scratch", "top-1 gain", "+12.5 points") in rows
    assert ("chance (1 / classes)", "top-1", "20.0%") in rows


def test_scratch_ahead_shows_a_negative_gain(tmp_path):
    rows = results_table(evaluated(tmp_path, 0.2, 0.25, classes=8))
    assert ("pre-trained - scratch", "top-1 gain", "-5.0 points") in rows
    assert ("chance (1 / classes)", "top-1", "12.5%") in rows


def test_one_arm_has_no_gain_row(tmp_path):
    ctx = evaluated(tmp_path, 0.4, 0.3)
    del ctx.stages["evaluate-scratch"]
    rows = results_table(ctx)
    assert not any(figure == "top-1 gain" for _, figure, _ in rows)
    assert plot_comparison(ctx, tmp_path) is None


def test_comparison_png_is_written(tmp_path):
    png = plot_comparison(evaluated(tmp_path, 0.4, 0.275), tmp_path)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@dataclass
class FakeRun(FakeContext):
    config: object = None


def test_mask_picture_draws_the_selected_strategy_over_real_frames(tiny_tokenizer, tmp_path):
    from conftest import make_test_video
    from PIL import Image

    from vimpac.config import PipelineConfig, PretrainConfig, TokenizeConfig
    from vimpac.report import plot_masks
    from vimpac.tokenize.job import run_tokenize

    video = make_test_video(tmp_path / "v.mp4", seconds=2.0)
    run_tokenize([str(video)], tiny_tokenizer, tmp_path / "tokens" / "archive",
                 TokenizeConfig(fps=4.0, shorter_side=32, size=32, decode_workers=0))
    config = PipelineConfig(pretrain=PretrainConfig(masking="tube", frames=4, grid=4,
                                                    mask_ratio=0.5))
    ctx = FakeRun({"tokens-pretrain": FakeStage(tmp_path / "tokens")}, config)
    png = plot_masks(ctx, tmp_path)
    assert png == tmp_path / "masks.png"
    assert Image.open(png).size == (880, 253)            # four frames side by side, titled


def test_table_says_which_model_was_evaluated_and_the_gain_interval(tmp_path):
    ctx = evaluated(tmp_path, 0.5, 0.25, classes=4)
    keys = [f"v{i}" for i in range(8)]
    ctx.stages["evaluate"].outcome.update(
        checkpoint_kind="final", selection="the last update (the paper reports the last model)",
        step=120, val_top1=0.6, split="test1", videos=8, keys=keys,
        correct=[1, 1, 1, 1, 0, 0, 0, 0])
    ctx.stages["evaluate-scratch"].outcome.update(
        checkpoint_kind="final", selection="the last update", step=120, val_top1=None,
        split="test1", videos=8, keys=keys, correct=[1, 1, 0, 0, 0, 0, 0, 0])
    rows = results_table(ctx)
    assert ("fine-tuned from pre-training", "evaluated model",
            "final.pt: the last update (the paper reports the last model) (update 120; "
            "validation top-1 60.0%)") in rows
    assert ("from scratch", "evaluated on", "test1 (8 videos; used for no choice)") in rows
    # paired differences: two videos +100, six 0: mean 25, sd 46.3, t(0.975, 7) = 2.365
    interval = next(v for _, f, v in rows if f == "95 % interval of the gain")
    assert interval.startswith("-13.7 .. +63.7 points") and "8 evaluation videos" in interval


def test_t_interval_matches_the_textbook_and_paired_gain_needs_equal_lengths():
    import pytest

    from vimpac.report import paired_gain, t_interval

    mean, low, high = t_interval([15.8, 14.2, 10.0])    # three seeds: t(0.975, 2) = 4.303
    assert mean == pytest.approx(13.333, abs=1e-3)
    assert (low, high) == (pytest.approx(5.892, abs=1e-3), pytest.approx(20.775, abs=1e-3))
    with pytest.raises(ValueError):
        paired_gain([1, 0], [1])
    with pytest.raises(ValueError):
        t_interval([1.0])


def reversal_entry(rev: float, between: float) -> dict:
    return {"reversal": {"mean": rev, "std": rev / 2, "median": rev, "q10": 0.0, "q90": rev},
            "between_clips": {"mean": between, "std": between / 4, "median": between,
                              "q10": 0.0, "q90": between},
            "ratio": rev / between}


def test_report_shows_the_frozen_probes_and_the_time_reversal_diagnostic(tmp_path):
    from vimpac.config import PipelineConfig
    from vimpac.report import write_report

    section = {"clips": 40, "random_seed": 0, "exact": True,
               "features": {"cls": "CLS", "tokens": "mean of token features"},
               "backbones": {"pre-trained": {"cls": reversal_entry(0.001, 0.02),
                                             "tokens": reversal_entry(0.01, 0.1)},
                             "random init": {"cls": reversal_entry(1e-8, 1e-6),
                                             "tokens": reversal_entry(0.0005, 0.05)}}}
    probes = FakeStage(tmp_path / "probes", {"knn_top1": 0.35, "linear_top1": 0.4,
                                             "test_split": "val", "time_reversal": section})
    probes.name = "probes"
    ctx = FakeRun({"probes": probes}, PipelineConfig(name="demo"))
    rows = results_table(ctx)
    assert ("pre-trained backbone, frozen", "k-NN top-1 (CLS, val)", "35.0%") in rows
    assert ("pre-trained backbone, frozen", "linear-probe top-1 (CLS)", "40.0%") in rows
    report = write_report(ctx, tmp_path / "report")
    text = Path(report["report"]).read_text()
    assert "## Time reversal (a diagnostic)" in text and "40 evaluation clips" in text
    assert "nothing is trained or chosen on it" in text
    assert "| pre-trained | CLS | 0.001 ± 0.0005 | 0.02 ± 0.005 | 0.05 |" in text
    assert "| random init | mean of token features | 0.0005 ± 0.00025 | 0.05 ± 0.013 | 0.01 |" \
        in text


def finetuned_arms(tmp_path):
    """Two fine-tuning arms with validation curves: one stopped by the plateau rule, one by the
    budget while still improving."""
    import json

    arms = {}
    for name, stop, step in (("finetune", "plateau", 60), ("finetune-scratch",
                                                          "budget-still-improving", 100)):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"step": s, "val_top1": min(0.9, s / 100)} for s in range(10, step + 1, 10)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        arms[name] = FakeStage(folder, {"stopped": stop, "stopped_step": step,
                                        "stop_reason": f"{stop} at update {step}"})
    return arms


def test_table_states_each_arms_stop_reason_and_warns_when_still_improving(tmp_path):
    ctx = evaluated(tmp_path, 0.4, 0.3)
    ctx.stages.update(finetuned_arms(tmp_path))
    rows = results_table(ctx)
    assert ("fine-tuned from pre-training", "stopped", "plateau at update 60") in rows
    assert ("from scratch", "stopped", "budget-still-improving at update 100") in rows
    warnings = [(stage, value) for stage, figure, value in rows if figure == "warning"]
    assert len(warnings) == 1 and warnings[0][0] == "from scratch"
    assert "still rising" in warnings[0][1]


def test_the_accuracy_curve_marks_where_and_why_each_arm_stopped(tmp_path, monkeypatch):
    import vimpac.report as report

    legends, save = [], report._save

    def keep(plt, fig, path):
        legends.extend(t.get_text() for ax in fig.axes if ax.get_legend()
                       for t in ax.get_legend().get_texts())
        return save(plt, fig, path)

    monkeypatch.setattr(report, "_save", keep)
    png = report.plot_curves(FakeContext(finetuned_arms(tmp_path)), tmp_path)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pre-trained stopped: plateau (update 60)" in legends
    assert "from scratch stopped: budget, still improving (update 100)" in legends


def test_report_says_which_machine_and_thread_count_each_stage_ran_on(tmp_path):
    from vimpac.config import PipelineConfig
    from vimpac.report import write_report

    here = {"cpu": "AMD EPYC", "torch_threads": 2, "torch": "2.13.0+cpu", "gpu": None}
    one = dict(here, torch_threads=1)
    stages = {}
    for name, where in (("pretrain", here), ("finetune", here), ("finetune-scratch", one),
                        ("evaluate", None)):
        stages[name] = FakeStage(tmp_path / name, {}, where)
        stages[name].name = name
    text = Path(write_report(FakeRun(stages, PipelineConfig(name="demo")),
                             tmp_path / "report")["report"]).read_text()
    assert "## Where the stages ran" in text
    assert "- AMD EPYC, no GPU; torch 2.13.0+cpu (2 threads): `pretrain`, `finetune`" in text
    assert "- AMD EPYC, no GPU; torch 2.13.0+cpu (1 thread): `finetune-scratch`" in text
    assert "- not recorded (an older run): `evaluate`" in text


def test_a_machine_record_reads_as_one_line_and_a_damaged_one_loses_fields_not_the_line():
    from vimpac.common.environment import describe_machine, machine

    here = machine()
    line = describe_machine(here)
    assert here["cpu"] in line and f"torch {here['torch']}" in line
    assert f"{here['torch_threads']} thread" in line and "\n" not in line
    full = {"cpu": "AMD EPYC", "cores": 2, "simd": ["avx2"], "memory_gib": 23.5,
            "python": "3.11.7", "torch": "2.13.0+cpu", "torch_cuda": None,
            "torch_threads": 1, "gpu": "NVIDIA H100"}
    assert describe_machine(full) == ("AMD EPYC (2 cores, avx2, 23.5 GiB), GPU NVIDIA H100; "
                                      "Python 3.11.7, torch 2.13.0+cpu (CPU build, 1 thread)")
    assert describe_machine({"simd": 7, "torch_threads": "x"}) == \
        "unknown CPU (no AVX), no GPU; torch ? (x threads)"
