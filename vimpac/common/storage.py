"""Where archives live: a local folder or an fsspec URL (``s3://``, ``gs://``, ``memory://``...).

:func:`location` turns what a user typed into a :class:`Location`, a folder with the handful of
operations the archive module needs: read, write atomically, list, remove. Paths inside it are
relative POSIX strings (``"manifests/worker-00000-of-00001.json"``).

* **Local folders** (plain paths and ``file://`` URLs) keep the POSIX guarantees: temp file,
  fsync, rename, fsync of the folder.
* **Object stores** have no rename, but a single PUT is atomic: an object is either absent or
  complete. Writers therefore upload whole objects, and the archive publishes shards by writing
  its manifest last; an uploaded shard no manifest names is invisible to readers.

Credentials are never handled here: fsspec and the store's SDK find them in the standard places
(``AWS_*`` environment variables, ``~/.aws``, instance roles, fsspec's ``FSSPEC_<PROTOCOL>_<KEY>``
variables and config files; ``AWS_ENDPOINT_URL`` for S3-compatible stores). URLs are shown with
any ``user:password@`` part removed.

Transient errors (connection resets, time-outs, 5xx) are retried with exponential back-off
(:data:`RETRY`); what still fails ends as a :class:`StorageError` naming the object.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vimpac.common.errors import VimpacError
from vimpac.common.fileio import atomic_open

log = logging.getLogger(__name__)

T = TypeVar("T")
_URL_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_USERINFO_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


@dataclass
class RetryPolicy:
    """How often and how patiently remote operations are retried."""
    attempts: int = 5           # tries in all
    base_delay_s: float = 0.5   # first back-off; doubles each time, with +-25 % jitter
    max_delay_s: float = 8.0


RETRY = RetryPolicy()


class StorageError(VimpacError, OSError):
    """A remote read or write that failed for good; ``filename`` is the object's URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(errno.EIO, reason, url)

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def is_url(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and bool(_URL_RE.match(path))


def redact(url: str) -> str:
    """``url`` without a ``user:password@`` part (safe to log)."""
    return _USERINFO_RE.sub(r"\1", url)


def location(path: str | os.PathLike | Location) -> Location:
    """The folder ``path`` names: local for plain paths and ``file://``, else remote (fsspec)."""
    if isinstance(path, Location):
        return path
    if not is_url(path):
        return LocalLocation(Path(path))
    text = str(path).rstrip("/")
    if text.startswith("file://"):
        return LocalLocation(Path(text[len("file://"):]))
    return RemoteLocation(text)


def _join(base: str, rel: str) -> str:
    rel = rel.strip("/")
    return f"{base}/{rel}" if rel else base


class Location:
    """A folder of objects. Subclasses: :class:`LocalLocation`, :class:`RemoteLocation`."""

    is_local: bool = True

    def url(self, rel: str = "") -> str:
        """What to show users for ``rel`` (credentials removed)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.url()

    def local_path(self, rel: str = "") -> Path:
        raise TypeError(f"{self.url(rel)} is not a local path")

    def exists(self, rel: str = "") -> bool:
        raise NotImplementedError

    def is_dir(self, rel: str = "") -> bool:
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """{rel: bytes} of several objects (concurrently where the store allows)."""
        return {rel: self.read_bytes(rel) for rel in rels}

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` with ``data`` atomically: readers see the old object or the new one."""
        raise NotImplementedError

    def create_bytes(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist, atomically; False if it
        already exists. Object stores need a conditional PUT (S3 ``If-None-Match: *``); on a
        store without one this is check-then-write (see :attr:`exclusive_create`)."""
        raise NotImplementedError

    @property
    def exclusive_create(self) -> bool:
        """Whether :meth:`create_bytes` is atomic against a concurrent creator."""
        return True

    def put_tree(self, local_dir: Path, rel: str) -> None:
        """Copy the files under ``local_dir`` to ``rel``/..., each object complete."""
        raise NotImplementedError

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        raise NotImplementedError

    def remove(self, rel: str) -> None:
        """Delete the object or folder ``rel`` (and everything under it); absent is fine."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ local

class LocalLocation(Location):
    """A folder on a local (or network-mounted POSIX) file system."""

    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def url(self, rel: str = "") -> str:
        return str(self.root / rel) if rel else str(self.root)

    def local_path(self, rel: str = "") -> Path:
        return self.root / rel if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.local_path(rel).exists()

    def is_dir(self, rel: str = "") -> bool:
        return self.local_path(rel).is_dir()

    def read_bytes(self, rel: str) -> bytes:
        return self.local_path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        with atomic_open(self.local_path(rel)) as fh:
            fh.write(data)

    def create_bytes(self, rel: str, data: bytes) -> bool:
        path = self.local_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path.with_name(f"{path.name}.new")) as fh:
            fh.write(data)
        try:                        # a hard link fails if the target exists: atomic, complete
            os.link(path.with_name(f"{path.name}.new"), path)
        except FileExistsError:
            return False
        finally:
            path.with_name(f"{path.name}.new").unlink(missing_ok=True)
        return True

    def put_tree(self, local_dir: Path, rel: str) -> None:
        target = self.local_path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local_dir, target, dirs_exist_ok=True)

    def list(self, rel: str = "") -> list[str]:
        folder = self.local_path(rel)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def remove(self, rel: str) -> None:
        path = self.local_path(rel)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- remote

