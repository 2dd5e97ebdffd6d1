"""ONNX Runtime backend: one InferenceSession per graph of the artifact directory.

Session options: ``intra_op_num_threads`` = ``threads`` (None: ORT default), graph optimization ORT_ENABLE_ALL,
sequential execution. Providers by short name: "cpu" -> CPUExecutionProvider, "cuda" -> CUDAExecutionProvider,
"tensorrt" -> TensorrtExecutionProvider (ORT's TensorRT provider, not the native TensorRT backend).

No silent fallback: a provider asked for by name that this onnxruntime build lacks, or that a session did not
actually take (ORT quietly falls back to CPU when e.g. the CUDA libraries fail to load), raises ``BackendError``.
With ``auto=True`` and no ``providers`` the best available set is tried (CUDA when present, else CPU) and what
runs is reported in ``providers``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BackendError, RequestError

if TYPE_CHECKING:  # pragma: no cover
    from ..artifacts import ArtifactDir

SHORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# ONNX Runtime >= 1.20: the first release whose CPU GroupQueryAttention is right for several new positions over a
# cached prefix (every request: prompt prefix cached, then 576+ image positions). 1.18 and 1.19 run such a call but
# return wrong values (max logit error 0.04 on a 2-layer model where 1.20+ agree with PyTorch to 5e-7; measured with
# llm.onnx of tests/test_ort_llm.py under onnxruntime 1.17.3 .. 1.22.0); 1.17 has no float32 CPU kernel at all.
MIN_ORT = (1, 20)
# PyPI distributions that all install the one `onnxruntime` module: only one of them may be installed.
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-training",
)


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError(
            f"onnxruntime is not installed ({e}); pip install 'legion_rt[cpu]' (CPU) or 'legion_rt[gpu]' "
            "(NVIDIA GPU), not both"
        ) from None
    check_ort_version(ort)
    return ort


def check_ort_version(ort) -> None:
    version = str(getattr(ort, "__version__", "0"))
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_ORT:
        raise BackendError(
            f"onnxruntime {version} is too old: legion_rt needs >= {MIN_ORT[0]}.{MIN_ORT[1]} (older GroupQueryAttention "
            "gives wrong results when new positions follow a cached prefix); pip install -U 'legion_rt[cpu]' or "
            "'legion_rt[gpu]'"
        )


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_ort_distributions() -> dict[str, str]:
    """The ONNX Runtime distributions pip has installed here: {name: version}."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        version = _dist_version(name)
        if version is not None:
            found[name] = version
    return found


def install_problem(available: list[str], *, want_cuda: bool) -> str | None:
    """What is wrong with the ONNX Runtime installation, with the fix, or None. Several distributions installed
    overwrite each other's `onnxruntime` module (the CPU wheel installed after onnxruntime-gpu removes the CUDA
    provider without a word); with ``want_cuda``, also the CPU-only build installed."""
    dists = installed_ort_distributions()
    if len(dists) > 1:
        listed = ", ".join(f"{n} {v}" for n, v in dists.items())
        return (
            f"several ONNX Runtime packages are installed ({listed}); they overwrite each other's `onnxruntime` "
            f"module, so a provider can silently disappear: pip uninstall -y {' '.join(dists)} && pip install "
            "'legion_rt[gpu]' (NVIDIA GPU) or 'legion_rt[cpu]'"
        )
    if want_cuda and "CUDAExecutionProvider" not in available:
        if "onnxruntime-gpu" in dists:
            return (
                "onnxruntime-gpu is installed but its CUDA provider is missing from this build "
                f"(available: {', '.join(available)}): reinstall it (pip install --force-reinstall onnxruntime-gpu)"
            )
        if dists:
            return (
                f"the installed ONNX Runtime ({', '.join(dists)}) has no CUDA provider: pip uninstall -y "
                f"{' '.join(dists)} && pip install 'legion_rt[gpu]'"
            )
    return None


