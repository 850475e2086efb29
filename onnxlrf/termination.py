"""SIGTERM as an interrupt, so that a terminated run cleans up like one stopped with Ctrl-C.

Python's default for SIGTERM ends the process at once: ``finally`` blocks do not
run, and staged outputs and temporary directories stay behind. Kept apart from
the heavier modules so that the CLI can install it without importing onnx.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program was (see :func:`sigterm_as_interrupt`).

    A KeyboardInterrupt, so that it stops the run like Ctrl-C does: cleanup runs, the CLI
    prints ``Aborted!``, and ``except Exception`` blocks do not swallow it.
    """


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of ending the process at once.

    Only in the main thread (the one Python delivers signals to) and only where SIGTERM has its
    default action: a handler the caller installed is left alone, and nested blocks keep the
    outer one's. A second SIGTERM during the cleanup is ignored.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
