"""Native TensorRT backend (GPU only), written against the documented TensorRT Python API, 10.3 (JetPack 6) to 11
(``tensorrt``: Builder / OnnxParser / Runtime / IExecutionContext.execute_async_v3), and cuda-python's runtime
bindings through ``cuda_rt`` (``cuda.bindings.runtime``, older ``cuda.cudart``).

Status, stated plainly: **this module has never run on a GPU** — it was written on a machine without a GPU or
TensorRT. What is tested here: the paths that need neither (``engines_usable`` returning False, ``BackendError``
"TensorRT is not installed"), and, with stand-in ``tensorrt`` / cuda-python module objects that record the calls
(tests/test_tensorrt.py): the version handling, the per-context buffers, the dtypes, the shape checks.

Design:
* ``build_engines(ART, precision)`` parses vision.onnx, sam_encoder.onnx, mask_head.onnx and, when the export
  wrote one (``--llm-graph standard|both``), the standard-operator LLM graph with TensorRT's ONNX parser and writes
  serialized engines to ``ART/tensorrt/<gpu name>-sm<cc>-trt<version>/`` with an ``engines.json`` record and a
  ``timing.cache`` (legion_rt/backends/trt_records.py: profiles from the manifest, fp32 layers, what is checked
  before an engine is loaded). Engines are specific to one GPU model and TensorRT version, hence the folder name. Precision: "fp16". "int8", "fp8" and "int4" need calibration data /
  quantized graphs that the export does not produce yet: they raise ``BackendError``.
* TensorRT versions: ``network_setup`` is the one place that knows what changed — networks are always explicit
  batch since 10 (``EXPLICIT_BATCH`` deprecated in 10, removed in 11); ``BuilderFlag.FP16`` (weakly typed
  networks) is deprecated in 10.12 and gone in 11, where every network is strongly typed (its precision is the
  ONNX graph's). So: an fp16 artifact (``--precision fp16`` export) builds a strongly typed network on every
  version; an fp32 artifact uses the FP16 builder flag where it exists and is refused on TensorRT 11.
* The GQA LLM graph uses ONNX Runtime's GroupQueryAttention contrib op, which TensorRT's parser does not know: with
  only that graph the decode loop runs on ONNX Runtime's CUDA provider (KV cache in device memory, ort_llm.py); with
  a ``standard_kv`` graph it runs on its TensorRT engine (``TrtLLM``).
* ``TensorRTBackend`` deserializes the engines and keeps, per calling thread (contexts are not thread-safe), one
  execution context with its stream and its device buffers: allocated on the first call, grown only when a larger
  shape comes, never freed per call (a cudaFree synchronizes the whole device, the LLM's decode included). Inputs
  and outputs are copied with cudaMemcpyAsync on the context's stream in each binding's own dtype
  (``engine.get_tensor_dtype``), and ``set_input_shape`` is checked (False: outside the optimization profile).
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BackendError
from .cuda_rt import CudaRuntime
from .trt_records import MAX_MASKS  # mask_head profile: N in 1..MAX_MASKS (more [SEG] are run in chunks)

if TYPE_CHECKING:  # pragma: no cover
    from ..artifacts import ArtifactDir

TRT_GRAPHS = ("vision", "sam_encoder", "mask_head")
PRECISIONS = ("fp16", "int8", "fp8", "int4")
MIN_TRT = (10, 3)  # JetPack 6.1/6.2 ship TensorRT 10.3

# TensorRT DataType name -> numpy dtype (BF16 / FP8 / INT4 have no numpy type: such bindings are refused).
NP_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT32": np.int32,
    "INT64": np.int64,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(
            "TensorRT is not installed (pip install 'legion_rt[tensorrt-cu12]' or '[tensorrt-cu13]' to match the driver, "
            "or JetPack's TensorRT on Jetson); use --backend onnxruntime"
        ) from None
    check_trt_version(trt)
    return trt, CudaRuntime()


def trt_version(trt) -> tuple[int, ...]:
    parts = []
    for p in str(getattr(trt, "__version__", "0")).split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_trt_version(trt) -> None:
    if trt_version(trt)[:2] < MIN_TRT:
        raise BackendError(
            f"TensorRT {trt.__version__} is too old: legion_rt needs TensorRT >= {MIN_TRT[0]}.{MIN_TRT[1]} "
            "(the v3 tensor API; JetPack >= 6.1 on Jetson)"
        )


def network_setup(trt, graph_fp16: bool) -> tuple[int, list]:
    """(create_network flags, builder flags to set) for an fp16 build of a graph stored in fp16 (``graph_fp16``)
    or fp32 — the one place that handles TensorRT 10.3 .. 11:

    * explicit batch: the only mode since TensorRT 10 (the EXPLICIT_BATCH flag is ignored in 10, gone in 11);
    * a graph already in fp16: a strongly typed network (its types are the ONNX graph's), on 11 the only kind (the
      STRONGLY_TYPED flag is deprecated and ignored there, so it is not passed);
    * an fp32 graph: a weakly typed network with BuilderFlag.FP16 (FP16 + FP32 fallback) where that flag exists;
      TensorRT 11 removed it, so the artifact must be exported with --precision fp16."""
    major = trt_version(trt)[0]
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    strongly_typed = getattr(creation, "STRONGLY_TYPED", None)
    fp16_flag = getattr(trt.BuilderFlag, "FP16", None)
    if graph_fp16 or fp16_flag is None:
        if not graph_fp16:
            raise BackendError(
                f"TensorRT {trt.__version__} builds strongly typed networks only (no BuilderFlag.FP16): the "
                "precision comes from the ONNX graphs, which are fp32 in this artifact directory; export it "
                "with --precision fp16 and rebuild the engines"
            )
        if major >= 11 or strongly_typed is None:
            return 0, []
        return 1 << int(strongly_typed), []
    return 0, [fp16_flag]


def np_dtype(trt_dtype) -> np.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    if name not in NP_DTYPES:
        raise BackendError(f"TensorRT binding dtype {name} has no numpy equivalent")
    return np.dtype(NP_DTYPES[name])


def _gpu_tag(trt, cuda: CudaRuntime) -> str:
    props = cuda.check(cuda.rt.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    name = "".join(c if c.isalnum() else "_" for c in name.split("\0")[0]).strip("_")
    return f"{name}-sm{props.major}{props.minor}-trt{trt.__version__}"


def engine_dir(art: ArtifactDir) -> Path:
    trt, cuda = _import_trt()
    return art.root / "tensorrt" / _gpu_tag(trt, cuda)


def engines_usable(art: ArtifactDir) -> bool:
    """True when TensorRT + a GPU are present and engines for this GPU were built in ART. Never raises."""
    try:
        return (engine_dir(art) / "engines.json").is_file()
    except Exception:
        return False


def _mark_fp32_layers(trt, network, extra: tuple[str, ...]) -> int:
    """Keep the numerically sensitive layers (trt_records.keep_fp32) in fp32 in a weakly typed FP16 build; returns
    how many. (A strongly typed network takes its precision from the ONNX graph: the fp16 export's casts.)"""
    from .trt_records import keep_fp32

    floats = {getattr(trt, "float32", None), getattr(trt, "float16", None)} - {None}
    count = 0
    for i in range(int(getattr(network, "num_layers", 0))):
        layer = network.get_layer(i)
        if not keep_fp32(getattr(layer, "type", ""), getattr(layer, "name", ""), extra):
            continue
        outs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not outs:
            continue
        layer.precision = trt.float32
        for j in outs:
            layer.set_output_type(j, trt.float32)
        count += 1
    return count


def _build_one(trt, logger, onnx_path: Path, graph: str, graph_fp16: bool, workspace: int, *, manifest=None,
               max_context: int | None = None, fp32_layers: tuple[str, ...] = (), timing_cache: Path | None = None):  # fmt: skip
    """(serialized engine bytes, profile, number of fp32 layers) of one ONNX graph; BackendError with TensorRT's
    own words on failure. ``timing_cache``: a file read before and written after the build (kernel timings are
    reused across builds and graphs: minutes saved per rebuild on a Jetson)."""
    from .trt_records import optimization_profile

    flags, builder_flags = network_setup(trt, graph_fp16)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx_path}: TensorRT cannot parse it ({errs})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    for flag in builder_flags:
        config.set_flag(flag)
    n_fp32 = 0
    if builder_flags:  # weakly typed FP16 build: pin the sensitive layers to fp32
        n_fp32 = _mark_fp32_layers(trt, network, fp32_layers)
        obey = getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS", None)
        if n_fp32 and obey is not None:
            config.set_flag(obey)
    cache = None
    if timing_cache is not None and hasattr(config, "create_timing_cache"):
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache of another GPU is not used
    inputs = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs[t.name] = tuple(t.shape)
    if manifest is not None:
        shapes = optimization_profile(manifest, graph, inputs, max_context=max_context)
    else:  # no manifest (older callers): batch 1, N masks for mask_head
        shapes = {}
        for name, shape in inputs.items():
            if shape and shape[0] == -1:
                lo, opt, hi = (
                    (1, 4, MAX_MASKS) if graph == "mask_head" and name == "seg_hidden" else (1, 1, 1)
                )
                shapes[name] = ([lo, *shape[1:]], [opt, *shape[1:]], [hi, *shape[1:]])
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)  # IHostMemory, None on failure (TensorRT >= 8)
    if blob is None:
        raise BackendError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
    if cache is not None:
        _write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(blob)), shapes, n_fp32


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def engine_graphs(manifest) -> list[tuple[str, object]]:
    """(engine name, manifest graph) of every graph TensorRT builds: vision, sam_encoder, mask_head, and the LLM
    when the artifact directory has a standard_kv graph (``export --llm-graph standard|both``)."""
    graphs = manifest.graphs
    out = [(g, getattr(graphs, g)) for g in TRT_GRAPHS]
    pick = getattr(graphs, "tensorrt_llm", None)
    llm = pick() if pick is not None else None
    if llm is not None:
        out.append(("llm", llm[1]))
    return out


