"""pipelines.yaml: typed sections; one-line errors name file, pipeline, key, value, expectation."""

import subprocess
import sys
import textwrap

import pytest

from vimpac.common.config import PACKAGED_CONFIG, ConfigError, config_to_yaml, describe_fields
from vimpac.config import PretrainConfig, load_pipeline, pipeline_names


def write(tmp_path, text):
    path = tmp_path / "pipelines.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_are_the_papers():
    cfg = PretrainConfig()
    assert (cfg.frames, cfg.grid, cfg.temperature, cfg.weight_decay, cfg.beta2) == (
        5, 16, 0.2, 0.05, 0.98)
    assert cfg.batch_size == 1024 and cfg.grad_clip == 1.0


def test_every_field_documented():
    for name, _, _, help_text in describe_fields(PretrainConfig):
        assert help_text, name


def test_extends_merges_sections(tmp_path):
    path = write(tmp_path, """
        pipelines:
          base: {pretrain: {model: tiny, lr: 0.01}}
          child: {extends: base, pretrain: {steps: 7}}
    """)
    cfg = load_pipeline("child", path)
    assert (cfg.pretrain.model, cfg.pretrain.lr, cfg.pretrain.steps) == ("tiny", 0.01, 7)


@pytest.mark.parametrize("body, fragment", [
    ("{pretrain: {bogus: 1}}", "pretrain.bogus: unknown key"),
    ("{pretrain: {steps: many}}", "pretrain.steps = 'many': expected an integer"),
    ("{pretrain: {dropout: 1.5}}", "pretrain.dropout = 1.5: expected >= 0 and <= 1"),
    ("{pretrain: {model: huge}}", "expected one of tiny, small, base, large-half"),
    ("{tokenize: {size: 100}}", "tokenize.size = 100: expected a multiple of 8"),
    ("{stages: {}}", "stages: unknown section"),
])
def test_errors_name_file_pipeline_key_value(tmp_path, body, fragment):
    path = write(tmp_path, f"pipelines:\n  p: {body}\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline("p", path)
    msg = str(err.value)
    assert str(path) in msg and "pipeline 'p'" in msg and fragment in msg
    assert "\n" not in msg


def test_overrides_are_type_checked(tmp_path):
    path = write(tmp_path, "pipelines:\n  p: {}\n")
    assert load_pipeline("p", path, ["pretrain.lr=3e-4"]).pretrain.lr == 3e-4
    assert load_pipeline("p", path, ["tokenize.crops=[top, bottom]"]).tokenize.crops == [
        "top", "bottom"]
    with pytest.raises(ConfigError, match="pretrain.steps = 1.5: expected an integer"):
        load_pipeline("p", path, ["pretrain.steps=1.5"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_pipeline("p", path, ["steps"])
    with pytest.raises(ConfigError, match=r"data.synth_travel = \[0.8, 0.2\]: expected \[low"):
        load_pipeline("p", path, ["data.synth_travel=[0.8, 0.2]"])
    assert load_pipeline("p", path, ["data.synth_classes=[still, pan]"]).data.synth_classes == [
        "still", "pan"]
    with pytest.raises(ConfigError, match=r"data.synth_classes = \['still', 'jump'\]: expected "
                                          r"2 or more distinct names from \['approach'"):
        load_pipeline("p", path, ["data.synth_classes=[still, jump]"])


def test_invalid_yaml_and_unknown_pipeline(tmp_path):
    path = write(tmp_path, "pipelines: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_pipeline("p", path)
    path = write(tmp_path, "pipelines:\n  p: {}\n")
    with pytest.raises(ConfigError, match="no pipeline named 'q'"):
        load_pipeline("q", path)


def test_packaged_pipelines_all_validate():
    names = pipeline_names(PACKAGED_CONFIG)
    assert "demo" in names
    for name in names:
        cfg = load_pipeline(name, PACKAGED_CONFIG)
        assert config_to_yaml(cfg)


@pytest.mark.parametrize("override, fragment", [
    ("pretrain.bogus=1", "pretrain.bogus: unknown key"),
    ("pretrain.steps=x", "pretrain.steps = 'x': expected an integer"),
    ("pretrain.lr=-1", "pretrain.lr = -1.0: expected > 0"),
])
def test_cli_config_errors_exit_2_with_one_line(override, fragment):
    proc = subprocess.run([sys.executable, "-m", "vimpac", "--set", override, "config", "show"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr


def test_selection_and_schedule_settings_are_checked_together(tmp_path):
    path = write(tmp_path, """
        pipelines:
          p: {}
    """)
    cfg = load_pipeline("p", path)
    assert (cfg.finetune.val_fraction, cfg.evaluate.checkpoint) == (0.1, "final")
    assert cfg.pretrain.schedule_steps == 0                 # one stage: the schedule is steps
    with pytest.raises(ConfigError, match="evaluate.checkpoint = 'best'.*val_fraction > 0"):
        load_pipeline("p", path, ["evaluate.checkpoint=best", "finetune.val_fraction=0"])
    with pytest.raises(ConfigError, match="schedule_steps = 10: expected 0 or >= pretrain.steps"):
        load_pipeline("p", path, ["pretrain.steps=20", "pretrain.schedule_steps=10"])
    with pytest.raises(ConfigError, match="val_fraction = 0.9"):
        load_pipeline("p", path, ["finetune.val_fraction=0.9"])


def test_plateau_settings_are_checked_and_named(tmp_path):
    path = write(tmp_path, "pipelines:\n  p: {}\n")
    cfg = load_pipeline("p", path)
    assert (cfg.finetune.plateau_patience, cfg.finetune.plateau_min_delta) == (0, 0.01)
    with pytest.raises(ConfigError, match="finetune.plateau_patience = -1: expected >= 0"):
        load_pipeline("p", path, ["finetune.plateau_patience=-1"])
    with pytest.raises(ConfigError, match="finetune.plateau_min_delta = 2.0: expected >= 0"):
        load_pipeline("p", path, ["finetune.plateau_min_delta=2"])
    with pytest.raises(ConfigError, match="finetune.plateau_patience = 3: .*val_fraction > 0"):
        load_pipeline("p", path, ["finetune.plateau_patience=3", "finetune.val_fraction=0"])
    assert load_pipeline("p", path).finetune.plateau_min_epochs == 0           # no minimum
    with pytest.raises(ConfigError, match="finetune.plateau_min_epochs = 4.0: .*plateau_patience"):
        load_pipeline("p", path, ["finetune.plateau_min_epochs=4"])
    with pytest.raises(ConfigError, match="plateau_min_epochs = 16.0: must be below .*epochs"):
        load_pipeline("p", path, ["finetune.plateau_patience=3", "finetune.epochs=16",
                                  "finetune.plateau_min_epochs=16"])


def test_the_fine_tuning_pool_is_a_name_in_the_pools_table(tmp_path):
    from vimpac.pretrain.model import POOLS

    path = write(tmp_path, "pipelines:\n  p: {}\n")
    assert load_pipeline("p", path).finetune.pool == "cls"                 # the paper's
    assert load_pipeline("p", path, ["finetune.pool=mean"]).finetune.pool == "mean"
    with pytest.raises(ConfigError, match="finetune.pool = 'max': expected one of cls, mean"):
        load_pipeline("p", path, ["finetune.pool=max"])
    assert set(POOLS) == {"cls", "mean"}


def test_a_field_added_at_its_default_leaves_the_cache_key_alone():
    """plateau_* were added after results were cached: at their defaults they are not hashed,
    so those results keep their keys; set, they are."""
    import dataclasses

    from vimpac.common.config import result_fields
    from vimpac.config import FinetuneConfig

    plain = result_fields(FinetuneConfig())
    assert not {"plateau_patience", "plateau_min_delta", "plateau_min_epochs"} & set(plain)
    assert "pool" not in plain and result_fields(FinetuneConfig(pool="mean"))["pool"] == "mean"
    on = result_fields(dataclasses.replace(FinetuneConfig(), plateau_patience=4))
    assert on["plateau_patience"] == 4 and "plateau_min_delta" not in on
    at_least = result_fields(dataclasses.replace(FinetuneConfig(), plateau_min_epochs=8.0))
    assert at_least["plateau_min_epochs"] == 8.0
