"""``vimpac run``: a named pipeline as a plan of content-addressed, reusable stage outputs.

Every stage's output goes to ``RUNS/<kind>/<key>/`` where ``key`` hashes the stage's resolved config
section and the keys of the stages it reads. A folder with ``DONE.json`` is complete and is reused
by any pipeline whose plan names the same key; a folder without it is resumed (each stage's own job
is resumable). So two pipelines with the same tokenize settings share one token archive, and a
pipeline that changes only pre-training settings reuses everything before pre-training.

Plan (synthetic data)::

    data -> tokenizer -> tokens-pretrain -> pretrain -> finetune ----------> evaluate -> report
               \\-------> tokens-finetune ------------/  finetune-scratch -> evaluate-scratch
                                                     \\-> probes (frozen pretrained.pt)

With ``jobs`` > 1, stages whose inputs are done run at once in child processes
(:mod:`vimpac.common.processes`); every stage holds ``RUNS/<kind>/<key>.lock`` while it builds,
so two runs (or two stages) that need one output build it once, and ``gc`` leaves it alone.

With ``pretrain.sources`` (archives tokenized before, mixed by weight) the ``pretrain`` stage reads
those instead of tokenizing the pipeline's pre-training inputs.
With ``pretrain.official_checkpoint`` (the authors' released ``classifier.pt``) the ``pretrain``
stage imports those weights instead of training (:mod:`vimpac.pretrain.official`), recording the
fingerprint of the pipeline's DALL-E tokenizer; its key hashes the file's path, size and time.
The evaluate stages test ``final.pt`` (``evaluate.checkpoint``; ``best`` is the model chosen on the
validation part of the training split) on the evaluation split. The ``probes`` stage probes the
frozen pre-trained backbone (``pretrained.pt``) on the fine-tuning clips: k-NN and linear probes of
its CLS features and the time-reversal diagnostic, against a random backbone of the same preset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vimpac.common import environment
from vimpac.common.config import config_to_yaml, result_fields
from vimpac.common.errors import VimpacError
from vimpac.common.fileio import atomic_write_json
from vimpac.common.progress import NULL_PROGRESS, Progress
from vimpac.config import PipelineConfig
from vimpac.data.datasets import load_dataset, standard_splits
from vimpac.data.synth import spec_from_config

log = logging.getLogger(__name__)

PLAN_VERSION = 1
DONE = "DONE.json"


StageFn = Callable[["RunContext", "Stage"], dict[str, Any]]


@dataclass
class Stage:
    """One step of a plan, declared once: what it computes (``run``) from which resolved settings
    (``config``) and which stages (``needs``), and where its output lives.

    ``config`` holds the very objects ``run`` reads (a stage never reads the pipeline's config
    itself), and the key hashes them (every non-volatile field, :func:`result_fields`), so the
    cache key and the run cannot drift apart."""
    name: str                                   # e.g. "tokens-pretrain"
    kind: str                                   # folder under RUNS: data, tokenizer, tokens, ...
    run: StageFn
    config: dict[str, Any]                      # resolved sections and identities it runs with
    needs: list[str] = field(default_factory=list)
    key: str = ""
    path: Path = Path()

    @property
    def settings(self) -> dict[str, Any]:
        """What defines the output: the config's plain values, volatile fields left out."""
        return {k: result_fields(v) if dataclasses.is_dataclass(v) else v
                for k, v in self.config.items()}

    def done(self) -> bool:
        return (self.path / DONE).is_file()

    def record(self) -> dict[str, Any]:
        return read_stage_record(self.path, self.name)

    def result(self) -> dict[str, Any]:
        return self.record()["result"]

    def machine(self) -> dict[str, Any] | None:
        """Where the stage ran (None when its record predates this field or is not a dict)."""
        machine = self.record().get("machine")
        return machine if isinstance(machine, dict) else None


class PipelineError(VimpacError):
    """A pipeline that cannot be planned or run as configured."""


def read_stage_record(folder: Path, name: str) -> dict[str, Any]:
    """Stage ``name``'s ``folder/DONE.json``: ``result`` (a dict), ``seconds``, ``finished`` and,
    in records written since it was added, ``machine`` (:func:`environment.machine`); a damaged
    record is an error naming the file (``--force`` the stage to run it again)."""
    path = folder / DONE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: unreadable stage record ({exc}); run the stage "
                            f"again with --force {name}") from None
    if not isinstance(record, dict) or not isinstance(record.get("result"), dict):
        raise PipelineError(f"{path}: stage record without a 'result' object; run the "
                            f"stage again with --force {name}")
    return record


