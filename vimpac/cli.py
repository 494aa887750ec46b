"""The ``vimpac`` command line: the only place that knows click, rich and exit codes.

Exit codes: 0 success; 1 finished but some inputs failed (each one reported); 2 usage or
configuration error (one line, never a traceback).
"""

from __future__ import annotations

import errno
import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from vimpac.common.errors import VimpacError
from vimpac.config import PipelineConfig, load_pipeline

console = Console(stderr=True)
out = Console()
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


# ----------------------------------------------------------------------------------- progress bars

class _RichTask:
    def __init__(self, progress: Progress, task_id: Any) -> None:
        self.progress, self.task_id = progress, task_id

    def advance(self, n: float = 1, **fields: Any) -> None:
        self.progress.update(self.task_id, advance=n, info=_fields_text(fields))

    def update(self, *, completed: float | None = None, total: float | None = None,
               **fields: Any) -> None:
        kwargs: dict[str, Any] = {"info": _fields_text(fields)} if fields else {}
        if completed is not None:
            kwargs["completed"] = completed
        if total is not None:
            kwargs["total"] = total
        self.progress.update(self.task_id, **kwargs)

    def close(self) -> None:
        self.progress.stop_task(self.task_id)


def _fields_text(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        parts.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


class RichProgress:
    """Implements :class:`vimpac.common.progress.Progress` with rich bars (stderr)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=console, disable=not enabled,
            transient=False)

    def task(self, description: str, total: float | None = None, unit: str = "") -> _RichTask:
        return _RichTask(self.progress, self.progress.add_task(description, total=total, info=""))

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


# ------------------------------------------------------------------------------ shared CLI options

class Context:
    def __init__(self, config_path: str | None, pipeline: str, overrides: tuple[str, ...],
                 verbosity: int) -> None:
        self.config_path, self.pipeline_name = config_path, pipeline
        self.overrides, self.verbosity = list(overrides), verbosity

    def pipeline(self, name: str | None = None) -> PipelineConfig:
        return load_pipeline(name or self.pipeline_name, self.config_path, self.overrides)

    def progress(self) -> RichProgress:
        return RichProgress(enabled=self.verbosity >= 0)


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", force=True,
                        handlers=[RichHandler(console=console, show_path=verbosity > 0,
                                              rich_tracebacks=False)])
    for noisy in ("numcodecs", "zarr", "asyncio", "matplotlib", "PIL", "botocore", "aiobotocore",
                  "s3fs", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map configuration, input and I/O errors to one line and exit code 2.

    An OSError (disk full, file size limit, unwritable or missing path) is reported as
    ``error: PATH: reason``; whatever was committed before it (archive shards, checkpoints) is
    intact, and rerunning the same command after fixing the cause resumes.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rich.markup import escape

        try:
            return fn(*args, **kwargs)
        except VimpacError as exc:           # inputs, files, settings: never a bug
            message = str(exc)
        except OSError as exc:
            where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
            message = f"{where}: {exc.strerror or exc}" if where else str(exc)
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                message += " (out of disk space or over the file size limit; the last " \
                           "committed state is intact: free space and rerun to resume)"
        # one line, printed verbatim: paths and values may contain newlines or [markup]
        text = " ".join(message.splitlines())
        console.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USAGE)
    return wrapper


class UsageError(VimpacError):
    """A user mistake found after parsing (a missing file, an incompatible archive...)."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="pipelines.yaml to read (default: ./pipelines.yaml, else the packaged one)")
@click.option("--pipeline", default="demo", show_default=True, help="pipeline name in the config")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="override a config value (repeatable), type-checked")
@click.option("-v", "--verbose", count=True, help="more logging")
@click.option("-q", "--quiet", count=True, help="less output: no progress bars")
@click.version_option(package_name="vimpac")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, pipeline: str, overrides: tuple[str, ...],
        verbose: int, quiet: int) -> None:
    """vimpac: video pre-training via masked token prediction and contrastive learning."""
    ctx.obj = Context(config_path, pipeline, overrides, verbose - quiet)
    _setup_logging(verbose - quiet)


