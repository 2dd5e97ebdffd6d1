"""One Engine shared by 8 threads gives exactly the results of sequential runs (what the HTTP service relies on:
every request of a server runs on its own thread over the same Engine).

The issue asks for 8 threads x 25 requests; on 2 CPU cores that takes about 3 minutes (the Engine runs one SAM
encoder at a time), so the suite runs 8 x 10 by default. LEGION_RT_TEST_PER_THREAD=25 runs the full 8 x 25
(passed in 194 s on the 2-core development machine)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

DEMO = Path(__file__).resolve().parents[1] / "legion_rt" / "assets" / "demo.jpg"
THREADS, PER_THREAD = 8, int(os.environ.get("LEGION_RT_TEST_PER_THREAD", "10"))


def _key(res):
    return (
        res.verdict,
        res.fake_probability,
        tuple(res.token_ids),
        res.text,
        tuple(res.phrases),
        tuple((a.phrase, a.bbox, a.area, a.token_index) for a in res.artifacts),
    )


@pytest.mark.slow
def test_threads_match_sequential(tiny_artifacts):
    from PIL import Image

    from legion_rt.engine import Engine

    rng = np.random.default_rng(7)
    pictures = [DEMO.read_bytes()]
    for h, w in ((48, 64), (97, 33), (64, 64)):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        pictures.append(arr)
        Image.fromarray(arr)  # a valid RGB array
    options = [
        {"max_new_tokens": 6},
        {"max_new_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 3},
    ]
    inputs = [(p, o) for p in range(len(pictures)) for o in range(len(options))]  # 8 distinct requests
    with Engine(tiny_artifacts, threads=1, verify="size") as eng:
        sequential = {}
        for p, o in inputs:
            sequential[(p, o)] = eng.analyze(pictures[p], **options[o])
        got: dict[tuple[int, int], list] = {}
        errors = []
        lock = threading.Lock()

        def worker(t):
            try:
                for i in range(PER_THREAD):
                    p, o = inputs[(t + i) % len(inputs)]
                    res = eng.analyze(pictures[p], **options[o])
                    with lock:
                        got.setdefault((p, o), []).append(res)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    assert not errors, errors
    assert sum(len(v) for v in got.values()) == THREADS * PER_THREAD
    for k, results in got.items():
        ref = sequential[k]
        for res in results:
            assert _key(res) == _key(ref), k
            assert np.array_equal(res.mask, ref.mask)
            for a, b in zip(res.artifacts, ref.artifacts, strict=True):
                assert np.array_equal(a.mask, b.mask)
