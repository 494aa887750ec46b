"""One writer per worker slot: a second writer of the same archive and worker index is refused.

Two processes writing the same worker's shards and manifest part would overwrite each other's
manifest and lose videos. The writer therefore holds its worker slot for as long as it writes:

* **Local folders**: an OS lock (``flock``) on ``locks/worker-WWWWW.lock``. The OS drops it when the
  holder exits, however it exits, so the lock of a killed process is taken over at once. The file
  names the holder (host, pid, start time) for the refusal message. (``flock`` works on local file
  systems and on NFSv4; on other network file systems use one folder per host or an object store.)
* **Object stores**: a lease object ``locks/worker-WWWWW.json`` created with a conditional PUT
  (S3 ``If-None-Match: *``), renewed every ``ttl / 4`` seconds. A lease whose holder is gone (not
  renewed within ``ttl``, or on this host a pid that no longer runs) is taken over through a marker
  object created the same conditional way, so two processes taking over one stale lease cannot
  both win. On stores without a conditional PUT the check is best-effort (check, then write) and a
  warning says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from vimpac.archive.errors import ArchiveError
from vimpac.common.storage import Location

log = logging.getLogger(__name__)

LEASE_TTL_ENV = "VIMPAC_LEASE_TTL_S"
DEFAULT_LEASE_TTL_S = 300.0


@dataclass
class Holder:
    host: str
    pid: int
    started: float
    token: str
    renewed: float = 0.0
    ttl_s: float = DEFAULT_LEASE_TTL_S

    @classmethod
    def me(cls, ttl_s: float) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, uuid.uuid4().hex, now, ttl_s)

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        try:
            data = json.loads(raw)
            return cls(host=str(data["host"]), pid=int(data["pid"]),
                       started=float(data["started"]), token=str(data["token"]),
                       renewed=float(data.get("renewed", 0.0)),
                       ttl_s=float(data.get("ttl_s", DEFAULT_LEASE_TTL_S)))
        except (ValueError, KeyError, TypeError, RecursionError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {when}"

    def gone(self, now: float) -> bool:
        """The holder no longer runs: its lease ran out, or it is a dead pid on this host."""
        if self.renewed + self.ttl_s < now:
            return True
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False


def _ttl() -> float:
    try:
        return max(1.0, float(os.environ.get(LEASE_TTL_ENV, DEFAULT_LEASE_TTL_S)))
    except ValueError:
        return DEFAULT_LEASE_TTL_S


class WorkerLock:
    """Hold worker slot ``worker`` of the archive at ``root`` while writing it."""

    def __init__(self, root: Location, worker: int) -> None:
        self.root, self.worker = root, worker
        self.holder = Holder.me(_ttl())
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    @property
    def name(self) -> str:
        return f"locks/worker-{self.worker:05d}" + (".lock" if self.root.is_local else ".json")

    def refused(self, holder: Holder | None, extra: str = "") -> ArchiveError:
        who = holder.describe() if holder else "another process"
        return ArchiveError(f"{self.root.url(self.name)}: worker {self.worker} of this archive "
                            f"is being written by {who}{extra}; wait for it to finish, or write "
                            "another worker index or archive")

    # -- local
    def _acquire_local(self) -> None:
        import fcntl

        path = self.root.local_path(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = None
            for _ in range(50):                 # the holder writes its name right after locking
                holder = Holder.parse(os.pread(fd, 4096, 0))
                if holder is not None:
                    break
                time.sleep(0.02)
            os.close(fd)
            raise self.refused(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.holder.to_bytes(), 0)
        os.fsync(fd)
        self._fd = fd

    def _release_local(self) -> None:
        if self._fd is not None:
            os.close(self._fd)                  # closing drops the flock
            self._fd = None

    # -- object store
    def _read_lease(self) -> Holder | None:
        try:
            return Holder.parse(self.root.read_bytes(self.name))
        except FileNotFoundError:
            return None

    def _acquire_remote(self) -> None:
        if not self.root.exclusive_create:
            log.warning("%s: this store has no conditional PUT; one writer per worker slot is "
                        "checked, not enforced", self.root.url())
        for _ in range(3):
            if self.root.create_bytes(self.name, self.holder.to_bytes()):
                self._start_heartbeat()
                return
            current = self._read_lease()
            if current is None:
                continue                        # released meanwhile: try again
            if not current.gone(time.time()):
                expires = time.strftime("%H:%M:%S",
                                        time.localtime(current.renewed + current.ttl_s))
                raise self.refused(current, f" (lease renewed until {expires})")
            marker = f"{self.name}.takeover-{current.token}"
            if not self.root.create_bytes(marker, self.holder.to_bytes()):
                raise self.refused(None, " (taking over its stale lease)")
            log.warning("%s: taking over the stale lease of %s", self.root.url(self.name),
                        current.describe())
            self.root.remove(self.name)
        raise self.refused(self._read_lease())

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="vimpac-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.holder.ttl_s / 4):
            try:
                current = self._read_lease()
                if current is None or current.token != self.holder.token:
                    self.lost = True
                    log.error("%s: lease lost to %s", self.root.url(self.name),
                              current.describe() if current else "nobody")
                    return
                self.holder.renewed = time.time()
                self.root.write_bytes(self.name, self.holder.to_bytes())
            except OSError as exc:
                log.warning("%s: could not renew the lease: %s", self.root.url(self.name), exc)

    def _release_remote(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            with contextlib.suppress(OSError):
                current = self._read_lease()
                if current is not None and current.token == self.holder.token:
                    self.root.remove(self.name)

    # -- both
    def acquire(self) -> WorkerLock:
        (self._acquire_local if self.root.is_local else self._acquire_remote)()
        return self

    def release(self) -> None:
        (self._release_local if self.root.is_local else self._release_remote)()

    def check(self) -> None:
        """Raise if the lease was lost (a paused writer whose lease another process took)."""
        if self.lost:
            raise self.refused(self._read_lease(), " (this writer's lease expired)")

    def __enter__(self) -> WorkerLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