def build_engines(
    art: ArtifactDir,
    precision: str = "fp16",
    *,
    workspace_gb: float = 8.0,
    log=print,
    max_context: int | None = None,
    fp32_layers: tuple[str, ...] = (),
    timing_cache: bool = True,
) -> Path:
    """Build TensorRT engines on the current GPU for vision, sam_encoder, mask_head and (when exported) the
    standard-operator LLM graph. Returns their folder, with ``engines.json`` (trt_records: hashes of every engine
    and of its source graph, GPU, TensorRT version, machine, profiles) and ``timing.cache``.

    ``workspace_gb``: TensorRT's workspace pool (an Orin Nano 8 GB shares that memory with everything: 1-2);
    ``max_context``: positions the LLM engine's KV profile covers (default the model's maximum);
    ``fp32_layers``: name patterns kept fp32 besides trt_records.FP32_LAYER_TYPES / FP32_LAYER_NAMES."""
    from . import trt_records

    trt, _cuda = _import_trt()
    if precision not in PRECISIONS:
        raise BackendError(f"precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if precision != "fp16":
        raise BackendError(
            f"precision {precision!r} needs calibration data or a quantized export, which legion_rt does not "
            "produce yet; use --precision fp16"
        )
    if not workspace_gb > 0:
        raise BackendError(f"--workspace-gb {workspace_gb}: must be > 0")
    todo = engine_graphs(art.manifest)
    if len(todo) == len(TRT_GRAPHS):
        log(
            "no standard-operator LLM graph in this artifact directory (export with --llm-graph standard or both): "
            "the LLM stays on ONNX Runtime's CUDA provider"
        )
    else:
        trt_records.llm_max_context(art.manifest, max_context)  # refuse a bad --max-context before building
    graph_fp16 = all(g.precision == "fp16" for _, g in todo)
    network_setup(trt, graph_fp16)  # refuse (TensorRT 11 + fp32 graphs) before creating anything
    out = engine_dir(art)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines.json").unlink(missing_ok=True)  # a half-built folder is never loadable
    logger = trt.Logger(trt.Logger.WARNING)
    record = trt_records.new_record(
        precision=precision,
        trt_version=trt.__version__,
        gpu=out.name,
        workspace_gb=workspace_gb,
        options={"max_context": max_context, "fp32_layers": list(fp32_layers), "timing_cache": timing_cache},
    )
    files = getattr(art.manifest, "files", {})
    for name, graph in todo:
        log(f"building TensorRT engine for {name} ({precision}) from {graph.file}...")
        data, shapes, n_fp32 = _build_one(
            trt,
            logger,
            art.path(graph.file) if hasattr(art, "path") else art.graph_path(name),
            name,
            graph_fp16,
            workspace_gb * 1024**3,
            manifest=art.manifest if hasattr(art.manifest, "prompt_length") else None,
            max_context=max_context,
            fp32_layers=tuple(fp32_layers),
            timing_cache=(out / "timing.cache") if timing_cache else None,
        )
        path = out / f"{name}.engine"
        _write_atomic(path, data)
        entry = files.get(graph.file)
        trt_records.add_engine(record, name, path.name, data, source=graph.file,
                               source_sha256=getattr(entry, "sha256", ""), profile=shapes, fp32_layers=n_fp32)  # fmt: skip
    _write_atomic(out / "engines.json", json.dumps(record, indent=2).encode())
    return out


class _ContextState:
    """One thread's execution context, its stream and its device buffers (name -> [ptr, capacity bytes])."""

    def __init__(self, ctx, stream):
        self.ctx, self.stream = ctx, stream
        self.buffers: dict[str, list[int]] = {}


class _TrtGraph:
    """One deserialized engine; an execution context (with stream and buffers) per thread."""

    def __init__(self, trt, cuda: CudaRuntime, runtime, path: Path, expected_sha256: str):
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != expected_sha256:
            raise BackendError(
                f"{path}: sha256 mismatch with engines.json (not the engine built here); rebuild with "
                f"`legion-rt build-engines {path.parent.parent.parent}`"
            )
        self.trt, self.cuda, self.path = trt, cuda, path
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(
                f"{path}: TensorRT cannot deserialize it (built for another GPU or TensorRT version?)"
            )
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in self.names}
        self.inputs = [n for n in self.names if is_input[n]]
        self.outputs = [n for n in self.names if not is_input[n]]
        self.dtypes = {n: np_dtype(self.engine.get_tensor_dtype(n)) for n in self.names}
        self._local = threading.local()
        self._states: list[_ContextState] = []
        self._lock = threading.Lock()

    def _state(self) -> _ContextState:
        st = getattr(self._local, "state", None)
        if st is None:
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise BackendError(f"{self.path}: TensorRT cannot create an execution context (GPU memory?)")
            st = self._local.state = _ContextState(ctx, self.cuda.stream_create())
            with self._lock:
                self._states.append(st)
        return st

    def _buffer(self, st: _ContextState, name: str, nbytes: int) -> int:
        """The device buffer of ``name`` in this context, grown (never shrunk) to ``nbytes``."""
        buf = st.buffers.get(name)
        if buf is None or buf[1] < nbytes:
            if buf is not None:
                self.cuda.free(buf[0], st.stream)
            size = max(int(nbytes), 1)
            buf = st.buffers[name] = [self.cuda.malloc(size, st.stream), size]
        return buf[0]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in (copied to this context's buffers on its stream), every output back as a host array."""
        self._check_inputs(feeds)
        st = self._state()
        arrays = {
            n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.inputs
        }  # alive until synced
        bound = {}
        for name, arr in arrays.items():
            ptr = self._buffer(st, name, arr.nbytes)
            self.cuda.copy_h2d_async(ptr, arr.ctypes.data, arr.nbytes, st.stream)
            bound[name] = (tuple(int(d) for d in arr.shape), ptr)
        return self._enqueue(st, st.stream, bound, {}, tuple(self.outputs))

    def run_device(
        self, inputs: dict, outputs: dict, host_outputs: tuple[str, ...], stream
    ) -> dict[str, np.ndarray]:
        """Enqueue the engine on ``stream`` (the caller's) with device buffers bound by address: ``inputs`` /
        ``outputs`` are {name: DeviceBuffer} in each binding's own dtype (no conversion on the device: a
        mismatch raises BackendError), ``host_outputs`` come back as host arrays (then the stream is synchronized),
        any other output goes to this context's scratch buffer. Nothing else is copied."""
        self._check_inputs(inputs)
        st = self._state()  # this thread's execution context (contexts are not thread-safe)
        bound = {}
        for name in self.inputs:
            buf = inputs[name].expect(inputs[name].shape, self.dtypes[name], f"{self.path.name} input {name}")
            bound[name] = (buf.shape, buf.ptr)
        return self._enqueue(st, stream, bound, outputs, host_outputs)

    def _check_inputs(self, given) -> None:
        if set(given) != set(self.inputs):
            raise BackendError(
                f"{self.path.name}: inputs {sorted(given)} do not match the engine's {sorted(self.inputs)}"
            )

    def _enqueue(self, st, stream, inputs: dict, outputs: dict, host_outputs) -> dict[str, np.ndarray]:
        """Bind ``inputs`` ({name: (shape, device pointer)}) and the outputs (a DeviceBuffer of ``outputs``, else
        this context's scratch buffer), execute on ``stream``, copy ``host_outputs`` back and synchronize."""
        ctx, cuda = st.ctx, self.cuda
        for name in self.inputs:
            shape, ptr = inputs[name]
            if not ctx.set_input_shape(name, shape):
                raise BackendError(
                    f"{self.path.name}: input {name} of shape {tuple(shape)} is outside the engine's "
                    "optimization profile"
                )
            ctx.set_tensor_address(name, ptr)
        hosts = {}
        for name in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.path.name}: output {name} has an unresolved shape {shape}")
            if name in outputs:
                ctx.set_tensor_address(name, outputs[name].expect(shape, self.dtypes[name],
                                                                  f"{self.path.name} output {name}").ptr)  # fmt: skip
                continue
            host = np.empty(shape, dtype=self.dtypes[name])
            ptr = self._buffer(st, name, host.nbytes)
            ctx.set_tensor_address(name, ptr)
            if name in host_outputs:
                hosts[name] = (host, ptr)
        if not ctx.execute_async_v3(stream):
            raise BackendError(f"{self.path.name}: TensorRT execution failed (see the log above)")
        for host, ptr in hosts.values():
            cuda.copy_d2h_async(host.ctypes.data, ptr, host.nbytes, stream)
        if hosts:
            cuda.synchronize(stream)
        return {k: v[0] for k, v in hosts.items()}

    def close(self) -> None:
        """Free every context's device buffers (after its stream has finished)."""
        with self._lock:
            states, self._states = self._states, []
        for st in states:
            self.cuda.synchronize(st.stream)
            for ptr, _size in st.buffers.values():
                self.cuda.free(ptr, st.stream)
            st.buffers.clear()
            self.cuda.synchronize(st.stream)


