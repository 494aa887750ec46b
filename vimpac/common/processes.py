"""Library calls in child processes that report back to the parent.

A child's log records, progress and outcome (its return value, or the exception it raised) come
back through one queue, so the parent (the CLI) draws every child's bars and log lines as it
would for work run in its own process, and an input error raised in a child is raised again in
the parent unchanged (one line, exit 2 at the CLI) while anything else keeps the child's
traceback (:class:`ChildFailed`, a bug).

Children start from a ``forkserver`` (never ``fork``: the parent may hold threads, such as the
progress bars' refresh thread; never ``spawn``: see :mod:`vimpac.common.workers`), are not
daemons (a stage may start DataLoader workers of its own), get the parent's environment of the
moment they start (as :class:`vimpac.common.workers.ParentEnvironment` gives workers) and
``threads`` intra-op threads each, so that the children share the machine's cores.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue as queues
import traceback
from collections.abc import Callable
from typing import Any

from vimpac.common.progress import NULL_PROGRESS, Progress, Task
from vimpac.common.workers import ParentEnvironment

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class ChildFailed(RuntimeError):
    """A child's error that is not an input error (a bug), or a child that died without
    reporting (a signal: killed, out of memory); the message carries what is known."""


def thread_budget() -> int:
    """The threads this process would use: torch's count (the usable cores, or
    ``OMP_NUM_THREADS`` where set), for children to share."""
    import torch

    return torch.get_num_threads()


# ------------------------------------------------------------------------------------- child side

class _QueueTask:
    def __init__(self, queue: Any, tag: str, task_id: int) -> None:
        self.queue, self.tag, self.id = queue, tag, task_id

    def _send(self, op: str, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
        self.queue.put(("progress", self.tag, self.id, op, args, fields))

    def advance(self, n: float = 1, **fields: Any) -> None:
        self._send("advance", (n,), fields)

    def update(self, *, completed: float | None = None, total: float | None = None,
               **fields: Any) -> None:
        self._send("update", (), {"completed": completed, "total": total, **fields})

    def close(self) -> None:
        self._send("close", (), {})


class QueueProgress:
    """A child's :class:`Progress`: every call goes to the parent's queue."""

    def __init__(self, queue: Any, tag: str) -> None:
        self.queue, self.tag, self.count = queue, tag, 0

    def task(self, description: str, total: float | None = None, unit: str = "") -> _QueueTask:
        self.count += 1
        self.queue.put(("progress", self.tag, self.count, "task", (description, total, unit), {}))
        return _QueueTask(self.queue, self.tag, self.count)


class _QueueLogHandler(logging.Handler):
    """Sends a child's records to the parent, formatted (arguments may not pickle), prefixed
    with the child's tag."""

    def __init__(self, queue: Any, tag: str) -> None:
        super().__init__()
        self.queue, self.tag = queue, tag

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info))
            record = logging.makeLogRecord({**record.__dict__, "msg": f"{self.tag}: {message}",
                                            "args": None, "exc_info": None, "exc_text": None})
            self.queue.put(("log", self.tag, record))
        except Exception:                    # a record that cannot be sent is not worth a crash
            self.handleError(record)


