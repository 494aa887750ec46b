"""A pipeline's configuration: the stage sections put together, checked, loaded.

A ``pipelines.yaml`` holds named pipelines; each has sections ``data``, ``tokenizer``, ``tokenize``,
``pretrain``, ``finetune`` and ``evaluate``, one config dataclass per stage, declared beside the
stage (``vimpac/<stage>/config.py``). A pipeline may ``extends:`` another, whose sections it
deep-merges over. Defaults are the paper's (Tan et al., App. B-C and Table 4) unless a field says
otherwise. The machinery (field checks, safe YAML, ``--set``) is :mod:`vimpac.common.config`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vimpac.common.config import (
    PACKAGED_CONFIG,
    ConfigError,
    Where,
    build_section,
    parse_override,
    read_pipelines,
    resolve_raw,
)
from vimpac.data.config import DataConfig
from vimpac.finetune.config import EvaluateConfig, FinetuneConfig
from vimpac.pretrain.config import PretrainConfig, SourceConfig
from vimpac.tokenize.config import TokenizeConfig, TokenizerConfig

__all__ = ["PACKAGED_CONFIG", "SECTIONS", "ConfigError", "DataConfig", "EvaluateConfig",
           "FinetuneConfig", "PipelineConfig", "PretrainConfig", "SourceConfig",
           "TokenizeConfig", "TokenizerConfig", "load_pipeline", "pipeline_names", "resolve"]

SECTIONS: dict[str, type] = {
    "data": DataConfig, "tokenizer": TokenizerConfig, "tokenize": TokenizeConfig,
    "pretrain": PretrainConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig,
}
PIPELINE_KEYS = set(SECTIONS) | {"extends", "description"}


@dataclass
class PipelineConfig:
    """One named pipeline: a config per stage."""
    name: str = "default"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(raw: dict[str, Any], name: str, source: str,
            overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Build a typed PipelineConfig from a raw pipeline mapping plus ``--set`` overrides."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"--set {text!r}: unknown section {section!r} (known: "
                              + ", ".join(SECTIONS) + ")")
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][key] = value
    where = Where(source + (" (with --set)" if overrides else ""), name)
    sections = {sec: build_section(cls, raw.get(sec), sec, where) for sec, cls in SECTIONS.items()}
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise where.error("description", description, "expected a string")
    config = PipelineConfig(name=name, description=description, **sections)
    for section in SECTIONS:                       # rules across one section's fields
        check = getattr(getattr(config, section), "check", None)
        if check is not None:
            check(where)
    check_consistency(config, where)
    return config


def check_consistency(config: PipelineConfig, where: Where) -> None:
    """Rules across sections (each section checks its own fields: ``check``)."""
    if config.evaluate.checkpoint == "best" and config.finetune.val_fraction == 0:
        raise where.error("evaluate.checkpoint", "best",
                          "needs a validation split to choose on (finetune.val_fraction > 0)")


def load_pipeline(name: str, path: str | Path | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load pipeline ``name`` from ``path`` (default: see :func:`default_config_path`)."""
    source, pipelines = read_pipelines(path)
    raw = resolve_raw(pipelines, name, source, PIPELINE_KEYS)
    return resolve(raw, name, source, overrides)


def pipeline_names(path: str | Path | None = None) -> list[str]:
    return list(read_pipelines(path)[1])