class TrtLLM:
    """The standard_kv LLM engine with the OrtLLM interface (new_cache / clone_cache / forward). The cache is the
    engine's ``present`` outputs fed back as ``past`` (host numpy arrays: a device-resident cache that stays in
    TensorRT's buffers between steps is the next step, see README "What has and has not run")."""

    kind = "standard_kv"

    def __init__(self, graph: _TrtGraph, model, info, max_context: int):
        self.graph, self.info = graph, info
        self.num_layers, self.num_kv_heads, self.head_dim = (
            model.num_layers,
            model.num_kv_heads,
            model.head_dim,
        )
        self.hidden_size, self.vocab_size = model.hidden_size, model.vocab_size
        self.max_positions = int(max_context)
        self.kv_dtype = np.dtype(info.kv_dtype)
        self.device = "cuda"

    def new_cache(self, max_len: int):
        from ..errors import RequestError
        from .ort_llm import KVCache

        if not 1 <= int(max_len) <= self.max_positions:
            raise RequestError(
                f"KV cache length {max_len} is outside 1..{self.max_positions} (the LLM engine's profile; "
                "rebuild with a larger --max-context)"
            )
        cache = KVCache(max_len=int(max_len))
        empty = (1, self.num_kv_heads, 0, self.head_dim)
        cache.keys = [np.zeros(empty, self.kv_dtype) for _ in range(self.num_layers)]
        cache.values = [np.zeros(empty, self.kv_dtype) for _ in range(self.num_layers)]
        return cache

    def clone_cache(self, cache, max_len: int):
        from ..errors import RequestError

        if max_len < cache.length:
            raise RequestError(
                f"clone_cache: max_len {max_len} is smaller than the cached length {cache.length}"
            )
        new = self.new_cache(max_len)
        new.keys = [np.array(k[:, :, : cache.length]) for k in cache.keys]
        new.values = [np.array(v[:, :, : cache.length]) for v in cache.values]
        new.length = cache.length
        return new

    def forward(self, cache, embeds: np.ndarray):
        from ..errors import RequestError

        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if (
            embeds.ndim != 3
            or embeds.shape[0] != 1
            or embeds.shape[2] != self.hidden_size
            or embeds.shape[1] < 1
        ):
            raise RequestError(f"LLM embeds shape {embeds.shape}: expected [1, S>=1, {self.hidden_size}]")
        total = cache.length + embeds.shape[1]
        if total > cache.max_len:
            raise RequestError(
                f"KV cache overflow: {cache.length} cached + {embeds.shape[1]} new positions > capacity {cache.max_len}"
            )
        info = self.info
        feeds = {info.inputs_embeds: embeds}
        for i in range(self.num_layers):
            feeds[info.past_key.format(i=i)] = cache.keys[i]
            feeds[info.past_value.format(i=i)] = cache.values[i]
        out = self.graph.run(feeds)
        cache.keys = [out[info.present_key.format(i=i)] for i in range(self.num_layers)]
        cache.values = [out[info.present_value.format(i=i)] for i in range(self.num_layers)]
        cache.length = total
        return (
            np.array(out[info.logits][0], dtype=np.float32),
            np.array(out[info.hidden][0], dtype=np.float32),
        )


