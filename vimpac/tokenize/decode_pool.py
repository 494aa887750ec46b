"""Decoding for the tokenize job: a few threads, each driving one ffmpeg process at a time.

Each task ``(index, path, specs)`` decodes every view of one video in a single ffmpeg run
(:func:`vimpac.common.video.decode_views`: the source is decoded once, the views are split
after the fps filter) and sends the frames back in chunks, so a long video never sits whole in
memory and the caller can encode one video while ffmpeg decodes the next ones.

ffmpeg does the decoding in its own process; the threads only wait on its pipe (the GIL is
released while they do), so a worker costs no interpreter start-up and the frames reach the
caller without being pickled or copied between processes. If the job's process dies (kill -9),
each ffmpeg fails its next write on the closed pipe and exits.

Messages from :meth:`DecodePool.get`::

    ("frames", index, uint8 [n, V, S, S, 3])   # V views, in the order of ``specs``
    ("done", index, None)
    ("failed", index, reason)
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Iterator
from typing import Any

from vimpac.common.ffmpeg_exe import ffmpeg_exe
from vimpac.common.video import DecodeSpec, VideoError, decode_views

Task = tuple[int, str, list[DecodeSpec]]
Message = tuple[str, int, Any]  # (kind, video index, payload)

_PUT_POLL_S = 0.5  # how often a worker blocked on a full result queue checks for close()


def decode_task(task: Task, chunk_frames: int, timeout_s: float,
                cancel: threading.Event | None = None) -> Iterator[Message]:
    """Decode every view of one video; yield the messages a worker sends for it."""
    index, path, specs = task
    try:
        for chunk in decode_views(path, specs, chunk_frames=chunk_frames, timeout_s=timeout_s,
                                  cancel=cancel):
            yield ("frames", index, chunk)
    except VideoError as exc:
        yield ("failed", index, exc.reason)
        return
    except Exception as exc:  # a decoder bug must cost one video, not the job
        yield ("failed", index, f"unexpected {type(exc).__name__}: {exc}")
        return
    yield ("done", index, None)


class DecodePool:
    """A fixed set of decoding threads fed through a task queue (``workers`` concurrent ffmpegs).

    With ``workers=0`` decoding runs inline in :meth:`get` (simple and deterministic, used by
    tests and small jobs). At most ``max_queued_chunks`` chunks wait in the result queue.
    """

    def __init__(self, workers: int, chunk_frames: int = 64, timeout_s: float = 600.0,
                 max_queued_chunks: int = 16) -> None:
        ffmpeg_exe()   # a missing or too old ffmpeg stops the job here, not once per video
        self.workers, self.chunk_frames, self.timeout_s = workers, chunk_frames, timeout_s
        self._inline: list[Task] = []
        self._inline_iter: Iterator[Message] | None = None
        self.tasks: queue.Queue[Task | None] = queue.Queue()
        self.results: queue.Queue[Message] = queue.Queue(maxsize=max_queued_chunks)
        self._closing = threading.Event()
        self.threads = [threading.Thread(target=self._work, name=f"vimpac-decode-{i}",
                                         daemon=True) for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        """Worker thread: decode tasks until a None task or close()."""
        while (task := self.tasks.get()) is not None and not self._closing.is_set():
            try:
                messages = decode_task(task, self.chunk_frames, self.timeout_s, self._closing)
                for message in messages:
                    if not self._put(message):
                        messages.close()                 # kills this task's ffmpeg
                        return
            except BaseException:  # pragma: no cover - last resort, keeps the caller informed
                self._put(("failed", task[0], traceback.format_exc(limit=1)))

    def _put(self, message: Message) -> bool:
        """Queue a message; False when the pool is closing (nobody will read it)."""
        while not self._closing.is_set():
            try:
                self.results.put(message, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def submit(self, task: Task) -> None:
        if self.workers > 0:
            self.tasks.put(task)
        else:
            self._inline.append(task)

    def get(self, timeout: float = 5.0) -> Message | None:
        """The next message, or None when nothing arrived within ``timeout`` seconds."""
        if self.workers == 0:
            return self._get_inline()
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            self._check_alive()
            return None

    def _get_inline(self) -> Message | None:
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

    def _check_alive(self) -> None:
        dead = [t for t in self.threads if not t.is_alive()]
        if dead:
            raise RuntimeError(f"{len(dead)} decode worker thread(s) stopped unexpectedly; "
                               "rerun the job to resume")

    def close(self) -> None:
        """Stop the workers: running decodes are cancelled and their ffmpeg killed and reaped."""
        self._closing.set()
        for _ in self.threads:
            self.tasks.put(None)
        for thread in self.threads:
            thread.join(timeout=10)
        if self._inline_iter is not None:
            self._inline_iter.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
