"""Readers for action-recognition datasets in the layouts their public releases unpack to.

Each reader turns a dataset root into a :class:`DatasetIndex`: class names, one :class:`VideoItem`
per video (with every split it belongs to) and the annotated videos whose file is absent. Nothing
is converted on disk; users point the pipeline at ``ssv2:/data/ssv2`` and the like.

Supported layouts (paths relative to the root, as each dataset's public release unpacks):

- ``ssv2``: ``labels/something-something-v2-{labels,train,validation,test}.json``,
  videos ``20bn-something-something-v2/{id}.webm``.
- ``ucf101``: ``ucfTrainTestlist/{classInd,trainlist0k,testlist0k}.txt``,
  videos ``UCF-101/{Class}/v_{Class}_gGG_cCC.avi``; tags ``train1..3`` / ``test1..3``.
- ``hmdb51``: ``testTrainMulti_7030_splits/{class}_test_split{k}.txt``,
  videos ``hmdb51_org/{class}/{name}.avi``; tags ``train1..3`` / ``test1..3``.
- ``diving48``: ``Diving48_V2_{train,test}.json``, ``Diving48_vocab.json``,
  videos ``rgb/{vid_name}.mp4``; tags ``train`` / ``test``.
- ``kinetics400``: ``annotations/{train,val,test}.csv``,
  videos ``{split}/{youtube_id}_{start:06d}_{end:06d}.mp4`` (or one class folder deeper).
- ``list``: ``relative/path.ext label`` lines (MMAction2 video lists), one file or a folder with
  ``train.txt`` / ``val.txt`` / ``test.txt`` and an optional ``classes.txt``.

Video keys follow the official VIMPAC code's LMDB keys (``video2token/extract_video_tokens.py``):
the relative path without extension.
Missing video files are not errors: they are listed in :attr:`DatasetIndex.missing`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vimpac.common.errors import VimpacError

logger = logging.getLogger(__name__)

DATASETS = ("ssv2", "ucf101", "hmdb51", "diving48", "kinetics400", "list")
ALIASES = {"sthv2": "ssv2", "something-something-v2": "ssv2", "k400": "kinetics400",
           "ucf": "ucf101", "hmdb": "hmdb51"}
VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")


class DatasetError(VimpacError):
    """A dataset root or annotation file that cannot be read; the message names file and line."""


@dataclass(frozen=True)
class VideoItem:
    """One video of a dataset.

    ``key`` is stable and unique within the dataset (relative path without extension; SSV2: the
    numeric id). ``label`` is the 0-based class index or -1 when unknown (test sets).
    """

    key: str
    path: str
    label: int
    splits: tuple[str, ...]


@dataclass
class DatasetIndex:
    """Everything a reader learned about a dataset root."""

    name: str
    root: str
    classes: list[str]
    items: list[VideoItem]
    missing: list[tuple[str, str]]
    split_tags: list[str] = field(default_factory=list)   # tags declared by annotation files
    missing_per_split: dict[str, int] = field(default_factory=dict)

    def split(self, tag: str) -> list[VideoItem]:
        """Videos tagged ``tag`` (present on disk, or all of them with ``check_files=False``)."""
        known = set(self.split_tags) | {t for item in self.items for t in item.splits}
        if tag not in known:
            raise DatasetError(f"{self.name} at {self.root} has no split {tag!r}; "
                               f"known splits: {sorted(known)}")
        return [item for item in self.items if tag in item.splits]

    def summary(self) -> dict[str, Any]:
        """Counts for logging and archive manifests."""
        per_split = Counter(t for item in self.items for t in item.splits)
        splits = {tag: per_split.get(tag, 0) for tag in self.split_tags}
        splits.update({t: n for t, n in sorted(per_split.items()) if t not in splits})
        return {
            "dataset": self.name,
            "root": self.root,
            "classes": len(self.classes),
            "videos": len(self.items),
            "unlabeled": sum(item.label < 0 for item in self.items),
            "splits": splits,
            "missing": len(self.missing),
            "missing_per_split": dict(self.missing_per_split),
        }


# ---------------------------------------------------------------------------------------------
# Argument parsing and dispatch


def parse_dataset_arg(arg: str) -> tuple[str, str] | None:
    """``"ucf101:/data/ucf"`` -> ``("ucf101", "/data/ucf")``; ``None`` for anything else.

    Only a known dataset name (or alias such as ``sthv2`` / ``k400``) before the first ``:``
    counts, so plain paths that contain ``:`` are returned as ``None``.
    """
    name, sep, root = arg.partition(":")
    if not sep:
        return None
    canonical = _canonical_name(name)
    if canonical is None:
        return None
    if not root.strip():
        raise DatasetError(f"dataset argument {arg!r} names {canonical!r} but no root folder; "
                           f"expected '{canonical}:/path/to/root'")
    return canonical, root


def load_dataset(name: str, root: str | None = None, *, check_files: bool = True) -> DatasetIndex:
    """Read dataset ``name`` at ``root``; ``load_dataset("ucf101:/data/ucf")`` also works."""
    if root is None:
        parsed = parse_dataset_arg(name)
        if parsed is None:
            raise DatasetError(f"{name!r} is not '<dataset>:<root>' with dataset one of {DATASETS}")
        name, root = parsed
    canonical = _canonical_name(name)
    if canonical is None:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return READERS[canonical](root, check_files=check_files)


def standard_splits(name: str, split_id: int = 1) -> tuple[str, str]:
    """(train tag, evaluation tag) of the usual protocol, e.g. ``("train1", "test1")`` (UCF101)."""
    canonical = _canonical_name(name)
    if canonical in ("ucf101", "hmdb51"):
        if split_id not in (1, 2, 3):
            raise DatasetError(f"{canonical} has splits 1, 2 and 3, not {split_id}")
        return f"train{split_id}", f"test{split_id}"
    if canonical == "diving48":
        return "train", "test"
    if canonical is None:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return "train", "val"


def _canonical_name(name: str) -> str | None:
    lowered = name.strip().lower()
    if lowered in DATASETS:
        return lowered
    return ALIASES.get(lowered)


# ---------------------------------------------------------------------------------------------
# Shared helpers: reading annotation files, locating videos, collecting items


def _norm_root(root: str) -> str:
    path = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise DatasetError(f"dataset root {path} {what}")
    return path


def _require(root: str, rel: str, dataset: str) -> str:
    """Absolute path of annotation file ``rel`` under ``root``, or a DatasetError with a hint."""
    path = os.path.join(root, rel)
    if os.path.isfile(path):
        return path
    raise DatasetError(f"{dataset}: expected {rel} under {root} but {path} does not exist"
                       f"{_layout_hint(root, rel)}")


def _layout_hint(root: str, rel: str) -> str:
    """Suggest the right root when ``rel`` sits one level up, one level down, or inside root."""
    parent = os.path.dirname(root)
    if os.path.exists(os.path.join(parent, rel)):
        return f"; it exists under the parent folder: use {parent} as the root"
    try:
        children = sorted(e.path for e in os.scandir(root) if e.is_dir())
    except OSError:
        children = []
    for child in children:
        if os.path.exists(os.path.join(child, rel)):
            return f"; it exists one level down: use {child} as the root"
    base = os.path.basename(rel)
    if base != rel and os.path.isfile(os.path.join(root, base)):
        inner = os.path.dirname(rel)
        return (f"; {base} is directly in {root}: the root must be the folder that contains "
                f"{inner}/, i.e. {parent}" if os.path.basename(root) == inner
                else f"; {base} is directly in {root} but the layout expects it in {inner}/")
    return ""


def _read_text(path: str) -> str:
    """File contents as text: UTF-8 (BOM stripped), falling back to Latin-1 with a warning."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        logger.warning("%s is not UTF-8 (%s); reading it as Latin-1", path, e)
        return data.decode("latin-1")


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without CR/LF and surrounding whitespace), blank lines skipped."""
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.strip()
        if line:
            yield lineno, line


def _read_json(path: str) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}") from e


def _bad_line(path: str, lineno: int, line: str, expected: str) -> DatasetError:
    return DatasetError(f"{path}:{lineno}: expected {expected}, got {line!r}")


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


class _VideoFinder:
    """Locates annotated video files with one directory listing per folder (not one stat per video).

    A file is found under its exact name first, then under the same stem with another video
    extension (re-encoded copies), then case-insensitively; folders exactly, else ignoring case.
    """

    def __init__(self, base: str):
        self.base = base
        self._listings: dict[str, tuple[dict[str, str], dict[str, str]]] = {}

    def _listing(self, folder: str) -> tuple[dict[str, str], dict[str, str]]:
        """(folders, files) of ``folder``: lookup key (name, stem, lower-case forms) -> entry."""
        if folder not in self._listings:
            dirs: dict[str, str] = {}
            files: dict[str, str] = {}
            try:
                entries = sorted((e.name, e.is_dir()) for e in os.scandir(folder))
            except OSError:
                entries = []
            for name, is_dir in entries:
                if is_dir:
                    dirs.setdefault(f"={name}", name)
                    dirs.setdefault(f"~{name.lower()}", name)
                    continue
                stem, ext = os.path.splitext(name)
                keys = [f"={name}", f"~{name.lower()}"]
                if ext.lower() in VIDEO_EXTS:
                    keys += [f"s{stem}", f"t{stem.lower()}"]
                for key in keys:
                    files.setdefault(key, name)
            self._listings[folder] = (dirs, files)
        return self._listings[folder]

    def find(self, rel: str) -> str | None:
        """Absolute path of the file annotated as ``rel`` (``/``-separated), or None."""
        rel = rel.replace("\\", "/")
        folder = "/" if rel.startswith("/") else self.base
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        for part in parts[:-1]:
            if part == "..":
                folder = os.path.dirname(folder)
                continue
            dirs, _ = self._listing(folder)
            found = dirs.get(f"={part}") or dirs.get(f"~{part.lower()}")
            if found is None:
                return None
            folder = os.path.join(folder, found)
        if not parts:
            return None
        _, files = self._listing(folder)
        name, stem = parts[-1], os.path.splitext(parts[-1])[0]
        lookups = (f"={name}", f"s{stem}", f"~{name.lower()}", f"t{stem.lower()}")
        found = next((files[k] for k in lookups if k in files), None)
        return None if found is None else os.path.join(folder, found)

    def folder_exists(self) -> bool:
        return os.path.isdir(self.base)


@dataclass
class _Entry:
    where: str          # absolute video path, or why it is missing
    label: int
    tags: list[str]
    found: bool


class _Collector:
    """Gathers items in annotation order, merging split tags of a video listed in several splits."""

    def __init__(self, name: str, root: str, video_base: str, check_files: bool):
        self.name, self.root, self.check_files = name, root, check_files
        self.finder = _VideoFinder(video_base)
        self.entries: dict[str, _Entry] = {}
        self.split_tags: list[str] = []
        self.duplicates: Counter[str] = Counter()

    def add(self, key: str, rel: str, label: int, tag: str | None, source: str,
            alternatives: tuple[str, ...] = ()) -> None:
        """Record video ``key`` at ``rel`` (relative to the video folder, else one of
        ``alternatives``) with split ``tag``; ``source`` names the annotation file for logs."""
        if tag is not None and tag not in self.split_tags:
            self.split_tags.append(tag)
        entry = self.entries.get(key)
        if entry is not None:
            self._merge(key, entry, label, tag, source)
            return
        tags = [tag] if tag is not None else []
        expected = os.path.join(self.finder.base, rel)
        if not self.check_files:
            self.entries[key] = _Entry(expected, label, tags, True)
            return
        path = next((p for r in (rel, *alternatives) if (p := self.finder.find(r))), None)
        if path is None:
            self.entries[key] = _Entry(f"video file not found: {expected}", label, tags, False)
        else:
            self.entries[key] = _Entry(path, label, tags, True)

    def _merge(self, key: str, entry: _Entry, label: int, tag: str | None, source: str) -> None:
        if tag is None or tag in entry.tags:
            self.duplicates[source] += 1
            if self.duplicates[source] == 1:
                logger.warning("%s: video %s is listed more than once; keeping the first entry",
                               source, key)
            return
        if label >= 0 and entry.label >= 0 and label != entry.label:
            logger.warning("%s: video %s has label %d here but %d in an earlier split; keeping %d",
                           source, key, label, entry.label, entry.label)
        elif entry.label < 0:
            entry.label = label
        entry.tags.append(tag)

    def build(self, classes: list[str]) -> DatasetIndex:
        """The index: found videos as items, absent ones in ``missing`` (with per-split counts)."""
        for source, n in self.duplicates.items():
            logger.warning("%s: skipped %d duplicate video entries", source, n)
        items = [VideoItem(k, e.where, e.label, tuple(e.tags))
                 for k, e in self.entries.items() if e.found]
        absent = [(k, e) for k, e in self.entries.items() if not e.found]
        per_split = Counter(t for _, e in absent for t in e.tags)
        if absent:
            logger.warning("%s at %s: %d annotated videos have no file (%s)", self.name, self.root,
                           len(absent), ", ".join(f"{t}: {n}" for t, n in per_split.items()))
        return DatasetIndex(self.name, self.root, classes, items, [(k, e.where) for k, e in absent],
                            list(self.split_tags), dict(per_split))

    def require_video_folder(self) -> None:
        """With file checks on, a missing video folder is a layout error, not 'all missing'."""
        if self.check_files and not self.finder.folder_exists():
            rel = os.path.relpath(self.finder.base, self.root)
            raise DatasetError(f"{self.name}: expected the video folder {rel}/ under {self.root} "
                               f"but {self.finder.base} does not exist"
                               f"{_layout_hint(self.root, rel)}"
                               " (pass check_files=False to read annotations only)")


def _strip_ext(rel: str) -> str:
    rel = rel.replace("\\", "/")
    stem, ext = os.path.splitext(rel)
    return stem if ext else rel


# ---------------------------------------------------------------------------------------------
# Something-Something V2

SSV2_LABELS = "labels/something-something-v2-labels.json"
SSV2_SPLITS = (("train", "labels/something-something-v2-train.json"),
               ("val", "labels/something-something-v2-validation.json"),
               ("test", "labels/something-something-v2-test.json"))
SSV2_VIDEOS = "20bn-something-something-v2"


def read_ssv2(root: str, *, check_files: bool = True) -> DatasetIndex:
    """Something-Something V2: 174 template classes; test videos have label -1."""
    root = _norm_root(root)
    labels_path = _require(root, SSV2_LABELS, "ssv2")
    classes = _ssv2_classes(labels_path)
    lookup = {_squash(c): i for i, c in enumerate(classes)}
    col = _Collector("ssv2", root, os.path.join(root, SSV2_VIDEOS), check_files)
    present = [(tag, os.path.join(root, rel)) for tag, rel in SSV2_SPLITS
               if os.path.isfile(os.path.join(root, rel))]
    if not present:
        raise DatasetError(f"ssv2: expected {', '.join(rel for _, rel in SSV2_SPLITS)} under "
                           f"{root}; none exists")
    col.require_video_folder()
    for tag, path in present:
        for key, label in _ssv2_entries(path, lookup, labeled=tag != "test"):
            col.add(key, f"{key}.webm", label, tag, path)
    return col.build(classes)


def _ssv2_classes(path: str) -> list[str]:
    """Class names by index from the labels JSON ``{"Template text": "93", ...}``."""
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise DatasetError(f"{path}: expected a JSON object mapping template to class index")
    by_index: dict[int, str] = {}
    for name, index in data.items():
        i = _parse_int(str(index))
        if i is None or i < 0 or i in by_index:
            raise DatasetError(f"{path}: class {name!r} has index {index!r}; expected a unique "
                               "non-negative integer (string or number)")
        by_index[i] = name
    if sorted(by_index) != list(range(len(by_index))):
        gaps = sorted(set(range(max(by_index) + 1)) - set(by_index))[:5]
        raise DatasetError(f"{path}: class indices must be 0..{len(by_index) - 1}; missing {gaps}")
    return [by_index[i] for i in range(len(by_index))]


def _squash(text: str) -> str:
    """Template text with brackets removed, whitespace collapsed, lower-cased (for lookup)."""
    return " ".join(text.replace("[", "").replace("]", "").split()).lower()


def _ssv2_entries(path: str, lookup: dict[str, int], labeled: bool) -> Iterator[tuple[str, int]]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of video entries")
    for n, entry in enumerate(data):
        video_id = entry.get("id") if isinstance(entry, dict) else None
        if video_id is None or not str(video_id).strip():
            raise DatasetError(f"{path}: entry {n} has no 'id': {entry!r}")
        label = -1
        if labeled:
            template = entry.get("template")
            if not isinstance(template, str):
                raise DatasetError(f"{path}: entry {n} (id {video_id}) has no 'template': "
                                   f"{entry!r}")
            label = lookup.get(_squash(template), -2)
            if label == -2:
                raise DatasetError(f"{path}: entry {n} (id {video_id}) has template {template!r}, "
                                   f"which is not a class of {SSV2_LABELS}")
        yield str(video_id).strip(), label


# ---------------------------------------------------------------------------------------------
# UCF101

UCF_LISTS = "ucfTrainTestlist"
UCF_VIDEOS = "UCF-101"


def read_ucf101(root: str, *, check_files: bool = True) -> DatasetIndex:
    """UCF101 with its 3 official splits as tags ``train1..3`` / ``test1..3``."""
    root = _norm_root(root)
    class_path = _require(root, f"{UCF_LISTS}/classInd.txt", "ucf101")
    classes = _ucf_classes(class_path)
    col = _Collector("ucf101", root, os.path.join(root, UCF_VIDEOS), check_files)
    lists = [(f"{kind}{k}", os.path.join(root, UCF_LISTS, f"{kind}list0{k}.txt"))
             for k in (1, 2, 3) for kind in ("train", "test")]
    present = [(tag, path) for tag, path in lists if os.path.isfile(path)]
    if not present:
        raise DatasetError(f"ucf101: expected {UCF_LISTS}/trainlist01.txt (and the other split "
                           f"lists) under {root}; none exists")
    absent = [os.path.basename(p) for _, p in lists if not os.path.isfile(p)]
    if absent:
        logger.warning("ucf101: %s missing under %s; those splits are skipped",
                       ", ".join(absent), os.path.join(root, UCF_LISTS))
    col.require_video_folder()
    for tag, path in present:
        for rel, label in _ucf_split(path, classes, labeled=tag.startswith("train")):
            col.add(_strip_ext(rel), rel, label, tag, path)
    return col.build(classes)


def _ucf_classes(path: str) -> list[str]:
    """``classInd.txt``: lines ``1 ApplyEyeMakeup``, 1-based and contiguous."""
    classes: list[str] = []
    for lineno, line in _read_lines(path):
        parts = line.split()
        index = _parse_int(parts[0]) if len(parts) == 2 else None
        if index is None:
            raise _bad_line(path, lineno, line, "'<1-based index> <ClassName>'")
        if index != len(classes) + 1:
            raise _bad_line(path, lineno, line,
                            f"class index {len(classes) + 1} (1-based, in order)")
        classes.append(parts[1])
    if not classes:
        raise DatasetError(f"{path}: no classes")
    return classes


def _ucf_split(path: str, classes: list[str], labeled: bool) -> Iterator[tuple[str, int]]:
    """(relative video path, 0-based label) from a trainlist (``path N``) or testlist (``path``)."""
    by_name = {c: i for i, c in enumerate(classes)}
    by_lower = {c.lower(): i for i, c in enumerate(classes)}
    expected = "'<Class>/<video>.avi <1-based label>'" if labeled else "'<Class>/<video>.avi'"
    for lineno, line in _read_lines(path):
        parts = line.split()
        if len(parts) != (2 if labeled else 1) or "/" not in parts[0].replace("\\", "/"):
            raise _bad_line(path, lineno, line, expected)
        rel = parts[0].replace("\\", "/")
        folder = rel.split("/", 1)[0]
        from_folder = by_name.get(folder, by_lower.get(folder.lower()))
        if labeled:
            number = _parse_int(parts[1])
            if number is None or not 1 <= number <= len(classes):
                raise _bad_line(path, lineno, line, f"a label in 1..{len(classes)}")
            if from_folder is not None and from_folder != number - 1:
                raise _bad_line(path, lineno, line, f"label {from_folder + 1} for folder {folder} "
                                f"(classInd.txt)")
            yield rel, number - 1
        else:
            if from_folder is None:
                raise _bad_line(path, lineno, line, f"a class folder listed in classInd.txt "
                                f"({folder!r} is not)")
            yield rel, from_folder


# ---------------------------------------------------------------------------------------------
# HMDB51

HMDB_SPLITS = "testTrainMulti_7030_splits"
HMDB_VIDEOS = "hmdb51_org"
_HMDB_SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<k>[123])\.txt$")
_HMDB_TAGS = {1: "train", 2: "test"}


def read_hmdb51(root: str, *, check_files: bool = True) -> DatasetIndex:
    """HMDB51 with its 3 splits as tags ``train1..3`` / ``test1..3`` (unused videos skipped)."""
    root = _norm_root(root)
    split_files = _hmdb_split_files(root)
    classes = sorted({cls for cls, _, _ in split_files})
    col = _Collector("hmdb51", root, os.path.join(root, HMDB_VIDEOS), check_files)
    col.split_tags = [f"{kind}{k}" for k in sorted({k for _, k, _ in split_files})
                      for kind in ("train", "test")]
    col.require_video_folder()
    seen: set[str] = set()
    for cls, k, path in split_files:
        for name, code in _hmdb_lines(path):
            key = f"{cls}/{_strip_ext(name)}"
            seen.add(key)
            if code:
                col.add(key, f"{cls}/{name}", classes.index(cls), f"{_HMDB_TAGS[code]}{k}", path)
    index = col.build(classes)
    unused = len(seen) - len(index.items) - len(index.missing)
    if unused:
        logger.info("hmdb51: %d videos are marked 0 (unused) in every split; skipped", unused)
    return index


def _hmdb_split_files(root: str) -> list[tuple[str, int, str]]:
    """(class, split number, path) of every ``{class}_test_split{k}.txt``, sorted."""
    folder = os.path.join(root, HMDB_SPLITS)
    if not os.path.isdir(folder):
        raise DatasetError(f"hmdb51: expected the folder {HMDB_SPLITS}/ (with "
                           f"<class>_test_split1.txt files) under {root} but {folder} does not "
                           f"exist{_layout_hint(root, HMDB_SPLITS)}")
    found = []
    for name in sorted(os.listdir(folder)):
        match = _HMDB_SPLIT_FILE.match(name)
        if match:
            found.append((match["cls"], int(match["k"]), os.path.join(folder, name)))
    if not found:
        raise DatasetError(f"hmdb51: {folder} has no <class>_test_split<1|2|3>.txt files")
    counts = Counter(k for _, k, _ in found)
    if len(set(counts.values())) > 1:
        logger.warning("hmdb51: split files per split number differ: %s", dict(counts))
    return found


def _hmdb_lines(path: str) -> Iterator[tuple[str, int]]:
    """(video file name, 0 unused / 1 train / 2 test) from ``name.avi N`` lines."""
    for lineno, line in _read_lines(path):
        parts = line.rsplit(None, 1)
        code = _parse_int(parts[1]) if len(parts) == 2 else None
        if code not in (0, 1, 2):
            raise _bad_line(path, lineno, line, "'<name>.avi <0|1|2>'")
        yield parts[0], code


# ---------------------------------------------------------------------------------------------
# Diving48

DIVING_VOCAB = "Diving48_vocab.json"
DIVING_SPLITS = (("train", ("Diving48_V2_train.json", "Diving48_train.json")),
                 ("test", ("Diving48_V2_test.json", "Diving48_test.json")))
DIVING_VIDEOS = "rgb"


def read_diving48(root: str, *, check_files: bool = True) -> DatasetIndex:
    """Diving48 (V2 annotations, V1 file names as a fallback); tags ``train`` / ``test``."""
    root = _norm_root(root)
    classes = _diving_classes(_require(root, DIVING_VOCAB, "diving48"))
    col = _Collector("diving48", root, os.path.join(root, DIVING_VIDEOS), check_files)
    present = []
    for tag, names in DIVING_SPLITS:
        path = next((os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))),
                    None)
        if path is not None:
            present.append((tag, path))
        else:
            logger.warning("diving48: no %s under %s", " or ".join(names), root)
    if not present:
        raise DatasetError(f"diving48: expected Diving48_V2_train.json / Diving48_V2_test.json "
                           f"under {root}; neither exists")
    col.require_video_folder()
    for tag, path in present:
        for vid, label in _diving_entries(path, len(classes)):
            col.add(vid, f"{vid}.mp4", label, tag, path)
    return col.build(classes)


def _diving_classes(path: str) -> list[str]:
    """Class names: the 4 attributes (takeoff, somersault, twist, flight) joined with ``_``."""
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path}: expected a JSON list with one attribute list per class")
    classes = []
    for n, attrs in enumerate(data):
        if not isinstance(attrs, list) or not attrs or not all(isinstance(a, str) for a in attrs):
            raise DatasetError(f"{path}: class {n} is {attrs!r}; expected a list of 4 strings")
        classes.append("_".join(a.strip() for a in attrs))
    return classes


def _diving_entries(path: str, n_classes: int) -> Iterator[tuple[str, int]]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of video entries")
    for n, entry in enumerate(data):
        vid = entry.get("vid_name") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(vid, str) or not vid or isinstance(label, bool) \
                or not isinstance(label, int) or not 0 <= label < n_classes:
            raise DatasetError(f"{path}: entry {n} is {entry!r}; expected "
                               f"{{'vid_name': str, 'label': 0..{n_classes - 1}, ...}}")
        yield vid, label


# ---------------------------------------------------------------------------------------------
# Kinetics-400

K400_SPLITS = (("train", ("train",)), ("val", ("val", "validate")), ("test", ("test",)))


def read_kinetics400(root: str, *, check_files: bool = True) -> DatasetIndex:
    """Kinetics-400 from ``annotations/*.csv``; absent clips are reported in ``missing``.

    Class names are the sorted labels of every CSV present (a test CSV without a label column
    gives label -1). Clips are looked up in ``{split}/`` and one class folder below it.
    """
    root = _norm_root(root)
    present = []
    for tag, names in K400_SPLITS:
        csv_path = next((p for n in names
                         if os.path.isfile(p := os.path.join(root, "annotations", f"{n}.csv"))),
                        None)
        if csv_path is not None:
            folder = next((n for n in names if os.path.isdir(os.path.join(root, n))), names[0])
            present.append((tag, csv_path, folder))
    if not present:
        raise DatasetError(f"kinetics400: expected annotations/train.csv (and val.csv, test.csv) "
                           f"under {root}; none exists"
                           f"{_layout_hint(root, 'annotations/train.csv')}")
    rows = [(tag, folder, path, row) for tag, path, folder in present for row in _k400_rows(path)]
    classes = sorted({label for *_, (label, _) in rows if label})
    lookup = {c: i for i, c in enumerate(classes)}
    col = _Collector("kinetics400", root, root, check_files)
    if check_files and not any(os.path.isdir(os.path.join(root, f)) for _, _, f in present):
        raise DatasetError(f"kinetics400: expected video folders "
                           f"{', '.join(f + '/' for _, _, f in present)} under {root}; none exists "
                           "(pass check_files=False to read annotations only)")
    for tag, folder, path, (label, clip) in rows:
        nested = (f"{folder}/{label}/{clip}.mp4", f"{folder}/{label.replace(' ', '_')}/{clip}.mp4")
        col.add(f"{tag}/{clip}", f"{folder}/{clip}.mp4", lookup.get(label, -1), tag,
                path, nested if label else ())
    return col.build(classes)


def _k400_rows(path: str) -> Iterator[tuple[str, str]]:
    """(class name or "", clip name ``{id}_{start:06d}_{end:06d}``) per CSV row."""
    lines = _read_text(path).split("\n")
    reader = csv.reader(lines)
    header = [h.strip().lower() for h in next(reader, [])]
    need = ("youtube_id", "time_start", "time_end")
    if not all(h in header for h in need):
        raise DatasetError(f"{path}:1: expected the header label,youtube_id,time_start,time_end,"
                           f"split; got {lines[0] if lines else ''!r}")
    col = {h: header.index(h) for h in (*need, "label") if h in header}
    expected = f"{len(header)} columns ({','.join(header)}) with numeric times"
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        lineno = reader.line_num
        try:
            youtube_id = row[col["youtube_id"]].strip()
            start = int(float(row[col["time_start"]]))
            end = int(float(row[col["time_end"]]))
        except (ValueError, IndexError, OverflowError):
            raise _bad_line(path, lineno, lines[lineno - 1].strip(), expected) from None
        if not youtube_id or len(row) < len(header):
            raise _bad_line(path, lineno, lines[lineno - 1].strip(), expected)
        label = row[col["label"]].strip() if "label" in col else ""
        yield label, f"{youtube_id}_{start:06d}_{end:06d}"


# ---------------------------------------------------------------------------------------------
# Generic video lists

LIST_SPLITS = (("train", ("train.txt", "train.csv")), ("val", ("val.txt", "val.csv")),
               ("test", ("test.txt", "test.csv")))
_HEADER_LABELS = {"label", "labels", "class", "class_id", "target"}


def read_list(path_or_root: str, *, check_files: bool = True) -> DatasetIndex:
    """MMAction2-style lists: ``relative/path.ext label`` (space or comma), 0-based labels.

    ``path_or_root`` is a folder with ``train.txt`` / ``val.txt`` / ``test.txt`` (and optionally
    ``classes.txt``, one class name per line) or one list file, whose tag is its file stem.
    Paths are relative to the list file's folder; a line with a path only has label -1.
    """
    target = os.path.abspath(os.path.expanduser(str(path_or_root)))
    if os.path.isfile(target):
        root = os.path.dirname(target)
        lists = [(_list_tag(target), target)]
    else:
        root = _norm_root(target)
        lists = [(tag, p) for tag, names in LIST_SPLITS
                 if (p := next((os.path.join(root, n) for n in names
                                if os.path.isfile(os.path.join(root, n))), None))]
        if not lists:
            raise DatasetError(f"list: expected train.txt, val.txt or test.txt under {root} "
                               "(or pass a list file itself); none exists")
    class_path = os.path.join(root, "classes.txt")
    classes = [line for _, line in _read_lines(class_path)] if os.path.isfile(class_path) else []
    col = _Collector("list", target, root, check_files)
    max_label = -1
    for tag, path in lists:
        for rel, label in _list_lines(path, len(classes) or None):
            max_label = max(max_label, label)
            col.add(_strip_ext(rel), rel, label, tag, path)
    if not classes:
        classes = [str(i) for i in range(max_label + 1)]
    return col.build(classes)


def _list_tag(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return {"validation": "val", "valid": "val"}.get(stem, stem)


def _list_lines(path: str, n_classes: int | None) -> Iterator[tuple[str, int]]:
    """(relative path, label or -1) per line; labels are checked against classes.txt if given."""
    for lineno, line in _read_lines(path):
        if "," in line:
            parts = [p.strip() for p in line.rsplit(",", 1)]
        else:
            parts = line.rsplit(None, 1)
        if len(parts) == 1:
            yield parts[0], -1
            continue
        label = _parse_int(parts[1])
        if label is None and lineno == 1 and parts[1].lower() in _HEADER_LABELS:
            continue
        if label is None or label < 0 or (n_classes is not None and label >= n_classes):
            bound = f"0..{n_classes - 1} (classes.txt)" if n_classes else ">= 0"
            raise _bad_line(path, lineno, line, f"'<relative/path.ext> <label>' with label {bound}")
        if not parts[0]:
            raise _bad_line(path, lineno, line, "a video path before the label")
        yield parts[0], label


READERS: dict[str, Callable[..., DatasetIndex]] = {
    "ssv2": read_ssv2, "ucf101": read_ucf101, "hmdb51": read_hmdb51, "diving48": read_diving48,
    "kinetics400": read_kinetics400, "list": read_list,
}
