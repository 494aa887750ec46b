"""Typed pipeline configuration: one dataclass per stage, filled from a ``pipelines.yaml`` section.

A ``pipelines.yaml`` holds named pipelines; each has sections ``data``, ``tokenizer``, ``tokenize``,
``pretrain``, ``finetune`` and ``evaluate``. A pipeline may ``extends:`` another, whose sections it
deep-merges over. Defaults are the paper's (Tan et al., App. B-C and Table 4) unless a field says
otherwise.

Validation lives here and only here: an unknown key, a wrong type or an out-of-range value raises
:class:`ConfigError` whose message is one line naming the file, pipeline, key, value and what was
expected.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vimpac.common.errors import VimpacError
from vimpac.common.names import plain_name_problem
from vimpac.data.synth import DEFAULT_CLASSES, classes_problem

PACKAGED_CONFIG = Path(__file__).resolve().parent.parent / "pipelines.yaml"


class ConfigError(VimpacError, ValueError):
    """A configuration problem, described in one line."""


def param(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, choices: Sequence[Any] | None = None) -> Any:
    """A config field: default, one-line description and its allowed range or choices."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


class TableChoices(Sequence[str]):
    """A field's choices read from a stage's table whenever they are used (checking or describing
    a value), never when the config module is imported: loading a config imports no stage (and no
    torch)."""

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        self._names = names

    def __getitem__(self, index: Any) -> Any:
        return tuple(self._names())[index]

    def __len__(self) -> int:
        return len(tuple(self._names()))


def _masking_names() -> Iterable[str]:
    """``pretrain.masking``'s choices: the MASKS table, which stays beside the strategies."""
    from vimpac.pretrain.masking import MASKS

    return MASKS


# ------------------------------------------------------------------------------------------ stages

@dataclass
class DataConfig:
    """Where the videos come from."""
    synthetic: bool = param(True, "generate the synthetic motion corpus and use it as the data")
    synth_seed: int = param(0, "seed of the synthetic corpus", ge=0)
    synth_train_per_class: int = param(12, "synthetic labelled train videos per class", ge=1)
    synth_val_per_class: int = param(4, "synthetic labelled val videos per class", ge=1)
    synth_size: int = param(96, "synthetic labelled clip side in pixels", ge=32, le=1024)
    synth_uncurated_videos: int = param(12, "synthetic unlabelled multi-shot videos", ge=0)
    synth_background_contrast: list[float] = param(
        [0.35, 0.75], "synthetic background texture contrast range [low, high] (0 = flat)")
    synth_travel: list[float] = param(
        [0.4, 0.62], "synthetic move_* distance range [low, high], fraction of the frame side")
    synth_camera_drift: float = param(0.1, "synthetic largest background drift over a clip, "
                                           "fraction of the frame side", ge=0, le=1)
    synth_classes: list[str] = param(list(DEFAULT_CLASSES), "synthetic motion classes of the "
                                     "labelled task, in label order")
    synth_layout: str = param("ucf101", "layout the synthetic labelled task is read from",
                              choices=("ucf101", "ssv2", "list"))
    pretrain_inputs: list[str] = param([], "videos, folders or list files for pre-training "
                                           "(used when synthetic is false)")
    finetune_dataset: str = param("", "labelled dataset as NAME:ROOT, e.g. ucf101:/data/UCF101 "
                                      "(used when synthetic is false)")


@dataclass
class TokenizerConfig:
    """The VQ-VAE: trained on your videos, imported from DALL-E, or loaded from a folder."""
    source: str = param("train", "train | dalle | path",
                        choices=("train", "dalle", "path"))
    path: str = param("", "DALL-E encoder.pkl (source=dalle) or tokenizer folder (source=path)")
    codebook_size: int = param(8192, "codes in the codebook (DALL-E: 8192); tokens store as uint16",
                               ge=2, le=65535)
    channels: int = param(128, "width of the conv encoder/decoder", ge=8, le=1024)
    image_size: int = param(128, "side of the square training frames in pixels", ge=16, le=1024)
    fps: float = param(2.0, "frame rate at which training frames are sampled", gt=0)
    frames_per_video: int = param(64, "frames sampled per video for training", ge=1)
    steps: int = param(20000, "training steps", ge=1)
    batch_size: int = param(64, "frames per training step", ge=1)
    lr: float = param(3e-4, "Adam learning rate", gt=0)
    holdout: float = param(0.1, "fraction of frames held out for PSNR / code usage", gt=0, le=0.5)
    checkpoint_every: int = param(500, "steps between resumable checkpoints", ge=1)
    seed: int = param(0, "training seed", ge=0)


