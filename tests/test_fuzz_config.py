"""Configuration fuzzing: any pipelines.yaml or --set ends in a config or one ConfigError line.

Documents mix real schema keys (every section and field of :mod:`vimpac.config`) with junk
keys, random nesting and types, ``extends`` chains and loops. ``load_pipeline`` is fuzzed directly
with many examples; the CLI (``vimpac --config F --pipeline P config show``) in-process through
click's CliRunner with fewer: it must exit 0, or exit 2 with a single ``error:`` line, never a
traceback. Examples are derandomized, so the file is deterministic.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vimpac.cli import cli
from vimpac.common.config import ConfigError
from vimpac.config import PIPELINE_KEYS, SECTIONS, PipelineConfig, load_pipeline

FIELDS = {sec: [f.name for f in dataclasses.fields(cls)] for sec, cls in SECTIONS.items()}
CHOICES = sorted({str(c) for cls in SECTIONS.values() for f in dataclasses.fields(cls)
                  for c in (f.metadata.get("choices") or ())})
NAMES = ["base", "child", "demo", "loop"]
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------------------------ strategies

junk_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                    max_size=12)
tricky_text = st.sampled_from(["", "[/x]", "[bold]", "a\nb", "..", "=", "~", "null", "1e400",
                               "nan", "-inf", "0x10", "!!python/object:os.system", "*a", "&a"])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, 1.25, 2.0, 4.0]),
    junk_text, tricky_text, st.sampled_from(CHOICES))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(junk_text, inner, max_size=3), max_leaves=6)


def plausible(sec: str, name: str) -> st.SearchStrategy[Any]:
    """Values near the field's valid set: its default, choices, range bounds, or anything."""
    f = next(f for f in dataclasses.fields(SECTIONS[sec]) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    meta = f.metadata
    near = [default] + list(meta.get("choices") or ())
    for bound in (meta.get("ge"), meta.get("gt"), meta.get("le")):
        if bound is not None:
            near += [bound, bound - 1, bound + 1, bound * 0.5]
    return st.one_of(st.sampled_from(near), values)


@st.composite
def section(draw: Any, sec: str) -> Any:
    """A stage section: mostly real keys with plausible values, sometimes junk or no mapping."""
    if draw(st.integers(0, 14)) == 0:
        return draw(values)
    out: dict[Any, Any] = {}
    for key in draw(st.lists(st.sampled_from(FIELDS[sec]), max_size=4, unique=True)):
        out[key] = draw(plausible(sec, key))
    if draw(st.integers(0, 7)) == 0:
        out[draw(st.one_of(junk_text, st.integers(-5, 5)))] = draw(values)
    return out


@st.composite
def pipeline(draw: Any) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(values)
    out: dict[Any, Any] = {}
    for key in draw(st.lists(st.sampled_from(sorted(PIPELINE_KEYS)), max_size=4, unique=True)):
        if key == "extends":
            out[key] = draw(st.one_of(st.sampled_from(NAMES), st.sampled_from(NAMES), values))
        elif key == "description":
            out[key] = draw(st.one_of(junk_text, values))
        else:
            out[key] = draw(section(key))
    if draw(st.integers(0, 9)) == 0:
        out[draw(junk_text)] = draw(values)
    return out


@st.composite
def document(draw: Any) -> Any:
    """A pipelines.yaml document (as Python data): usually well-shaped, sometimes not at all."""
    shape = draw(st.integers(0, 29))
    if shape == 0:
        return draw(values)
    doc: dict[Any, Any] = {"pipelines": {}}
    for name in draw(st.lists(st.sampled_from(NAMES), min_size=1, unique=True)):
        doc["pipelines"][name] = draw(pipeline())
    if shape == 1:
        doc["pipelines"][draw(st.one_of(junk_text, st.integers(0, 3)))] = draw(pipeline())
    if shape == 2:
        doc["pipelines"] = draw(values)
    if draw(st.booleans()):
        doc["version"] = draw(st.one_of(st.just(1), values))
    if shape == 3:
        doc[draw(st.one_of(junk_text, st.integers()))] = draw(values)
    return doc


pipeline_name = st.one_of(st.sampled_from(NAMES), st.sampled_from(NAMES), st.sampled_from(NAMES),
                          junk_text)


def as_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True) \
        .removesuffix("\n...\n").strip()


def override() -> st.SearchStrategy[str]:
    """A ``--set`` argument: real or junk keys, values written as YAML or as raw text."""
    real = st.sampled_from([(s, k) for s, ks in FIELDS.items() for k in ks]).flatmap(
        lambda sk: plausible(*sk).map(lambda v: f"{sk[0]}.{sk[1]}={as_yaml(v)}"))
    junk_key = st.one_of(st.builds(lambda a, b: f"{a}.{b}", junk_text, junk_text), junk_text)
    junk = st.builds(lambda k, v: f"{k}={v}", junk_key, st.one_of(junk_text, tricky_text))
    return st.one_of(real, real, junk, junk_text)


# ----------------------------------------------------------------------------------------- checks

def write_doc(folder: Path, doc: Any) -> Path:
    path = folder / "pipelines.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def load_or_config_error(name: str, path: Path, overrides: list[str] = ()) -> None:
    """load_pipeline gives a PipelineConfig or a one-line ConfigError; nothing else escapes."""
    try:
        config = load_pipeline(name, path, list(overrides))
    except ConfigError as exc:
        assert str(exc).strip(), "empty error message"
        return
    assert isinstance(config, PipelineConfig)


def assert_cli_outcome(result: Any) -> None:
    """Exit 0, or exit 2 with exactly one ``error:`` line on stderr and no traceback."""
    assert "Traceback" not in result.output + result.stderr, result.stderr
    if result.exit_code == 0:
        return
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("Usage:"):        # click's own usage errors, also exit 2
        assert lines[-1].startswith("Error:"), lines
        return
    assert len(lines) == 1 and lines[0].startswith("error: "), lines


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------------------------------ tests

@settings(FUZZ, max_examples=300)
@given(doc=document(), name=pipeline_name)
@example(doc={"pipelines": {"loop": {"extends": "child"}, "child": {"extends": "loop"}}},
         name="loop")
@example(doc={"pipelines": {"base": None}, 1: "x", "a": "y"}, name="base")
@example(doc={"pipelines": {"base": {"tokenize": {"crops": ["[/x]"]}}}}, name="base")
@example(doc={"pipelines": {"a\nb": {"pretrain": {"lr\nx": 1}}}}, name="a\nb")
def test_random_documents_load_or_fail_cleanly(folder: Path, doc: Any, name: str) -> None:
    load_or_config_error(name, write_doc(folder, doc))


@settings(FUZZ, max_examples=40)
@given(raw=st.one_of(st.binary(max_size=200), junk_text.map(str.encode),
                     st.sampled_from([b"\xff\xfe\x00", b"pipelines: &a [*a]", b"{{", b"- - -",
                                      b"pipelines: {a: &x {tokenize: {scales: *x}}}",
                                      b"pipelines:\n  a:\n    tokenize: {scales: &s [*s]}\n"])))
def test_random_bytes_as_config_fail_cleanly(folder: Path, raw: bytes) -> None:
    path = folder / "raw.yaml"
    path.write_bytes(raw)
    load_or_config_error("a", path)


@settings(FUZZ, max_examples=200)
@given(overrides=st.lists(override(), max_size=4))
@example(overrides=['pretrain.format="[/x]"'])
@example(overrides=["tokenize.scales=&a [*a]"])
@example(overrides=["pretrain.lr=.nan", "pretrain.steps=1e400"])
def test_random_overrides_load_or_fail_cleanly(folder: Path, overrides: list[str]) -> None:
    path = write_doc(folder, {"pipelines": {"demo": {"pretrain": {"model": "tiny"}}}})
    load_or_config_error("demo", path, overrides)


@settings(FUZZ, max_examples=40)
@given(doc=document(), name=pipeline_name,
       overrides=st.lists(override(), max_size=2))
@example(doc={"pipelines": {"demo": {}}}, name="demo", overrides=['pretrain.format="[/x]"'])
@example(doc={"pipelines": {"demo": {}}}, name="demo", overrides=["x.y\nz=1"])
def test_cli_config_show_exits_0_or_2_with_one_line(folder: Path, doc: Any, name: str,
                                                     overrides: list[str]) -> None:
    path = write_doc(folder, doc)
    args = ["--config", str(path), "--pipeline", name]
    for text in overrides:
        args += ["--set", text]
    result = CliRunner().invoke(cli, [*args, "config", "show"])
    assert_cli_outcome(result)


def test_cli_config_error_is_printed_verbatim(folder: Path) -> None:
    """Rich markup in a value is shown as typed, not interpreted (nor a crash)."""
    path = write_doc(folder, {"pipelines": {"demo": {}}})
    result = CliRunner().invoke(cli, ["--config", str(path), "--set", 'pretrain.format="[bold]x"',
                                      "config", "show"])
    assert_cli_outcome(result)
    assert result.exit_code == 2 and "'[bold]x'" in result.stderr
