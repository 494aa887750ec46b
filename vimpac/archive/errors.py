"""What can be wrong with an archive, from the whole archive down to one shard."""

from __future__ import annotations

from vimpac.common.errors import VimpacError


class ArchiveError(VimpacError):
    """A problem with an archive on disk; the message is one line naming the archive, and the
    manifest, shard and video where it is known."""


class ShardError(ArchiveError):
    """One shard's content is wrong (checksum, structure, token ids, grid). Readers may skip the
    shard (``pretrain.on_corrupt_shard: skip``); everything else in the archive stays usable."""


class ChecksumError(ShardError):
    """A shard whose bytes do not match the manifest's checksum, or a shard file that is missing."""