@dataclass
class TokenizeConfig:
    """Stage 1: decode videos and write sharded token archives."""
    fps: float = param(2.0, "token frames per second (paper: 2 for pre-training)", gt=0, le=120)
    shorter_side: int = param(128, "resize so the shorter side is this (paper: S=128, then 256)",
                              ge=8, le=4096)
    size: int = param(128, "square crop side in pixels; tokens per side = size / 8", ge=8, le=4096)
    scales: list[float] = param([1.0], "extra resize scales of shorter_side as views "
                                       "(paper fine-tuning: [1.0, 1.25])")
    crops: list[str] = param(["center"],
                             "crop views: top (top-left), center, bottom (bottom-right)")
    hflip: bool = param(False, "also store horizontally flipped views (never for SSV2)")
    formats: list[str] = param(["zarr", "webdataset"], "archive formats to write: zarr, webdataset")
    videos_per_shard: int = param(256, "videos per shard", ge=1)
    chunk_frames: int = param(1024, "token frames per zarr inner chunk (each chunk costs "
                                    "~0.3 ms to read: keep them large; a clip read decodes "
                                    "one chunk)", ge=1)
    zstd_level: int = param(3, "zstd compression level", ge=1, le=22)
    decode_workers: int = param(2, "concurrent ffmpeg decodes, each driven by a thread "
                                   "(0: decode inline)", ge=0, le=256)
    batch_frames: int = param(256, "frames per encoder batch", ge=1)
    decode_timeout_s: float = param(600.0, "per-video decode time limit in seconds", gt=0)
    device: str = param("auto", "encoder device: auto, cpu, cuda, cuda:N")


@dataclass
class SourceConfig:
    """One archive of ``pretrain.sources``: where it is, its share of the samples, and how it
    is drawn."""
    path: str = param("", "archive folder or URL (s3://bucket/prefix)")
    weight: float = param(0.0, "share of the samples drawn from this archive (normalised over "
                               "the sources); 0 for every source: shares by size", ge=0)
    replacement: bool = param(False, "draw videos independently (with replacement) instead of "
                                     "epoch by epoch")


