"""The shard formats an archive can hold, as one table.

``FORMATS`` maps a format's name (as written in configs and manifests) to its :class:`Format`:
where its shards live, how one is written and how one is read back, validated. Configuration
choices, the writer, the readers and ``vimpac verify`` all take the formats from this table.
Adding a format is one new module in this folder and one entry here (see docs/extending.md).
"""

from __future__ import annotations

from vimpac.archive.formats import wds, zarr
from vimpac.archive.formats.base import (
    Format,
    ShardContent,
    ShardLayout,
    ShardReader,
    ShardSource,
)

FORMATS: dict[str, Format] = {f.name: f for f in (zarr.FORMAT, wds.FORMAT)}
DEFAULT_FORMATS: tuple[str, ...] = tuple(FORMATS)          # what tokenize writes by default
STREAM_DEFAULT: str = next(iter(FORMATS))                  # what pretrain streams by default

__all__ = ["DEFAULT_FORMATS", "FORMATS", "STREAM_DEFAULT", "Format", "ShardContent",
           "ShardLayout", "ShardReader", "ShardSource"]