class TensorRTBackend:
    """vision / sam_encoder / mask_head on TensorRT engines; the LLM on its TensorRT engine when one was built
    (standard_kv graph), else on ONNX Runtime's CUDA provider. Only engines recorded in engines.json by this
    machine, for this GPU, TensorRT version and these ONNX graphs are loaded (trt_records.check_record)."""

    name = "tensorrt"
    # Device buffers are bound by address and every engine is enqueued on the stream the caller gives: the SAM
    # encoder on the SAM thread's stream (its own execution context), the mask head on the mask thread's.
    device_io = True
    runs_on_caller_stream = True
    device_id = 0  # engines are built for and run on device 0 (_gpu_tag)

    def __init__(self, art: ArtifactDir, *, threads: int | None = None):
        from .trt_records import check_record, rebuild_hint

        trt, cuda = _import_trt()
        folder = art.root / "tensorrt" / _gpu_tag(trt, cuda)
        meta_path = folder / "engines.json"
        if not meta_path.is_file():
            raise BackendError(
                f"{folder}: no TensorRT engines for this GPU; run `legion-rt build-engines {art.root}`"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            raise BackendError(f"{meta_path}: not JSON; {rebuild_hint(art.root)}") from None
        check_record(meta, root=art.root, trt_version=trt.__version__, gpu=folder.name, manifest=art.manifest)
        missing = [g for g in TRT_GRAPHS if g not in meta["engines"]]
        if missing:
            raise BackendError(f"{meta_path}: no engine for {', '.join(missing)}; {rebuild_hint(art.root)}")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._graphs = {
            g: _TrtGraph(trt, cuda, runtime, folder / entry["file"], entry["sha256"])
            for g, entry in meta["engines"].items()
        }
        if "llm" in self._graphs:
            from .trt_records import llm_max_context

            (_, info) = art.manifest.graphs.tensorrt_llm()
            context = llm_max_context(art.manifest, meta.get("options", {}).get("max_context"))
            self.llm = TrtLLM(self._graphs["llm"], art.manifest.model, info, context)
            self._ort = None
            self.providers = ["TensorRT " + trt.__version__]
        else:
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

    # ------------------------------------------------------------------------------------------ device buffers
    def vision_device(self, clip, stream):
        """clip pixels DeviceBuffer [1, 3, 336, 336] -> (image_embeds [1, 576, H], cls_logits | None), host."""
        want = ("image_embeds", "cls_logits") if self._has_cls else ("image_embeds",)
        out = self._graphs["vision"].run_device({"pixel_values": clip}, {}, want, stream)
        return out["image_embeds"], (out["cls_logits"] if self._has_cls else None)

    def sam_encoder_device(self, pixels, out, stream) -> None:
        """SAM pixels [1, 3, 1024, 1024] -> ``out`` image_embeddings [1, 256, 64, 64], enqueued on ``stream``."""
        self._graphs["sam_encoder"].run_device(
            {"pixel_values": pixels}, {"image_embeddings": out}, (), stream
        )

    def mask_head_device(self, seg_hidden, embedding, out, stream) -> None:
        """seg_hidden [N, H] (N <= MAX_MASKS), embedding -> ``out`` low_res_masks [N, 256, 256] on ``stream``."""
        if seg_hidden.shape[0] > MAX_MASKS:
            raise BackendError(
                f"mask head: {seg_hidden.shape[0]} [SEG] in one call, the engine takes {MAX_MASKS}"
            )
        feeds = {"seg_hidden": seg_hidden, "image_embeddings": embedding}
        self._graphs["mask_head"].run_device(feeds, {"low_res_masks": out}, (), stream)

    def close(self) -> None:
        for graph in self._graphs.values():
            graph.close()