@dataclass
class PretrainConfig:
    """Stage 2: masked-token prediction + contrastive learning on token archives."""
    format: str = param("zarr", "archive format to stream: zarr or webdataset",
                        choices=("zarr", "webdataset"))
    model: str = param("small", "model preset: tiny, small, base, large-half",
                       choices=("tiny", "small", "base", "large-half"))
    frames: int = param(5, "token frames per clip T (paper: 5)", ge=1, le=256)
    grid: int = param(16, "token grid side H=W of the model (16 at 128 px, 32 at 256 px)",
                      ge=1, le=256)
    masking: str = param("block", "masking strategy, a name in vimpac.pretrain.masking.MASKS: "
                               "block (paper), iid (ablation), tube (VideoMAE)",
                         choices=TableChoices(_masking_names))
    num_blocks: int = param(0, "cubes per sample; 0 = the paper's Table 2 count for (T, grid)",
                            ge=0, le=1000)
    mask_ratio: float = param(0.145, "masked fraction for iid and tube masking", gt=0, le=1)
    mlm_weight: float = param(1.0, "weight of the masked-token loss", ge=0)
    contrastive_weight: float = param(1.0, "alpha: weight of the contrastive loss", ge=0)
    temperature: float = param(0.2, "gamma: NT-Xent temperature", gt=0)
    proj_hidden: int = param(2048, "contrastive head hidden width (paper: 2048 small, 4096 large)",
                             ge=1)
    proj_layers: int = param(2, "contrastive head layers (paper: 2 small, 3 large)", ge=1, le=8)
    max_clip_distance: float = param(0.0, "max start distance of the two clips in seconds; "
                                           "0 = unlimited (paper default)", ge=0)
    dropout: float = param(0.1, "dropout everywhere in the backbone", ge=0, le=1)
    batch_size: int = param(1024, "videos per optimizer update (via accumulation)", ge=1)
    micro_batch: int = param(8, "videos per forward pass per process", ge=1)
    steps: int = param(12000, "update count at which this run stops (counted from 0 across "
                              "stages: a run continuing a stage-1 checkpoint continues its "
                              "count)", ge=1)
    schedule_steps: int = param(0, "updates of the whole linear LR schedule (warm-up + decay to "
                                   "0) over every stage; 0 = steps (a single-stage run)", ge=0)
    lr: float = param(1e-3, "peak learning rate (paper: 1e-3 small, 3e-4 large)", gt=0)
    warmup: float = param(0.1, "warm-up fraction of the schedule (schedule_steps)", ge=0, le=1)
    weight_decay: float = param(0.05, "AdamW weight decay (not on biases and norms)", ge=0)
    beta2: float = param(0.98, "AdamW beta2 (beta1 = 0.9)", gt=0, le=1)
    grad_clip: float = param(1.0, "gradient-norm clip; 0 = off", ge=0)
    precision: str = param("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp32",
                           choices=("auto", "bf16", "fp32"))
    compile: bool = param(False, "torch.compile the model")
    grad_checkpoint: bool = param(False, "activation checkpointing per layer")
    num_workers: int = param(2, "DataLoader workers per process", ge=0, le=64)
    sources: list[SourceConfig] = param([], "archives to mix, each {path, weight, replacement} "
                                            "(instead of ARCHIVES on the command line)")
    shuffle: str = param("auto", "global: one seeded order over every clip, read by random "
                                 "access; shard: shards streamed through a shuffle buffer; auto: "
                                 "global when every archive is local", choices=("auto", "global",
                                                                               "shard"))
    shuffle_buffer: int = param(256, "videos in the shard-buffer mode's shuffle buffer", ge=1)
    read_window: int = param(2048, "global shuffle: samples read together, grouped by shard "
                                   "(each shard opened, each chunk decoded once per window; "
                                   "10 MiB per DataLoader worker at T5, 16x16)",
                             ge=1, le=1 << 20)
    open_shards: int = param(64, "global shuffle: shard readers kept open per DataLoader "
                                 "worker", ge=1, le=1 << 16)
    checkpoint_every: int = param(500, "updates between checkpoints", ge=1)
    keep_checkpoints: int = param(3, "checkpoints kept", ge=1)
    log_every: int = param(10, "updates between metric lines", ge=1)
    init_from: str = param("", "start from: a stage-1 run folder or training checkpoint "
                                "(resumes model, both heads, AdamW state and the schedule across "
                                "a resolution change), or a pretrained.pt (weights only); "
                                "position tables are interpolated to (frames, grid)")
    official_checkpoint: str = param("", "the authors' released classifier.pt: when set, the "
                                          "pipeline's pretrain stage imports it instead of "
                                          "training (see `vimpac pretrain import-official`)")
    on_corrupt_shard: str = param("stop", "stop or skip (with a warning) on a bad checksum",
                                  choices=("stop", "skip"))
    seed: int = param(0, "seed of data order, masking and init", ge=0)


@dataclass
class FinetuneConfig:
    """Stage 3: action recognition from a pre-trained backbone."""
    init: str = param("pretrained", "pretrained or scratch", choices=("pretrained", "scratch"))
    split: str = param("1", "dataset split (UCF101/HMDB51: 1, 2, 3)")
    frames: int = param(10, "token frames per clip (paper: 10)", ge=1, le=256)
    grid: int = param(32, "token grid side (paper: 32 = 256 px)", ge=1, le=256)
    fps: float = param(4.0, "token frame rate of the dataset archive (paper: 2 UCF/K400, 4 others)",
                       gt=0)
    view_scales: list[float] = param([1.0, 1.25], "training views: resize scales of the "
                                                   "shorter side (paper: S and 1.25 S)")
    view_crops: list[str] = param(["top", "center", "bottom"],
                                  "training views: crop positions (paper: 3)")
    view_hflip: bool = param(True, "training views: add flipped copies (paper; never for SSV2)")
    compare_scratch: bool = param(False, "also fine-tune the same model from scratch with the "
                                         "same budget (the paper's Table 7 baseline)")
    epochs: float = param(50.0, "passes over the training set", gt=0)
    batch_size: int = param(128, "videos per update", ge=1)
    micro_batch: int = param(16, "videos per forward pass per process", ge=1)
    lr: float = param(1e-4, "peak learning rate (1e-4 small/base, 5e-5 large-half)", gt=0)
    warmup: float = param(0.1, "warm-up fraction", ge=0, le=1)
    weight_decay: float = param(0.01, "AdamW weight decay", ge=0)
    label_smoothing: float = param(0.0, "label smoothing", ge=0, le=1)
    dropout: float = param(0.1, "backbone dropout", ge=0, le=1)
    grad_clip: float = param(1.0, "gradient-norm clip; 0 = off", ge=0)
    precision: str = param("auto", "auto, bf16, fp32", choices=("auto", "bf16", "fp32"))
    num_workers: int = param(2, "DataLoader workers", ge=0, le=64)
    eval_every: float = param(1.0, "epochs between validations", gt=0)
    val_fraction: float = param(0.1, "fraction of the training split held out (by key hash) as "
                                     "the validation set that best.pt is chosen on; 0 = no "
                                     "validation, no best.pt", ge=0, le=0.5)
    seed: int = param(0, "seed", ge=0)


