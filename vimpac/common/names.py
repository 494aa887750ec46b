"""Names that become keys and paths: never absolute, never with ``..``.

Video keys name videos inside archives and reports; pipeline names and stage keys become folders.
Whatever the user's inputs look like (a list file may name ``../../videos/a.mp4``), a name vimpac
stores or turns into a path is relative and stays inside its folder.
"""

from __future__ import annotations

import re

MAX_NAME = 4096
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def normalise_key(text: str) -> str:
    """A video key as archives store it: a relative name without ``..``, ``.`` or empty parts,
    no leading ``/`` and no control characters. Empty results become ``video``."""
    text = "".join(ch for ch in text if ch >= " " and ch != "\x7f")
    parts = [p for p in text.split("/") if p not in ("", ".", "..")]
    return "/".join(parts)[:MAX_NAME] or "video"


def key_problem(key: str) -> str:
    """Why ``key`` is not a stored key's shape ('' when it is fine)."""
    if not key or len(key) > MAX_NAME:
        return f"expected 1..{MAX_NAME} characters"
    if normalise_key(key) != key:
        return "expected a relative name without '..', '.', empty parts or control characters"
    return ""


def relative_path_problem(rel: str) -> str:
    """Why ``rel`` is not a safe path inside a folder ('' when it is)."""
    if not rel or len(rel) > MAX_NAME or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return "expected a relative path inside the folder"
    if any(p in ("", ".", "..") for p in rel.split("/")):
        return "expected a relative path inside the folder (no '..', '.' or empty parts)"
    return ""


def plain_name_problem(name: str) -> str:
    """Why ``name`` cannot name a folder or file by itself ('' when it can)."""
    if not PLAIN_NAME.match(name):
        return f"expected a plain name ({PLAIN_NAME.pattern})"
    return ""
