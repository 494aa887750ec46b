"""The pipeline report: ``report.md`` with the results table and the pictures that explain them.

The table says which fine-tuned model each arm's number comes from (``final.pt`` by default, or
``best.pt`` chosen on the validation part of the training split) and on which split it was measured
(the evaluation split, never used for any choice), and gives the pre-trained - scratch gain with a
95 % interval: a paired Student t-interval over the evaluation videos (:func:`paired_gain`). One
pipeline run is one seed, so the interval covers which videos were tested, not seed-to-seed
variation; ``benchmarks/finetune_gain.py`` reports the interval over seeds. The ``probes`` stage's
k-NN / linear probes of the frozen pre-trained backbone join the table, and its time-reversal
diagnostic (:mod:`vimpac.finetune.time_reversal`) gets a small table of its own. Each fine-tuning
arm's row says why it stopped (the plateau rule, the budget, or the budget while validation top-1
was still rising: a warning), and the accuracy curve marks where.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vimpac.common.environment import describe_machine

if TYPE_CHECKING:
    import numpy as np

    from vimpac.config import PretrainConfig
    from vimpac.pipeline import RunContext

log = logging.getLogger(__name__)

ARMS = {"finetune": "pre-trained", "finetune-scratch": "from scratch"}
STOP_WORDS = {"plateau": "plateau", "budget": "budget",
              "budget-still-improving": "budget, still improving"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def results_table(ctx: RunContext) -> list[tuple[str, str, str]]:
    """(stage, figure, value) rows of everything the pipeline measured."""
    rows: list[tuple[str, str, str]] = []
    names = ctx.stages

    def add(stage: str, figure: str, value: Any, fmt: str = "{:.3g}") -> None:
        if value is None:
            return
        rows.append((stage, figure, fmt.format(value) if isinstance(value, float) else str(value)))

    if "tokenizer" in names and names["tokenizer"].done():
        r = names["tokenizer"].result()
        for key in ("psnr", "code_usage", "perplexity"):
            add("tokenizer", key, r.get(key))
    for name in ("tokens-pretrain", "tokens-finetune"):
        if name in names and names[name].done():
            r = names[name].result()
            add(name, "videos ok / failed", f"{r.get('ok')} / {r.get('failed')}")
    if "pretrain" in names and names["pretrain"].done():
        r = names["pretrain"].result()
        if "imported" in r:
            add("pretrain", "imported weights", f"{r['imported']} (sha256 {r['sha256'][:16]}, "
                f"{r.get('layers')} layers x {r.get('dim')})")
        for key in ("step", "mlm_acc", "mlm_acc_moving", "nce_acc", "mlm_loss", "nce_loss"):
            add("pretrain", key, None if "imported" in r else r.get(key))
    evaluated = _evaluations(ctx)
    for name, r in _finetuned(ctx).items():
        label = "fine-tuned from pre-training" if name == "finetune" else "from scratch"
        add(label, "stopped", r.get("stop_reason"))
        if r.get("stopped") == "budget-still-improving":
            add(label, "warning", "validation top-1 was still rising when the budget ran out: "
                "a larger finetune.epochs (or finetune.plateau_patience) may give more")
    for variant, r in evaluated.items():
        label = "fine-tuned from pre-training" if variant == "evaluate" else "from scratch"
        add(label, "evaluated model", _model_text(r))
        add(label, "evaluated on", _split_text(r))
        add(label, "top-1 (multi-view)", r.get("top1"), "{:.1%}")
        add(label, "top-5 (multi-view)", r.get("top5"), "{:.1%}")
    top1 = _both_top1(evaluated)
    if top1:
        add("pre-trained - scratch", "top-1 gain", f"{100 * (top1[0] - top1[1]):+.1f} points")
        gain = _paired(evaluated)
        if gain is not None:
            add("pre-trained - scratch", "95 % interval of the gain",
                f"{gain[1]:+.1f} .. {gain[2]:+.1f} points (paired t over {gain[3]} "
                "evaluation videos, one seed)")
    add("chance (1 / classes)", "top-1", _chance(evaluated), "{:.1%}")
    if "probes" in names and names["probes"].done():
        r = names["probes"].result()
        label = "pre-trained backbone, frozen"
        add(label, f"k-NN top-1 (CLS, {r.get('test_split')})", r.get("knn_top1"), "{:.1%}")
        add(label, "linear-probe top-1 (CLS)", r.get("linear_top1"), "{:.1%}")
    return rows


def _model_text(r: dict[str, Any]) -> str:
    """E.g. ``final.pt: the last update (update 120; validation top-1 61.3 %)``."""
    kind = r.get("checkpoint_kind", "unknown")
    text = f"{kind}.pt: {r.get('selection', 'unknown')}"
    details = [f"update {r['step']}"] if r.get("step") is not None else []
    if r.get("val_top1") is not None:
        details.append(f"validation top-1 {r['val_top1']:.1%}")
    return text + (f" ({'; '.join(details)})" if details else "")


def _split_text(r: dict[str, Any]) -> str:
    return f"{r.get('split')} ({r.get('videos')} videos; used for no choice)"


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided Student t confidence interval of the mean of ``values``
    (n - 1 degrees of freedom; needs n >= 2)."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        raise ValueError(f"t_interval: needs at least 2 values, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_gain(pre: Sequence[int], scratch: Sequence[int],
                level: float = 0.95) -> tuple[float, float, float, int]:
    """Gain in points of per-video correctness (1/0, same videos in the same order), pre-trained
    minus scratch: (mean, low, high, videos), a paired t-interval over the videos."""
    if len(pre) != len(scratch):
        raise ValueError(f"paired_gain: {len(pre)} vs {len(scratch)} videos")
    mean, low, high = t_interval([100.0 * (a - b) for a, b in zip(pre, scratch, strict=True)],
                                 level)
    return mean, low, high, len(pre)


def _paired(evaluated: dict[str, dict[str, Any]]) -> tuple[float, float, float, int] | None:
    """The paired interval when both arms saw the same videos in the same order."""
    pre, scratch = evaluated.get("evaluate", {}), evaluated.get("evaluate-scratch", {})
    if "correct" not in pre or "correct" not in scratch or pre.get("keys") != scratch.get("keys"):
        return None
    if len(pre["correct"]) < 2:
        return None
    return paired_gain(pre["correct"], scratch["correct"])


def _finetuned(ctx: RunContext) -> dict[str, dict[str, Any]]:
    """Results (summaries) of the fine-tuning stages that are done, pre-trained first."""
    return {name: ctx.stages[name].result() for name in ARMS
            if name in ctx.stages and ctx.stages[name].done()}


def _evaluations(ctx: RunContext) -> dict[str, dict[str, Any]]:
    """Results of the evaluate stages that are done, pre-trained first, then scratch."""
    return {name: ctx.stages[name].result() for name in ("evaluate", "evaluate-scratch")
            if name in ctx.stages and ctx.stages[name].done()}


def _both_top1(evaluated: dict[str, dict[str, Any]]) -> tuple[float, float] | None:
    """(pre-trained, scratch) top-1 when both arms were evaluated."""
    top1 = [evaluated.get(name, {}).get("top1") for name in ("evaluate", "evaluate-scratch")]
    return None if None in top1 else (top1[0], top1[1])


def _chance(evaluated: dict[str, dict[str, Any]]) -> float | None:
    for r in evaluated.values():
        if r.get("per_class"):
            return 1.0 / len(r["per_class"])
    return None


def time_reversal_section(ctx: RunContext) -> list[str]:
    """Markdown of the probes stage's time-reversal diagnostic (none before that stage ran)."""
    stage = ctx.stages.get("probes")
    section = stage.result().get("time_reversal") if stage and stage.done() else None
    if not section:
        return []
    lines = ["", "## Time reversal (a diagnostic)", "",
             "How far a frozen backbone's feature moves when its clip is played backwards: the "
             "cosine distance 1 - cos(f(x), f(x reversed in time)) over "
             f"{section['clips']} evaluation clips, against the same distance between two "
             "different clips (each clip against the next in a seeded random order). A ratio near "
             "0 means the feature hardly sees the order of the frames; near 1, reversing a clip "
             "moves it as far as swapping the video. The random backbone (same preset, seed "
             f"{section['random_seed']}) shows what the architecture does without training. "
             "This is a diagnostic: nothing is trained or chosen on it.", "",
             "| backbone | feature | reversal distance | between-clip distance | ratio |",
             "|---|---|---|---|---|"]
    names = section.get("features", {})
    for backbone, feats in section["backbones"].items():
        for feature, entry in feats.items():
            ratio = "n/a" if entry["ratio"] is None else f"{entry['ratio']:.3g}"
            lines.append(f"| {backbone} | {names.get(feature, feature)} | "
                         f"{_mean_sd(entry['reversal'])} | {_mean_sd(entry['between_clips'])} | "
                         f"{ratio} |")
    return lines