def stable_hash(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ plan

def build_plan(config: PipelineConfig, runs: str | Path) -> list[Stage]:
    """The stages of ``config`` in run order, each with its key and output folder."""
    d, stages = config.data, []
    if d.synthetic:
        stages.append(Stage("data", "data", stage_data, {"synth": spec_from_config(d)}))
        pretrain_inputs = _synth_pretrain_inputs(config)
        finetune_inputs = {"from": "data", "dataset": d.synth_layout}
    else:
        if not (d.pretrain_inputs or d.finetune_dataset or config.pretrain.sources):
            raise PipelineError(f"pipeline '{config.name}': data.synthetic is false but none of "
                                "data.pretrain_inputs, data.finetune_dataset and "
                                "pretrain.sources is set")
        pretrain_inputs = {"paths": [str(Path(p).resolve()) for p in d.pretrain_inputs]}
        finetune_inputs = {"dataset": d.finetune_dataset}
    data_needs = ["data"] if d.synthetic else []
    tokenizer = config.tokenizer
    if tokenizer.source == "train":
        stages.append(Stage("tokenizer", "tokenizer", stage_tokenizer,
                            {"tokenizer": tokenizer, "inputs": pretrain_inputs}, data_needs))
    elif tokenizer.source == "dalle":
        stages.append(Stage("tokenizer", "tokenizer", stage_tokenizer,
                            {"tokenizer": tokenizer, "dalle": _file_identity(tokenizer.path)}))
    tok_needs = ["tokenizer"] if tokenizer.source != "path" else []
    tok_id = {"path": str(Path(tokenizer.path).resolve())} if not tok_needs else {}
    official, sources = config.pretrain.official_checkpoint, config.pretrain.sources
    has_pretrain = bool(d.synthetic or d.pretrain_inputs or official or sources)
    has_finetune = bool(d.synthetic or d.finetune_dataset)
    if official:
        stages.append(Stage("pretrain", "pretrain", stage_import_official,
                            {"official": _file_identity(official), **tok_id}, tok_needs))
    elif sources:                       # archives tokenized before, mixed by weight
        stages.append(Stage("pretrain", "pretrain", stage_pretrain,
                            {"pretrain": config.pretrain}))
    elif has_pretrain:
        stages.append(Stage("tokens-pretrain", "tokens", stage_tokens_pretrain,
                            {"tokenize": config.tokenize, "inputs": pretrain_inputs, **tok_id},
                            tok_needs + data_needs))
        stages.append(Stage("pretrain", "pretrain", stage_pretrain,
                            {"pretrain": config.pretrain}, ["tokens-pretrain"]))
    if has_finetune:
        stages.append(Stage("tokens-finetune", "tokens", stage_tokens_finetune,
                            {"tokenize": config.tokenize.labelled(config.finetune),
                             "inputs": finetune_inputs, **tok_id}, tok_needs + data_needs))
        stages += _finetune_stages(config, has_pretrain)
    if has_pretrain and has_finetune:
        stages.append(_probes_stage(config))
    stages.append(Stage("report", "reports", stage_report, {"pipeline": config.name}))
    _assign_keys(stages, Path(runs))
    return stages


def _synth_pretrain_inputs(config: PipelineConfig) -> dict[str, Any]:
    """What the synthetic corpus gives the tokenizer and pre-training (``data.synth_pretrain_on``):
    its uncurated videos, or the labelled task's training split (the fine-tuning split
    ``finetune.split`` of ``data.synth_layout``, validation part included), as plain videos
    without labels."""
    d = config.data
    if d.synth_pretrain_on == "uncurated":
        return {"from": "data", "path": "uncurated"}
    if not config.finetune.split.isdigit():
        raise PipelineError(f"finetune.split = {config.finetune.split!r}: expected a split "
                            "number such as 1")
    train_tag, _ = standard_splits(d.synth_layout, int(config.finetune.split))
    return {"from": "data", "dataset": d.synth_layout, "split": train_tag, "labels": False}


def _finetune_stages(config: PipelineConfig, has_pretrain: bool) -> list[Stage]:
    """Fine-tuning from the pre-trained backbone and/or from scratch, each then evaluated."""
    ft, variants = config.finetune, []
    if has_pretrain and ft.init == "pretrained":
        variants.append(("finetune", "pretrained", ["tokens-finetune", "pretrain"]))
    if ft.init == "scratch" or ft.compare_scratch or not has_pretrain:
        variants.append(("finetune-scratch", "scratch", ["tokens-finetune"]))
    stages = []
    for name, init, needs in variants:
        stages.append(Stage(name, "finetune", stage_finetune,
                            {"finetune": ft, "init": init, "model": config.pretrain.model},
                            needs))
        stages.append(Stage(name.replace("finetune", "evaluate"), "evaluate", stage_evaluate,
                            {"evaluate": config.evaluate}, [name]))
    return stages


def _probes_stage(config: PipelineConfig) -> Stage:
    """Frozen-feature probes of ``pretrained.pt`` on the clips fine-tuning sees."""
    ev, ft = config.evaluate, config.finetune
    return Stage("probes", "probes", stage_probes,
                 {"probes": {"knn_k": ev.knn_k, "knn_temperature": ev.knn_temperature,
                             "linear_probe_epochs": ev.linear_probe_epochs},
                  "clips": {"split": ft.split, "frames": ft.frames, "grid": ft.grid,
                            "fps": ft.fps}},
                 ["tokens-finetune", "pretrain"])


def _file_identity(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():                       # plannable (--dry-run); running it will say why
        return {"path": str(p.resolve()), "missing": True}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime}


def _assign_keys(stages: list[Stage], runs: Path) -> None:
    by_name = {s.name: s for s in stages}
    for stage in stages:
        upstream = {n: by_name[n].key for n in stage.needs}
        stage.key = stable_hash({"v": PLAN_VERSION, "kind": stage.kind,
                                 "settings": stage.settings, "needs": upstream})
        stage.path = runs / stage.kind / stage.key
    report = by_name["report"]
    report.needs = [s.name for s in stages if s.name != "report"]
    report.path = runs / "reports" / str(report.settings["pipeline"])


# ------------------------------------------------------------------------------------------ run

@dataclass
class RunContext:
    config: PipelineConfig
    runs: Path
    stages: dict[str, Stage]
    progress: Progress = NULL_PROGRESS

    def path(self, name: str) -> Path:
        return self.stages[name].path

    def result(self, name: str) -> dict[str, Any]:
        return self.stages[name].result()


def stage_data(ctx: RunContext, stage: Stage) -> dict[str, Any]:
    from vimpac.data.synth import write_corpus

    corpus = write_corpus(stage.path / "corpus", stage.config["synth"], progress=ctx.progress)
    return {"corpus": corpus["counts"]}


def _inputs(ctx: RunContext, inputs: dict[str, Any]) -> list[str]:
    """A tokenize stage's ``inputs`` identity as the paths / dataset specs it names."""
    if inputs.get("from") == "data":
        corpus = ctx.path("data") / "corpus"
        if "split" in inputs:                   # one split's videos, as files: no labels
            index = load_dataset(inputs["dataset"], str(corpus / inputs["dataset"]))
            return [item.path for item in index.split(inputs["split"])]
        if "dataset" in inputs:
            return [f"{inputs['dataset']}:{corpus / inputs['dataset']}"]
        return [str(corpus / inputs["path"])]
    return [inputs["dataset"]] if "dataset" in inputs else list(inputs["paths"])


def _tokenizer_dir(ctx: RunContext) -> Path:
    if "tokenizer" not in ctx.stages:                   # tokenizer.source = path
        return Path(ctx.config.tokenizer.path)
    return ctx.path("tokenizer") / "tokenizer"


def stage_tokenizer(ctx: RunContext, stage: Stage) -> dict[str, Any]:
    tk = stage.config["tokenizer"]
    if "dalle" in stage.config:
        from vimpac.tokenize.dalle import import_dalle

        if not Path(tk.path).is_file():
            raise PipelineError(f"tokenizer.path = {tk.path!r}: no such file (OpenAI's DALL-E "
                                "encoder.pkl, which vimpac cannot download for you)")
        model = import_dalle(tk.path, stage.path / "tokenizer")
        return {"fingerprint": model.fingerprint()}
    from vimpac.data.inputs import collect_inputs
    from vimpac.tokenize.train_tokenizer import train_tokenizer

    videos = [v.path for v in collect_inputs(_inputs(ctx, stage.config["inputs"])).videos]
    metrics = train_tokenizer(videos, tk.train_spec(), stage.path, progress=ctx.progress)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def stage_tokens(ctx: RunContext, stage: Stage) -> dict[str, Any]:
    """A token archive of the stage's inputs with the stage's tokenize settings."""
    from vimpac.tokenize.job import run_tokenize

    summary = run_tokenize(_inputs(ctx, stage.config["inputs"]), _tokenizer_dir(ctx),
                           stage.path / "archive", stage.config["tokenize"], worker_index=0,
                           num_workers=1, progress=ctx.progress)
    for path, reason in summary.failures:
        log.warning("not tokenized: %s: %s", path, reason)
    return {"ok": summary.ok + summary.skipped, "failed": len(summary.failures),
            "frames": summary.frames, "bytes": summary.bytes}


stage_tokens_pretrain = stage_tokens_finetune = stage_tokens


def stage_pretrain(ctx: RunContext, stage: Stage) -> dict[str, Any]:
    from vimpac.pretrain.train import run_pretrain

    cfg = stage.config["pretrain"]
    archives = [] if cfg.sources else [ctx.path("tokens-pretrain") / "archive"]
    result = run_pretrain(archives, cfg, stage.path, progress=ctx.progress)
    return {"step": result.step, **{k: float(v) for k, v in result.last_metrics.items()}}


def stage_import_official(ctx: RunContext, stage: Stage) -> dict[str, Any]:
    """The authors' weights into ``pretrained.pt``, tied to the pipeline's DALL-E tokenizer."""
    from vimpac.pretrain.official import import_official
    from vimpac.tokenize.tokenizer import dalle_folder

    path = stage.config["official"]["path"]
    if not Path(path).is_file():
        raise PipelineError(f"pretrain.official_checkpoint = {path!r}: no such file (the "
                            "authors' released classifier.pt, which vimpac cannot download)")
    fingerprint, codebook = dalle_folder(_tokenizer_dir(ctx))
    record = import_official(path, stage.path, tokenizer_fingerprint=fingerprint,
                             tokenizer_codebook=codebook)
    return {"step": 0, "imported": record["source"], "sha256": record["sha256"],
            **{k: v for k, v in record["inferred"].items() if isinstance(v, (int, str))}}


def stage_finetune(ctx: RunContext, stage: Stage) -> dict[str, Any]:
    """Fine-tuning from the pre-trained backbone (``init: pretrained``) or from scratch."""
    from vimpac.finetune.train import run_finetune

    init = str(ctx.path("pretrain") / "pretrained.pt") \
        if stage.config["init"] == "pretrained" else None
    summary = run_finetune(ctx.path("tokens-finetune") / "archive", stage.config["finetune"],
                           stage.path, init=init, model_preset=stage.config["model"],
                           progress=ctx.progress)
    return json.loads(json.dumps(summary, default=str))


def stage_evaluate(ctx: RunContext, stage: Stage) -> dict[str, Any]:
    """The fine-tuned model the stage reads (``final.pt``, or ``best.pt`` chosen on the
    validation split: ``evaluate.checkpoint``) on the evaluation split."""
    from vimpac.finetune.evaluate import run_evaluate

    cfg = stage.config["evaluate"]
    ckpt = ctx.path(stage.needs[0]) / f"{cfg.checkpoint}.pt"
    results = run_evaluate(ctx.path("tokens-finetune") / "archive", ckpt, cfg, stage.path)
    return json.loads(json.dumps(results, default=str))


def stage_probes(ctx: RunContext, stage: Stage) -> dict[str, Any]:
    """k-NN / linear probes and the time-reversal diagnostic of the pre-trained backbone (and of a
    random one) on the fine-tuning archive's standard split, at fine-tuning's clip size."""
    from vimpac.archive import Archive
    from vimpac.finetune.config import EvaluateConfig
    from vimpac.finetune.evaluate import run_probes
    from vimpac.finetune.train import resolve_splits

    archive, clips = ctx.path("tokens-finetune") / "archive", stage.config["clips"]
    opened = Archive(archive)
    splits = resolve_splits(opened.settings, clips["split"], opened.root)
    results = run_probes(archive, ctx.path("pretrain") / "pretrained.pt",
                         EvaluateConfig(**stage.config["probes"]), stage.path, splits=splits,
                         frames=clips["frames"], grid=clips["grid"], fps=clips["fps"],
                         progress=ctx.progress)
    return json.loads(json.dumps(results, default=str))


def stage_report(ctx: RunContext, stage: Stage) -> dict[str, Any]:
    from vimpac.report import write_report

    return write_report(ctx, stage.path)


def dependents(stages: list[Stage], names: set[str]) -> set[str]:
    """``names`` and every stage that reads from them, transitively."""
    out = set(names)
    changed = True
    while changed:
        changed = False
        for s in stages:
            if s.name not in out and out & set(s.needs):
                out.add(s.name)
                changed = True
    return out


@dataclass
class StageOutcome:
    name: str
    path: Path
    status: str                 # reused | ran | planned
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)


