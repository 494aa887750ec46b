"""The command line: every subcommand listed with a purpose; doctor reports the environment."""

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