@dataclass
class EvaluateConfig:
    """Multi-view evaluation and frozen-feature probes."""
    test_clips: int = param(10, "uniform temporal clips per video", ge=1, le=100)
    test_crops: list[str] = param(["top", "center", "bottom"],
                                  "crop views averaged at test (SSV2: center only)")
    knn_k: int = param(200, "neighbours for the k-NN probe", ge=1)
    knn_temperature: float = param(0.07, "k-NN vote temperature", gt=0)
    linear_probe_epochs: int = param(100, "epochs of the linear probe on frozen CLS features", ge=0)
    checkpoint: str = param("final", "model the pipeline evaluates: final (the last update, as "
                                     "the paper reports) or best (best top-1 on the validation "
                                     "split carved from the training data)",
                            choices=("final", "best"))


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


# ---------------------------------------------------------------------------------------- checking

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return {int: "an integer", float: "a finite number", bool: "true/false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise TypeError. Numbers in strings count as numbers."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        (item,) = typing.get_args(tp)
        return [_coerce(v, item) for v in value]
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT:
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_INT:
            return int(value)
        raise TypeError
    if tp is float:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT:
            return float(value)
        if isinstance(value, float) and math.isfinite(value):
            return value
        if isinstance(value, str) and len(value) <= 64:
            try:
                number = float(value)
            except ValueError:
                raise TypeError from None
            if math.isfinite(number):
                return number
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _range_text(meta: dict[str, Any]) -> str:
    parts = []
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']}")
    if meta.get("ge") is not None:
        parts.append(f">= {meta['ge']}")
    if meta.get("le") is not None:
        parts.append(f"<= {meta['le']}")
    return " and ".join(parts)


def _in_range(value: Any, meta: dict[str, Any]) -> bool:
    if meta.get("choices") is not None:
        return value in meta["choices"]
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, (int, float)):
            continue
        if meta.get("gt") is not None and not v > meta["gt"]:
            return False
        if meta.get("ge") is not None and not v >= meta["ge"]:
            return False
        if meta.get("le") is not None and not v <= meta["le"]:
            return False
    return True


class _Where:
    """Formats the 'file: pipeline 'x': key = value: expected ...' one-line errors."""

    def __init__(self, source: str, pipeline: str) -> None:
        self.source, self.pipeline = source, pipeline

    def error(self, key: str, value: Any = dataclasses.MISSING, expected: str = "") -> ConfigError:
        where = f"{self.source}: pipeline '{self.pipeline}': {key}"
        if value is not dataclasses.MISSING:
            where += f" = {value!r}"
        return ConfigError(f"{where}: {expected}" if expected else where)


def build_section(cls: type, raw: Any, section: str, where: _Where) -> Any:
    """Build a stage config from its raw mapping, checking keys, types and ranges."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise where.error(section, raw, "expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise where.error(f"{section}.{key}", expected=f"unknown key (known: {known})")
        meta = fields[key].metadata
        item = _record_type(hints[key])
        if item is not None:
            values[key] = _records(item, value, f"{section}.{key}", where)
            continue
        try:
            value = _coerce(value, hints[key])
        except TypeError:
            raise where.error(f"{section}.{key}", value,
                              f"expected {_type_name(hints[key])}") from None
        if not _in_range(value, meta):
            raise where.error(f"{section}.{key}", value, f"expected {_range_text(meta)}")
        values[key] = value
    return cls(**values)


def _record_type(tp: Any) -> type | None:
    """The item type of a field typed as a list of config records (e.g. ``pretrain.sources``)."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _records(cls: type, raw: Any, key: str, where: _Where) -> list[Any]:
    """A list of records, each a mapping checked like a section (errors name ``key[i].field``)."""
    if not isinstance(raw, (list, tuple)):
        names = ", ".join(f.name for f in dataclasses.fields(cls))
        raise where.error(key, raw, f"expected a list of mappings with keys {names}")
    return [build_section(cls, item, f"{key}[{i}]", where) for i, item in enumerate(raw)]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ----------------------------------------------------------------------------------------- loading