def run_pipeline(config: PipelineConfig, runs: str | Path, *, force: tuple[str, ...] = (),
                 dry_run: bool = False, progress: Progress = NULL_PROGRESS,
                 on_stage: Callable[[StageOutcome], None] | None = None,
                 jobs: int = 1) -> list[StageOutcome]:
    """Run (or, with ``dry_run``, only plan) every stage of ``config`` that is not done.

    ``jobs`` > 1 runs up to that many stages at once, each in its own process with a share of
    the threads (:func:`_run_concurrently`); a stage still starts only once every stage it reads
    is done, so the outputs are those of the same stages run one by one."""
    if jobs < 1:
        raise PipelineError(f"--jobs {jobs}: expected 1 or more")
    stages = build_plan(config, runs)
    names = {s.name for s in stages}
    unknown = set(force) - names
    if unknown:
        raise PipelineError(f"--force {sorted(unknown)[0]}: no such stage in pipeline "
                            f"'{config.name}' (stages: {', '.join(s.name for s in stages)})")
    redo = dependents(stages, set(force))
    ctx = RunContext(config, Path(runs), {s.name: s for s in stages}, progress)
    outcomes: list[StageOutcome] = []
    todo: list[Stage] = []
    for stage in stages:
        again = stage.name in redo or stage.name == "report"
        if stage.done() and not again:
            outcomes.append(StageOutcome(stage.name, stage.path, "reused",
                                         result=stage.result()))
        elif dry_run:
            outcomes.append(StageOutcome(stage.name, stage.path, "planned"))
        else:
            todo.append(stage)
            continue
        if on_stage:
            on_stage(outcomes[-1])
    fresh = {s.name for s in todo if s.name in redo and s.name != "report"}
    if jobs > 1 and len(todo) > 1:
        outcomes += _run_concurrently(ctx, todo, fresh, jobs, on_stage)
    else:
        for stage in todo:
            outcomes.append(_run_stage(ctx, stage, fresh=stage.name in fresh))
            if on_stage:
                on_stage(outcomes[-1])
    order = [s.name for s in stages]
    return sorted(outcomes, key=lambda o: order.index(o.name))