def resolve_providers(providers) -> list[str]:
    """Short or full provider names -> full ORT names, checked against this onnxruntime build."""
    ort = _import_ort()
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    if not providers:
        raise RequestError("providers: give at least one of cpu, cuda, tensorrt")
    available = ort.get_available_providers()
    out = []
    for p in providers:
        full = SHORT_NAMES.get(str(p).lower(), str(p))
        if full not in SHORT_NAMES.values():
            raise RequestError(f"provider {p!r}: unknown (use {', '.join(SHORT_NAMES)})")
        if full not in available:
            problem = install_problem(available, want_cuda=full != "CPUExecutionProvider")
            raise BackendError(
                f"provider {p!r} ({full}) is not available in this onnxruntime build "
                f"(available: {', '.join(available)})" + (f"; {problem}" if problem else "")
            )
        out.append(full)
    return out


def session_options(threads: int | None, *, spinning: bool = True):
    """``spinning``: whether idle intra-op threads busy-wait for the next run (ORT's default). Good for the LLM's
    back-to-back decode steps; bad for graphs that run concurrently with it (they would burn the cores the
    decode needs), so those get ``spinning=False``."""
    ort = _import_ort()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


# Graph-level fusions turned off per graph on the CPU provider, because they are slower there. SkipLayerNormFusion
# in mask_head: it fuses the mask decoder's residual add + LayerNorm over the 4096 image positions into
# SkipLayerNormalization, which ran slower than Add + LayerNormalization (measured 2026-11-28, small model,
# 2 threads, interleaved runs: 35.5 -> 30.8 ms per [SEG] best-of, 125.6 -> 112.3 ms median under load; outputs
# differ by 2.4e-7, well inside the export's verification rule, which checks the graph with the same setting).
# No change for sam_encoder / vision (measured, identical bits); llm.onnx is hand-built with its fused ops.
CPU_DISABLED_OPTIMIZERS = {"mask_head": ["SkipLayerNormFusion"]}


def disabled_optimizers(graph: str, providers: list[str]) -> list[str]:
    """ORT optimizers to disable for ``graph`` when it runs on ``providers`` (full names, first = main)."""
    if providers and providers[0] != "CPUExecutionProvider":
        return []
    return list(CPU_DISABLED_OPTIMIZERS.get(graph, []))


# Graphs whose runs give ONNX Runtime's CPU arena back at the end of each run (run option
# memory.enable_memory_arena_shrinkage). Measured on the 7B-shaped SAM ViT-H encoder (2 threads, 2026-12-07): with
# the arena kept, the process grew from 2.6 GB to 7.1 GB after one run and 11.6 GB after the second (the arena
# extends by powers of two and keeps it all); with shrinkage it returns to 2.7 GB after each run, same peak (7.1 GB)
# and same time (27 s). The Engine's peak RSS over two requests of the 7B-shaped int4 artifacts went from 20.1 to
# 16.1 GB (benchmarks/README.md, "The released sizes"). The LLM keeps its arena: its decode steps reuse the same
# small buffers back to back.
SHRINK_ARENA_GRAPHS = ("vision", "sam_encoder")
# Providers whose sessions read and write CUDA device memory: graphs on them can be bound to device buffers.
DEVICE_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# ONNX type strings of the graph inputs the device path binds -> numpy dtype of the buffer it must give.
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


def _provider_list(full_names: list[str]) -> list:
    """ORT provider list with options; CPU is appended last so ops a GPU provider lacks still run."""
    out: list = []
    for name in full_names:
        if name == "TensorrtExecutionProvider":
            cache = Path(os.environ.get("LEGION_RT_CACHE", Path.home() / ".cache" / "legion_rt")) / "ort_trt"
            out.append((name, {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache)}))
        else:
            out.append(name)
    if "CPUExecutionProvider" not in full_names:
        out.append("CPUExecutionProvider")
    return out


