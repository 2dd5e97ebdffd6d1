"""KV-cached LLM runner over llm.onnx (graph kind ``gqa_shared_kv``, see export/onnx_llm.py).

The KV cache of a request is one preallocated buffer per layer and per K/V, [1, KVH, max_len, D], bound through
ONNX Runtime IOBinding as both the ``past`` input and the ``present`` output of the GroupQueryAttention node:
the op writes the new rows in place and attends over the filled positions only, so a decode step never copies
the cache. ``clone_cache`` copies only the filled positions (the shared prompt prefix) into a fresh cache.

Usage::

    runner = OrtLLM(session_or_path, manifest.model, manifest.graphs.llm)   # typed manifest (legion_rt.manifest)
    cache = runner.new_cache(max_len)            # capacity = prompt + max_new_tokens
    logits, hidden = runner.forward(cache, embeds)   # embeds f32 [1, S, H] -> f32 [V], f32 [H] (last position)
    cache.length                                 # filled positions
    cache2 = runner.clone_cache(cache, max_len)

One runner may be used from many threads at once as long as each thread uses its own cache.

Kind ``standard_kv`` (export/onnx_llm_standard.py, standard ONNX operators for TensorRT): the cache is the
``present`` arrays of the last call ([1, KVH, length, D], numpy), fed back as ``past``; the graph concatenates the
new rows, so each call copies the cache once (the GQA graph does not). ``max_len`` is enforced the same way.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import ArtifactError, BackendError, RequestError
from ..manifest import LlmGraph, ModelInfo

SUPPORTED_KINDS = ("gqa_shared_kv", "standard_kv")
_CUDA_INIT_LOCK = threading.Lock()  # first device cache of any runner: one CudaRuntime + stream each


@dataclass
class KVCache:
    """Preallocated KV buffers of one request. ``keys[i]``/``values[i]``: [1, KVH, max_len, D] (numpy views of
    the OrtValues on CPU; None on a GPU device). ``length``: filled positions."""

    max_len: int
    length: int = 0
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    ort_keys: list = field(default_factory=list)
    ort_values: list = field(default_factory=list)
    # per-cache scratch, so concurrent requests never share a buffer
    seqlens_k: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int32))
    total: np.ndarray = field(default_factory=lambda: np.zeros((), dtype=np.int32))


class OrtLLM:
    """Drives llm.onnx with a KV cache. ``session_or_path``: an onnxruntime.InferenceSession or a path to
    llm.onnx (then a CPU session is created, ``threads`` intra-op threads). ``model`` / ``graph``: the manifest's
    model sizes and llm graph description."""

    def __init__(self, session_or_path, model: ModelInfo, graph: LlmGraph, *, threads: int | None = None):
        import onnxruntime as ort

        self._ort = ort
        if graph.kind not in SUPPORTED_KINDS:
            raise ArtifactError(
                f"manifest.json: llm graph kind {graph.kind!r} is not supported by this runtime"
            )
        self.kind = graph.kind
        self.num_layers = model.num_layers
        self.num_kv_heads = model.num_kv_heads
        self.head_dim = model.head_dim
        self.hidden_size = model.hidden_size
        self.vocab_size = model.vocab_size
        self.max_positions = model.max_position_embeddings
        self.kv_dtype = np.dtype(graph.kv_dtype)
        self.names = {
            k: getattr(graph, k)
            for k in (
                "inputs_embeds",
                "seqlens_k",
                "total_sequence_length",
                "logits",
                "hidden",
                "past_key",
                "past_value",
                "present_key",
                "present_value",
            )
        }
        if isinstance(session_or_path, (str, os.PathLike)):
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = int(threads)
            try:
                session_or_path = ort.InferenceSession(
                    os.fspath(session_or_path), opts, providers=["CPUExecutionProvider"]
                )
            except Exception as err:  # onnxruntime raises its own exception types
                raise BackendError(
                    f"{os.fspath(session_or_path)}: cannot create an ONNX Runtime session: {err}"
                ) from None
        self.session = session_or_path
        n = self.names
        want = {n["inputs_embeds"]}
        if self.kind == "gqa_shared_kv":
            want |= {n["seqlens_k"], n["total_sequence_length"]}
        want |= {n[k].format(i=i) for k in ("past_key", "past_value") for i in range(self.num_layers)}
        missing = sorted(want - {i.name for i in self.session.get_inputs()})
        if missing:
            raise ArtifactError(
                f"llm.onnx does not match manifest.json graphs.llm: missing inputs {missing[:4]}"
            )
        provider = self.session.get_providers()[0]
        # KV buffers live where the attention runs: device memory when the CUDA provider runs GroupQueryAttention
        # (its CUDA kernel is fp16/bf16 only, so an fp16 artifact), host memory otherwise (CPU provider, or an fp32
        # graph whose attention ONNX Runtime places on the CPU).
        # A standard_kv graph's cache is host numpy arrays (ONNX Runtime copies them in; on the GPU that graph is
        # meant for TensorRT, legion_rt/backends/tensorrt.py).
        on_cuda = (
            provider == "CUDAExecutionProvider"
            and self.kv_dtype == np.float16
            and self.kind == "gqa_shared_kv"
        )
        self.device = "cuda" if on_cuda else "cpu"
        self.device_id = 0
        if self.device == "cuda":
            opts = self.session.get_provider_options().get(provider, {})
            self.device_id = int(opts.get("device_id", 0))
        # The GQA graph on a GPU provider can leave its ``hidden`` output on the device: the device-resident request
        # (legion_rt/device_path.py) then copies a [SEG]'s hidden state device to device into the mask head's input.
        self.can_keep_hidden_on_device = (
            provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
            and self.kind == "gqa_shared_kv"
        )
        self._provider = provider
        self.hidden_on_device = False

    # ----------------------------------------------------------------------------------------------- caches
    def new_cache(self, max_len: int) -> KVCache:
        """A zero-filled cache with room for ``max_len`` positions (prompt + max_new_tokens)."""
        max_len = int(max_len)
        if not 1 <= max_len <= self.max_positions:
            raise RequestError(
                f"KV cache length {max_len} is outside 1..{self.max_positions} "
                "(the model's max_position_embeddings)"
            )
        cache = KVCache(max_len=max_len)
        if self.kind == "standard_kv":  # grows by the graph's Concat: start with 0 positions
            empty = (1, self.num_kv_heads, 0, self.head_dim)
            cache.keys = [np.zeros(empty, self.kv_dtype) for _ in range(self.num_layers)]
            cache.values = [np.zeros(empty, self.kv_dtype) for _ in range(self.num_layers)]
            return cache
        shape = (1, self.num_kv_heads, max_len, self.head_dim)
        cuda = self._device_cuda()
        for _ in range(self.num_layers):
            for arrays, ort_values in ((cache.keys, cache.ort_keys), (cache.values, cache.ort_values)):
                if self.device == "cpu":
                    # np.zeros is lazily committed by the OS: unused capacity costs no time.
                    arr = np.zeros(shape, dtype=self.kv_dtype)
                    arrays.append(arr)
                    ort_values.append(self._ort.OrtValue.ortvalue_from_numpy(arr))  # shares arr's memory
                else:
                    value = self._ort.OrtValue.ortvalue_from_shape_and_type(
                        shape, self.kv_dtype.type, self.device, self.device_id
                    )
                    if cuda is not None:  # device memory comes uninitialized: zero it on the device
                        nbytes = math.prod(shape) * self.kv_dtype.itemsize
                        cuda.memset_async(value.data_ptr(), nbytes, self._cuda_stream)
                    else:
                        value.update_inplace(np.zeros(shape, dtype=self.kv_dtype))
                    arrays.append(None)
                    ort_values.append(value)
        if cuda is not None:
            cuda.synchronize(self._cuda_stream)  # ONNX Runtime runs on its own stream: finish before it reads
        return cache

    def clone_cache(self, cache: KVCache, max_len: int) -> KVCache:
        """A new cache of capacity ``max_len`` holding a copy of ``cache``'s filled positions (prefix reuse).
        Costs a copy of the filled positions only: on the CPU a slice copy, on a CUDA device one device-to-device
        cudaMemcpy2DAsync per layer and K/V (rows of ``length * D`` elements, one per KV head)."""
        if max_len < cache.length:
            raise RequestError(
                f"clone_cache: max_len {max_len} is smaller than the cached length {cache.length}"
            )
        new = self.new_cache(max_len)
        n = cache.length
        if self.kind == "standard_kv":
            new.keys = [np.array(k[:, :, :n]) for k in cache.keys]  # own copies: the source may grow on
            new.values = [np.array(v[:, :, :n]) for v in cache.values]
        elif self.device == "cpu":
            for src, dst in zip(cache.keys + cache.values, new.keys + new.values, strict=False):
                dst[:, :, :n, :] = src[:, :, :n, :]
        elif (cuda := self._device_cuda()) is not None:
            from .cuda_rt import prefix_copy_geometry

            geometry = prefix_copy_geometry(
                (1, self.num_kv_heads, cache.max_len, self.head_dim),
                (1, self.num_kv_heads, max_len, self.head_dim),
                n,
                self.kv_dtype.itemsize,
            )
            for src, dst in zip(
                cache.ort_keys + cache.ort_values, new.ort_keys + new.ort_values, strict=False
            ):
                cuda.copy_prefix_2d(dst.data_ptr(), src.data_ptr(), geometry, self._cuda_stream)
            cuda.synchronize(self._cuda_stream)
        else:  # no cuda-python: through the host, once per request (never per step)
            for src, dst in zip(
                cache.ort_keys + cache.ort_values, new.ort_keys + new.ort_values, strict=False
            ):
                host = np.zeros((1, self.num_kv_heads, max_len, self.head_dim), dtype=self.kv_dtype)
                host[:, :, :n, :] = src.numpy()[:, :, :n, :]
                dst.update_inplace(host)
        new.length = n
        return new

    def _device_cuda(self):
        """The CudaRuntime (cuda_rt) used for device KV buffers, with ``self._cuda_stream`` on ``device_id``;
        None on the CPU, or (with a one-time warning) when cuda-python is not installed: the caches then go
        through the host (a full-capacity upload per request)."""
        if self.device == "cpu":
            return None
        with _CUDA_INIT_LOCK:
            if not hasattr(self, "_cuda"):
                self._cuda = self._init_device_cuda()
        if self._cuda is not None:
            # cuda-python calls act on the calling thread's current device; requests may come from any thread
            self._cuda.check(self._cuda.rt.cudaSetDevice(self.device_id), f"cudaSetDevice({self.device_id})")
        return self._cuda

    def _init_device_cuda(self):
        from .cuda_rt import CudaRuntime

        try:
            cuda = CudaRuntime()
        except BackendError as err:
            import warnings

            warnings.warn(f"KV caches on the GPU go through host memory: {err}", RuntimeWarning, stacklevel=4)
            return None
        cuda.check(cuda.rt.cudaSetDevice(self.device_id), f"cudaSetDevice({self.device_id})")
        self._cuda_stream = cuda.stream_create()
        return cuda

    def keep_hidden_on_device(self) -> None:
        """From now on ``forward`` returns the hidden state as a DeviceBuffer f32 [1, H] (an OrtValue on the
        session's CUDA device, alive as long as the buffer), never copied to the host."""
        if not self.can_keep_hidden_on_device:
            raise BackendError(
                f"llm.onnx ({self.kind}) runs on {self._provider}: its hidden state cannot stay on a CUDA device"
            )
        opts = self.session.get_provider_options().get(self._provider, {})
        self.hidden_device_id = int(opts.get("device_id", 0))
        self.hidden_on_device = True

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, cache: KVCache, embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the S positions of ``embeds`` (f32 [1, S, H]) after the cache's filled positions, writing their
        K/V in place. Returns (logits f32 [V], hidden f32 [H]) of the last position; cache.length += S."""
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if (
            embeds.ndim != 3
            or embeds.shape[0] != 1
            or embeds.shape[2] != self.hidden_size
            or embeds.shape[1] < 1
        ):
            raise RequestError(f"LLM embeds shape {embeds.shape}: expected [1, S>=1, {self.hidden_size}]")
        S = embeds.shape[1]
        total = cache.length + S
        if total > cache.max_len:
            raise RequestError(
                f"KV cache overflow: {cache.length} cached + {S} new positions > capacity {cache.max_len}"
            )
        if self.kind == "standard_kv":
            return self._forward_standard(cache, embeds, total)
        cache.seqlens_k[0] = total - 1
        cache.total[...] = total
        n = self.names
        binding = self.session.io_binding()
        binding.bind_cpu_input(n["inputs_embeds"], embeds)
        binding.bind_cpu_input(n["seqlens_k"], cache.seqlens_k)
        binding.bind_cpu_input(n["total_sequence_length"], cache.total)
        for i in range(self.num_layers):
            # The same OrtValue as past input and present output: GroupQueryAttention appends in place.
            binding.bind_ortvalue_input(n["past_key"].format(i=i), cache.ort_keys[i])
            binding.bind_ortvalue_input(n["past_value"].format(i=i), cache.ort_values[i])
            binding.bind_ortvalue_output(n["present_key"].format(i=i), cache.ort_keys[i])
            binding.bind_ortvalue_output(n["present_value"].format(i=i), cache.ort_values[i])
        binding.bind_output(n["logits"], "cpu")
        if self.hidden_on_device:  # a fresh device OrtValue per call: a queued [SEG] keeps its own
            binding.bind_output(n["hidden"], "cuda", self.hidden_device_id)
        else:
            binding.bind_output(n["hidden"], "cpu")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as err:
            raise BackendError(f"llm.onnx failed at cache length {cache.length} + {S}: {err}") from None
        outs = binding.get_outputs()  # in binding order: the 2 * num_layers caches, then logits, hidden
        # own copies (V + H floats): never views into buffers ONNX Runtime may reuse
        logits = np.array(outs[-2].numpy()[0], dtype=np.float32)  # [V]
        if self.hidden_on_device:
            from .device_buffer import DeviceBuffer

            # [1, H], on the device
            hidden = DeviceBuffer.from_ortvalue(
                outs[-1], (1, self.hidden_size), np.float32, self.hidden_device_id, "hidden"
            )
        else:
            hidden = np.array(outs[-1].numpy()[0], dtype=np.float32)  # [H]
        cache.length = total
        return logits, hidden

    def _forward_standard(self, cache: KVCache, embeds: np.ndarray, total: int):
        n, L = self.names, self.num_layers
        feeds = {n["inputs_embeds"]: embeds}
        for i in range(L):
            feeds[n["past_key"].format(i=i)] = cache.keys[i]
            feeds[n["past_value"].format(i=i)] = cache.values[i]
        wanted = [n["logits"], n["hidden"]]
        wanted += [n[k].format(i=i) for i in range(L) for k in ("present_key", "present_value")]
        try:
            outs = self.session.run(wanted, feeds)
        except Exception as err:
            raise BackendError(
                f"llm.onnx failed at cache length {cache.length} + {embeds.shape[1]}: {err}"
            ) from None
        cache.keys = list(outs[2::2])
        cache.values = list(outs[3::2])
        cache.length = total
        return np.array(outs[0][0], dtype=np.float32), np.array(outs[1][0], dtype=np.float32)


def measure_ms_per_token(
    runner: OrtLLM, context: int, *, steps: int = 32, warmup: int = 4, seed: int = 0, prefill_chunk: int = 256
) -> float:
    """Median milliseconds of one decode step (S=1) with ``context`` positions already in the KV cache.

    The cache is filled with random embeddings (prefill in chunks of ``prefill_chunk``); the numbers measure the
    graph and the runner only (no sampling, no embedding lookup). Used by tests and benchmarks/e2e.py to check
    that a step does not grow with copies of the whole cache (ratio of context 1024 to 128)."""
    import time

    rng = np.random.default_rng(seed)
    H = runner.hidden_size
    cache = runner.new_cache(context + warmup + steps)
    filled = 0
    while filled < context:
        s = min(prefill_chunk, context - filled)
        runner.forward(cache, rng.standard_normal((1, s, H), dtype=np.float32))
        filled += s
    token = rng.standard_normal((1, 1, H), dtype=np.float32)
    for _ in range(warmup):
        runner.forward(cache, token)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.forward(cache, token)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


def decode_context_ratio(
    runner: OrtLLM, short: int = 128, long: int = 1024, *, repeats: int = 3, steps: int = 24
) -> dict:
    """ms/token at ``short`` and ``long`` context, each the best of ``repeats`` interleaved measurements (a
    shared machine's load spikes hit single runs, not the minimum), and their ratio.

    Returns {"ms_short": float, "ms_long": float, "ratio": ms_long / ms_short, "short": short, "long": long}.
    Attention itself reads every cached position, so the ratio is above 1 by the KV bytes read per step
    relative to the weights; what must not happen is a copy of the whole cache per step."""
    best = {short: float("inf"), long: float("inf")}
    for r in range(repeats):
        for ctx in (short, long):
            best[ctx] = min(best[ctx], measure_ms_per_token(runner, ctx, steps=steps, seed=r))
    return {
        "ms_short": best[short],
        "ms_long": best[long],
        "ratio": best[long] / best[short],
        "short": short,
        "long": long,
    }