def _run_concurrently(ctx: RunContext, todo: list[Stage], fresh: set[str], jobs: int,
                      on_stage: Callable[[StageOutcome], None] | None) -> list[StageOutcome]:
    """Run ``todo`` (in plan order) with up to ``jobs`` stages at once, each in a child process;
    a stage starts once every stage it reads is done. Of this process's torch threads (the
    cores, or ``OMP_NUM_THREADS``), a stage that the plan lets run beside another gets
    ``threads // jobs``, one that every other stage reads or is read by gets them all
    (:func:`threads_of`: fixed by the plan, not by timing, so a rerun or a resumed stage has the
    same thread count). The children's progress and logs reach ``ctx.progress`` and this
    process's logging. On an error the stages still running are stopped (each resumes when run
    again) and the error is raised."""
    from vimpac.common.processes import Children, thread_budget

    pending, outcomes = list(todo), []
    waiting_on = {s.name for s in todo}
    threads = threads_of(list(ctx.stages.values()), jobs, thread_budget())
    portable = dataclasses.replace(ctx, progress=NULL_PROGRESS)
    log.info("running up to %d stages at once; threads per stage: %s", jobs,
             ", ".join(f"{s.name} {threads[s.name]}" for s in todo))
    with Children(ctx.progress) as children:
        while pending or children.running:
            for stage in list(pending):
                if len(children.running) >= jobs:
                    break
                if waiting_on & set(stage.needs):
                    continue
                pending.remove(stage)
                children.start(stage.name, _stage_in_child, portable, stage,
                               stage.name in fresh, threads=threads[stage.name])
            name, outcome = children.wait()
            waiting_on.discard(name)
            outcomes.append(outcome)
            if on_stage:
                on_stage(outcome)
    return outcomes


