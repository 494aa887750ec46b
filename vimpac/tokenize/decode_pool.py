"""Decoding worker processes for the tokenize job.

Each worker takes ``(index, path, specs)`` tasks, decodes every view of the video sequentially with
ffmpeg and sends the frames back in chunks, so a long video never sits whole in memory and the
parent can encode one video while the workers decode the next ones. This module imports no torch:
the workers stay light.

Messages on the result queue::

    ("frames", index, view_position, uint8 [n, S, S, 3])
    ("done", index, None, None)
    ("failed", index, None, reason)
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from collections.abc import Iterator
from typing import Any

from vimpac.common.video import DecodeSpec, VideoError, check_input, decode_frames

Task = tuple[int, str, list[DecodeSpec]]
Message = tuple[str, int, Any, Any]


def decode_task(task: Task, chunk_frames: int, timeout_s: float) -> Iterator[Message]:
    """Decode every view of one video; yield the messages a worker sends for it."""
    index, path, specs = task
    try:
        check_input(path)
        for position, spec in enumerate(specs):
            for chunk in decode_frames(path, spec, chunk_frames=chunk_frames, timeout_s=timeout_s):
                yield ("frames", index, position, chunk)
    except VideoError as exc:
        yield ("failed", index, None, exc.reason)
        return
    except Exception as exc:  # a decoder bug must cost one video, not the job
        yield ("failed", index, None, f"unexpected {type(exc).__name__}: {exc}")
        return
    yield ("done", index, None, None)


def _parent_gone() -> bool:
    parent = mp.parent_process()
    return parent is not None and not parent.is_alive()


def _put(results: Any, message: Message) -> bool:
    """Send a message; False when the parent died (kill -9) while the queue was full."""
    while True:
        try:
            results.put(message, timeout=1.0)
            return True
        except queue.Full:
            if _parent_gone():
                return False


def _worker(tasks: Any, results: Any, chunk_frames: int, timeout_s: float) -> None:
    """Decode tasks until told to stop, or until the parent process is gone."""
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if _parent_gone():
                results.cancel_join_thread()     # nobody reads the pipe: exit without flushing
                return
            continue
        if task is None:
            return
        try:
            for message in decode_task(task, chunk_frames, timeout_s):
                if not _put(results, message):
                    results.cancel_join_thread()
                    return
        except BaseException:  # pragma: no cover - last resort, keeps the parent informed
            _put(results, ("failed", task[0], None, traceback.format_exc(limit=1)))


class DecodePool:
    """A fixed set of decoding processes fed through a task queue.

    With ``workers=0`` decoding runs inline in the calling process (simple and deterministic,
    used by tests and small jobs).
    """

    def __init__(self, workers: int, chunk_frames: int = 64, timeout_s: float = 600.0,
                 max_queued_chunks: int = 16) -> None:
        self.workers, self.chunk_frames, self.timeout_s = workers, chunk_frames, timeout_s
        self._inline: list[Task] = []
        self._inline_iter: Iterator[Message] | None = None
        if workers > 0:
            ctx = mp.get_context("spawn")
            self.tasks = ctx.Queue()
            self.results = ctx.Queue(maxsize=max_queued_chunks)
            self.procs = [ctx.Process(target=_worker, daemon=True,
                                      args=(self.tasks, self.results, chunk_frames, timeout_s))
                          for _ in range(workers)]
            for proc in self.procs:
                proc.start()

    def submit(self, task: Task) -> None:
        if self.workers > 0:
            self.tasks.put(task)
        else:
            self._inline.append(task)

    def get(self, timeout: float = 5.0) -> Message | None:
        """The next message, or None when nothing arrived within ``timeout`` seconds."""
        if self.workers == 0:
            while True:
                if self._inline_iter is not None:
                    message = next(self._inline_iter, None)
                    if message is not None:
                        return message
                    self._inline_iter = None
                if not self._inline:
                    return None
                self._inline_iter = decode_task(self._inline.pop(0), self.chunk_frames,
                                                self.timeout_s)
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            self._check_alive()
            return None

    def _check_alive(self) -> None:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"{len(dead)} decode worker(s) died (exit code "
                               f"{dead[0].exitcode}); rerun the job to resume")

    def close(self) -> None:
        if self.workers == 0:
            return
        for _ in self.procs:
            self.tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.tasks.close()
        self.results.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self.workers > 0:
            for proc in self.procs:
                proc.kill()
        self.close()
