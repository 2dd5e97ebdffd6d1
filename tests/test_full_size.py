"""The released sizes end to end: make-tiny --size full (7B-shaped random checkpoint), the streamed int4 export,
Engine on ONNX Runtime CPU; the same path as benchmarks/full_size.py (which also exports fp16 and prints the
table). Skipped unless LEGION_RT_FULL_SIZE names a work directory: it needs ~25 GB of disk, ~20 GB of memory and
about half an hour on 2 cores, far past what CI affords (tests/test_full_size_writer.py and
tests/test_streamed_export.py run the same code at CI sizes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

WORK = os.environ.get("LEGION_RT_FULL_SIZE")

pytestmark = [
    pytest.mark.full_size,
    pytest.mark.skipif(
        not WORK,
        reason="full-size run (7B shapes: ~25 GB disk, ~20 GB RAM, ~30 min on 2 cores): "
        "set LEGION_RT_FULL_SIZE=DIR to run it",
    ),
]


def test_full_size_int4_end_to_end():
    pytest.importorskip("torch")
    from legion_rt.engine import Engine
    from legion_rt.export.onnx_export import export_artifacts
    from legion_rt.export.tiny import make_tiny
    from legion_rt.export.tiny.full import check_disk
    from legion_rt.result import DoneEvent, MaskEvent, TokenEvent

    work = Path(WORK)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "tiny_info.json").is_file():
        check_disk(work, 25 * 10**9, "the full-size test")
        make_tiny(model, size="full")
    info = json.loads((model / "tiny_info.json").read_text())
    assert info["size"] == "legion-7b" and info["streamed"]
    art = work / "artifacts-int4"
    if not (art / "manifest.json").is_file():
        export_artifacts(checkpoint=model / "checkpoint", clip=model / "clip", detector=model / "detector.bin",
                         out=art, precision="int4", progress=False)  # fmt: skip
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["num_layers"] == 32 and manifest["model"]["vocab_size"] == 32007
    assert manifest["graphs"]["llm"]["precision"] == "int4" and manifest["graphs"]["llm"]["external_data"]
    assert (
        manifest["graphs"]["sam_encoder"]["file"] == "sam_encoder.onnx"
        and (art / "sam_encoder.onnx.data").is_file()
    )
    assert "first 2 of 32 layers" in manifest["verification"]["llm"]["note"]

    engine = Engine(art, threads=2)
    picture = Path(__file__).parents[1] / "legion_rt" / "assets" / "demo.jpg"
    events = list(engine.request(str(picture), max_new_tokens=16))
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    masks = [e for e in events if isinstance(e, MaskEvent)]
    result = events[-1].result
    assert isinstance(events[-1], DoneEvent) and result.token_ids == tokens and len(tokens) == 16
    cycle = info["cycle"]  # the planted loop: every token is the cycle's successor of the one before
    assert all(
        cycle[(cycle.index(a) + 1) % len(cycle)] == b for a, b in zip(tokens, tokens[1:], strict=False)
    )
    assert len(masks) == tokens.count(manifest["tokens"]["seg"]) >= 1
    for m in masks:
        assert m.artifact.mask.shape == result.artifacts[0].mask.shape and np.any(m.artifact.mask)