pass_ctx = click.make_pass_decorator(Context)


# ------------------------------------------------------------------------------------- subcommands

@cli.command()
@pass_ctx
@handle_errors
def doctor(ctx: Context) -> None:
    """Show the ffmpeg, torch build, devices and package versions in use."""
    from vimpac.common.environment import check_ffmpeg, environment_report

    table = Table(title="vimpac environment", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")      # long paths wrap whole instead of ending in "..."
    for key, value in environment_report().items():
        table.add_row(key, str(value))
    out.print(table)
    check_ffmpeg()      # a missing or too old ffmpeg: one line, exit 2


@cli.group()
def config() -> None:
    """Inspect and validate pipelines.yaml."""


@config.command("show")
@pass_ctx
@handle_errors
def config_show(ctx: Context) -> None:
    """Print the resolved config of --pipeline, with --set applied."""
    from vimpac.common.config import config_to_yaml

    out.print(config_to_yaml(ctx.pipeline()), highlight=False)


@config.command("validate")
@pass_ctx
@handle_errors
def config_validate(ctx: Context) -> None:
    """Check every pipeline in the config file."""
    from vimpac.config import pipeline_names

    names = pipeline_names(ctx.config_path)
    for name in names:
        load_pipeline(name, ctx.config_path, ctx.overrides)
    out.print(f"{len(names)} pipelines valid: {', '.join(names)}")


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@pass_ctx
@handle_errors
def synth(ctx: Context, out_dir: str) -> None:
    """Write the synthetic video corpus (labelled motion task + uncurated videos)."""
    from vimpac.data.synth import write_corpus

    spec = synth_spec(ctx.pipeline())
    with ctx.progress() as progress:
        summary = write_corpus(out_dir, spec, progress=progress)
    out.print(f"synthetic corpus in {out_dir}: " + ", ".join(
        f"{k} {v}" for k, v in summary.get("counts", {}).items()))


def synth_spec(config: PipelineConfig) -> Any:
    from vimpac.data.synth import spec_from_config

    return spec_from_config(config.data)


# --------------------------------------------------------------------------------------- tokenizer

@cli.group()
def tokenizer() -> None:
    """Train a VQ-VAE on your videos, or import the DALL-E dVAE encoder."""


@tokenizer.command("train")
@click.argument("videos", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="folder for checkpoints, metrics, PNG and the final tokenizer/")
@pass_ctx
@handle_errors
def tokenizer_train(ctx: Context, videos: tuple[str, ...], out_dir: str) -> None:
    """Train the VQ-VAE on frames sampled from VIDEOS (files, folders, list files); resumable."""
    from vimpac.data.inputs import collect_inputs
    from vimpac.tokenize.train_tokenizer import train_tokenizer

    cfg = ctx.pipeline()
    found = collect_inputs(videos)
    if not found.videos:
        raise UsageError("no videos found in " + ", ".join(videos))
    with ctx.progress() as progress:
        metrics = train_tokenizer([v.path for v in found.videos], cfg.tokenizer.train_spec(),
                                  out_dir, progress=progress)
    _print_metrics("tokenizer", metrics)
    out.print(f"tokenizer written to {Path(out_dir) / 'tokenizer'}")


@tokenizer.command("import-dalle")
@click.argument("encoder_pkl", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@handle_errors
def tokenizer_import_dalle(encoder_pkl: str, out_dir: str) -> None:
    """Convert OpenAI's DALL-E encoder.pkl (trusted files only) into vimpac's format."""
    from vimpac.tokenize.dalle import import_dalle

    model = import_dalle(encoder_pkl, out_dir)
    out.print(f"DALL-E encoder imported to {out_dir} (fingerprint {model.fingerprint()[:16]})")


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in metrics.items():
        if isinstance(value, (int, float, str)):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    out.print(table)


# ---------------------------------------------------------------------------------------- archives

class ArchiveLocation(click.ParamType):
    """An archive folder or an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``).

    Local folders are checked like ``click.Path``; URLs are passed on as typed (the archive
    module opens them and names the object in any error)."""

    name = "archive"

    def __init__(self, exists: bool = True) -> None:
        self.path = click.Path(exists=exists, file_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> str:
        from vimpac.common.storage import is_url

        if is_url(str(value)) and not str(value).startswith("file://"):
            return str(value)
        return self.path.convert(value, param, ctx)


ARCHIVE = ArchiveLocation()


# ---------------------------------------------------------------------------------------- tokenize

@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(exists=True),
              help="tokenizer folder (from `tokenizer train` or `tokenizer import-dalle`)")
@click.option("--out", "out_dir", required=True, type=ArchiveLocation(exists=False),
              help="archive folder or fsspec URL such as s3://bucket/prefix (created; rerun "
                   "the same command to resume)")
@click.option("--worker-index", type=int, default=None,
              help="this worker's index (default: torchrun RANK or Slurm array id, else 0)")
@click.option("--num-workers", type=int, default=None,
              help="number of workers (default: torchrun WORLD_SIZE or Slurm array size, else 1)")
@pass_ctx
@handle_errors
def tokenize(ctx: Context, inputs: tuple[str, ...], tokenizer_dir: str, out_dir: str,
             worker_index: int | None, num_workers: int | None) -> None:
    """Tokenize videos, folders, list files or datasets (ucf101:ROOT, ...) into an archive."""
    from vimpac.data.inputs import collect_inputs
    from vimpac.tokenize.job import run_tokenize

    cfg = ctx.pipeline().tokenize
    try:
        found = collect_inputs(inputs)
        with ctx.progress() as progress:
            summary = run_tokenize(found, tokenizer_dir, out_dir, cfg, worker_index=worker_index,
                                   num_workers=num_workers, progress=progress)
    except ValueError as exc:                  # e.g. a worker index out of range
        raise UsageError(str(exc)) from None
    _print_tokenize_summary(summary, out_dir)
    if summary.failures:
        sys.exit(EXIT_SOME_FAILED)


def _print_tokenize_summary(summary: Any, out_dir: str) -> None:
    from rich.markup import escape  # paths are shown verbatim, never parsed as [markup]

    if summary.nothing_to_do:
        out.print(f"nothing to do: all {summary.skipped} videos are already in {escape(out_dir)}")
    table = Table(title=f"tokenize -> {escape(out_dir)}")
    for col in ("ok", "failed", "skipped", "frames", "tokens", "bytes", "frames/s", "seconds"):
        table.add_column(col, justify="right")
    nbytes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in summary.bytes.items()) or "0"
    table.add_row(str(summary.ok), str(len(summary.failures)), str(summary.skipped),
                  str(summary.frames), str(summary.tokens), nbytes,
                  f"{summary.frames_per_second:.1f}", f"{summary.seconds:.1f}")
    out.print(table)
    if summary.failures:
        failed = Table(title="failed inputs")
        failed.add_column("input")
        failed.add_column("reason")
        for path, reason in summary.failures:
            failed.add_row(escape(path), escape(reason))
        out.print(failed)


# ----------------------------------------------------------------------------------------- archive

@cli.command()
@click.argument("archive", type=ARCHIVE)
@click.option("--deep", is_flag=True,
              help="also decode every shard and check it against the manifest (structure, "
                   "grid, keys, token ids), as the readers do")
@pass_ctx
@handle_errors
def verify(ctx: Context, archive: str, deep: bool) -> None:
    """Check an archive's manifest and shard checksums (--deep: every shard decoded and checked
    too); name every problem."""
    from rich.markup import escape

    from vimpac.archive import verify as verify_archive
    from vimpac.common.storage import location

    if not location(archive).is_dir():         # a URL that names nothing (local: click checks)
        raise UsageError(f"{archive}: no such archive folder")
    with ctx.progress() as progress:
        task = progress.task("verify" + (" --deep" if deep else ""), unit="shards")
        report = verify_archive(archive, deep=deep,
                                on_shard=lambda done, total: task.update(completed=done,
                                                                         total=total))
        task.close()
    for problem in report.problems:
        console.print(f"[red]corrupt:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    decoded = f", {report.videos_decoded} video reads decoded (every format)" if deep else ""
    out.print(f"{report.shards_checked} shards, {report.files_checked} files checked{decoded}: "
              + ("ok" if report.ok else f"{len(report.problems)} problem(s)"))
    if not report.ok:
        sys.exit(EXIT_SOME_FAILED)


@cli.group()
def archive() -> None:
    """Archive maintenance: merge worker manifests."""


@archive.command("merge")
@click.argument("archive_dir", type=ARCHIVE)
@handle_errors
def archive_merge(archive_dir: str) -> None:
    """Write ARCHIVE/manifest.json combining every worker's manifest part."""
    from vimpac.archive import merge_manifests

    path = merge_manifests(archive_dir)
    out.print(f"merged manifest written to {path}")


# ----------------------------------------------------------------------------------------- pretrain

class DefaultGroup(click.Group):
    """A group whose first argument, when it names no subcommand, goes to ``default`` (so
    ``vimpac pretrain ARCHIVES... --out DIR`` keeps working beside ``pretrain import-official``)."""

    def __init__(self, *args: Any, default: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@cli.group(cls=DefaultGroup, default="train")
def pretrain() -> None:
    """Pre-train on token archives (`vimpac pretrain ARCHIVES... --out DIR` runs `train`), or
    import the authors' released weights."""


@pretrain.command("train")
@click.argument("archives", nargs=-1, required=False, type=ARCHIVE)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="run folder: checkpoints, metrics.jsonl, tensorboard/, pretrained.pt")
@click.option("--stop-after", type=int, default=None,
              help="stop after this many updates (rerun to continue)")
@pass_ctx
@handle_errors
def pretrain_train(ctx: Context, archives: tuple[str, ...], out_dir: str,
                   stop_after: int | None) -> None:
    """Pre-train on token archives (masked tokens + contrastive); resumable; torchrun-ready.

    ARCHIVES are read together, each video once per epoch; to mix archives by weight, list them
    in pretrain.sources instead (pipelines.yaml or --set)."""
    from vimpac.pretrain.train import run_pretrain

    cfg = ctx.pipeline().pretrain
    with ctx.progress() as progress:
        result = run_pretrain(list(archives), cfg, out_dir, progress=progress,
                              stop_after=stop_after)
    _print_metrics(f"pretrain step {result.step}", result.last_metrics)
    if result.step >= cfg.steps:
        out.print(f"pre-trained backbone: {result.pretrained}")


@pretrain.command("import-official")
@click.argument("classifier_pt", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="folder for pretrained.pt and import.json")
@click.option("--tokenizer", "tokenizer_dir", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="the DALL-E tokenizer from `vimpac tokenizer import-dalle` (the weights were "
                   "pre-trained on its tokens)")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="attention heads (default: args.txt beside the file if it says, else "
                   "hid_dim // 64 as the official code)")
@handle_errors
def pretrain_import_official(classifier_pt: str, out_dir: str, tokenizer_dir: str,
                             heads: int | None) -> None:
    """Import the authors' released classifier.pt (read with weights_only, never args.pickle)."""
    from vimpac.pretrain.official import import_official
    from vimpac.tokenize.tokenizer import dalle_folder

    fingerprint, codebook = dalle_folder(tokenizer_dir)
    record = import_official(classifier_pt, out_dir, heads=heads, tokenizer_codebook=codebook,
                             tokenizer_fingerprint=fingerprint)
    _print_metrics("imported", {**record["inferred"], "sha256": record["sha256"][:16]})
    out.print(f"pre-trained model: {Path(out_dir) / 'pretrained.pt'}")


# ----------------------------------------------------------------------------------------- finetune

@cli.command()
@click.argument("archive_dir", type=ARCHIVE)
@click.option("--init", "init", type=click.Path(exists=True, dir_okay=False), default=None,
              help="pretrained.pt from `vimpac pretrain` (omit: train from scratch)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="run folder: checkpoints, metrics.jsonl, best.pt, final.pt, summary.json")
@click.option("--stop-after", type=int, default=None,
              help="stop after this many updates (rerun to continue)")
@pass_ctx
@handle_errors
def finetune(ctx: Context, archive_dir: str, init: str | None, out_dir: str,
             stop_after: int | None) -> None:
    """Fine-tune on a labelled token archive (action recognition); resumable; torchrun-ready."""
    from vimpac.finetune.train import run_finetune

    config = ctx.pipeline()
    if init is None and config.finetune.init == "pretrained":
        console.print("no --init: training from scratch (the baseline)", highlight=False)
    try:
        with ctx.progress() as progress:
            summary = run_finetune(archive_dir, config.finetune, out_dir, init=init,
                                   model_preset=config.pretrain.model, progress=progress,
                                   stop_after=stop_after)
    except ValueError as exc:                  # bad settings found by the trainer / evaluator
        raise UsageError(str(exc)) from None
    _print_metrics("finetune", {k: v for k, v in summary.items() if k != "stop_reason"})
    out.print(f"stopped: {_stop_text(summary)}", highlight=False, soft_wrap=True)


def _stop_text(summary: dict[str, Any]) -> str:
    """Why a fine-tuning run stopped: plateau, budget, or budget while still improving."""
    if summary.get("stop_reason"):
        return str(summary["stop_reason"])
    return (f"interrupted at update {summary['steps']} of {summary['total_steps']} "
            "(--stop-after); rerun the same command to continue")


@cli.command()
@click.argument("archive_dir", type=ARCHIVE)
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="best.pt / final.pt from `vimpac finetune` (or pretrained.pt with --probes)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--split", "split_tag", default=None,
              help="split tag to evaluate (default: the fine-tuning run's eval split)")
@click.option("--probes", is_flag=True,
              help="frozen-feature k-NN and linear probes of the CLS features, and the "
                   "time-reversal diagnostic, instead")
@pass_ctx
@handle_errors
def evaluate(ctx: Context, archive_dir: str, checkpoint: str, out_dir: str,
             split_tag: str | None, probes: bool) -> None:
    """Multi-view evaluation (top-1/5, per class, confusion PNG), or k-NN/linear probes."""
    from vimpac.finetune.evaluate import run_evaluate, run_probes

    cfg = ctx.pipeline().evaluate
    try:
        with ctx.progress() as progress:
            if probes:
                results = run_probes(archive_dir, checkpoint, cfg, out_dir, progress=progress)
            else:
                results = run_evaluate(archive_dir, checkpoint, cfg, out_dir,
                                       split_tag=split_tag, progress=progress)
    except ValueError as exc:                  # bad settings found by the trainer / evaluator
        raise UsageError(str(exc)) from None
    _print_metrics("evaluate", results)
    if "time_reversal" in results:
        from vimpac.finetune.time_reversal import time_reversal_lines

        for line in time_reversal_lines(results["time_reversal"]):
            out.print(line, highlight=False)


# --------------------------------------------------------------------------------------- pipelines

RUNS_OPTION = click.option("--runs", "runs_dir", default="runs", show_default=True,
                           envvar="VIMPAC_RUNS", type=click.Path(file_okay=False),
                           help="folder of cached stage outputs")


@cli.command()
@click.argument("name", required=False)
@RUNS_OPTION
@click.option("--dry-run", is_flag=True, help="print the plan: what runs, what is reused, where")
@click.option("--force", multiple=True, metavar="STAGE",
              help="redo this stage and the stages after it that read it (repeatable)")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="run up to this many independent stages at once (e.g. fine-tuning from "
                   "scratch beside pre-training), each in its own process with its share of "
                   "the cores")