def machine_section(ctx: RunContext) -> list[str]:
    """Which machine each finished stage ran on: a short training run's numbers repeat on the
    same CPU, thread count and torch build, and land elsewhere on another."""
    where: dict[str, list[str]] = {}
    for stage in ctx.stages.values():
        if stage.name != "report" and stage.done():
            machine = stage.machine()
            text = describe_machine(machine) if machine else "not recorded (an older run)"
            where.setdefault(text, []).append(f"`{stage.name}`")
    if not where:
        return []
    lines = ["", "## Where the stages ran", "",
             "Training numbers repeat on the same CPU, thread count and torch build; floats "
             "summed in another order take a short run elsewhere.", ""]
    return lines + [f"- {text}: {', '.join(names)}" for text, names in where.items()]


def _mean_sd(stats: dict[str, float] | None) -> str:
    return "n/a" if stats is None else f"{stats['mean']:.3g} ± {stats['std']:.2g}"


def plot_curves(ctx: RunContext, out: Path) -> Path | None:
    plt = _plt()
    pre = _metrics(ctx.path("pretrain") / "metrics.jsonl") if "pretrain" in ctx.stages else []
    fts = {n: _metrics(ctx.path(n) / "metrics.jsonl") for n in ("finetune", "finetune-scratch")
           if n in ctx.stages}
    if not pre and not any(fts.values()):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    if pre:
        steps = [m["step"] for m in pre]
        axes[0].plot(steps, [m["mlm_loss"] for m in pre], label="masked-token loss")
        axes[0].plot(steps, [m["nce_loss"] for m in pre], label="contrastive loss")
        axes[0].set_title("pre-training losses")
        axes[1].plot(steps, [m["mlm_acc"] for m in pre], label="masked-token accuracy")
        moving = [(m["step"], m["mlm_acc_moving"]) for m in pre if "mlm_acc_moving" in m]
        if moving:
            axes[1].plot(*zip(*moving, strict=True), label="masked-token accuracy, moving codes")
        axes[1].plot(steps, [m["nce_acc"] for m in pre], label="contrastive accuracy")
        axes[1].set_title("pre-training accuracies")
    finetuned = _finetuned(ctx)
    for name, rows in fts.items():
        val = [(m["step"], m["val_top1"]) for m in rows if "val_top1" in m]
        if val:
            line, = axes[2].plot(*zip(*val, strict=True), marker="o", label=ARMS[name])
            _mark_stop(axes[2], val, finetuned.get(name, {}), ARMS[name], line.get_color())
    axes[2].set_title("fine-tuning: validation top-1\n(held out of the training split)")
    for ax in axes:
        ax.set_xlabel("update")
        if ax.lines:            # accuracies rise: the lower right is where a curve is not
            ax.legend(fontsize=7 if ax is axes[2] else 8,
                      loc="lower right" if ax is axes[2] else "best")
    return _save(plt, fig, out / "curves.png")