def threads_of(stages: list[Stage], jobs: int, cores: int) -> dict[str, int]:
    """Threads per stage under ``--jobs``: all ``cores`` for a stage that can never run beside
    another (every other stage of the plan reads it or is read by it, transitively), else
    ``cores // jobs`` (at least 1)."""
    downstream = {s.name: dependents(stages, {s.name}) for s in stages}
    share = max(1, cores // jobs)
    return {s.name: cores if all(t.name in downstream[s.name] or s.name in downstream[t.name]
                                 for t in stages) else share
            for s in stages}


def _stage_in_child(progress: Progress, ctx: RunContext, stage: Stage,
                    fresh: bool) -> StageOutcome:
    return _run_stage(dataclasses.replace(ctx, progress=progress), stage, fresh)


def lock_path(output: Path) -> Path:
    """The lock file of a stage output folder: ``RUNS/<kind>/<key>.lock``."""
    return output.with_name(output.name + ".lock")


@contextlib.contextmanager
def output_lock(output: Path, *, wait: bool = True, who: str = "") -> Iterator[bool]:
    """Hold ``output``'s lock (``flock`` on :func:`lock_path`; the OS drops it however its holder
    exits; local file systems and NFSv4). ``wait``: block until it is free (logging that, as
    ``who``), and yield True; else yield whether it was free (and is now held)."""
    import fcntl

    lock = lock_path(output)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = wait
            if wait:
                log.info("%s: another process is building %s; waiting for it", who, output)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield held
    finally:
        os.close(fd)                           # closing drops the lock


def _run_stage(ctx: RunContext, stage: Stage, fresh: bool) -> StageOutcome:
    """Build ``stage`` (``fresh``: from an empty folder) unless, once its lock is held, its output
    turns out to be complete (built meanwhile by another process)."""
    with output_lock(stage.path, who=stage.name):   # one builder per output, across runs
        if not fresh and stage.name != "report" and stage.done():
            return StageOutcome(stage.name, stage.path, "reused", result=stage.result())
        return _build_stage(ctx, stage, fresh)


def _build_stage(ctx: RunContext, stage: Stage, fresh: bool) -> StageOutcome:
    if fresh and stage.path.exists():
        shutil.rmtree(stage.path)
    stage.path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage.path / "stage.json", {
        "name": stage.name, "kind": stage.kind, "key": stage.key, "settings": stage.settings,
        "needs": {n: ctx.stages[n].key for n in stage.needs}, "pipeline": ctx.config.name})
    (stage.path / "config.yaml").write_text(config_to_yaml(ctx.config))
    log.info("stage %s -> %s", stage.name, stage.path)
    start = time.perf_counter()
    result = stage.run(ctx, stage)
    seconds = time.perf_counter() - start
    atomic_write_json(stage.path / DONE, {"result": result, "seconds": seconds,
                                          "finished": time.time(),
                                          "machine": environment.machine()})
    return StageOutcome(stage.name, stage.path, "ran", seconds, result)


