"""The runtime imports and runs with torch, transformers, onnx (and the export package) absent: a subprocess
installs a meta-path finder that makes those imports fail, then runs Engine.analyze on prebuilt artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCKED = (
    "torch",
    "transformers",
    "onnx",
    "onnxscript",
    "export",
    "legion_rt.export",
    "cv2",
    "sentencepiece",
)

SCRIPT = r"""
import json, sys
BLOCKED = set(sys.argv[3].split(","))

class Block:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked by test_no_torch: {name}")
        return None

sys.meta_path.insert(0, Block())
for name in BLOCKED:  # prove the block works
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} was importable despite the block")

import legion_rt
from legion_rt.engine import Engine

eng = Engine(sys.argv[1], backend="onnxruntime", threads=1)
res = eng.analyze(sys.argv[2], max_new_tokens=12)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"tokens": res.token_ids, "verdict": res.verdict, "leaked": leaked,
                  "providers": eng.providers}))
"""


def test_runtime_without_torch(tiny_artifacts, tmp_path):
    import numpy as np
    from PIL import Image

    pic = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((45, 67, 3)) * 255).astype(np.uint8)).save(pic)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_artifacts), str(pic), ",".join(BLOCKED)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the repo root: `export` must not be found by accident either
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    assert 1 <= len(out["tokens"]) <= 12 and out["verdict"] in ("fake", "real")

    from legion_rt.engine import Engine

    # same answer as in this (torch-enabled) process
    assert Engine(tiny_artifacts, threads=1).analyze(pic, max_new_tokens=12).token_ids == out["tokens"]