def _mark_stop(ax: Any, val: list[tuple[int, float]], summary: dict[str, Any], arm: str,
               color: str) -> None:
    """A star where the arm stopped, its legend saying why (runs from before the stop record
    have none)."""
    step, reason = summary.get("stopped_step"), summary.get("stopped")
    if step is None or reason is None:
        return
    y = next((v for s, v in reversed(val) if s <= step), val[-1][1])
    ax.plot([step], [y], marker="*", markersize=14, color=color, linestyle="none",
            markeredgecolor="black", label=f"{arm} stopped: {STOP_WORDS.get(reason, reason)} "
                                           f"(update {step})")


def plot_comparison(ctx: RunContext, out: Path) -> Path | None:
    evaluated = _evaluations(ctx)
    top1 = _both_top1(evaluated)
    if not top1:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3.2))
    bars = ax.bar(["pre-trained", "scratch"], [100 * v for v in top1], color=["#2a7", "#999"])
    ax.bar_label(bars, fmt="%.1f")
    chance = _chance(evaluated)
    if chance is not None:
        ax.axhline(100 * chance, color="#c33", linestyle="--", linewidth=1)
        ax.text(1.45, 100 * chance, "chance", color="#c33", va="bottom", ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("fine-tuning: pre-trained vs scratch")
    return _save(plt, fig, out / "comparison.png")


def plot_masks(ctx: RunContext, out: Path) -> Path | None:
    """Masks of the configured strategy (``pretrain.masking``), drawn over real frames of a
    pre-training video."""
    from vimpac.archive import Archive
    from vimpac.common.video import DecodeSpec, VideoError, decode_video

    if "tokens-pretrain" not in ctx.stages:
        return None
    archive = Archive(ctx.path("tokens-pretrain") / "archive")
    pt, s = ctx.config.pretrain, archive.settings
    # at the token frame rate: frame t is the first frame token frame t was encoded from
    spec = DecodeSpec(fps=s.fps, shorter_side=s.shorter_side, size=s.size, crop="center")
    for entry in archive.entries:
        if entry.frames < pt.frames:
            continue
        try:
            frames = decode_video(archive.records[entry.key].source, spec)[:pt.frames]
        except VideoError:
            continue
        return draw_mask(pt, frames, s.grid, out / "masks.png")
    return None


def draw_mask(pt: PretrainConfig, frames: np.ndarray, grid: tuple[int, int], png: Path) -> Path:
    """One mask of ``MASKS[pt.masking]`` (seed 0) over ``frames`` [T, S, S, 3], written to
    ``png``; the title says the strategy, its settings and the masked fraction."""
    import torch

    from vimpac.pretrain.masking import MASKS, MaskParams
    from vimpac.tokenize.visualize import mask_overlay_png

    masking, params = MASKS[pt.masking], MaskParams.of(pt)
    shape = (1, len(frames), *grid)
    mask = masking.sample(shape, params, torch.Generator().manual_seed(0))[0].numpy()
    return mask_overlay_png(frames, mask, png, f"{masking.name} masking: "
                            f"{masking.caption(shape, params)}: {mask.mean():.1%} masked")


def _copy(src: Path, out: Path, name: str) -> Path | None:
    if not src.is_file():
        return None
    dst = out / name
    shutil.copyfile(src, dst)
    return dst


def write_report(ctx: RunContext, out: Path) -> dict[str, Any]:
    """Write ``out/report.md`` and its PNGs; return the results table as a dict."""
    from vimpac.tokenize.visualize import inspect_archive

    out.mkdir(parents=True, exist_ok=True)
    pictures: list[tuple[str, Path | None]] = []
    if "tokens-pretrain" in ctx.stages and ctx.stages["tokens-pretrain"].done():
        tok = ctx.path("tokenizer") / "tokenizer" if "tokenizer" in ctx.stages else None
        try:
            pictures.append(("Source frames, VQ reconstructions and token maps",
                             inspect_archive(ctx.path("tokens-pretrain") / "archive",
                                             out / "tokens.png", tokenizer_dir=tok)))
        except Exception as exc:  # a picture must not fail the report
            log.warning("token picture skipped: %s", exc)
    if "tokenizer" in ctx.stages:
        pictures.append(("Tokenizer: held-out frames (top) and reconstructions (bottom)",
                         _copy(ctx.path("tokenizer") / "reconstructions.png", out,
                               "reconstructions.png")))
    masks = f"Masks over real frames ({ctx.config.pretrain.masking} masking)"
    for title, fn in ((masks, plot_masks),
                      ("Loss and accuracy curves", plot_curves),
                      ("Pre-trained vs scratch", plot_comparison)):
        try:
            pictures.append((title, fn(ctx, out)))
        except Exception as exc:
            log.warning("%s skipped: %s", title, exc)
    if "evaluate" in ctx.stages and ctx.stages["evaluate"].done():
        png = ctx.stages["evaluate"].result().get("confusion_png")
        if png:
            pictures.append(("Confusion matrix (pre-trained, fine-tuned)",
                             _copy(Path(png), out, "confusion.png")))
    rows = results_table(ctx)
    lines = [f"# vimpac report: pipeline `{ctx.config.name}`", "",
             ctx.config.description, "", "| stage | figure | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += time_reversal_section(ctx)
    lines += machine_section(ctx)
    lines += ["", "## Stage outputs", ""]
    lines += [f"- `{s.name}`: `{s.path}`" for s in ctx.stages.values() if s.name != "report"]
    for title, path in pictures:
        if path is not None:
            lines += ["", f"## {title}", "", f"![{title}]({path.name})"]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"report": str(out / "report.md"), "rows": [list(r) for r in rows]}