# --------------------------------------------------------------------------------- ls / gc

@dataclass
class CachedOutput:
    kind: str
    key: str
    path: Path
    bytes: int
    complete: bool
    pipelines: list[str]


def referenced(configs: list[PipelineConfig], runs: Path) -> dict[Path, list[str]]:
    """Output folder -> names of the pipelines whose plans use it."""
    refs: dict[Path, list[str]] = {}
    for config in configs:
        try:
            stages = build_plan(config, runs)
        except PipelineError as exc:
            log.warning("%s", exc)
            continue
        for stage in stages:
            refs.setdefault(stage.path, []).append(config.name)
    return refs


def list_outputs(configs: list[PipelineConfig], runs: str | Path) -> list[CachedOutput]:
    runs = Path(runs)
    refs = referenced(configs, runs)
    rows = []
    for kind_dir in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        for out in sorted(p for p in kind_dir.iterdir() if p.is_dir()):
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            rows.append(CachedOutput(kind_dir.name, out.name, out, size, (out / DONE).is_file(),
                                     sorted(set(refs.get(out, [])))))
    return rows


def garbage(configs: list[PipelineConfig], runs: str | Path) -> list[CachedOutput]:
    return [row for row in list_outputs(configs, runs) if not row.pipelines]


def collect_garbage(configs: list[PipelineConfig], runs: str | Path) -> list[CachedOutput]:
    """Remove the outputs no pipeline of ``configs`` uses, and their locks; an output that a
    running stage is building (its lock held: a run with other ``--set`` values, say) is kept."""
    removed = []
    for row in garbage(configs, runs):
        with output_lock(row.path, wait=False) as free:
            if not free:
                log.warning("%s: kept: a running stage is building it", row.path)
                continue
            shutil.rmtree(row.path)
            lock_path(row.path).unlink(missing_ok=True)
        removed.append(row)
    return removed