def default_config_path() -> Path:
    """``./pipelines.yaml`` if present, else the copy packaged with vimpac."""
    local = Path("pipelines.yaml")
    return local if local.is_file() else PACKAGED_CONFIG


MAX_INT = 2**63 - 1                 # larger integers in a config are refused, not carried along
MAX_YAML_VALUES = 100_000           # values a config may hold once its aliases are expanded
MAX_YAML_BYTES = 16 << 20
# libyaml's loader (when PyYAML has it) is fast and bounds nesting itself; both build only plain
# values (no Python objects).
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str, source: str) -> Any:
    """YAML from untrusted text, safely: no Python objects (safe_load), and one ConfigError line
    for syntax errors, nesting too deep for the parser, integers of thousands of digits, and
    aliases that expand to more than :data:`MAX_YAML_VALUES` values ("billion laughs")."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters, more than a config may have")
    try:
        doc = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML{loc}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply to be a config") from None
    except ValueError as exc:               # int("9" * 5000): Python refuses the conversion
        raise ConfigError(f"{source}: a value is not usable: "
                          f"{str(exc).splitlines()[0][:120]} (an integer too large?)") from None
    _check_size(doc, source)
    return doc


def _check_size(doc: Any, source: str) -> None:
    """Refuse documents whose aliases expand beyond :data:`MAX_YAML_VALUES` values, or loop."""
    sizes: dict[int, int] = {}

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, (list, dict)):
            return 1
        if id(node) in sizes:
            if sizes[id(node)] < 0:
                raise ConfigError(f"{source}: YAML aliases refer to themselves")
            return sizes[id(node)]
        if depth > 100:
            raise ConfigError(f"{source}: YAML nested too deeply to be a config")
        sizes[id(node)] = -1
        items = list(node.items()) if isinstance(node, dict) else [(None, v) for v in node]
        total = 1
        for key, value in items:
            total += size(key, depth + 1) + size(value, depth + 1)
            if total > MAX_YAML_VALUES:
                raise ConfigError(f"{source}: YAML aliases expand to more than "
                                  f"{MAX_YAML_VALUES} values; a config is much smaller")
        sizes[id(node)] = total
        return total

    size(doc, 0)


def read_pipelines(path: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """Read and shape-check a pipelines.yaml; return (source name, {pipeline: raw mapping})."""
    path = Path(path) if path else default_config_path()
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    doc = load_yaml(text, source)
    if not isinstance(doc, dict) or not isinstance(doc.get("pipelines"), dict):
        raise ConfigError(f"{source}: expected a top-level 'pipelines:' mapping of named pipelines")
    for name in doc["pipelines"]:
        why = plain_name_problem(name) if isinstance(name, str) else "expected a string"
        if why:
            raise ConfigError(f"{source}: pipeline name {name!r}: {why} (it names the report "
                              "folder)")
    unknown = set(doc) - {"pipelines", "version"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {sorted(unknown, key=str)[0]!r} "
                          "(known: pipelines, version)")
    return source, doc["pipelines"]


def _resolve_raw(pipelines: dict[str, Any], name: str, source: str,
                 seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name not in pipelines:
        known = ", ".join(sorted(map(str, pipelines)))
        raise ConfigError(f"{source}: no pipeline named {name!r} (known: {known})")
    if name in seen:
        raise ConfigError(f"{source}: pipeline {name!r}: 'extends' loops through "
                          + " -> ".join(seen + (name,)))
    raw = pipelines[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: pipeline {name!r}: expected a mapping of stage sections")
    where = _Where(source, str(name))
    for key in raw:
        if key not in PIPELINE_KEYS:
            raise where.error(str(key), expected="unknown section (known: "
                              + ", ".join(sorted(PIPELINE_KEYS)) + ")")
    parent = raw.get("extends")
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise where.error("extends", parent, "expected a pipeline name")
    base = _resolve_raw(pipelines, parent, source, seen + (name,))
    merged = _deep_merge({k: v for k, v in base.items() if k != "description"}, raw)
    merged.pop("extends", None)
    return merged


def parse_override(text: str) -> tuple[str, str, Any]:
    """``'pretrain.lr=3e-4'`` -> ``('pretrain', 'lr', 3e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, _, value_text = text.partition("=")
    section, _, name = key.strip().partition(".")
    if not section or not name or "." in name:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. pretrain.lr=3e-4")
    try:
        value = load_yaml(value_text, f"--set {text!r}") if value_text.strip() else ""
    except ConfigError as exc:
        if "invalid YAML" not in str(exc):
            raise
        value = value_text
    return section, name, value


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
    where = _Where(source + (" (with --set)" if overrides else ""), name)
    sections = {sec: build_section(cls, raw.get(sec), sec, where) for sec, cls in SECTIONS.items()}
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise where.error("description", description, "expected a string")
    config = PipelineConfig(name=name, description=description, **sections)
    check_consistency(config, where)
    return config


def check_consistency(config: PipelineConfig, where: _Where) -> None:
    """Cross-field rules that single-field ranges cannot express."""
    for key in ("synth_background_contrast", "synth_travel"):
        pair = getattr(config.data, key)
        if len(pair) != 2 or not 0.0 <= pair[0] <= pair[1] <= 1.0:
            raise where.error(f"data.{key}", pair,
                              "expected [low, high] with 0 <= low <= high <= 1")
    why = classes_problem(config.data.synth_classes, minimum=2)
    if config.data.synthetic and why:
        raise where.error("data.synth_classes", config.data.synth_classes, why)
    tk = config.tokenize
    if tk.size > tk.shorter_side:
        raise where.error("tokenize.size", tk.size,
                          f"expected <= tokenize.shorter_side ({tk.shorter_side})")
    if tk.size % 8:
        raise where.error("tokenize.size", tk.size, "expected a multiple of 8 (8x8 pixel tokens)")
    for crop in tk.crops:
        if crop not in ("top", "center", "bottom"):
            raise where.error("tokenize.crops", tk.crops, "expected items from top, center, bottom")
    if not tk.crops:
        raise where.error("tokenize.crops", tk.crops, "expected at least one crop")
    for fmt in tk.formats:
        if fmt not in ("zarr", "webdataset"):
            raise where.error("tokenize.formats", tk.formats,
                              "expected items from zarr, webdataset")
    if not tk.formats:
        raise where.error("tokenize.formats", tk.formats, "expected at least one format")
    if not tk.scales or any(s < 1.0 or s > 4.0 for s in tk.scales):
        raise where.error("tokenize.scales", tk.scales, "expected scales in [1.0, 4.0]")
    for crop in config.finetune.view_crops:
        if crop not in ("top", "center", "bottom"):
            raise where.error("finetune.view_crops", config.finetune.view_crops,
                              "expected items from top, center, bottom")
    if any(s < 1.0 or s > 4.0 for s in config.finetune.view_scales) or \
            not config.finetune.view_scales:
        raise where.error("finetune.view_scales", config.finetune.view_scales,
                          "expected scales in [1.0, 4.0]")
    for crop in config.evaluate.test_crops:
        if crop not in ("top", "center", "bottom"):
            raise where.error("evaluate.test_crops", config.evaluate.test_crops,
                              "expected items from top, center, bottom")
    pt = config.pretrain
    if pt.schedule_steps and pt.schedule_steps < pt.steps:
        raise where.error("pretrain.schedule_steps", pt.schedule_steps,
                          f"expected 0 or >= pretrain.steps ({pt.steps})")
    if config.evaluate.checkpoint == "best" and config.finetune.val_fraction == 0:
        raise where.error("evaluate.checkpoint", "best",
                          "needs a validation split to choose on (finetune.val_fraction > 0)")
    for i, source in enumerate(config.pretrain.sources):
        if not source.path:
            raise where.error(f"pretrain.sources[{i}].path", source.path,
                              "expected an archive folder or URL")
    weighted = [s.weight > 0 for s in config.pretrain.sources]
    if any(weighted) and not all(weighted):
        raise where.error("pretrain.sources", [s.weight for s in config.pretrain.sources],
                          "expected a weight > 0 for every source, or none (shares by size)")
    if config.pretrain.micro_batch > config.pretrain.batch_size:
        raise where.error("pretrain.micro_batch", config.pretrain.micro_batch,
                          f"expected <= pretrain.batch_size ({config.pretrain.batch_size})")


def load_pipeline(name: str, path: str | Path | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load pipeline ``name`` from ``path`` (default: see :func:`default_config_path`)."""
    source, pipelines = read_pipelines(path)
    raw = _resolve_raw(pipelines, name, source)
    return resolve(raw, name, source, overrides)


def pipeline_names(path: str | Path | None = None) -> list[str]:
    return list(read_pipelines(path)[1])


def config_to_yaml(config: Any) -> str:
    """The resolved config as YAML text (what is written next to every output)."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False)


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of each field of a stage config (docs, ``config show``)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows
