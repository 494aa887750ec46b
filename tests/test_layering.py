"""The layering stays: imports point one way, and only the archive package names formats.

    common <- data <- archive <- tokenize
                      archive <- pretrain <- finetune
    vimpac/{cli,pipeline,report,config}.py on top

Every ``import`` of a vimpac module is walked, lazy ones inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from vimpac.archive import FORMATS

PACKAGE = Path(__file__).resolve().parent.parent / "vimpac"
BELOW: dict[str, set[str]] = {            # what each package may import besides itself
    "common": set(),
    "data": {"common"},
    "archive": {"common", "data"},
    "tokenize": {"common", "data", "archive"},
    "pretrain": {"common", "data", "archive"},
    "finetune": {"common", "data", "archive", "pretrain"},
}
# String literals equal to a format's name that are not format names: logger and package names.
NOT_FORMATS = {("cli.py", "zarr"), ("common/environment.py", "zarr"),
               ("common/environment.py", "webdataset")}


def layer(module: str) -> str:
    """``vimpac.pretrain.train`` -> ``pretrain``; top-level modules -> ``top``."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in BELOW else "top"


def modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out.append((path, name))
    return out


def imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [n for n in names if n == "vimpac" or n.startswith("vimpac.")]


def test_imports_point_one_way():
    wrong = []
    for path, name in modules():
        here = layer(name)
        if here == "top":
            continue
        for target in imported(ast.parse(path.read_text())):
            there = layer(target)
            if there != here and there not in BELOW[here]:
                wrong.append(f"{name} imports {target} ({here} -> {there})")
    assert not wrong, "\n".join(wrong)


def test_tokenize_does_not_import_finetune_or_pretrain():
    for path, name in modules():
        if layer(name) == "tokenize":
            assert not [t for t in imported(ast.parse(path.read_text()))
                        if layer(t) in ("finetune", "pretrain")], name


def test_only_the_archive_package_names_formats():
    names = set(FORMATS) | {f.folder for f in FORMATS.values()}
    found = []
    for path, _ in modules():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("archive/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and \
                    (rel, node.value) not in NOT_FORMATS:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, "format names outside vimpac/archive/:\n" + "\n".join(found)
