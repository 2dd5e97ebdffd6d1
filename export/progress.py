"""The export's progress display: one line per step on stderr, or a rich progress bar when rich is installed."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    """One line per step on stderr (or a rich progress bar when rich is installed); silent when disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.done = enabled, total, 0
        self._rich = None
        if enabled:
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                self._rich = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(),
                    transient=False,
                )
                self._rich.start()
                self._task = self._rich.add_task("export", total=total)
            except ImportError:
                self._rich = None

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(msg, soft_wrap=True, highlight=False)
        else:
            print(msg, file=sys.stderr, flush=True)

    def detail(self, what: str, done: int, total: int) -> None:
        """Where a long step is (``what`` ``done``/``total``): the rich bar's description, or a stderr line at every
        quarter."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, description=f"{what} {done}/{total}")
        elif done == total or done % max(1, total // 4) == 0:
            print(f"      {what} {done}/{total}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, what: str):
        t0 = time.perf_counter()
        if self.enabled and self._rich is not None:
            self._rich.update(self._task, description=what)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        yield
        self.done += 1
        if self.enabled and self._rich is not None:
            self._rich.update(self._task, advance=1)
            self._rich.console.print(f"[{self.done}/{self.total}] {what}: {time.perf_counter() - t0:.1f} s")
        elif self.enabled:
            print(
                f"[{self.done}/{self.total}] {what}: done in {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
