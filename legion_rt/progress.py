"""Progress of a run over many pictures or frames, on stderr: a ``rich`` progress bar (count, items/s, ETA) when
stderr is a terminal, one plain line per item otherwise (``[3/10] name: ... (2.1 pictures/s, ETA 3 s)``), nothing
when quiet. ``print`` writes a status line without breaking the bar."""

from __future__ import annotations

import sys
import time


class _Quiet:
    def print(self, msg: str) -> None:
        pass

    def advance(self, msg: str, ok: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class _Plain:
    def __init__(self, total: int | None, what: str):
        self.total, self.what, self.done = total, what, 0
        self.t0 = time.perf_counter()

    def print(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def advance(self, msg: str, ok: bool = True) -> None:
        self.done += 1
        dt = time.perf_counter() - self.t0
        rate = self.done / dt if dt > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {max(0.0, (self.total - self.done) / rate):.0f} s"
        self.print(f"[{self.done}{of}] {msg} ({rate:.2f} {self.what}/s{eta})")

    def close(self) -> None:
        pass


class _Rich:
    def __init__(self, total: int | None, what: str):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=sys.stderr)
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.what = what
        self.t0 = time.perf_counter()
        self.done = 0
        self.task = self.progress.add_task(what, total=total, rate=f"0.00 {what}/s")
        self.progress.start()

    def print(self, msg: str) -> None:
        self.progress.console.print(msg, markup=False, highlight=False)

    def advance(self, msg: str, ok: bool = True) -> None:
        self.done += 1
        dt = time.perf_counter() - self.t0
        rate = f"{self.done / dt:.2f} {self.what}/s" if dt > 0 else ""
        if not ok:
            self.print(msg)
        self.progress.update(self.task, advance=1, rate=rate)

    def close(self) -> None:
        self.progress.stop()


def make_progress(total: int | None, *, quiet: bool, what: str = "pictures", terminal: bool | None = None):
    """The progress display for ``total`` items (None: unknown)."""
    if quiet:
        return _Quiet()
    if terminal is None:
        terminal = sys.stderr.isatty()
    if terminal:
        try:
            return _Rich(total, what)
        except ImportError:  # rich is a dependency; a broken install still gets plain lines
            pass
    return _Plain(total, what)
