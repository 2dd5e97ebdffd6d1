"""Native TensorRT backend (GPU only), written against the documented TensorRT 10 Python API
(``tensorrt``: Builder / OnnxParser / Runtime / IExecutionContext.execute_async_v3) and cuda-python's runtime
bindings (``cuda.bindings.runtime``, older ``cuda.cudart``).

Status, stated plainly: **this module has never run** — it was written on a machine without a GPU or TensorRT.
Only the paths that do not need TensorRT are tested (importing this module, ``engines_usable`` returning False,
``TensorRTBackend`` / ``build_engines`` raising ``BackendError`` "TensorRT is not installed").

Design:
* ``build_engines(ART, precision)`` parses vision.onnx, sam_encoder.onnx and mask_head.onnx with TensorRT's ONNX
  parser and writes serialized engines to ``ART/tensorrt/<gpu name>-sm<cc>-trt<version>/`` with an
  ``engines.json`` (precision, sha256 of every engine, TensorRT version, GPU). Engines are specific to one GPU model
  and TensorRT version, hence the folder name. Precision: "fp16" (FP16 + FP32 fallback). "int8", "fp8" and "int4"
  need calibration data / quantized graphs that the export does not produce yet: they raise ``BackendError``.
* The LLM graph uses ONNX Runtime's GroupQueryAttention contrib op, which TensorRT's parser does not know, so the
  decode loop runs on ONNX Runtime's CUDA provider (KV cache in device memory, see ort_llm.py).
* ``TensorRTBackend`` deserializes the engines, keeps one execution context per calling thread (contexts are not
  thread-safe) and copies inputs/outputs through pinned-free plain cudaMemcpy (synchronous per call).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BackendError

if TYPE_CHECKING:  # pragma: no cover
    from ..artifacts import ArtifactDir

TRT_GRAPHS = ("vision", "sam_encoder", "mask_head")
PRECISIONS = ("fp16", "int8", "fp8", "int4")
MAX_MASKS = 32  # mask_head optimization profile: N in 1..MAX_MASKS (more [SEG] are run in chunks)


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(
            "TensorRT is not installed (pip install tensorrt cuda-python on a machine with an NVIDIA GPU); "
            "use --backend onnxruntime"
        ) from None
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
    except ImportError:
        raise BackendError(
            "cuda-python is not installed (pip install cuda-python); needed by the TensorRT backend"
        ) from None
    return trt, cudart


def _check(result):
    """cuda-python calls return (err, *values): raise on error, return the values."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def _gpu_tag(trt, cudart) -> str:
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    name = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return f"{name}-sm{props.major}{props.minor}-trt{trt.__version__}"


def engine_dir(art: ArtifactDir) -> Path:
    trt, cudart = _import_trt()
    return art.root / "tensorrt" / _gpu_tag(trt, cudart)


def engines_usable(art: ArtifactDir) -> bool:
    """True when TensorRT + a GPU are present and engines for this GPU were built in ART. Never raises."""
    try:
        return (engine_dir(art) / "engines.json").is_file()
    except Exception:
        return False


