"""``legion_rt.Engine``: one artifact directory, many requests (public API: docs/CONTRACT.md "Python").

The Engine holds what requests share: the verified artifact directory and its typed manifest, the backend's
graph sessions, the embedding table (memory-mapped), the detokenizer, the prompt prefix's KV cache (computed once)
and two worker pools (SAM encoder, mask jobs). Each ``analyze`` / ``stream`` call makes one ``Request``
(legion_rt/request.py), whose stages run in data-flow order: preprocess, vision (+ detect-first gate), prefill,
decode steps, masks, finish.

``timings["masks"]`` is the time spent in the mask jobs (mask head + upsampling), summed; the jobs overlap with
decoding, so stage times may add up to more than ``total``. Extra keys: ``time_to_first_token``,
``time_to_first_mask`` (from the start of the request; NaN without masks), ``ms_per_token`` (decode steps only),
``wait_masks`` (time after the last token spent waiting for masks), ``decode_tokens``.

Admission (``max_concurrency`` / ``max_queue``) and deadlines (``timeout_s``): legion_rt/admission.py.

Thread safety: ONNX Runtime sessions are safe to ``run`` concurrently; each request has its own KV cache (a clone
of the shared, read-only prefix cache), its own sampler and its own text stream, so concurrent calls give the
same results as sequential ones.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .admission import Admission
from .artifacts import ArtifactDir, load_artifacts, sha256_file
from .decode import DecodeOptions
from .detokenizer import Detokenizer
from .errors import ArtifactError, ImageError, RequestError
from .image import DEFAULT_MAX_PIXELS, describe, load_image
from .request import STAGES as _STAGES  # noqa: F401  (kept importable from here)
from .request import Request
from .result import Artifact, DoneEvent, MaskEvent, Result, TokenEvent

__all__ = ["Artifact", "DoneEvent", "Engine", "MaskEvent", "Request", "Result", "TokenEvent"]


class Engine:
    """Loads and verifies an artifact directory, opens the backend, caches the prompt prefix's KV.

    ``backend``: "auto" | "onnxruntime" | "tensorrt"; ``threads``: intra-op threads per graph session and native
    kernel threads (None: library defaults); ``providers``: ONNX Runtime providers by name ("cpu", "cuda",
    "tensorrt"), an unavailable one raises BackendError; ``verify``: "full" (sha256 of every file, default),
    "size" or "none"; ``max_pixels``: input pictures over this many pixels are refused before decoding.
    ``sam_start``: when the SAM encoder starts, concurrently with the rest: "early" (with the vision pass),
    "after_prefill" (with the decode loop; the first token does not share the cores with it) or "auto" (early
    when the machine has at least 2 x ``threads`` cores, else after the prefill). It never delays a token.
    ``max_concurrency`` / ``max_queue``: at most N requests run and M wait (FIFO); one more raises ``BusyError``
    (None: no limit). ``engine.backend_name`` / ``engine.providers`` report what actually runs.
    """

    def __init__(
        self,
        artifacts: str | os.PathLike,
        backend: str = "auto",
        *,
        threads: int | None = None,
        providers: list[str] | str | None = None,
        verify: str = "full",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        mask_workers: int = 1,
        sam_start: str = "auto",
        max_concurrency: int | None = None,
        max_queue: int | None = None,
        max_memory: int | None = None,
    ):
        self.art: ArtifactDir = load_artifacts(
            artifacts, verify=verify
        )  # first: a bad ART fails before anything

        from . import ops
        from .backends import create_backend

        self.max_pixels = int(max_pixels)
        self.threads = threads
        if sam_start not in ("auto", "early", "after_prefill"):
            raise RequestError(f"sam_start={sam_start!r}: must be auto, early or after_prefill")
        if sam_start == "auto":
            # Early start only pays when the SAM encoder gets cores of its own; on a small machine it slows the
            # vision pass and the prefill (measured on 2 cores: first token 0.67 s early vs 0.24 s after the
            # prefill, same total) while the first mask comes only 0.14 s sooner.
            cores = os.cpu_count() or 1
            sam_start = "early" if threads is not None and cores >= 2 * int(threads) else "after_prefill"
        self.sam_start = sam_start
        self._admission = Admission(max_concurrency, max_queue)
        # bytes one request may use: weights + activation estimate + its KV cache (legion_rt/memory_plan.py)
        self.max_memory = None if max_memory is None else int(max_memory)
        self._ops = ops
        self._backend = create_backend(self.art, backend, threads=threads, providers=providers)
        # CUDA pre/post-processing when the graphs run on the GPU (legion_rt/device_path.py); else legion_rt.ops
        from .device_path import select_ops

        self._ops, self.kernel_path = select_ops(self._backend, ops, self.art.manifest)
        # device-resident requests (graphs bound to device buffers) when the choice says so; else None
        self._device = self._ops if self.kernel_path.resident else None
        self.backend_name = self._backend.name
        self.providers = list(self._backend.providers)

        m = self.manifest = self.art.manifest
        self.eos_id = m.tokens.eos
        self.seg_id = m.tokens.seg
        self.prefix_ids = list(m.prompt.prefix_ids)
        self.suffix_ids = list(m.prompt.suffix_ids)
        self.num_image_tokens = m.model.num_image_tokens
        self.max_positions = m.model.max_position_embeddings
        self.hidden_size = m.model.hidden_size
        self.has_detector = m.detector
        self.prompt_length = m.prompt_length
        self._pre_kwargs = m.preprocess.kwargs()
        mpath = self.art.root / "manifest.json"
        self.model_identity = {"name": m.model.name, "manifest_sha256": sha256_file(mpath)}

        table_path = self.art.path("embed_tokens.npy")
        try:
            self._embed_table = np.load(table_path, mmap_mode="r")  # [V, H], f32 or f16, paged in on demand
        except Exception as e:
            raise ArtifactError(f"{table_path}: cannot read the embedding table ({e})") from None
        if self._embed_table.shape != (m.model.vocab_size, self.hidden_size):
            raise ArtifactError(
                f"{table_path}: shape {self._embed_table.shape}, expected [{m.model.vocab_size}, {self.hidden_size}]"
            )
        self.detok = Detokenizer.from_dir(self.art.root)

        # The image-independent prompt prefix (system prompt, "USER: The <im_start>") is the same for every
        # request: run it once; requests clone its KV rows.
        llm = self._backend.llm
        self._prefix_cache = llm.new_cache(len(self.prefix_ids))
        llm.forward(self._prefix_cache, self._embed_ids(self.prefix_ids))

        # SAM encoder jobs never wait on anything; mask jobs wait on SAM futures: separate pools, no deadlock.
        self._sam_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="legion-sam")
        self._mask_pool = ThreadPoolExecutor(
            max_workers=max(1, int(mask_workers)), thread_name_prefix="legion-mask"
        )
        self._closed = False

    # ---------------------------------------------------------------------------------------------- public
    @property
    def running_requests(self) -> int:
        """Requests admitted and not finished (for metrics)."""
        return self._admission.running

    @property
    def queued_requests(self) -> int:
        """Requests waiting for a slot (for metrics)."""
        return self._admission.waiting

    def analyze(self, image: Any, **options: Any) -> Result:
        """Run one picture to completion; same options as ``stream``. Returns the ``Result``."""
        req = self.request(image, **options)
        try:
            for ev in req:
                if isinstance(ev, DoneEvent):
                    return ev.result
        finally:
            req.close()
        raise RequestError("the request was cancelled before it finished")  # only via Request.cancel()

    def request(
        self,
        image: Any,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        skip_if_real: float | None = None,
        ignore_eos: bool = False,
        timeout_s: float | None = None,
        color_order: str = "rgb",
    ) -> Request:
        """Make one ``Request``: an iterator of events, ``TokenEvent`` per generated token, ``MaskEvent`` per [SEG]
        as soon as its mask is ready (in [SEG] order), then ``DoneEvent(result)``. ``stream`` is this same call.
        Closing it early (``close()``, or dropping it) cancels the request and frees its memory; ``cancel()``
        stops it from another thread.

        ``image``: path, bytes, PIL.Image or RGB uint8 [H, W, 3]. ``max_new_tokens`` >= 1 (prompt + new tokens
        must fit the model's positions). ``temperature`` 0 = greedy (the reference's rule); > 0 samples with
        ``top_p`` and ``seed``. ``skip_if_real`` in [0, 1] (detect-first gating, off by default): when the
        detector's P(real) >= skip_if_real the LLM is not run; the result has the verdict only. ``ignore_eos``:
        keep generating after EOS (benchmarks). ``timeout_s`` > 0: past that many seconds from this call (the
        wait for an admission slot included) the request stops and raises ``DeadlineError``. ``color_order``:
        "rgb" (default) or "bgr" for an ndarray ``image`` (e.g. a frame from OpenCV); other inputs ignore it.
        Raises ImageError (bad picture), RequestError (bad option), BusyError (queue full) or DeadlineError
        (no slot in time) here, before any model work is done.
        """
        t0 = time.perf_counter()
        opts = DecodeOptions(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            ignore_eos=ignore_eos,
        ).validate(prompt_len=self.prompt_length, max_positions=self.max_positions)
        if self.max_memory is not None:
            from .memory_plan import check_request_memory

            check_request_memory(self.art.root, opts.max_new_tokens, self.max_memory)
        if skip_if_real is not None:
            if isinstance(skip_if_real, bool) or not isinstance(skip_if_real, (int, float)):
                raise RequestError(f"skip_if_real={skip_if_real!r}: must be a number in [0, 1] or None")
            if not 0.0 <= float(skip_if_real) <= 1.0:
                raise RequestError(f"skip_if_real={skip_if_real!r}: must be in [0, 1]")
            if not self.has_detector:
                raise RequestError("skip_if_real: these artifacts have no detector (export with --detector)")
        deadline = None
        if timeout_s is not None:
            if (
                isinstance(timeout_s, bool)
                or not isinstance(timeout_s, (int, float))
                or not float(timeout_s) > 0
                or timeout_s == float("inf")
            ):
                raise RequestError(f"timeout_s={timeout_s!r}: must be a finite number of seconds > 0 or None")
            deadline = t0 + float(timeout_s)
        if self._closed:
            raise RequestError("this Engine is closed")
        # Decode the picture eagerly so a bad image raises here, at the call, not at the first next().
        rgb = load_image(image, max_pixels=self.max_pixels, color_order=color_order)
        # SAM's ResizeLongestSide rounds the short side to 0 pixels past ~2048:1; the reference fails there too.
        h, w, sam = int(rgb.shape[0]), int(rgb.shape[1]), int(self._pre_kwargs["sam_size"])
        scale = sam * 1.0 / max(h, w)  # segment-anything's get_preprocess_shape, float64 as in the reference
        if int(h * scale + 0.5) < 1 or int(w * scale + 0.5) < 1:
            raise ImageError(
                f"{describe(image)}: {w}x{h} is too elongated (its short side scales to 0 of {sam} px)"
            )
        self._admission.acquire(deadline, clock=time.perf_counter)
        name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
        return Request(
            self,
            rgb,
            opts,
            skip_if_real=skip_if_real,
            t0=t0,
            deadline=deadline,
            timeout_s=timeout_s,
            release=self._admission.release,
            image_name=name if isinstance(name, str) else None,
        )

    # ``stream`` is the same call: "yield TokenEvent per generated token, MaskEvent per [SEG] as soon as its mask is
    # ready (in [SEG] order), then DoneEvent(result)"; closing the iterator early cancels the request.
    stream = request

    def classify(self, images: Any, *, batch_size: int = 8, color_order: str = "rgb") -> list:
        """Verdicts only, batched (vision graph + detector head; no LLM, no SAM): one ``Classification`` per
        picture, equal to ``analyze``'s verdict and probability. See legion_rt/classify.py."""
        from .classify import classify

        return classify(self, images, batch_size=batch_size, color_order=color_order)

    def watch(self, source: Any, **options: Any):
        """Analyze a video, camera, URL, frame directory or iterable of frames: yields one ``FrameResult`` per
        frame considered. See legion_rt/watch.py for the options."""
        from .watch import watch

        return watch(self, source, **options)

    def close(self) -> None:
        """Stop the worker pools (pending jobs finish first)."""
        self._closed = True
        self._sam_pool.shutdown(wait=True)
        self._mask_pool.shutdown(wait=True)
        if hasattr(self._ops, "close"):  # DeviceOps: its device buffers
            self._ops.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- internals
    def _embed_ids(self, ids: list[int]) -> np.ndarray:
        """ids -> f32 [1, len(ids), H] rows of the embedding table."""
        rows = self._embed_table[np.asarray(ids, dtype=np.int64)]
        return np.ascontiguousarray(rows, dtype=np.float32)[None]

    def _preprocess(self, rgb: np.ndarray):
        kw = dict(self._pre_kwargs)
        if self.threads:
            kw["num_threads"] = int(self.threads)
        return self._ops.preprocess(rgb, **kw)

    def _preprocess_device(self, rgb: np.ndarray):
        """Device path: the picture's CLIP and SAM pixels in device buffers (a device_path.RequestDevice)."""
        return self._device.start_request(rgb, **self._pre_kwargs)
