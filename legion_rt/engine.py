"""``legion_rt.Engine``: one artifact directory, many requests (public API: /work/shared/CONTRACT.md).

One request (``analyze`` / ``stream``):

```
image -> load_image (cv2.imread-exact) -> ops.preprocess (native)          "preprocess"
      -> vision graph: image embeds [1,576,H] + detector logits [1,2]       "vision"
         (detect-first gate: verdict alone when P(real) >= skip_if_real)
      -> clone the cached prompt-prefix KV, prefill 576 image embeds + suffix ids           "prefill"
      -> SAM encoder in its own thread, started with the vision pass or right after the prefill (``sam_start``);
         it runs while decoding goes on and is awaited only by the first mask              "sam_encoder"
      -> decode loop (greedy / sampled), one position per step, KV written in place          "decode"
         each [SEG]: its hidden state goes to the mask pool at once (waits for the SAM embedding there),
         mask head + ops.postprocess_masks -> MaskEvent as soon as ready, in [SEG] order      "masks"
      -> text: decode(prompt ids + generated ids), reference post-processing, phrase pairing
      -> DoneEvent(Result)
```
``timings["masks"]`` is the time spent in the mask jobs (mask head + upsampling), summed; the jobs overlap with
decoding, so stage times may add up to more than ``total``. Extra keys: ``time_to_first_token``,
``time_to_first_mask`` (from the start of the request; NaN without masks), ``ms_per_token`` (decode steps only),
``wait_masks`` (time after the last token spent waiting for masks), ``decode_tokens``.

Thread safety: ONNX Runtime sessions are safe to ``run`` concurrently; each request has its own KV cache (a clone
of the shared, read-only prefix cache), its own sampler and its own text stream, so concurrent calls give the
same results as sequential ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .artifacts import Artifacts, load_artifacts
from .decode import DecodeOptions, generate
from .errors import ArtifactError, ImageError, RequestError
from .image import DEFAULT_MAX_PIXELS, describe, load_image
from .result import Artifact, DoneEvent, MaskEvent, Result, TokenEvent
from .text import Detokenizer, pair_phrases, postprocess_text

# ------------------------------------------------------------------------------------------------- engine

_STAGES = ("preprocess", "vision", "sam_encoder", "prefill", "decode", "masks", "total")


class Engine:
    """Loads and verifies an artifact directory, opens the backend, caches the prompt prefix's KV.

    ``backend``: "auto" | "onnxruntime" | "tensorrt"; ``threads``: intra-op threads per graph session and native
    kernel threads (None: library defaults); ``providers``: ONNX Runtime providers by name ("cpu", "cuda",
    "tensorrt"), an unavailable one raises BackendError; ``verify``: "full" (sha256 of every file, default),
    "size" or "none"; ``max_pixels``: input pictures over this many pixels are refused before decoding.
    ``sam_start``: when the SAM encoder starts, concurrently with the rest: "early" (with the vision pass),
    "after_prefill" (with the decode loop; the first token does not share the cores with it) or "auto" (early
    when the machine has at least 2 x ``threads`` cores, else after the prefill). It never delays a token.
    ``engine.backend_name`` / ``engine.providers`` report what actually runs.
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
    ):
        self.art: Artifacts = load_artifacts(
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
        self._ops = ops
        self._backend = create_backend(self.art, backend, threads=threads, providers=providers)
        self.backend_name = self._backend.name
        self.providers = list(self._backend.providers)
        m = self.art.manifest
        try:
            tok = m["tokens"]
            self.eos_id = int(tok["eos"])
            self.seg_id = int(tok["seg"])
            self.prefix_ids = [int(i) for i in m["prompt"]["prefix_ids"]]
            self.suffix_ids = [int(i) for i in m["prompt"]["suffix_ids"]]
            self.num_image_tokens = int(m["model"].get("num_image_tokens", 576))
            self.max_positions = int(m["model"]["max_position_embeddings"])
            self.hidden_size = int(m["model"]["hidden_size"])
            self._pre_kwargs = _preprocess_kwargs(m["preprocess"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{self.art.root / 'manifest.json'}: incomplete or invalid ({e!r})") from None
        self.has_detector = bool(m.get("detector", False))
        self.prompt_length = len(self.prefix_ids) + self.num_image_tokens + len(self.suffix_ids)

        table_path = self.art.path("embed_tokens.npy")
        try:
            self._embed_table = np.load(table_path, mmap_mode="r")  # [V, H], f32 or f16, paged in on demand
        except Exception as e:
            raise ArtifactError(f"{table_path}: cannot read the embedding table ({e})") from None
        if self._embed_table.ndim != 2 or self._embed_table.shape[1] != self.hidden_size:
            raise ArtifactError(
                f"{table_path}: shape {self._embed_table.shape}, expected [V, {self.hidden_size}]"
            )
        vocab = int(self._embed_table.shape[0])
        for what, ids in (
            ("prompt.prefix_ids", self.prefix_ids),
            ("prompt.suffix_ids", self.suffix_ids),
            ("tokens.eos/seg", [self.eos_id, self.seg_id]),
        ):
            bad = [i for i in ids if not 0 <= i < vocab]  # a negative id would silently index from the end
            if bad:
                raise ArtifactError(
                    f"{self.art.root / 'manifest.json'}: {what} has token id {bad[0]} outside [0, {vocab})"
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
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------- public
    def analyze(self, image: Any, **options: Any) -> Result:
        """Run one picture to completion; same options as ``stream``. Returns the ``Result``."""
        result = None
        for ev in self.stream(image, **options):
            if isinstance(ev, DoneEvent):
                result = ev.result
        assert result is not None
        return result

    def stream(
        self,
        image: Any,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        skip_if_real: float | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[TokenEvent | MaskEvent | DoneEvent]:
        """Yield ``TokenEvent`` per generated token, ``MaskEvent`` per [SEG] as soon as its mask is ready (in
        [SEG] order), then ``DoneEvent(result)``.

        ``image``: path, bytes, PIL.Image or RGB uint8 [H, W, 3]. ``max_new_tokens`` >= 1 (prompt + new tokens
        must fit the model's positions). ``temperature`` 0 = greedy (the reference's rule); > 0 samples with
        ``top_p`` and ``seed``. ``skip_if_real`` in [0, 1] (detect-first gating, off by default): when the
        detector's P(real) >= skip_if_real the LLM is not run; the result has the verdict only. ``ignore_eos``:
        keep generating after EOS (benchmarks).
        Raises ImageError (bad picture) or RequestError (bad option) before any work is done.
        """
        opts = DecodeOptions(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            ignore_eos=ignore_eos,
        ).validate(prompt_len=self.prompt_length, max_positions=self.max_positions)
        if skip_if_real is not None:
            if isinstance(skip_if_real, bool) or not isinstance(skip_if_real, (int, float)):
                raise RequestError(f"skip_if_real={skip_if_real!r}: must be a number in [0, 1] or None")
            if not 0.0 <= float(skip_if_real) <= 1.0:
                raise RequestError(f"skip_if_real={skip_if_real!r}: must be in [0, 1]")
            if not self.has_detector:
                raise RequestError("skip_if_real: these artifacts have no detector (export with --detector)")
        if self._closed:
            raise RequestError("this Engine is closed")
        # Decode the picture eagerly so a bad image raises here, at the call, not at the first next().
        clock = time.perf_counter
        t0 = clock()
        rgb = load_image(image, max_pixels=self.max_pixels)
        # SAM's ResizeLongestSide rounds the short side to 0 pixels past ~2048:1; the reference fails there too.
        h, w, sam = int(rgb.shape[0]), int(rgb.shape[1]), int(self._pre_kwargs["sam_size"])
        scale = sam * 1.0 / max(h, w)  # segment-anything's get_preprocess_shape, float64 as in the reference
        if int(h * scale + 0.5) < 1 or int(w * scale + 0.5) < 1:
            raise ImageError(
                f"{describe(image)}: {w}x{h} is too elongated (its short side scales to 0 of {sam} px)"
            )
        return self._run(rgb, opts, skip_if_real, t0)

    def close(self) -> None:
        """Stop the worker pools (pending jobs finish first)."""
        self._closed = True
        self._sam_pool.shutdown(wait=True)
        self._mask_pool.shutdown(wait=True)

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

    def _run(self, rgb: np.ndarray, opts: DecodeOptions, skip_if_real: float | None, t0: float):
        clock = time.perf_counter
        timings: dict[str, float] = dict.fromkeys(_STAGES, 0.0)
        H, W = int(rgb.shape[0]), int(rgb.shape[1])

        s = clock()
        clip_px, sam_px, resized = self._preprocess(rgb)
        resized = (int(resized[0]), int(resized[1]))
        timings["preprocess"] = clock() - t0  # includes decoding the picture

        def sam_job() -> np.ndarray:
            s = clock()
            emb = self._backend.sam_encoder(sam_px)
            timings["sam_encoder"] = clock() - s
            return emb

        gated = skip_if_real is not None
        early = self.sam_start == "early" and not gated
        sam_future: Future | None = self._sam_pool.submit(sam_job) if early else None

        s = clock()
        image_embeds, cls_logits = self._backend.vision(clip_px)
        timings["vision"] = clock() - s

        verdict = fake_p = label = logits_list = None
        if cls_logits is not None:
            z = np.asarray(cls_logits, dtype=np.float64).reshape(-1)  # [2]: index 0 = fake, 1 = real
            e = np.exp(z - z.max())
            p = e / e.sum()
            fake_p = float(p[0])
            label = int(np.argmax(z))  # a tie goes to index 0 (fake), as torch.argmax in the reference
            verdict = "real" if label == 1 else "fake"
            logits_list = [float(v) for v in z]
            if gated and float(p[1]) >= float(skip_if_real):
                timings["total"] = clock() - t0
                timings["time_to_first_token"] = float("nan")
                timings["time_to_first_mask"] = float("nan")
                result = Result(
                    verdict=verdict,
                    fake_probability=fake_p,
                    explanation=None,
                    text=None,
                    token_ids=[],
                    artifacts=[],
                    mask=np.zeros((H, W), dtype=bool),
                    timings=timings,
                    label=label,
                    cls_logits=logits_list,
                    skipped=True,
                    image_size=(H, W),
                )
                yield DoneEvent(result)
                return
        if sam_future is None and self.sam_start != "after_prefill":
            sam_future = self._sam_pool.submit(sam_job)

        llm = self._backend.llm
        s = clock()
        cache = llm.clone_cache(self._prefix_cache, self.prompt_length + opts.max_new_tokens)
        first = np.concatenate(
            [
                np.asarray(image_embeds, dtype=np.float32).reshape(1, -1, self.hidden_size),
                self._embed_ids(self.suffix_ids),
            ],
            axis=1,
        )  # [1, 576 + len(suffix), H]
        clone_s = clock() - s

        prompt_ids = self.prefix_ids + self.suffix_ids  # decoded with the answer (image index removed)
        text_stream = self.detok.stream(prompt_ids)
        generated: list[int] = []
        mask_futures: list[Future] = []
        artifacts: list[Artifact] = []
        emitted = 0
        mask_time = [0.0]
        first_mask_at = [float("nan")]
        decode_s, steps = 0.0, 0

        # [SEG] hidden states waiting for the mask head. Each [SEG] submits a drain job; a drain takes every state
        # pending at that moment (several pile up while the SAM embedding is not ready yet). Results are delivered
        # through per-[SEG] futures.
        pending: list[tuple[np.ndarray, Future]] = []
        pending_lock = threading.Lock()

        def drain() -> None:
            with pending_lock:
                batch = list(pending)
                pending.clear()
            if not batch:
                return
            try:
                embedding = sam_future.result()  # usually finished long ago
                s = clock()
                # One mask-head call per [SEG] (N = 1), never a timing-dependent batch: ONNX Runtime's result for
                # a row differs in the last bits between N = 1 and N > 1 (measured 1.5e-7), and a mask must not
                # depend on how many [SEG] happened to be waiting. Upsampling is batched (rows independent).
                low = np.concatenate(
                    [self._backend.mask_head(h[None].astype(np.float32), embedding) for h, _ in batch]
                )  # [N, 256, 256]
                masks, _union, bboxes, areas = self._ops.postprocess_masks(
                    np.ascontiguousarray(low, dtype=np.float32),
                    resized,
                    (H, W),
                    with_stats=True,
                    num_threads=self.threads,
                )
                with self._lock:
                    mask_time[0] += clock() - s
                for i, (_, fut) in enumerate(batch):
                    b = bboxes[i]
                    fut.set_result((masks[i], (int(b[0]), int(b[1]), int(b[2]), int(b[3])), int(areas[i])))
            except BaseException as e:  # delivered to the request's thread by the futures
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)

        seg_token_index: list[int] = []
        # Whether the answer so far ends inside an unclosed "<p>": a [SEG] there gets that phrase once "</p>"
        # arrives, so its MaskEvent waits for the "</p>" (or the end of generation).
        p_state = {"open": False, "carry": ""}

        def track_phrase(delta: str) -> None:
            text = p_state["carry"] + delta  # the carry lets a tag spelled over two deltas be seen
            i, j = text.rfind("<p>"), text.rfind("</p>")
            if i > j:
                p_state["open"] = True
            elif j > i:
                p_state["open"] = False
            p_state["carry"] = text[-3:]

        def phrase_open() -> bool:
            return p_state["open"]

        def ready_masks(final: bool) -> Iterator[MaskEvent]:
            nonlocal emitted
            phrases = None
            while emitted < len(mask_futures) and (final or mask_futures[emitted].done()):
                if not final and phrase_open():
                    return
                mask, bbox, area = mask_futures[emitted].result()
                if phrases is None:
                    phrases = pair_phrases(self.detok, prompt_ids, generated, self.seg_id)
                art = Artifact(
                    phrase=phrases[emitted] if emitted < len(phrases) else None,
                    mask=mask,
                    bbox=bbox,
                    area=area,
                    index=emitted,
                    token_index=seg_token_index[emitted],
                )
                if math.isnan(first_mask_at[0]):
                    first_mask_at[0] = clock() - t0
                artifacts.append(art)
                emitted += 1
                yield MaskEvent(art)

        for step in generate(llm, cache, first, self._embed_ids, opts, self.eos_id, clock):
            if steps == 0 and not generated:
                timings["prefill"] = step.seconds + clone_s
                timings["time_to_first_token"] = clock() - t0
            else:
                decode_s += step.seconds
                steps += 1
            if sam_future is None:  # sam_start="after_prefill": the prefill had the cores to itself
                sam_future = self._sam_pool.submit(sam_job)
            generated.append(step.token_id)
            last = len(generated) == opts.max_new_tokens or (
                step.token_id == self.eos_id and not opts.ignore_eos
            )
            delta = text_stream.push(step.token_id)
            if last:
                delta += text_stream.flush()  # held-back bytes of an incomplete character, if any
            track_phrase(delta)
            if step.token_id == self.seg_id:
                seg_token_index.append(len(generated) - 1)
                fut: Future = Future()
                with pending_lock:
                    pending.append((step.hidden, fut))
                mask_futures.append(fut)
                self._mask_pool.submit(drain)
            yield TokenEvent(step.token_id, delta)
            yield from ready_masks(final=False)
        timings["decode"] = decode_s
        timings["decode_tokens"] = float(steps)
        timings["ms_per_token"] = 1000.0 * decode_s / steps if steps else 0.0
        s = clock()
        yield from ready_masks(final=True)
        timings["wait_masks"] = clock() - s
        if not sam_future.done():  # no [SEG]: the SAM embedding is unused; do not make the caller wait for it
            sam_future.cancel()
        timings["masks"] = mask_time[0]
        timings["time_to_first_mask"] = first_mask_at[0]

        out = postprocess_text(self.detok.decode(prompt_ids + generated))
        final_phrases = pair_phrases(self.detok, prompt_ids, generated, self.seg_id)
        for i, a in enumerate(artifacts):
            # The pairing on the full text is authoritative. It differs from the one a MaskEvent carried only
            # when later text moved the answer's start (a generated "ASSISTANT: "): then the Result corrects it.
            p = final_phrases[i] if i < len(final_phrases) else None
            if p != a.phrase:
                artifacts[i] = dataclasses.replace(a, phrase=p)
        if artifacts:
            union = np.logical_or.reduce([a.mask for a in artifacts])
        else:
            union = np.zeros((H, W), dtype=bool)
        timings["total"] = clock() - t0
        result = Result(
            verdict=verdict,
            fake_probability=fake_p,
            explanation=out.explanation,
            text=out.answer,
            token_ids=generated,
            artifacts=artifacts,
            mask=union,
            timings=timings,
            label=label,
            cls_logits=logits_list,
            phrases=list(out.phrases),
            image_size=(H, W),
        )
        yield DoneEvent(result)


def _preprocess_kwargs(pre: dict[str, Any]) -> dict[str, Any]:
    """manifest["preprocess"] -> keyword arguments of legion_rt.ops.preprocess."""
    clip, sam = pre["clip"], pre["sam"]
    kw: dict[str, Any] = {
        "clip_size": int(clip["size"]),
        "clip_mean": tuple(float(x) for x in clip["mean"]),
        "clip_std": tuple(float(x) for x in clip["std"]),
        "sam_size": int(sam["size"]),
        "sam_mean": tuple(float(x) for x in sam["mean"]),
        "sam_std": tuple(float(x) for x in sam["std"]),
    }
    # The manifest's clip "size" is the square crop (336); the shortest-edge resize is the same size for every
    # CLIP LEGION uses. An explicit "resize" / "crop" pair is honoured when present.
    crop = clip.get("crop", clip.get("crop_size", clip["size"]))
    crop = (int(crop), int(crop)) if isinstance(crop, (int, float)) else (int(crop[0]), int(crop[1]))
    kw["clip_crop"] = crop
    if "resize" in clip:
        kw["clip_size"] = int(clip["resize"])
    return kw
