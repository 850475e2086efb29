"""Progress bars for the long steps and a log of what was decided and why.

Library functions take ``progress: Progress | None``. ``None`` shows nothing;
decisions still go to the ``onnxlrf`` logger at INFO level, so a library user
sees them with ``logging.basicConfig(level=logging.INFO)``. The CLI makes a
:class:`Progress` on stderr unless ``--quiet``.

On a terminal each step is a tqdm bar (nested steps, e.g. the validation run
inside one back-off attempt, disappear when done). Elsewhere (a log file, CI)
there are no bars: each top-level step prints one line when it ends, with its
count and duration. Bars are updated per batch, per layer or per run, never per
sample, so they cost nothing measurable.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar, Union

from tqdm import tqdm

logger = logging.getLogger("onnxlrf")

T = TypeVar("T")


class Task:
    """One running step: advance it with :meth:`update`; :meth:`note` shows a short status beside the bar."""

    def __init__(self, bar: tqdm | None = None) -> None:
        self._bar = bar
        self.count = 0

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` units."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def note(self, text: str) -> None:
        """Show ``text`` beside the bar (what the step is doing now)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)


class Progress:
    """Progress bars and decision log on ``stream`` (default stderr).

    ``enabled=False`` shows nothing (decisions still reach the logger).
    ``bars=None`` draws bars only when ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool = True, bars: bool | None = None) -> None:
        self.stream = stream
        self.enabled = enabled
        self._bars = bars
        self._depth = 0

    @property
    def _stream(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr  # resolved late: tests swap sys.stderr

    def _draw_bars(self) -> bool:
        if self._bars is not None:
            return self._bars
        isatty = getattr(self._stream, "isatty", None)
        return bool(isatty and isatty())

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None, unit: str = "it") -> Iterator[Task]:
        """A step of ``total`` units (None: unknown); yields a :class:`Task` to advance."""
        if not self.enabled:
            yield Task()
            return
        top_level = self._depth == 0
        bars = self._draw_bars()
        bar = tqdm(total=total, desc=description, unit=unit, file=self._stream, leave=top_level,
                   dynamic_ncols=True, mininterval=0.2) if bars else None
        task = Task(bar)
        start = time.perf_counter()
        self._depth += 1
        try:
            yield task
        finally:
            self._depth -= 1
            if bar is not None:
                bar.close()
        if top_level and not bars:
            done = f"{task.count}/{total} {unit}, " if total is not None else ""
            self._write(f"{description}: {done}{time.perf_counter() - start:.1f} s")

    def track(self, items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
        """Iterate ``items`` inside a task, advancing it by one per item."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        with self.task(description, total, unit) as task:
            for item in items:
                yield item
                task.update()

    def log(self, message: str) -> None:
        """Record a decision (shown above any bars; also logged at INFO)."""
        logger.info(message)
        if self.enabled:
            self._write(message)

    def _write(self, line: str) -> None:
        if self._draw_bars():
            tqdm.write(line, file=self._stream)
        else:
            print(line, file=self._stream, flush=True)


class _CallbackProgress(Progress):
    """Adapter for the older ``progress=callable(message)`` style: messages only, no bars."""

    def __init__(self, callback: Callable[[str], None]) -> None:
        super().__init__(enabled=False)
        self._callback = callback

    def log(self, message: str) -> None:
        super().log(message)
        self._callback(message)


SILENT = Progress(enabled=False)

ProgressLike = Union[Progress, Callable[[str], None], None]


def as_progress(progress: ProgressLike) -> Progress:
    """``None`` -> silent, a Progress as it is, a callable -> it receives the log messages."""
    if progress is None:
        return SILENT
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return _CallbackProgress(progress)
    raise TypeError(f"progress must be a Progress, a callable or None, not {type(progress).__name__}")
