"""A stand-in Engine for the HTTP service's tests: the interface of ``legion_rt.Engine`` (admission with
``max_concurrency`` / ``max_queue`` and ``BusyError``, ``timeout_s`` and ``DeadlineError``, ``close()`` cancels)
with controllable step times, so the HTTP mechanics (status codes, streaming, disconnects, drains) are tested
deterministically and quickly.

Run as a script it serves itself through ``legion_rt.serve.runner`` (the SIGTERM tests):
``python tests/serve_fake.py PORT_FILE [--step-s S] [--tokens N] [--drain-timeout S]``.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from legion_rt.errors import BusyError, DeadlineError, RequestError
from legion_rt.image import load_image
from legion_rt.result import Artifact, DoneEvent, MaskEvent, Result, TokenEvent

IDENTITY = {"name": "fake", "manifest_sha256": "0" * 64}


def fake_masks(h: int, w: int, n: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        m = np.zeros((h, w), bool)
        m[i % h :: 3, (2 * i) % w :: 2] = True
        out.append(m)
    return out


class FakeEngine:
    """Each request: ``first_delay_s`` (the prefill and SAM encoder), then ``tokens`` steps of ``step_s``; a
    [SEG] (with a mask) at every step in ``seg_at``. ``hold``: an Event every request waits for before its first
    token (to keep requests in flight). ``skip_if_real`` >= 0.5 answers with the verdict only (gated)."""

    def __init__(
        self,
        *,
        step_s=0.0,
        tokens=8,
        first_delay_s=0.0,
        seg_at=(2, 5),
        max_concurrency=1,
        max_queue=4,
        hold: threading.Event | None = None,
        warmup_gate: threading.Event | None = None,
    ):
        self.step_s, self.tokens, self.first_delay_s, self.seg_at = step_s, tokens, first_delay_s, set(seg_at)
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.hold, self.warmup_gate = hold, warmup_gate
        self.backend_name, self.providers, self.has_detector = "fake", ["none"], True
        self._cond = threading.Condition()
        self._running = 0
        self._queue: list = []
        self.requests = 0
        self.records: list[dict] = []  # per request: steps, closed_early, closed_at, step_times
        self.closed = False

    @property
    def running_requests(self) -> int:
        return self._running

    @property
    def queued_requests(self) -> int:
        return len(self._queue)

    def stream(
        self,
        image,
        *,
        max_new_tokens=512,
        temperature=0.0,
        top_p=1.0,
        seed=None,
        skip_if_real=None,
        ignore_eos=False,
        timeout_s=None,
    ):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
        if temperature < 0:
            raise RequestError(f"temperature={temperature!r}: must be >= 0")
        rgb = load_image(image)
        t0 = time.monotonic()
        deadline = None if timeout_s is None else t0 + timeout_s
        with self._cond:
            if self._running >= self.max_concurrency or self._queue:
                if len(self._queue) >= self.max_queue:
                    raise BusyError(f"busy: {self._running} running, {len(self._queue)} queued")
                ticket = object()
                self._queue.append(ticket)
                try:
                    while not (self._queue[0] is ticket and self._running < self.max_concurrency):
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise DeadlineError("deadline passed in the queue")
                        self._cond.wait(left)
                finally:
                    self._queue.remove(ticket)
                    self._cond.notify_all()
            self._running += 1
            self.requests += 1
        rec = {"steps": 0, "closed_early": False, "closed_at": None, "step_times": [], "done": False}
        self.records.append(rec)
        return _Run(self, rec, rgb, min(max_new_tokens, self.tokens), skip_if_real, deadline, timeout_s)

    def _release(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def analyze(self, image, **kw):
        result = None
        for ev in self.stream(image, **kw):
            if isinstance(ev, DoneEvent):
                result = ev.result
        return result

    def close(self) -> None:
        self.closed = True


class _Run:
    def __init__(self, eng: FakeEngine, rec, rgb, n, skip_if_real, deadline, timeout_s):
        self.eng, self.rec, self.n, self.skip, self.deadline, self.timeout_s = (
            eng,
            rec,
            n,
            skip_if_real,
            deadline,
            timeout_s,
        )
        self.h, self.w = int(rgb.shape[0]), int(rgb.shape[1])
        self.masks = fake_masks(self.h, self.w, len([i for i in range(n) if i in eng.seg_at]))
        self._gen = self._events()
        self._open = True

    def __iter__(self):
        return self

    def __next__(self):
        if not self._open:
            raise StopIteration
        try:
            return next(self._gen)
        except BaseException:
            self._finish()
            raise

    def close(self) -> None:
        if self._open:
            if not self.rec["done"]:
                self.rec["closed_early"] = True
                self.rec["closed_at"] = time.monotonic()
            self._gen.close()
            self._finish()

    def _finish(self) -> None:
        if self._open:
            self._open = False
            self.eng._release()

    def _check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineError(f"the request passed its deadline of {self.timeout_s:g} s")

    def _events(self):
        eng = self.eng
        if eng.warmup_gate is not None and eng.requests == 1:
            eng.warmup_gate.wait(30)
        if eng.hold is not None:
            eng.hold.wait(30)
        t_end = time.monotonic() + eng.first_delay_s
        while time.monotonic() < t_end:
            self._check()
            time.sleep(0.01)
        if self.skip is not None and self.skip >= 0.5:
            self.rec["done"] = True
            yield DoneEvent(self._result([], [], skipped=True))
            return
        ids, arts = [], []
        for i in range(self.n):
            self._check()
            if eng.step_s:
                time.sleep(eng.step_s)
            self.rec["steps"] += 1
            self.rec["step_times"].append(time.monotonic())
            tid = 7 if i in eng.seg_at else 100 + i
            ids.append(tid)
            yield TokenEvent(tid, f" t{i}")
            if i in eng.seg_at:
                m = self.masks[len(arts)]
                ys, xs = np.nonzero(m)
                bbox = (
                    (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
                    if len(xs)
                    else (0, 0, 0, 0)
                )
                a = Artifact(
                    phrase=f"p{len(arts)}",
                    mask=m,
                    bbox=bbox,
                    area=int(m.sum()),
                    index=len(arts),
                    token_index=i,
                )
                arts.append(a)
                yield MaskEvent(a)
        self.rec["done"] = True
        yield DoneEvent(self._result(ids, arts))

    def _result(self, ids, arts, skipped=False) -> Result:
        union = np.logical_or.reduce([a.mask for a in arts]) if arts else np.zeros((self.h, self.w), bool)
        return Result(
            verdict="real" if skipped else "fake",
            fake_probability=0.2 if skipped else 0.8,
            explanation=None if skipped else "fake text",
            text=None if skipped else " ".join(f"t{i}" for i in range(len(ids))),
            token_ids=ids,
            artifacts=arts,
            mask=union,
            timings={"total": 0.1, "time_to_first_token": float("nan")},
            label=1 if skipped else 0,
            cls_logits=[0.0, 1.0],
            skipped=skipped,
            phrases=[a.phrase for a in arts],
            image_size=(self.h, self.w),
            model=dict(IDENTITY),
        )


def main() -> None:  # serve a FakeEngine through the real runner (SIGTERM tests)
    import argparse
    import logging
    import sys

    from legion_rt.serve.app import create_app
    from legion_rt.serve.runner import bind, serve_app
    from legion_rt.serve.service import ServeConfig, Service

    p = argparse.ArgumentParser()
    p.add_argument("port_file")
    p.add_argument("--step-s", type=float, default=0.05)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--drain-timeout", type=float, default=10.0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    config = ServeConfig(port=0, drain_timeout=a.drain_timeout, max_concurrency=2, max_queue=4)
    eng = FakeEngine(step_s=a.step_s, tokens=a.tokens, max_concurrency=2, max_queue=4)
    service = Service(config, engine=eng)
    sock = bind("127.0.0.1", 0)
    with open(a.port_file + ".tmp", "w") as f:
        f.write(str(sock.getsockname()[1]))
    import os

    os.replace(a.port_file + ".tmp", a.port_file)
    serve_app(create_app(service), service, config, sock=sock)
    print(f"fake server exited; engine closed={eng.closed}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