@pass_ctx
@handle_errors
def run(ctx: Context, name: str | None, runs_dir: str, dry_run: bool,
        force: tuple[str, ...], jobs: int) -> None:
    """Run a named pipeline (default: demo), reusing every stage output that exists."""
    from vimpac.pipeline import PipelineError, run_pipeline

    config = ctx.pipeline(name)
    start = time.perf_counter()
    table = Table(title=f"pipeline {config.name}" + (" (dry run)" if dry_run else ""))
    for col in ("stage", "status", "seconds", "output"):
        table.add_column(col)

    def show(outcome: Any) -> None:
        secs = f"{outcome.seconds:.1f}" if outcome.status == "ran" else ""
        table.add_row(outcome.name, outcome.status, secs, str(outcome.path))
        if not dry_run:
            console.print(f"[bold]{outcome.name}[/bold]: {outcome.status} ({outcome.path})",
                          highlight=False)
    try:
        with ctx.progress() as progress:
            outcomes = run_pipeline(config, runs_dir, force=force, dry_run=dry_run,
                                    progress=progress if not dry_run else _null_progress(),
                                    on_stage=show, jobs=jobs)
    except PipelineError as exc:
        raise UsageError(str(exc)) from None
    out.print(table)
    report = next((o for o in outcomes if o.name == "report" and o.status == "ran"), None)
    if report is not None:
        results = Table(title="results")
        for col in ("stage", "figure", "value"):
            results.add_column(col)
        for row in report.result.get("rows", []):
            results.add_row(*row)
        out.print(results)
        out.print(f"report: {report.result['report']}")
    out.print(f"done in {time.perf_counter() - start:.1f} s")