class OnnxRuntimeBackend:
    """Sessions for vision, sam_encoder, mask_head and llm (the latter driven by OrtLLM)."""

    name = "onnxruntime"
    # Each session runs on ONNX Runtime's own CUDA stream and returns when its outputs are written: a caller that
    # wrote an input buffer on its stream synchronizes that stream first (device_path.DevicePath._ready_for).
    runs_on_caller_stream = False

    def __init__(
        self,
        art: ArtifactDir,
        *,
        threads: int | None = None,
        providers=None,
        auto: bool = False,
        graphs: tuple[str, ...] = ("vision", "sam_encoder", "mask_head", "llm"),
    ):
        ort = _import_ort()
        self._ort = ort
        self.threads = threads
        self._graphs = tuple(graphs)
        if providers is None:
            available = ort.get_available_providers()
            problem = install_problem(
                available, want_cuda=auto and "onnxruntime-gpu" in installed_ort_distributions()
            )
            if problem:  # "auto" would quietly run on the CPU: say why
                import warnings

                warnings.warn(f"ONNX Runtime: {problem}", RuntimeWarning, stacklevel=3)
            wanted = ["CUDAExecutionProvider"] if (auto and "CUDAExecutionProvider" in available) else []
            wanted.append("CPUExecutionProvider")
            strict = False
        else:
            wanted = resolve_providers(providers)
            strict = True
        try:
            self._sessions = self._open_all(art, wanted, strict=strict)
        except BackendError:
            if strict or wanted == ["CPUExecutionProvider"]:
                raise
            # "auto" only: the GPU provider is compiled in but cannot start here (no device / libraries).
            wanted = ["CPUExecutionProvider"]
            self._sessions = self._open_all(art, wanted, strict=True)
        self.providers = list(self._sessions["llm"].get_providers())
        if "vision" in self._sessions:
            vis = self._sessions["vision"]
            self._vision_in = vis.get_inputs()[0].name
            outs = [o.name for o in vis.get_outputs()]
            self._vision_out = ["image_embeds"] + (["cls_logits"] if "cls_logits" in outs else [])
        if "sam_encoder" in self._sessions:
            self._sam_in = self._sessions["sam_encoder"].get_inputs()[0].name
            self._sam_out = self._sessions["sam_encoder"].get_outputs()[0].name
        if "mask_head" in self._sessions:
            self._mask_out = self._sessions["mask_head"].get_outputs()[0].name
        self._input_types = {g: {i.name: i.type for i in s.get_inputs()} for g, s in self._sessions.items()}
        self._run_options = {
            g: self._shrinking_run() if g in SHRINK_ARENA_GRAPHS else None for g in self._sessions
        }
        self.device_id = 0
        if self.providers[0] in DEVICE_PROVIDERS:
            opts = self._sessions["llm"].get_provider_options().get(self.providers[0], {})
            self.device_id = int(opts.get("device_id", 0))

        from .ort_llm import OrtLLM

        self.llm = OrtLLM(self._sessions["llm"], art.manifest.model, art.manifest.graphs.llm)

    def _shrinking_run(self):
        """RunOptions that give the CPU arena's memory back when the run ends (SHRINK_ARENA_GRAPHS)."""
        ro = self._ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return ro

    @staticmethod
    def _spin(graph: str) -> bool:
        mode = os.environ.get("LEGION_RT_SPIN", "llm")  # "all" | "llm" | "none" (experiments)
        return mode == "all" or (mode == "llm" and graph == "llm")

    def _open_all(self, art: ArtifactDir, wanted: list[str], *, strict: bool) -> dict:
        sessions = {}
        for graph in self._graphs:
            path = art.graph_path(graph)
            try:
                sess = self._ort.InferenceSession(
                    os.fspath(path),
                    session_options(self.threads, spinning=self._spin(graph)),
                    providers=_provider_list(wanted),
                    disabled_optimizers=disabled_optimizers(graph, wanted),
                )
            except Exception as e:  # onnxruntime raises its own (non-Python-standard) exception types
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BackendError(f"{path}: cannot create an ONNX Runtime session ({msg})") from None
            got = sess.get_providers()
            if got[0] != wanted[0]:
                raise BackendError(
                    f"{path}: provider {wanted[0]} was asked for but the session runs on {got[0]} "
                    "(the provider could not start here)"
                )
            sessions[graph] = sess
        return sessions

    def vision(self, clip_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outs = self._sessions["vision"].run(
            self._vision_out, {self._vision_in: clip_pixels}, self._run_options["vision"]
        )
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def sam_encoder(self, sam_pixels: np.ndarray) -> np.ndarray:
        return self._sessions["sam_encoder"].run(
            [self._sam_out], {self._sam_in: sam_pixels}, self._run_options["sam_encoder"]
        )[0]

    def mask_head(self, seg_hidden: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        feeds = {
            "seg_hidden": np.ascontiguousarray(seg_hidden, dtype=np.float32),
            "image_embeddings": np.ascontiguousarray(embedding, dtype=np.float32),
        }
        return self._sessions["mask_head"].run([self._mask_out], feeds)[0]

    # ----------------------------------------------------------------------------- device buffers (IOBinding)
    @property
    def device_io(self) -> bool:
        """Whether the graphs can be bound to CUDA device buffers: the sessions run on the CUDA / TensorRT
        provider. The SAM encoder is a session of its own, so it runs on its own ONNX Runtime stream, concurrently
        with the LLM session's decode steps (called from the SAM pool thread)."""
        return bool(self.providers) and self.providers[0] in DEVICE_PROVIDERS

    def _bound_run(
        self, graph: str, inputs: dict, outputs: dict, host_outputs: list[str]
    ) -> list[np.ndarray]:
        """Run ``graph`` with device buffers bound as ``inputs`` / ``outputs`` ({name: DeviceBuffer}); the outputs
        named in ``host_outputs`` come back as host arrays, the device outputs are never copied."""
        sess = self._sessions[graph]
        types = self._input_types[graph]
        binding = sess.io_binding()
        for name, buf in inputs.items():
            want = ORT_TYPES.get(types.get(name, ""))
            if want is None or np.dtype(want) != buf.dtype:
                raise BackendError(
                    f"{graph}.onnx input {name} is {types.get(name, 'not an input')}: cannot bind the device buffer "
                    f"{buf.name} ({buf.dtype} {list(buf.shape)})"
                )
            binding.bind_input(name, device_type="cuda", device_id=buf.device_id, element_type=buf.dtype.type,
                               shape=buf.shape, buffer_ptr=buf.ptr)  # fmt: skip
        for name, buf in outputs.items():
            binding.bind_output(name, device_type="cuda", device_id=buf.device_id, element_type=buf.dtype.type,
                                shape=buf.shape, buffer_ptr=buf.ptr)  # fmt: skip
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        try:
            sess.run_with_iobinding(binding, self._run_options.get(graph))
        except Exception as e:  # onnxruntime raises its own exception types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"{graph}.onnx failed on device buffers ({msg})") from None
        values = binding.get_outputs()  # in binding order: the device outputs, then the host ones
        return [values[len(outputs) + i].numpy() for i in range(len(host_outputs))]

    def vision_device(self, clip, stream=None) -> tuple[np.ndarray, np.ndarray | None]:
        """clip pixels DeviceBuffer f32 [1, 3, 336, 336] -> (image_embeds f32 [1, 576, H], cls_logits | None)."""
        del stream  # ONNX Runtime's own stream (see runs_on_caller_stream)
        outs = self._bound_run("vision", {self._vision_in: clip}, {}, self._vision_out)
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def sam_encoder_device(self, pixels, out, stream=None) -> None:
        """SAM pixels DeviceBuffer f32 [1, 3, 1024, 1024] -> ``out`` f32 [1, 256, 64, 64], written on the device."""
        del stream
        self._bound_run("sam_encoder", {self._sam_in: pixels}, {self._sam_out: out}, [])

    def mask_head_device(self, seg_hidden, embedding, out, stream=None) -> None:
        """seg_hidden f32 [N, H], embedding f32 [1, 256, 64, 64] -> ``out`` low-res masks f32 [N, 256, 256]."""
        del stream
        feeds = {"seg_hidden": seg_hidden, "image_embeddings": embedding}
        self._bound_run("mask_head", feeds, {self._mask_out: out}, [])
