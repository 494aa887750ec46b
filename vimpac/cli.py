"""The ``vimpac`` command line: the only place that knows click, rich and exit codes.

Exit codes: 0 success; 1 finished but some inputs failed (each one reported); 2 usage or
configuration error (one line, never a traceback).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
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

from vimpac.common.config import ConfigError, PipelineConfig, load_pipeline

console = Console(stderr=True)
out = Console()
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


# ------------------------------------------------------------------------------------ progress bars

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
    for noisy in ("numcodecs", "zarr", "asyncio", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map configuration and input errors to one line and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            sys.exit(EXIT_USAGE)
        except UsageError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            sys.exit(EXIT_USAGE)
    return wrapper


class UsageError(Exception):
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
    from vimpac.common.environment import environment_report

    table = Table(title="vimpac environment", show_header=False)
    for key, value in environment_report().items():
        table.add_row(key, str(value))
    out.print(table)


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
    from vimpac.common.config import pipeline_names

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
    from vimpac.common.synth import write_corpus

    spec = synth_spec(ctx.pipeline())
    with ctx.progress() as progress:
        summary = write_corpus(out_dir, spec, progress=progress)
    out.print(f"synthetic corpus in {out_dir}: " + ", ".join(
        f"{k} {v}" for k, v in summary.get("counts", {}).items()))


def synth_spec(config: PipelineConfig) -> Any:
    from vimpac.common.synth import SynthSpec

    d = config.data
    return SynthSpec(seed=d.synth_seed, train_per_class=d.synth_train_per_class,
                     val_per_class=d.synth_val_per_class, width=d.synth_size,
                     height=d.synth_size, uncurated_videos=d.synth_uncurated_videos)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: rerun the same command to resume")
        sys.exit(130)