def _null_progress() -> Any:
    from vimpac.common.progress import NULL_PROGRESS

    return NULL_PROGRESS


def _all_pipelines(ctx: Context) -> list[Any]:
    from vimpac.config import pipeline_names

    return [load_pipeline(n, ctx.config_path, ctx.overrides)
            for n in pipeline_names(ctx.config_path)]


@cli.command("ls")
@RUNS_OPTION
@pass_ctx
@handle_errors
def ls_outputs(ctx: Context, runs_dir: str) -> None:
    """List cached stage outputs with sizes and the pipelines that use them."""
    from vimpac.pipeline import list_outputs

    table = Table(title=f"cached outputs in {runs_dir}")
    for col in ("kind", "key", "size", "complete", "used by"):
        table.add_column(col)
    for row in list_outputs(_all_pipelines(ctx), runs_dir):
        table.add_row(row.kind, row.key, f"{row.bytes / 2**20:.1f} MiB",
                      "yes" if row.complete else "partial", ", ".join(row.pipelines) or "-")
    out.print(table)


@cli.command()
@RUNS_OPTION
@click.option("--dry-run", is_flag=True, help="only list what would be removed")
@pass_ctx
@handle_errors
def gc(ctx: Context, runs_dir: str, dry_run: bool) -> None:
    """Remove cached outputs that no pipeline in the config refers to."""
    from vimpac.pipeline import collect_garbage, garbage

    rows = garbage(_all_pipelines(ctx), runs_dir) if dry_run else \
        collect_garbage(_all_pipelines(ctx), runs_dir)
    for row in rows:
        out.print(f"{'would remove' if dry_run else 'removed'} {row.path} "
                  f"({row.bytes / 2**20:.1f} MiB)")
    out.print(f"{len(rows)} output(s) {'unreferenced' if dry_run else 'removed'}")


@cli.command()
@click.argument("archive_dir", type=ARCHIVE)
@click.option("--png", "png", required=True, type=click.Path(dir_okay=False),
              help="picture to write")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True), default=None,
              help="tokenizer folder, to draw VQ reconstructions")
@click.option("--videos", default=3, show_default=True, help="videos to draw")
@handle_errors
def inspect(archive_dir: str, png: str, tokenizer_dir: str | None, videos: int) -> None:
    """Draw a few archived videos: source frames, VQ reconstructions, token maps."""
    from vimpac.tokenize.visualize import inspect_archive

    try:
        path = inspect_archive(archive_dir, png, tokenizer_dir=tokenizer_dir, videos=videos)
    except ValueError as exc:                  # e.g. a tokenizer that did not write the archive
        raise UsageError(str(exc)) from None
    out.print(f"wrote {path}")


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: rerun the same command to resume")
        sys.exit(130)
    except Exception:                           # not a user error: a bug, with its traceback
        import traceback

        traceback.print_exc()
        console.print("[red]internal error[/red]: this is a bug in vimpac, not a problem with "
                      "your inputs; committed work is intact and rerunning resumes. Please "
                      "report it with the traceback above.", highlight=False)
        sys.exit(EXIT_INTERNAL)
