"""Progress reporting that library code can call without knowing how (or whether) it is drawn.

Library functions take a ``progress: Progress`` argument (default :data:`NULL_PROGRESS`) and
call ``task = progress.task("name", total)``, ``task.advance(n, **fields)``, ``task.close()``. Only
the CLI layer implements :class:`Progress` with rich progress bars; library code itself only logs.
"""

from __future__ import annotations

from typing import Any, Protocol


class Task(Protocol):
    def advance(self, n: float = 1, **fields: Any) -> None: ...
    def update(self, *, completed: float | None = None, total: float | None = None,
               **fields: Any) -> None: ...
    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: float | None = None, unit: str = "") -> Task: ...


class _NullTask:
    def advance(self, n: float = 1, **fields: Any) -> None:
        pass

    def update(self, *, completed: float | None = None, total: float | None = None,
               **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullProgress:
    """Draws nothing: the default for library calls and tests."""

    def task(self, description: str, total: float | None = None, unit: str = "") -> _NullTask:
        return _NullTask()


NULL_PROGRESS = NullProgress()
