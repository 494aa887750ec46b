"""Table 7 in miniature: scratch, MP and MP + CL on two synthetic tasks, fine-tuned to a plateau.

The paper's Table 7 compares fine-tuning from scratch, after masked-token prediction only (MP)
and after MP + contrastive (MP + CL). Tasks: ``five``, the ``demo`` pipeline's five kinds of motion
(still, pan, move right, turn clockwise, approach; pre-trained as the demo is, 300 updates on the
uncurated videos), and ``directions``, the ``demo-direction`` pipeline's eight classes that differ
only by the direction of motion (each pair the same clip played backwards; 3,200 training videos,
which 1,200 pre-training updates see without labels). Arms: ``scratch`` (the pipeline's from-scratch
fine-tuning), ``mp`` (pre-trained with ``pretrain.contrastive_weight=0``) and ``mp+cl`` (pre-trained
with the pipeline's contrastive weight). Every arm of a task fine-tunes under the same rule: for
``five`` at most ``finetune.epochs`` = 40, stopping once validation top-1 has not risen by 0.01 for
8 validations (:data:`CONVERGE`); for ``directions`` the pipeline's own (at most 16 epochs, a
validation every half epoch, patience 6, no stop before epoch 8); ``--set`` overrides either. Seed
``s`` seeds pre-training and fine-tuning (``--fixed-pretraining``: fine-tuning only);
``--corpus-seed`` generates another corpus (``data.synth_seed``), so a setting chosen on one corpus
can be checked on a corpus it was not chosen on.

Protocol: nothing is chosen on the evaluation split. The plateau rule and ``best.pt`` look only at
the validation part of the training split; the number reported is ``final.pt`` (``--checkpoint
best``: ``best.pt``) on the held-out evaluation split. Each cell is the mean top-1 over seeds with
a 95 % Student t-interval over the seeds, and each pre-trained arm's gain over scratch, paired by
seed, with its interval; chance is 1 / classes. Every run goes through the pipeline cache
(:mod:`benchmarks.pipeline_runs`): shared stages run once, and running the same command again after
an interruption continues where it stopped. The JSON (rows per run: top-1, why and where
fine-tuning stopped, seconds) is rewritten after every run.

    python -m benchmarks.table7 --runs runs --corpus-seed 1 --out bench-out/table7.json

Parts can run side by side (e.g. ``--layouts ssv2`` and ``--layouts ucf101`` in two processes with
their own ``--runs`` and ``--out``); ``--combine A.json B.json --out T.json`` then makes one table.
What a minimum budget for the plateau rule changes: run again, with a larger
``finetune.plateau_min_epochs`` = E, the runs that stopped before epoch E, then ``--combine
NEW.json ... --over OLD.json`` keeps OLD's runs that stopped later (the minimum cannot change
them) and refuses to keep one that stopped earlier. ``--combine A.json B.json --pool-corpora``
pools results from different corpus seeds into one table: a run is a seed on a corpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.pipeline_runs import (
    PipelineRun,
    csv_list,
    interval_text,
    mean_interval,
    run_main,
    run_with,
    seed_overrides,
)
from vimpac.common.environment import machine
from vimpac.common.fileio import atomic_write_json


@dataclass(frozen=True)
class Task:
    title: str
    pipeline: str
    converge: tuple[str, ...] = ()   # overrides of the fine-tuning rule; () keeps the pipeline's


@dataclass(frozen=True)
class Arm:
    title: str
    pretrain: list[str] = field(default_factory=list)   # overrides of a pre-trained arm


CONVERGE = ("finetune.epochs=40", "finetune.eval_every=1.0", "finetune.plateau_patience=8",
            "finetune.plateau_min_delta=0.01")
TASKS = {"five": Task("five kinds of motion", "demo", CONVERGE),
         "directions": Task("eight directions", "demo-direction")}
ARMS = {"scratch": Arm("scratch"), "mp": Arm("MP", ["pretrain.contrastive_weight=0"]),
        "mp+cl": Arm("MP + CL")}


@dataclass
class Setting:
    """What every run of the benchmark shares."""
    config: str | None
    runs: str
    corpus_seed: int | None
    checkpoint: str
    seed_pretraining: bool
    extra: list[str]


def overrides(setting: Setting, task: str, layout: str, seed: int, arm: str,
              scratch: bool) -> list[str]:
    """``--set`` overrides of one pipeline run: a pre-trained arm (and the scratch arm with it)."""
    corpus = [] if setting.corpus_seed is None else [f"data.synth_seed={setting.corpus_seed}"]
    return [*corpus, f"data.synth_layout={layout}", *seed_overrides(seed, setting.seed_pretraining),
            *TASKS[task].converge, f"finetune.compare_scratch={'true' if scratch else 'false'}",
            f"evaluate.checkpoint={setting.checkpoint}", *ARMS[arm].pretrain, *setting.extra]


def arm_row(run: PipelineRun, task: str, layout: str, seed: int, arm: str) -> dict[str, Any]:
    """One arm of one run: its top-1 on the evaluation split and how its fine-tuning ended."""
    ft, ev = ("finetune-scratch", "evaluate-scratch") if arm == "scratch" else \
        ("finetune", "evaluate")
    tuned, tested = run.result(ft), run.result(ev)
    stages = [ft, ev] if arm == "scratch" else ["pretrain", ft, ev]
    return {"task": task, "pipeline": run.config.name, "layout": layout, "seed": seed,
            "corpus_seed": run.config.data.synth_seed, "pretrain_seed": run.config.pretrain.seed,
            "arm": arm, "top1": tested["top1"], "chance": 1 / len(run.config.data.synth_classes),
            "evaluated": tested.get("checkpoint_kind"), "eval_split": tested.get("split"),
            "eval_videos": tested.get("videos"), "evaluated_step": tested.get("step"),
            "evaluated_val_top1": tested.get("val_top1"), "stopped": tuned.get("stopped"),
            "stopped_step": tuned.get("stopped_step"), "stop_reason": tuned.get("stop_reason"),
            "steps": tuned.get("steps"), "total_steps": tuned.get("total_steps"),
            "best_val_top1": tuned.get("best_val_top1"), "best_step": tuned.get("best_step"),
            "min_step": (tuned.get("plateau") or {}).get("min_step", 0),
            "run_seconds": run.seconds, "stage_seconds": run.stage_seconds(stages)}


def runs_of(setting: Setting, task: str, layout: str, seed: int,
            arms: list[str]) -> list[dict[str, Any]]:
    """Rows of every arm for one (task, layout, seed). The scratch arm comes with the first
    pre-trained arm's run (its stages do not depend on pre-training, so every run shares them);
    asked for alone, it is that run with ``finetune.init=scratch``: the same fine-tuning, without
    the pre-trained arm's (the pipeline still plans MP + CL pre-training, run once if not
    cached)."""
    pretrained = [a for a in arms if a != "scratch"] or ["mp+cl"]
    alone = ["finetune.init=scratch"] if arms == ["scratch"] else []
    rows = []
    for i, arm in enumerate(pretrained):
        scratch = "scratch" in arms and i == 0
        run = run_with(TASKS[task].pipeline, setting.config, setting.runs,
                       overrides(setting, task, layout, seed, arm, scratch) + alone)
        if arm in arms:
            rows.append(arm_row(run, task, layout, seed, arm))
        if scratch:
            rows.append(arm_row(run, task, layout, seed, "scratch"))
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, layout, arm): mean top-1 over seeds with its interval, the gain over scratch
    paired by seed, for MP + CL also its gain over MP (the contrastive loss's part, Table 7's
    question), chance, and why fine-tuning stopped."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["layout"], row["arm"]), []).append(row)
    top1 = {(r["task"], r["layout"], r["arm"], *unit(r)): r["top1"] for r in rows}

    def gain_over(mine: list[dict[str, Any]], base: str) -> dict[str, Any] | None:
        paired = [r["top1"] - top1[(r["task"], r["layout"], base, *unit(r))] for r in mine
                  if (r["task"], r["layout"], base, *unit(r)) in top1]
        return mean_interval(paired) if paired and mine[0]["arm"] != base else None

    out = []
    for (task, layout, arm), mine in groups.items():
        out.append({"task": task, "layout": layout, "arm": arm, "seeds": [r["seed"] for r in mine],
                    "corpus_seeds": sorted({r.get("corpus_seed") for r in mine}, key=str),
                    "top1": mean_interval([r["top1"] for r in mine]),
                    "gain_vs_scratch": gain_over(mine, "scratch"),
                    "gain_vs_mp": gain_over(mine, "mp") if arm == "mp+cl" else None,
                    "chance": mine[0]["chance"],
                    "stopped": dict(Counter(str(r["stopped"]) for r in mine)),
                    "mean_steps": sum(r["steps"] or 0 for r in mine) / len(mine)})
    return out


def cell(summary: dict[str, Any]) -> str:
    stops = ", ".join(f"{k} {v}" for k, v in sorted(summary["stopped"].items()))
    text = interval_text(summary["top1"])
    if summary["gain_vs_scratch"] is not None:
        text += f"; gain {interval_text(summary['gain_vs_scratch'], sign=True)}"
    if summary.get("gain_vs_mp") is not None:
        text += f"; over MP {interval_text(summary['gain_vs_mp'], sign=True)}"
    return f"{text}; stopped: {stops}"


def markdown(summary: list[dict[str, Any]], arms: list[str], checkpoint: str) -> list[str]:
    """Rows scratch / MP / MP + CL, a column per (task, layout), chance last."""
    columns = list(dict.fromkeys((s["task"], s["layout"]) for s in summary))
    found = {(s["task"], s["layout"], s["arm"]): s for s in summary}
    seeds = max((len(s["seeds"]) for s in summary), default=0)
    corpora = sorted({c for s in summary for c in s.get("corpus_seeds", [])}, key=str)
    averaged = f"{seeds} seeds [95 % t-interval over seeds]" if len(corpora) < 2 else (
        f"{seeds} runs, seeds on corpus seeds {', '.join(map(str, corpora))} [95 % t-interval "
        "over runs]")
    paired = "by seed" if len(corpora) < 2 else "by corpus and seed"
    lines = [f"{checkpoint}.pt on the evaluation split: top-1 in %, mean of {averaged}; gain over "
             f"scratch (MP + CL: and over MP) in points, paired {paired}; why fine-tuning "
             "stopped (runs per reason)", "",
             "| arm | " + " | ".join(f"{TASKS[t].title} ({layout})" for t, layout in columns)
             + " |", "|---|" + "---|" * len(columns)]
    for arm in (a for a in ARMS if a in arms):
        cells = [cell(found[(t, layout, arm)]) if (t, layout, arm) in found else "-"
                 for t, layout in columns]
        lines.append(f"| {ARMS[arm].title} | " + " | ".join(cells) + " |")
    chance = [next(f"{100 * s['chance']:.1f} %" for s in summary
                   if (s["task"], s["layout"]) == col) for col in columns]
    lines.append("| chance | " + " | ".join(chance) + " |")
    return lines


def measure(setting: Setting, tasks: list[str], arms: list[str], layouts: list[str],
            seeds: list[int], out: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for task in tasks:
        for layout in layouts:
            for seed in seeds:
                for row in runs_of(setting, task, layout, seed, arms):
                    rows.append(row)
                    print(f"{task:10s} {layout:6s} seed {seed} {ARMS[row['arm']].title:8s} "
                          f"top-1 {row['top1']:6.1%} (chance {row['chance']:.1%}); "
                          f"{row['stop_reason']}", flush=True)
                converge = {t: list(TASKS[t].converge) for t in tasks}
                result = {"setting": {**dataclasses.asdict(setting), "converge": converge,
                                      "tasks": tasks, "arms": arms, "layouts": layouts,
                                      "seeds": seeds},
                          "machine": machine(), "complete": False, "rows": rows,
                          "summary": summarise(rows)}
                atomic_write_json(out, result)
    result["complete"] = True
    result["table"] = markdown(result["summary"], arms, setting.checkpoint)
    atomic_write_json(out, result)
    return result


NUMBER = (int, float)
ROW_TYPES: dict[str, Any] = {"task": str, "layout": str, "seed": int, "arm": str, "top1": NUMBER,
                             "chance": NUMBER, "stopped": str, "steps": int}
TYPE_NAMES = {str: "text", int: "whole number", NUMBER: "number"}
KNOWN = {"task": TASKS, "arm": ARMS}


def row_problem(row: Any) -> str | None:
    """What is wrong with one row of a result file (None if nothing): a key missing, a value of
    the wrong type, an unknown task or arm, an accuracy outside 0..1."""
    if not isinstance(row, dict):
        return f"a row is a {type(row).__name__}, not an object"
    for key, kind in ROW_TYPES.items():
        if key not in row:
            return f"a row without {key!r}"
        value = row[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"a row's {key!r} is {value!r}, not a {TYPE_NAMES[kind]}"
        if key in KNOWN and value not in KNOWN[key]:
            return f"a row's {key!r} is {value!r}, not one of {', '.join(KNOWN[key])}"
    if not 0 <= row["top1"] <= 1 or not 0 < row["chance"] <= 1:
        return f"a row's top1 or chance is outside 0..1 ({row['top1']!r}, {row['chance']!r})"
    corpus = row.get("corpus_seed")
    if corpus is not None and (not isinstance(corpus, int) or isinstance(corpus, bool)):
        return f"a row's 'corpus_seed' is {corpus!r}, not a whole number"
    return None


PER_PART = {"runs", "tasks", "arms", "layouts", "seeds", "converge"}   # may differ between files


def run_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """A run of the benchmark: (task, layout, seed, arm)."""
    return row["task"], row["layout"], row["seed"], row["arm"]


def unit(row: dict[str, Any]) -> tuple[Any, Any]:
    """What gains pair over: the seed within its corpus (one corpus unless pooled)."""
    return row.get("corpus_seed"), row["seed"]


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    key = next(k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))
    return f"{key}: {a.get(key)!r} against {b.get(key)!r}"


def load_result(path: Path) -> dict[str, Any]:
    """A finished result of this benchmark, its rows checked; one line naming the file if not."""
    try:
        data = json.loads(path.read_text())
        rows = data["rows"]
        if not isinstance(rows, list):
            raise TypeError(f"rows is a {type(rows).__name__}, not a list")
        if not data.get("complete"):
            raise SystemExit(f"{path}: the run that wrote it has not finished")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"{path}: not a table7 result ({exc})") from None
    if data.get("setting") is not None and not isinstance(data["setting"], dict):
        raise SystemExit(f"{path}: its setting is a {type(data['setting']).__name__}, not an "
                         "object")
    for row in rows:
        problem = row_problem(row)
        if problem:
            raise SystemExit(f"{path}: {problem}")
    return data


def combine(paths: list[Path], out: Path, checkpoint: str, over: Path | None = None,
            pool: bool = False) -> dict[str, Any]:
    """One table from JSONs this benchmark wrote (e.g. one per layout, run side by side): their
    rows together, each (task, layout, seed, arm) once, one corpus seed, one setting (what the
    runs share: every option but the runs folder and which tasks, arms, layouts and seeds; a file
    from before the setting was kept has none to compare). ``over``: see :func:`overlay`.
    ``pool``: the files may come from different corpus seeds (the setting otherwise the same);
    a run is then a seed on a corpus, each once, and gains pair within a corpus and seed."""
    loaded = [load_result(path) for path in paths]
    rows = [row for data in loaded for row in data["rows"]]
    settings = [data.get("setting") for data in loaded]
    per_part = PER_PART | ({"corpus_seed"} if pool else set())
    shared = [(path, {k: v for k, v in setting.items() if k not in per_part})
              for path, setting in zip(paths, settings, strict=True)
              if isinstance(setting, dict)]
    for path, setting in shared[1:]:
        if setting != shared[0][1]:
            raise SystemExit(f"{path}: ran with other settings than {shared[0][0]} "
                             f"({first_difference(shared[0][1], setting)})")
    seen = Counter((r.get("corpus_seed"), *run_key(r)) for r in rows)
    twice = [k for k, n in seen.items() if n > 1]
    if twice:
        raise SystemExit(f"(corpus seed, task, layout, seed, arm) {twice[0]} is in more than "
                         "one file")
    extra: dict[str, Any] = {}
    if over is not None:
        if pool:
            raise SystemExit("--over and --pool-corpora: lay each corpus's files over its own "
                             "first, then pool the results")
        rows, extra = overlay(rows, settings, over)
    corpora = {r.get("corpus_seed") for r in rows}
    if len(corpora) > 1 and not pool:
        raise SystemExit(f"the files come from different corpus seeds: {sorted(map(str, corpora))}"
                         " (--pool-corpora pools them)")
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    summary = summarise(rows)
    result = {"combined": [str(p) for p in paths], "settings": settings, "pooled": pool,
              "machines": [data.get("machine") for data in loaded], **extra,
              "complete": True, "rows": rows, "summary": summary,
              "table": markdown(summary, arms, checkpoint)}
    atomic_write_json(out, result)
    return result


MINIMUM = "finetune.plateau_min_epochs="


def not_a_minimum(base: dict[str, Any], setting: dict[str, Any]) -> str | None:
    """How ``setting`` differs from ``base`` other than in ``--set`` of the minimum budget (None
    if it does not; the pipeline's own minimum is compared through the rows' ``min_step``)."""
    theirs = {k: v for k, v in base.items() if k not in PER_PART | {"extra"}}
    mine = {k: v for k, v in setting.items() if k not in PER_PART | {"extra"}}
    if mine != theirs:
        return first_difference(theirs, mine)
    before, after = ([e for e in s.get("extra", []) if not str(e).startswith(MINIMUM)]
                     for s in (base, setting))
    return None if before == after else f"extra: {before!r} against {after!r}"


def overlay(rows: list[dict[str, Any]], settings: list[Any],
            over: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What a minimum budget of the plateau rule changes, without rerunning what it cannot change.
    ``rows`` ran with a minimum budget (``finetune.plateau_min_epochs``, the pipeline's or set; all
    one minimum); ``over`` is the same setting with none or a smaller one. A run the rule stopped at
    or after the minimum's update is the same run under the minimum (the rule differs only before
    it), so ``over``'s rows that ``rows`` lack are kept if they stopped there, and refused, naming
    the row, if they stopped earlier. Rows run again that ``over`` has too are compared with it: the
    same top-1 at the same update shows, on full-size runs, that the minimum left them alone."""
    old = load_result(over)
    bases = [old["setting"]] if "setting" in old else old.get("settings")  # a run, or combined
    if not bases or not all(isinstance(b, dict) for b in [*bases, *settings]):
        raise SystemExit(f"{over}: --over needs files that record their settings")
    for setting in settings:
        for base in bases:
            wrong = not_a_minimum(base, setting)
            if wrong:
                raise SystemExit(f"{over}: the files differ from it by more than {MINIMUM}E "
                                 f"({wrong})")
    minimum = sorted({r.get("min_step") for r in rows}, key=str)
    if len(minimum) != 1 or not isinstance(minimum[0], int) or minimum[0] <= 0:
        raise SystemExit("the files' runs do not share one minimum budget (their min_step: "
                         f"{', '.join(map(str, minimum))})")
    step = minimum[0]
    for row in old["rows"]:
        if not isinstance(row.get("min_step", 0), int) or row.get("min_step", 0) >= step:
            raise SystemExit(f"{over}: {run_key(row)} ran with a minimum budget at update "
                             f"{row.get('min_step')}, not below the files' {step}")
    again = {run_key(r): r for r in rows}
    kept, same, changed = [], [], []
    for row in old["rows"]:
        if run_key(row) in again:
            new = again[run_key(row)]
            alike = (new["top1"], new.get("stopped_step")) == (row["top1"], row.get("stopped_step"))
            (same if alike else changed).append(list(run_key(row)))
        elif not isinstance(row.get("stopped_step"), int) or row["stopped_step"] < step:
            raise SystemExit(f"{over}: {run_key(row)} stopped at update {row.get('stopped_step')}, "
                             f"before the minimum budget's update {step}: run it again")
        else:
            kept.append({**row, "source": "kept"})
    return ([{**r, "source": "rerun"} for r in rows] + kept,
            {"over": str(over), "min_step": step, "kept": [list(run_key(r)) for r in kept],
             "rerun_same_as_before": same, "rerun_changed": changed})


