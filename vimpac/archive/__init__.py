"""The token archive: the contract between the tokenize stage and the training stages.

This package alone knows the on-disk format. An archive is a folder, local or on an object store
(any fsspec URL; :mod:`vimpac.common.storage` does the I/O)::

    ARCHIVE/
      manifests/worker-00000-of-00001.json   one manifest part per tokenize worker (atomic rewrites)
      manifest.json                          optional merged manifest (``vimpac archive merge``)
      locks/                                 one writer per worker slot (see :mod:`.lock`)
      <format folder>/<shard><suffix>        one entry per shard and format (see :mod:`.formats`)

* :mod:`.manifest`: typed settings and records, parsed and validated once;
* :mod:`.writer`: :class:`ArchiveWriter`, the one commit protocol;
* :mod:`.reader`: :class:`Archive` and shard readers that check what they read;
* :mod:`.formats`: the ``FORMATS`` table (zarr, webdataset);
* :mod:`.verify`: ``vimpac verify`` (checksums; ``deep``: every check a reader makes).
"""

from vimpac.archive.errors import ArchiveError, ChecksumError, ShardError
from vimpac.archive.formats import FORMATS, Format, ShardReader
from vimpac.archive.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TOKEN_DTYPE,
    ArchiveSettings,
    ManifestPart,
    ShardRecord,
    VideoRecord,
    View,
    load_part,
    make_views,
    save_part,
)
from vimpac.archive.reader import Archive, Entry, open_archives, read_tokens
from vimpac.archive.verify import VerifyReport, verify
from vimpac.archive.writer import ArchiveWriter, merge_manifests, shard_name, write_archive

__all__ = [
    "FORMATS", "FORMAT_NAME", "FORMAT_VERSION", "TOKEN_DTYPE", "Archive", "ArchiveError",
    "ArchiveSettings", "ArchiveWriter", "ChecksumError", "Entry", "Format", "ManifestPart",
    "ShardError", "ShardReader", "ShardRecord", "VerifyReport", "VideoRecord", "View",
    "load_part", "make_views", "merge_manifests", "open_archives",
    "read_tokens", "save_part", "shard_name", "verify", "write_archive",
]