def build_engines(art: ArtifactDir, precision: str = "fp16", *, workspace_gb: float = 8.0, log=print) -> Path:
    """Build TensorRT engines for vision, sam_encoder and mask_head on the current GPU. Returns their folder."""
    trt, cudart = _import_trt()
    if precision not in PRECISIONS:
        raise BackendError(f"precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if precision != "fp16":
        raise BackendError(
            f"precision {precision!r} needs calibration data or a quantized export, which legion_rt does not "
            "produce yet; use --precision fp16"
        )
    out = engine_dir(art)
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    record = {"precision": precision, "tensorrt": trt.__version__, "gpu": out.name, "engines": {}}
    for graph in TRT_GRAPHS:
        log(f"building TensorRT engine for {graph} ({precision})...")
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(art.graph_path(graph))):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"{art.graph_path(graph)}: TensorRT cannot parse it ({errs})")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 1024**3))
        config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = list(t.shape)
            if shape[0] == -1:  # dynamic leading dim: batch 1 for vision/sam, N masks for mask_head
                lo, opt, hi = (
                    (1, 4, MAX_MASKS) if graph == "mask_head" and t.name == "seg_hidden" else (1, 1, 1)
                )
                profile.set_shape(t.name, [lo, *shape[1:]], [opt, *shape[1:]], [hi, *shape[1:]])
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise BackendError(f"{art.graph_path(graph)}: TensorRT engine build failed (see the log above)")
        data = bytes(blob)
        path = out / f"{graph}.engine"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        record["engines"][graph] = {
            "file": path.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    (out / "engines.json").write_text(json.dumps(record, indent=2))
    return out


class _TrtGraph:
    """One deserialized engine; an execution context per thread."""

    def __init__(self, trt, cudart, runtime, path: Path, expected_sha256: str):
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected_sha256:
            raise BackendError(
                f"{path}: sha256 mismatch with engines.json (rebuild with legion-rt build-engines)"
            )
        self.trt, self.cudart = trt, cudart
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(
                f"{path}: TensorRT cannot deserialize it (built for another GPU or TensorRT version?)"
            )
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._local = threading.local()

    def _context(self):
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = self.engine.create_execution_context()
            self._local.stream = _check(self.cudart.cudaStreamCreate())
        return ctx, self._local.stream

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self.trt, self.cudart
        ctx, stream = self._context()
        buffers = []
        try:
            for name, arr in feeds.items():
                arr = np.ascontiguousarray(arr, dtype=np.float32)
                ctx.set_input_shape(name, arr.shape)
                ptr = _check(cudart.cudaMalloc(arr.nbytes))
                buffers.append(ptr)
                _check(
                    cudart.cudaMemcpy(
                        ptr, arr.ctypes.data, arr.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
                    )
                )
                ctx.set_tensor_address(name, ptr)
            outputs = {}
            for name in self.names:
                if self.engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                    continue
                shape = tuple(ctx.get_tensor_shape(name))
                host = np.empty(shape, dtype=np.float32)
                ptr = _check(cudart.cudaMalloc(max(host.nbytes, 1)))
                buffers.append(ptr)
                ctx.set_tensor_address(name, ptr)
                outputs[name] = (host, ptr)
            if not ctx.execute_async_v3(stream):
                raise BackendError("TensorRT execution failed")
            _check(cudart.cudaStreamSynchronize(stream))
            for _name, (host, ptr) in outputs.items():
                _check(
                    cudart.cudaMemcpy(
                        host.ctypes.data, ptr, host.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
                    )
                )
            return {k: v[0] for k, v in outputs.items()}
        finally:
            for ptr in buffers:
                cudart.cudaFree(ptr)


class TensorRTBackend:
    """vision / sam_encoder / mask_head on TensorRT engines, the LLM on ONNX Runtime's CUDA provider."""

    name = "tensorrt"

    def __init__(self, art: ArtifactDir, *, threads: int | None = None):
        trt, cudart = _import_trt()
        folder = engine_dir(art)
        meta_path = folder / "engines.json"
        if not meta_path.is_file():
            raise BackendError(
                f"{folder}: no TensorRT engines for this GPU; run `legion-rt build-engines {art.root}`"
            )
        meta = json.loads(meta_path.read_text())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._graphs = {
            g: _TrtGraph(
                trt, cudart, runtime, folder / meta["engines"][g]["file"], meta["engines"][g]["sha256"]
            )
            for g in TRT_GRAPHS
        }
        from .onnxruntime import OnnxRuntimeBackend

        # Only the LLM session is used from this one; it must really run on CUDA (strict provider check).
        self._ort = OnnxRuntimeBackend(art, threads=threads, providers=["cuda"], graphs=("llm",))
        self.llm = self._ort.llm
        self.providers = ["TensorRT " + trt.__version__, *self._ort.providers]
        self._has_cls = "cls_logits" in self._graphs["vision"].names

    def vision(self, clip_pixels):
        out = self._graphs["vision"].run({"pixel_values": clip_pixels})
        return out["image_embeds"], (out["cls_logits"] if self._has_cls else None)

    def sam_encoder(self, sam_pixels):
        return self._graphs["sam_encoder"].run({"pixel_values": sam_pixels})["image_embeddings"]

    def mask_head(self, seg_hidden, embedding):
        chunks = []
        for s in range(0, seg_hidden.shape[0], MAX_MASKS):
            feeds = {"seg_hidden": seg_hidden[s : s + MAX_MASKS], "image_embeddings": embedding}
            chunks.append(self._graphs["mask_head"].run(feeds)["low_res_masks"])
        return np.concatenate(chunks, axis=0)