def _portable(exc: BaseException) -> BaseException | None:
    """``exc`` if it survives pickling (so the parent can raise it again), else None."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return exc


def _child_main(queue: Any, tag: str, fn: Callable[..., Any], args: tuple[Any, ...],
                environ: ParentEnvironment, threads: int, log_level: int) -> None:
    environ(0)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    root = logging.getLogger()
    root.handlers[:] = [_QueueLogHandler(queue, tag)]
    root.setLevel(log_level)
    try:
        import torch

        torch.set_num_threads(threads)
        result = fn(QueueProgress(queue, tag), *args)
    except BaseException as exc:             # reported whole; the parent decides what it is
        queue.put(("error", tag, _portable(exc), traceback.format_exc(), _is_input_error(exc),
                   str(exc)))
    else:
        queue.put(("done", tag, result))


# ------------------------------------------------------------------------------------ parent side

def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Children:
    """Child processes started with :meth:`start` and collected one outcome at a time with
    :meth:`wait`; leaving the ``with`` block stops any still running (each stage resumes from
    its last committed state when run again)."""

    def __init__(self, progress: Progress = NULL_PROGRESS) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["torch"])   # children fork with torch imported
        self.queue = self.context.Queue()
        self.running: dict[str, Any] = {}
        self.progress = progress
        self.tasks: dict[tuple[str, int], Task] = {}

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, tag: str, fn: Callable[..., Any], *args: Any, threads: int = 1) -> None:
        """Run ``fn(progress, *args)`` in a child named ``tag``; ``fn`` and ``args`` must pickle
        (module-level functions, plain data)."""
        if tag in self.running:
            raise ValueError(f"a child named {tag!r} is already running")
        process = self.context.Process(
            target=_child_main, name=f"vimpac {tag}", daemon=False,
            args=(self.queue, tag, fn, args, ParentEnvironment(), threads,
                  logging.getLogger().getEffectiveLevel()))
        process.start()
        self.running[tag] = process

    def wait(self) -> tuple[str, Any]:
        """Block until a child ends: its tag and return value. A child's input error
        (:class:`~vimpac.common.errors.VimpacError`, ``OSError``) is raised again here as it was;
        anything else, or a child that died without a word, raises :class:`ChildFailed`."""
        if not self.running:
            raise ValueError("no child is running")
        silent_dead: set[str] = set()
        while True:
            try:
                message = self.queue.get(timeout=POLL_SECONDS)
            except queues.Empty:
                dead = {t for t, p in self.running.items() if not p.is_alive()}
                for tag in dead & silent_dead:   # dead for a whole poll and nothing came
                    code = self.running.pop(tag).exitcode
                    raise ChildFailed(f"{tag}: its process ended with {describe_exit(code)} "
                                      "before reporting (killed, or out of memory?)") from None
                silent_dead = dead
                continue
            kind, tag = message[0], message[1]
            if kind == "log":
                record = message[2]
                logging.getLogger(record.name).handle(record)
            elif kind == "progress":
                self._progress(tag, *message[2:])
            elif kind in ("done", "error"):
                self._close_tasks(tag)
                self.running.pop(tag).join()
                if kind == "done":
                    return tag, message[2]
                raise _error(tag, *message[2:])

    def stop(self) -> None:
        for process in self.running.values():
            if process.is_alive():
                process.terminate()
        for tag, process in self.running.items():
            process.join()
            log.warning("%s: stopped (%s); it resumes when run again", tag,
                        describe_exit(process.exitcode))
        self.running.clear()

    def _progress(self, tag: str, task_id: int, op: str, args: tuple[Any, ...],
                  fields: dict[str, Any]) -> None:
        key = (tag, task_id)
        if op == "task":
            description, total, unit = args
            self.tasks[key] = self.progress.task(f"{tag}: {description}", total, unit)
        elif key in self.tasks:
            task = self.tasks[key]
            if op == "advance":
                task.advance(*args, **fields)
            elif op == "update":
                task.update(**fields)
            elif op == "close":
                self.tasks.pop(key).close()

    def _close_tasks(self, tag: str) -> None:
        for key in [k for k in self.tasks if k[0] == tag]:
            self.tasks.pop(key).close()


def _is_input_error(exc: BaseException) -> bool:
    from vimpac.common.errors import VimpacError

    return isinstance(exc, VimpacError | OSError | KeyboardInterrupt)


def _error(tag: str, exc: BaseException | None, text: str, input_error: bool,
           message: str) -> BaseException:
    """The exception to raise in the parent for a child's: the same one where it pickles, an
    input error's message where it does not, else :class:`ChildFailed` with the traceback."""
    from vimpac.common.errors import VimpacError

    if input_error:
        return exc if exc is not None else VimpacError(message)
    return ChildFailed(f"{tag} failed in its process:\n{text}")