def _transient(exc: BaseException) -> bool:
    """Worth retrying: network trouble and server-side errors, not missing objects or denials."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, FileExistsError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if any(word in name for word in ("Connect", "Timeout", "Endpoint", "ServerDisconnected",
                                     "ClientPayload", "IncompleteRead", "ResponseStream")):
        return True
    text = str(exc)
    return isinstance(exc, OSError) and any(code in text for code in (
        "500", "502", "503", "504", "SlowDown", "InternalError", "RequestTimeout"))


def with_retries(url: str, what: str, fn: Callable[[], T], policy: RetryPolicy | None = None
                 ) -> T:
    """``fn()`` retried on transient errors with exponential back-off and jitter.

    A missing object raises FileNotFoundError naming ``url``; a permanent failure, or a transient
    one that outlives the policy, raises :class:`StorageError` naming ``url``.
    """
    policy = policy or RETRY
    delay = policy.base_delay_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such object", url) from None
        except Exception as exc:
            if not _transient(exc):
                raise StorageError(url, f"cannot {what}: {_describe(exc)}") from None
            if attempt == policy.attempts:
                raise StorageError(url, f"cannot {what} after {attempt} attempts: "
                                   f"{_describe(exc)}") from None
            log.warning("%s: %s failed (%s); retrying in %.1f s (attempt %d of %d)", url, what,
                        _describe(exc), delay, attempt + 1, policy.attempts)
            time.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, policy.max_delay_s)
    raise AssertionError("unreachable")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


class RemoteLocation(Location):
    """A prefix in an fsspec file system (an object store, or ``memory://`` in tests)."""

    is_local = False

    def __init__(self, url: str) -> None:
        import fsspec

        self._url = url.rstrip("/")
        try:
            self.fs, self.path = fsspec.url_to_fs(self._url)
        except (ImportError, ValueError) as exc:
            scheme = self._url.split("://", 1)[0]
            hint = " (pip install 's3fs')" if scheme in ("s3", "s3a") else \
                " (pip install 'gcsfs')" if scheme in ("gs", "gcs") else ""
            raise StorageError(redact(self._url), f"cannot open {scheme}:// URLs: "
                               f"{_describe(exc)}{hint}") from None
        self.path = self.path.rstrip("/")

    def __getstate__(self) -> dict[str, Any]:
        return {"_url": self._url}          # file systems are re-created in each process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_url"])

    def url(self, rel: str = "") -> str:
        return redact(_join(self._url, rel))

    def _p(self, rel: str) -> str:
        return _join(self.path, rel)

    def exists(self, rel: str = "") -> bool:
        return with_retries(self.url(rel), "check", lambda: self.fs.exists(self._p(rel)))

    def is_dir(self, rel: str = "") -> bool:
        return with_retries(self.url(rel), "check", lambda: self.fs.isdir(self._p(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return with_retries(self.url(rel), "read", lambda: self.fs.cat_file(self._p(rel)))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        if len(rels) < 2:
            return {rel: self.read_bytes(rel) for rel in rels}
        paths = [self._p(rel) for rel in rels]
        try:                                   # one batch: async stores fetch concurrently
            got = with_retries(self.url(rels[0]) + f" (and {len(rels) - 1} more)", "read",
                               lambda: self.fs.cat(paths, on_error="raise"))
        except (FileNotFoundError, StorageError):
            return {rel: self.read_bytes(rel) for rel in rels}   # find which one, by name
        return {rel: got[path] for rel, path in zip(rels, paths, strict=True)}

    def write_bytes(self, rel: str, data: bytes) -> None:
        with_retries(self.url(rel), "write", lambda: self.fs.pipe_file(self._p(rel), data))

    def create_bytes(self, rel: str, data: bytes) -> bool:
        def put() -> bool:
            try:
                self.fs.pipe_file(self._p(rel), data, mode="create")
            except FileExistsError:
                return False
            except OSError as exc:          # a 412 not mapped to FileExistsError by the SDK
                if "precondition" in str(exc).lower():
                    return False
                raise
            return True
        return with_retries(self.url(rel), "create", put)

    @property
    def exclusive_create(self) -> bool:
        # S3 (s3fs) sends If-None-Match: *; the in-memory test store opens with "xb". Others
        # fall back to fsspec's check-then-write.
        protocols = self.fs.protocol
        protocols = {protocols} if isinstance(protocols, str) else set(protocols)
        return bool(protocols & {"memory", "s3", "s3a"})

    def put_tree(self, local_dir: Path, rel: str) -> None:
        for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            sub = _join(rel, file.relative_to(local_dir).as_posix())
            self.write_bytes(sub, file.read_bytes())

    def list(self, rel: str = "") -> list[str]:
        def ls() -> list[str]:
            try:
                found = self.fs.ls(self._p(rel), detail=False, refresh=True)
            except FileNotFoundError:
                return []
            base = self._p(rel).strip("/")
            return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in found
                           if p.rstrip("/").strip("/") != base})
        return with_retries(self.url(rel), "list", ls)

    def remove(self, rel: str) -> None:
        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._p(rel), recursive=True)
        with_retries(self.url(rel), "remove", rm)
