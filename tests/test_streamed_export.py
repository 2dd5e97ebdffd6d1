"""The streamed export (load_legion(stream_llm=True), export/truncated.py, quantization while writing): what the
released 7B goes through, at sizes CI affords. The streamed llm.onnx must be the graph the loaded export writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from legion_rt.engine import Engine  # noqa: E402
from legion_rt.export.checkpoint import load_legion  # noqa: E402
from legion_rt.export.memory import choose_streaming, estimate_export_memory  # noqa: E402
from legion_rt.export.onnx_export import export_artifacts  # noqa: E402
from legion_rt.export.quantize import WEIGHT_REL_RMS, quantization_record, quantize_weight  # noqa: E402
from legion_rt.export.truncated import TRUNCATED_LAYERS, truncated_llm  # noqa: E402


def _export(paths, out, **kw):
    return export_artifacts(checkpoint=paths.checkpoint, clip=paths.clip, detector=paths.detector, out=out,
                            progress=False, **kw)  # fmt: skip


def _initializers(path):
    proto = onnx.load(str(path), load_external_data=True)
    return proto, {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_streamed_weights_read_one_tensor_at_a_time(tiny_paths):
    model = load_legion(tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector, stream_llm=True)
    full = load_legion(tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector)
    assert model.llm.model.layers[0].mlp.up_proj.weight.is_meta and model.llm.lm_head.weight.is_meta
    assert not model.llm.model.embed_tokens.weight.is_meta and not model.mm_projector[0].weight.is_meta
    ref = full.llm.state_dict()
    assert set(model.llm_weights.keys()) == {k for k in ref if not k.startswith("model.embed_tokens.")}
    for name in ("model.layers.1.self_attn.k_proj.weight", "lm_head.weight", "model.norm.weight"):
        got = model.llm_weights[name]
        assert got.dtype == torch.float32 and torch.equal(got, ref[name]), name
    assert model.llm_weights.get("lm_head.bias") is None
    mapped = model.llm_weights.mapped("model.layers.0.mlp.gate_proj.weight")  # as stored: bf16, file-backed
    assert mapped.dtype == torch.bfloat16 and torch.equal(
        mapped.float(), ref["model.layers.0.mlp.gate_proj.weight"]
    )
    llm = truncated_llm(model, layers=1)
    assert llm.config.num_hidden_layers == 1
    assert torch.equal(llm.model.layers[0].mlp.down_proj.weight, ref["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_streamed_export_writes_the_same_llm_graph(tiny_paths, tiny_artifacts, tmp_path, precision, capfd):
    """fp32: the same initializers and nodes as the loaded export's llm.onnx; int4: quantized one weight at a time,
    the same packed weights and scales as MatMulNBitsQuantizer on the whole fp32 graph. Verified on the truncated
    model (the tiny LLM has 2 layers: all of it), and the Engine's answer is the loaded export's."""
    loaded = (
        tiny_artifacts
        if precision == "fp32"
        else _export(tiny_paths, tmp_path / "loaded", precision=precision)
    )
    capfd.readouterr()
    streamed = _export(tiny_paths, tmp_path / "streamed", precision=precision, stream_llm=True)
    # importing ONNX Runtime's quantizer configures the root logger at INFO: the torch exports after it must not
    # print their optimizer's passes (found on the first 7B int4 export: thousands of lines)
    assert " [INFO] " not in capfd.readouterr().err
    pa, a = _initializers(loaded / "llm.onnx")
    pb, b = _initializers(streamed / "llm.onnx")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert [(n.op_type, list(n.input)) for n in pa.graph.node] == [
        (n.op_type, list(n.input)) for n in pb.graph.node
    ]
    ver = json.loads((streamed / "manifest.json").read_text())["verification"]
    note = f"first {TRUNCATED_LAYERS} of 2 layers (streamed LLM)"
    checked = ["llm"] + (["llm_fp32_source"] if precision != "fp32" else [])
    for name in checked:
        assert note in ver[name]["note"] and ver[name]["max_abs_err"] <= ver[name]["limit"], (name, ver[name])
    assert not any(p.name.startswith(".verify") for p in streamed.iterdir())  # the side directory is gone
    ra = Engine(loaded).analyze(_picture(), max_new_tokens=24)
    rb = Engine(streamed).analyze(_picture(), max_new_tokens=24)
    assert ra.token_ids == rb.token_ids and ra.text == rb.text
    for x, y in zip(ra.artifacts, rb.artifacts, strict=True):
        assert np.array_equal(x.mask, y.mask)


def _picture():
    from pathlib import Path

    import legion_rt

    return str(Path(legion_rt.__file__).parent / "assets" / "demo.jpg")


def test_quantize_weight_is_the_tool_on_one_matmul():
    w = np.random.default_rng(0).standard_normal((96, 40)).astype(np.float32)
    q = quantization_record("int4")
    attrs, arrays = quantize_weight(w, "x.weight", bits=4, block_size=q.block_size, symmetric=q.symmetric,
                                    accuracy_level=q.accuracy_level)  # fmt: skip
    assert attrs == {"K": 96, "N": 40, "bits": 4, "block_size": 32, "accuracy_level": 4}
    names = [n for n, _ in arrays]
    assert names == ["x.weight_Q4", "x.weight_scales"]
    packed, scales = (a for _, a in arrays)
    assert packed.shape == (40, 3, 16) and packed.dtype == np.uint8 and scales.shape == (40, 3)
    # dequantized (symmetric: zero point 8) it is the weight within one step of its block (round to nearest; the
    # block's extreme may be clipped to the 8th level), and the rms error is what 16 levels give
    nib = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(40, 3, 32).astype(np.float32) - 8
    deq = (nib * scales[:, :, None]).reshape(40, 96).T
    step = np.repeat(np.abs(scales), 32, axis=1).T  # [96, 40]
    assert (np.abs(deq - w) <= step * (1 + 1e-6)).all()
    assert np.sqrt(np.mean((deq - w) ** 2)) / np.sqrt(np.mean(w**2)) < WEIGHT_REL_RMS[4]


def test_streaming_is_chosen_when_the_loaded_export_does_not_fit(tiny_paths):
    kw = dict(precision="fp32", verify=True)
    loaded = estimate_export_memory(tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector, **kw)
    streamed = estimate_export_memory(tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector, stream_llm=True,
                                      **kw)  # fmt: skip
    assert streamed.model < loaded.model
    args = (tiny_paths.checkpoint, tiny_paths.clip, tiny_paths.detector)
    assert choose_streaming(*args, limit=loaded.total + 1, stream_llm=None, **kw) is False
    assert choose_streaming(*args, limit=loaded.total - 1, stream_llm=None, **kw) is True
    assert choose_streaming(*args, limit=1, stream_llm=False, **kw) is False  # as asked


def test_full_size_memory_plan_fits_24_gb():
    """The 7B-shaped checkpoint's export estimate from shapes alone (tests/test_full_size_writer.py plans the
    same files): loaded it needs ~44 GB (fp16), streamed it fits a 24 GB machine with room."""
    from legion_rt.export.config import CONFIGS
    from legion_rt.export.tiny.full import _checkpoint_specs, _template

    cfg = CONFIGS["legion-7b"].replace(vocab_size=32007)
    specs = _checkpoint_specs(cfg, _template(cfg.replace(num_layers=1), meta=True), num_layers=32)
    llm = sum(int(np.prod(s)) for k, s, _ in specs if k.startswith(("model.layers.", "lm_head")))
    assert llm * 4 > 24 * 2**30  # the float32 LLM alone is past the machine
