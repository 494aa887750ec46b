"""The command line: every subcommand listed with a purpose; doctor reports the environment;
a bug exits 3 with its traceback."""

import pytest

from vimpac.cli import cli


def test_help_lists_subcommands(cli_runner):
    result = cli_runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("doctor", "config", "synth"):
        assert name in result.output


def test_doctor_reports_ffmpeg_and_torch(cli_runner):
    result = cli_runner.invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "ffmpeg" in result.output and "torch" in result.output


def test_stage_errors_inside_run_are_one_line(cli_runner, tmp_path, monkeypatch):
    """An archive problem raised deep inside `vimpac run` ends as one line, exit 2."""
    import vimpac.pipeline as pipeline
    from vimpac.archive import ArchiveError

    def broken(ctx, stage):
        raise ArchiveError(f"{tmp_path}/archive: too few videos for a batch")

    monkeypatch.setattr(pipeline, "stage_data", broken)
    result = cli_runner.invoke(cli, ["-q", "run", "demo", "--runs", str(tmp_path)])
    assert result.exit_code == 2
    assert "too few videos" in result.output and "Traceback" not in result.output


def test_internal_error_exits_3_with_traceback(monkeypatch, capsys):
    import vimpac.cli as cli_mod

    def broken(**kwargs):
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(cli_mod, "cli", broken)
    with pytest.raises(SystemExit) as exit_info:
        cli_mod.main()
    assert exit_info.value.code == cli_mod.EXIT_INTERNAL == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an invariant broke" in err


def test_every_user_error_class_shares_one_base():
    """The CLI maps one class to 'error: ...' and exit 2; every stage's user errors derive from
    it, and nothing else does (a bug keeps its traceback)."""
    from vimpac.archive import ArchiveError, ChecksumError, ShardError
    from vimpac.common.checkpoint import CheckpointError
    from vimpac.common.config import ConfigError
    from vimpac.common.errors import VimpacError
    from vimpac.common.ffmpeg_exe import FFmpegNotFound
    from vimpac.common.storage import StorageError
    from vimpac.common.video import VideoError
    from vimpac.data.datasets import DatasetError
    from vimpac.pipeline import PipelineError
    from vimpac.pretrain.train import PretrainError

    for cls in (ArchiveError, ShardError, ChecksumError, CheckpointError, ConfigError,
                FFmpegNotFound, StorageError, VideoError, DatasetError, PipelineError,
                PretrainError):
        assert issubclass(cls, VimpacError), cls
    assert not issubclass(RuntimeError, VimpacError) and not issubclass(KeyError, VimpacError)
