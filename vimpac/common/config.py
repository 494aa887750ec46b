"""Typed configuration, the machinery: fields, checking, and reading ``pipelines.yaml`` safely.

Each stage declares its own config dataclass beside its code (``vimpac/data/config.py``,
``vimpac/tokenize/config.py``, ``vimpac/pretrain/config.py``, ``vimpac/finetune/config.py``), with
fields made by :func:`param`: default, one-line help, range or choices, and whether the field is
*volatile* (how a job runs, not what it computes: worker counts, devices, logging intervals).
:mod:`vimpac.config` puts the sections together into a pipeline. Everything here is shared:

* checking a section (:func:`build_section`): an unknown key, a wrong type or an out-of-range value
  raises :class:`ConfigError`, one line naming the file, pipeline, key, value and what was expected;
* reading YAML from untrusted text (:func:`load_yaml`), ``extends:`` chains and ``--set``;
* what identifies a result (:func:`result_fields`: every non-volatile field) for cache keys and for
  checking a resume (:func:`changed_fields`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from vimpac.common.errors import VimpacError
from vimpac.common.names import plain_name_problem

PACKAGED_CONFIG = Path(__file__).resolve().parent.parent / "pipelines.yaml"


class ConfigError(VimpacError, ValueError):
    """A configuration problem, described in one line."""


def param(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, choices: Sequence[Any] | None = None,
          volatile: bool = False, keyed_when_set: bool = False) -> Any:
    """A config field: default, one-line description and its allowed range or choices.

    ``volatile``: the field says how a job runs, not what it computes (worker counts, devices,
    logging and checkpoint intervals). It is left out of cache keys, and a resumed job may change
    it (the change is logged); changing any other field on resume is refused.

    ``keyed_when_set``: a field added after results were cached whose default computes what the
    code computed before it existed. It is part of the cache key only when it differs from its
    default, so those results keep their keys."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices, "volatile": volatile,
            "keyed_when_set": keyed_when_set}
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
        choices = tuple(meta["choices"])
        return all(v in choices for v in value) if isinstance(value, list) else value in choices
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


class Where:
    """Formats the 'file: pipeline 'x': key = value: expected ...' one-line errors."""

    def __init__(self, source: str, pipeline: str) -> None:
        self.source, self.pipeline = source, pipeline

    def error(self, key: str, value: Any = dataclasses.MISSING, expected: str = "") -> ConfigError:
        where = f"{self.source}: pipeline '{self.pipeline}': {key}"
        if value is not dataclasses.MISSING:
            where += f" = {value!r}"
        return ConfigError(f"{where}: {expected}" if expected else where)


def build_section(cls: type, raw: Any, section: str, where: Where) -> Any:
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


def _records(cls: type, raw: Any, key: str, where: Where) -> list[Any]:
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


def resolve_raw(pipelines: dict[str, Any], name: str, source: str, sections: set[str],
                seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Pipeline ``name``'s raw mapping with its ``extends:`` chain merged in; ``sections``: the
    keys a pipeline may have."""
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
    where = Where(source, str(name))
    for key in raw:
        if key not in sections:
            raise where.error(str(key), expected="unknown section (known: "
                              + ", ".join(sorted(sections)) + ")")
    parent = raw.get("extends")
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise where.error("extends", parent, "expected a pipeline name")
    base = resolve_raw(pipelines, parent, source, sections, seen + (name,))
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


def result_fields(config: Any) -> dict[str, Any]:
    """A config's non-volatile fields as plain values: what identifies its result (cache keys).
    A ``keyed_when_set`` field is left out while it holds its default."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)
            if not f.metadata.get("volatile")
            and not (f.metadata.get("keyed_when_set") and _is_default(config, f))}


def _is_default(config: Any, f: dataclasses.Field) -> bool:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return _plain(getattr(config, f.name)) == _plain(default)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def changed_fields(saved: dict[str, Any], config: Any) -> tuple[list[str], list[str]]:
    """(changed non-volatile fields, changed volatile fields) of ``config`` against a config
    saved as a dict (in a checkpoint), each as ``name old -> new``; a field the saved config
    lacks counts as unchanged when it has its default (a checkpoint older than the field)."""
    changed, volatile = [], []
    for f in dataclasses.fields(config):
        now = _plain(getattr(config, f.name))
        if f.name in saved:
            before = saved[f.name]
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            before = _plain(default)
        if before != now:
            (volatile if f.metadata.get("volatile") else changed).append(
                f"{f.name} {before!r} -> {now!r}")
    return changed, volatile


CROPS = ("top", "center", "bottom")


def check_crops(where: Where, key: str, crops: list[str]) -> None:
    """Crop positions: items from top (top-left), center, bottom (bottom-right), at least one."""
    if not crops or any(c not in CROPS for c in crops):
        raise where.error(key, crops, "expected one or more items from " + ", ".join(CROPS))


def check_scales(where: Where, key: str, scales: list[float]) -> None:
    """Resize scales of the shorter side: at least one, each in [1.0, 4.0]."""
    if not scales or any(s < 1.0 or s > 4.0 for s in scales):
        raise where.error(key, scales, "expected scales in [1.0, 4.0]")
