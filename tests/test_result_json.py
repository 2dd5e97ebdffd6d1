"""The Result JSON (schema 1): COCO RLE masks that pycocotools decodes back exactly, the JSON Schema shipped in
the package, and ``Result.to_dict()`` / ``--json`` documents that validate against it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
mask_utils = pytest.importorskip("pycocotools.mask")

from legion_rt import rle  # noqa: E402
from legion_rt.result import Artifact, Result, result_schema  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "legion_rt" / "assets" / "demo.jpg"


def _validate(doc):
    jsonschema.Draft202012Validator(result_schema()).validate(doc)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (480, 640), (17, 1), (64, 64)])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
def test_rle_round_trip_with_pycocotools(shape, density):
    """encode() writes what pycocotools.mask.encode writes (Fortran order), and pycocotools.mask.decode of the
    JSON form (counts as str) gives the mask back bit for bit."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    mask = rng.random(shape) < density
    doc = json.loads(json.dumps(rle.encode(mask)))  # through JSON, as a client sees it
    assert doc["size"] == [shape[0], shape[1]] and isinstance(doc["counts"], str)
    ref = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert doc["counts"] == ref["counts"].decode("ascii")
    back = mask_utils.decode({"size": doc["size"], "counts": doc["counts"].encode("ascii")})
    assert back.shape == shape and np.array_equal(back.astype(bool), mask)
    assert np.array_equal(rle.decode(doc), mask)


def test_rle_refuses_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2), bool))


def _toy_result(**kw) -> Result:
    m = np.zeros((5, 8), bool)
    m[1:3, 2:6] = True
    a = Artifact(phrase="edge", mask=m, bbox=(2, 1, 6, 3), area=8, index=0, token_index=3)
    base = dict(
        verdict="fake",
        fake_probability=0.9,
        explanation="x",
        text="x [SEG]",
        token_ids=[1, 2, 3, 4],
        artifacts=[a],
        mask=m.copy(),
        timings={"total": 0.5, "time_to_first_mask": float("nan")},
        label=0,
        cls_logits=[1.0, -1.0],
        phrases=["edge"],
        image_size=(5, 8),
        model={"name": "tiny", "manifest_sha256": "ab" * 32},
    )
    base.update(kw)
    return Result(**base)


def test_schema_accepts_the_contract_and_rejects_breakage():
    doc = _toy_result(image="pics/a.jpg").to_dict()
    _validate(doc)
    assert doc["schema_version"] == 1 and doc["image"] == "pics/a.jpg"
    assert doc["model"] == {"name": "tiny", "manifest_sha256": "ab" * 32}
    assert doc["timings"]["time_to_first_mask"] is None  # NaN is not JSON
    assert "image" not in _toy_result().to_dict()  # only when the input had a name
    # each of these breaks the contract: the schema must say so
    breakers = [
        lambda d: d.pop("mask_rle"),
        lambda d: d["artifacts"][0].pop("mask_rle"),
        lambda d: d["mask_rle"].__setitem__("counts", [0, 40]),  # uncompressed RLE is not the contract
        lambda d: d.__setitem__("schema_version", 2),
        lambda d: d["model"].__setitem__("manifest_sha256", "nothex"),
        lambda d: d["artifacts"][0].__setitem__("bbox", [0, 0, 1]),
        lambda d: d.__setitem__("verdict", "maybe"),
    ]
    for i, brk in enumerate(breakers):
        bad = copy.deepcopy(doc)
        brk(bad)
        with pytest.raises(jsonschema.ValidationError):
            _validate(bad)
            pytest.fail(f"breaker {i} was accepted")


def test_schema_file_is_package_data():
    """The schema ships inside legion_rt/ (scikit-build-core packages every file under legion_rt/)."""
    import legion_rt

    path = Path(legion_rt.__file__).parent / "schemas" / "result.schema.json"
    assert path.is_file() and json.loads(path.read_text())["$schema"].endswith("2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(result_schema())


def test_engine_result_to_dict(tiny_artifacts):
    """A real answer: validates, keeps the old keys, and every RLE decodes to the Result's masks exactly."""
    from legion_rt.engine import Engine
    from legion_rt.serve.service import model_identity

    with Engine(tiny_artifacts, threads=1, verify="size") as eng:
        res = eng.analyze(DEMO, max_new_tokens=24)
        if not res.model:  # filled by the engine once the runtime change lands; the service fills it too
            res.model = model_identity(eng)
    doc = json.loads(json.dumps(res.to_dict()))
    _validate(doc)
    for old in ("verdict", "fake_probability", "label", "cls_logits", "skipped", "explanation", "text"):
        assert old in doc
    assert doc["mask_area"] == int(res.mask.sum()) and doc["image_size"] == list(res.image_size)
    assert np.array_equal(
        mask_utils.decode({**doc["mask_rle"], "counts": doc["mask_rle"]["counts"].encode()}), res.mask
    )
    assert len(doc["artifacts"]) == len(res.artifacts) >= 1
    for a, d in zip(res.artifacts, doc["artifacts"], strict=True):
        assert np.array_equal(rle.decode(d["mask_rle"]), a.mask)
        assert d["area"] == int(a.mask.sum())


def test_cli_json_is_the_result_json(tiny_artifacts, tmp_path, capsys):
    """`legion-rt analyze --json` writes the same document (plus `image`): it validates and its masks decode."""
    from legion_rt.cli import main

    out = tmp_path / "r.json"
    rc = main(["analyze", str(DEMO), "--artifacts", str(tiny_artifacts), "--json", str(out)]
              + ["--max-new-tokens", "16", "--threads", "1", "--verify", "size", "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["image"] == str(DEMO) and doc["schema_version"] == 1
    for a in doc["artifacts"]:
        assert rle.decode(a["mask_rle"]).sum() == a["area"]
    jsonschema.validate(doc, result_schema())
    assert doc["model"]["name"] == "tiny" and len(doc["model"]["manifest_sha256"]) == 64
