"""How DataLoader worker processes start: one rule for every loader of the project.

``fork`` is the cheapest (a worker starts with the parent's memory) but copies a parent's threads
away: where the parent may hold I/O threads (fsspec's async loop for an object store; the
pre-training stream, which also runs under torchrun's process group) the workers start from a
``forkserver`` instead. Never ``spawn``: a spawned worker leaves through a full interpreter
shutdown, which stops the daemon thread that sends its batches wherever that thread is. Caught
inside torch's tensor sharing (C++ that waits for the GIL), the thread calls ``std::terminate``,
the worker dies of SIGABRT, and the parent's DataLoader raises "worker ... is killed by signal:
Aborted" while it shuts its workers down, after every batch it asked for arrived (seen on a
stream abandoned mid-epoch, as every pre-training run ends). A forkserver child leaves with
``os._exit`` once its work is done, without that shutdown.

A forkserver child inherits the environment of the server, which starts with the first such
loader of the process; :class:`ParentEnvironment` gives each worker the parent's environment of
the moment its loader starts instead (object-store credentials set later, as ``spawn`` did).
"""

from __future__ import annotations

import os
from typing import Any


def worker_start_method(workers: int, fork_safe: bool = False) -> str | None:
    """The ``multiprocessing_context`` of a DataLoader with ``workers`` worker processes:
    ``None`` (in-process, or the platform default where ``fork_safe``), else ``"forkserver"``."""
    if workers <= 0 or fork_safe:
        return None
    return "forkserver"


class ParentEnvironment:
    """A DataLoader ``worker_init_fn`` that sets the worker's environment to the parent's as it
    was when this object was made."""

    def __init__(self) -> None:
        self.environ = dict(os.environ)

    def __call__(self, worker_id: int) -> None:
        os.environ.clear()
        os.environ.update(self.environ)


def worker_options(workers: int, fork_safe: bool = False) -> dict[str, Any]:
    """DataLoader keyword arguments that start ``workers`` worker processes by the rule above."""
    method = worker_start_method(workers, fork_safe)
    return {"multiprocessing_context": method,
            "worker_init_fn": ParentEnvironment() if method == "forkserver" else None}
