"""``vimpac verify``: an archive checked against its manifest, every problem named.

The plain check reads the manifests (all of the validation :class:`Archive` does on opening) and
every shard file's checksum; a shard with no checksums recorded fails. ``deep=True`` also decodes
every shard in every format and view, whole and video by video (the streaming and the random-access
paths), and applies everything a reader checks: structure against the manifest (video count,
offsets, frame counts, grid, keys) and token ids below the codebook size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vimpac.archive.errors import ArchiveError
from vimpac.archive.formats import FORMATS
from vimpac.archive.reader import Archive
from vimpac.common.storage import Location


@dataclass
class VerifyReport:
    shards_checked: int = 0
    files_checked: int = 0
    videos_decoded: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(root: str | Path | Location, deep: bool = False,
           on_shard: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check ``root``; ``on_shard(done, total)`` is called after each shard (progress)."""
    report = VerifyReport()
    try:
        archive = Archive(root)
    except ArchiveError as exc:
        report.problems.append(str(exc))
        return report
    names = archive.shard_names()
    for name in names:
        report.shards_checked += 1
        for fmt_name in archive.settings.formats:
            if fmt_name not in FORMATS:
                report.problems.append(f"{archive.root}: shard {name}: format {fmt_name!r} is "
                                       "unknown to this vimpac (not checked)")
                continue
            _check_shard(archive, name, fmt_name, deep, report)
        if on_shard is not None:
            on_shard(report.shards_checked, len(names))
    return report


def _check_shard(archive: Archive, name: str, fmt_name: str, deep: bool,
                 report: VerifyReport) -> None:
    fmt = FORMATS[fmt_name]
    try:
        report.files_checked += len(archive.shard_files(name, fmt))
        archive.verify_shard(name, fmt)
        if deep:
            reader = archive.open_shard(name, fmt, verify=False)
            for view in archive.settings.view_names:
                reader.read_all(view)                    # the streaming path
                for index in range(archive.shards[name].videos):
                    reader.read(index, view)             # the random-access path
            report.videos_decoded += archive.shards[name].videos
    except ArchiveError as exc:
        report.problems.append(str(exc))