def choices(text: str, known: dict[str, Any], flag: str) -> list[str]:
    items = csv_list(text)
    unknown = [i for i in items if i not in known]
    if unknown or not items:
        raise SystemExit(f"{flag} {text!r}: expected names from {', '.join(known)}")
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="five,directions", help="five, directions")
    parser.add_argument("--arms", default="scratch,mp,mp+cl", help="scratch, mp, mp+cl")
    parser.add_argument("--layouts", default="ssv2", help="ssv2, ucf101 (synthetic layouts)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--corpus-seed", type=int, default=None,
                        help="data.synth_seed of the corpus (default: the pipelines')")
    parser.add_argument("--fixed-pretraining", action="store_true",
                        help="one pre-training run per arm (pretrain.seed from the pipeline); "
                             "seeds vary fine-tuning only")
    parser.add_argument("--checkpoint", choices=("final", "best"), default="final",
                        help="model tested: final.pt, or best.pt chosen on validation")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="extra override for every run")
    parser.add_argument("--config", default=None, help="pipelines.yaml (default: the packaged)")
    parser.add_argument("--runs", default="runs", help="the pipeline cache folder")
    parser.add_argument("--out", default="bench-out/table7.json")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: one table from finished results of this benchmark "
                             "(e.g. one per layout, run side by side), written to --out")
    parser.add_argument("--over", type=Path, default=None, metavar="JSON",
                        help="with --combine: the files ran with a larger "
                             "finetune.plateau_min_epochs and replace this result's rows; its "
                             "other rows are kept if they stopped at or after the minimum")
    parser.add_argument("--pool-corpora", action="store_true",
                        help="with --combine: files from different corpus seeds, one table over "
                             "all their runs (gains paired within a corpus and seed)")
    args = parser.parse_args(argv)
    for flag, given in (("--over", args.over), ("--pool-corpora", args.pool_corpora)):
        if given and not args.combine:
            raise SystemExit(f"{flag} goes with --combine")
    if args.combine:
        result = combine(args.combine, Path(args.out), args.checkpoint, args.over,
                         args.pool_corpora)
        if args.over:
            print(f"minimum budget: no plateau stop before update {result['min_step']}; "
                  f"{len(result['kept'])} runs of {args.over} kept (stopped after it); of those "
                  f"run again, {len(result['rerun_same_as_before'])} the same as before, "
                  f"{len(result['rerun_changed'])} changed\n")
        print("\n".join(result["table"]))
        return
    setting = Setting(args.config, args.runs, args.corpus_seed, args.checkpoint,
                      not args.fixed_pretraining, args.extra)
    result = measure(setting, choices(args.tasks, TASKS, "--tasks"),
                     choices(args.arms, ARMS, "--arms"), csv_list(args.layouts),
                     [int(s) for s in csv_list(args.seeds)], Path(args.out))
    print()
    print("\n".join(result["table"]))


if __name__ == "__main__":
    run_main(main)
