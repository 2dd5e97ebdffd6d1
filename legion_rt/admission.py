"""Admission control for one Engine: at most ``max_running`` requests run, at most ``max_queue`` wait, FIFO.

A request asks for a slot when it is created (``Engine.stream`` / ``analyze``) and gives it back when it ends,
fails or is cancelled. ``None`` means no limit (the default: library users see no change). A request that finds
the queue full gets ``BusyError`` at once; one still waiting at its deadline gets ``DeadlineError``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from .errors import BusyError, DeadlineError, RequestError


def _limit(name: str, value: int | None, lo: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise RequestError(f"{name}={value!r}: must be an integer >= {lo} or None")
    return value


class Admission:
    """FIFO admission with a bounded queue. Thread-safe."""

    def __init__(self, max_running: int | None = None, max_queue: int | None = None):
        self.max_running = _limit("max_concurrency", max_running, 1)
        self.max_queue = _limit("max_queue", max_queue, 0)
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: deque[object] = deque()  # tickets, oldest first

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def acquire(self, deadline: float | None = None, clock=time.monotonic) -> None:
        """Take a slot, waiting in FIFO order. ``deadline``: a ``clock()`` value; None waits for ever."""
        with self._cond:
            if self.max_running is None or (self._running < self.max_running and not self._waiting):
                self._running += 1
                return
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise BusyError(
                    f"busy: {self._running} requests running and {len(self._waiting)} waiting "
                    f"(max_concurrency={self.max_running}, max_queue={self.max_queue}); retry later"
                )
            ticket = object()
            self._waiting.append(ticket)
            try:
                while not (self._waiting[0] is ticket and self._running < self.max_running):
                    left = None if deadline is None else deadline - clock()
                    if left is not None and left <= 0:
                        raise DeadlineError(
                            "deadline passed while waiting for a free slot "
                            f"({self._running} running, max_concurrency={self.max_running})"
                        )
                    self._cond.wait(left)
                self._running += 1
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next ticket may now be first

    def release(self) -> None:
        with self._cond:
            if self._running <= 0:  # pragma: no cover - a bug in the caller
                raise RuntimeError("Admission.release() without acquire()")
            self._running -= 1
            self._cond.notify_all()
