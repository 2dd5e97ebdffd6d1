"""One request through the model: a picture in, stream events out, as named stages in the order of the data flow.

```
preprocess    decoded RGB -> clip pixels [1,3,336,336], sam pixels [1,3,1024,1024], SAM resize (h', w')
vision        CLIP + projector -> image embeds [1,576,H]; detector logits [1,2] -> verdict
              (detect-first gate: the verdict alone when P(real) >= skip_if_real)
sam encoder   [1,3,1024,1024] -> [1,256,64,64] in the Engine's SAM pool, started with the vision pass ("early") or
              right after the prefill ("after_prefill"); awaited by the first mask only
prefill       clone the cached prompt-prefix KV, run 576 image embeds + the prompt suffix -> first token
decode step   one position, KV written in place -> next token; each [SEG]'s hidden state goes to the mask pool
masks         mask head (one call per [SEG]) + upsampling -> MaskEvent in [SEG] order as soon as ready
finish        text, phrases, union mask, timings -> DoneEvent(Result)
```

A ``Request`` is an iterator of events (``TokenEvent`` / ``MaskEvent`` / ``DoneEvent``): each ``next()`` runs the
stages up to the next event. ``cancel()`` (any thread) stops it at the next step; ``close()`` (the iterating
thread, or a consumer that stops iterating: it also runs when the request is garbage-collected) cancels it,
drops its pending SAM and mask jobs, frees its KV cache and gives back its admission slot. Past its deadline a
request stops the same way and raises ``DeadlineError``. A request's state belongs to it alone: the worker jobs
return their results (and times) through futures, they never write the request's fields.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from .answer import pair_phrases, postprocess_text
from .decode import DecodeOptions, Decoder, Step
from .errors import DeadlineError
from .result import Artifact, DoneEvent, MaskEvent, Result, TokenEvent

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

STAGES = ("preprocess", "vision", "sam_encoder", "prefill", "decode", "masks", "total")


class PhraseTracker:
    """Whether the answer streamed so far ends inside an unclosed ``<p>``.

    A [SEG] there gets that phrase once ``</p>`` arrives, so its MaskEvent waits for the ``</p>`` (or the end of
    generation). ``push(delta)`` takes each text delta; a tag spelled over two deltas is still seen."""

    def __init__(self) -> None:
        self.open = False
        self._carry = ""

    def push(self, delta: str) -> bool:
        text = self._carry + delta
        i, j = text.rfind("<p>"), text.rfind("</p>")
        if i > j:
            self.open = True
        elif j > i:
            self.open = False
        self._carry = text[-3:]  # "</p" is the longest tag prefix that can end a delta
        return self.open


class OrderedMasks:
    """Mask results delivered in [SEG] order, each as soon as it (and every earlier one) is ready.

    ``add(token_index)`` registers the next [SEG] and returns the Future its mask job completes with
    ``(mask bool [H, W], bbox (x0, y0, x1, y1), area, seconds)``. ``take(final=..., hold=...)`` yields
    ``(index, token_index, value)`` for the ready prefix; ``hold`` (a phrase is open) stops it before the next
    one unless ``final``, and ``final`` waits for every remaining mask."""

    def __init__(self) -> None:
        self._futures: list[Future] = []
        self._token_index: list[int] = []
        self.delivered = 0

    def __len__(self) -> int:
        return len(self._futures)

    def add(self, token_index: int) -> Future:
        fut: Future = Future()
        self._futures.append(fut)
        self._token_index.append(int(token_index))
        return fut

    def take(self, *, final: bool, hold: bool = False) -> Iterator[tuple[int, int, Any]]:
        while self.delivered < len(self._futures):
            if not final and (hold or not self._futures[self.delivered].done()):
                return
            i = self.delivered
            value = self._futures[i].result()  # a failed mask job raises its error here
            self.delivered += 1
            yield i, self._token_index[i], value

    def cancel(self) -> None:
        for fut in self._futures[self.delivered :]:
            fut.cancel()


class _Cancelled(Exception):
    """Internal: the request was cancelled; its event stream ends quietly."""


class Request:
    """One picture through an ``Engine`` (see the module docstring). Made by ``Engine.request`` / ``stream``.

    ``rgb``: the decoded picture, uint8 [H, W, 3]; ``opts``: validated decode options; ``deadline``: a
    ``time.perf_counter()`` value or None; ``release``: gives the admission slot back (called once)."""

    def __init__(
        self,
        engine: Engine,
        rgb: np.ndarray,
        opts: DecodeOptions,
        *,
        skip_if_real: float | None = None,
        t0: float | None = None,
        deadline: float | None = None,
        timeout_s: float | None = None,
        release: Callable[[], None] | None = None,
        image_name: str | None = None,
    ):
        self.engine = engine
        self.rgb = rgb
        self.opts = opts
        self.skip_if_real = skip_if_real
        self.clock = time.perf_counter
        self.t0 = self.clock() if t0 is None else t0
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.image_name = image_name
        self.size = (int(rgb.shape[0]), int(rgb.shape[1]))  # (H, W)
        self.timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.cache = None  # this request's KV cache (a clone of the engine's prefix cache)
        self.generated: list[int] = []
        self.artifacts: list[Artifact] = []
        self.verdict = self.fake_probability = self.label = self.cls_logits = None
        self._release = release
        self._cancel = threading.Event()
        self._sam: Future | None = None
        self._masks = OrderedMasks()
        self._pending: list[tuple[np.ndarray, Future]] = []  # [SEG] hidden states not yet taken by a mask job
        self._pending_lock = threading.Lock()
        # The device-resident path (legion_rt/device_path.py DevicePath) when the engine chose it, else None: the
        # host path below is then exactly the CPU path. ``_rd``: this request's device buffers and events.
        self._dev = getattr(engine, "_device", None)
        self._rd = None
        self._phrase = PhraseTracker()
        self._prompt_ids = list(engine.prefix_ids) + list(engine.suffix_ids)  # decoded with the answer
        self._text = engine.detok.stream(self._prompt_ids)
        self._decoder: Decoder | None = None
        self._decode_s = 0.0
        self._steps = 0
        self._mask_s = 0.0
        self._first_mask_at = float("nan")
        self._finished = False
        self._events = self._run()

    # ------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Request:
        return self

    def __next__(self) -> TokenEvent | MaskEvent | DoneEvent:
        if self._finished:
            raise StopIteration
        try:
            return next(self._events)
        except BaseException:
            self._cleanup()
            raise

    def cancel(self) -> None:
        """Stop at the next step (safe from any thread); the event stream then ends without a DoneEvent."""
        self._cancel.set()

    def close(self) -> None:
        """Cancel and free everything now (from the iterating thread, or when nothing iterates)."""
        self._cancel.set()
        if (
            self._events.gi_running
        ):  # another thread is inside next(): it stops at its next step and cleans up
            return
        self._events.close()
        self._cleanup()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # ----------------------------------------------------------------------------------------------- stages
    def preprocess(self) -> None:
        """Decoded picture -> CLIP and SAM pixels (native core). Its time includes decoding the picture.
        Device path: the pixels stay in the device buffers the vision and SAM graphs are bound to."""
        if self._dev is not None:
            self._rd = self.engine._preprocess_device(self.rgb)
            self.clip_px = self.sam_px = None
            resized = self._rd.resized
        else:
            self.clip_px, self.sam_px, resized = self.engine._preprocess(self.rgb)
        self.resized = (int(resized[0]), int(resized[1]))
        self.timings["preprocess"] = self.clock() - self.t0

    def start_sam(self) -> None:
        """Submit the SAM image encoder to the engine's SAM pool (once)."""
        if self._sam is None:
            rd = self._rd
            # the job holds a reference to the device buffers, dropped when it is done or cancelled
            if rd is not None:
                rd.acquire()
                self._sam = self.engine._sam_pool.submit(self._sam_job, rd)
                self._sam.add_done_callback(rd.release)
            else:
                self._sam = self.engine._sam_pool.submit(self._sam_job)

    def _sam_job(self, rd=None) -> tuple[np.ndarray, float]:
        """``rd``: the device buffers, bound at submission (``_cleanup`` may clear ``self._rd`` meanwhile)."""
        if self._cancel.is_set():
            raise _Cancelled()
        s = self.clock()
        if rd is not None:  # (DeviceBuffer [1, 256, 64, 64], its ready event), on this thread's stream
            emb = self._dev.sam_encoder(self.engine._backend, rd)
        else:
            emb = self.engine._backend.sam_encoder(self.sam_px)  # [1, 256, 64, 64]
        return emb, self.clock() - s

    def vision(self) -> bool:
        """CLIP + projector + detector. Returns True when the detect-first gate stops the request here."""
        s = self.clock()
        if self._rd is not None:
            self.image_embeds, cls_logits = self._dev.vision(self.engine._backend, self._rd)
        else:
            self.image_embeds, cls_logits = self.engine._backend.vision(self.clip_px)
        self.timings["vision"] = self.clock() - s
        if cls_logits is None:
            return False
        z = np.asarray(cls_logits, dtype=np.float64).reshape(-1)  # [2]: index 0 = fake, 1 = real
        e = np.exp(z - z.max())
        p = e / e.sum()
        self.fake_probability = float(p[0])
        self.label = int(np.argmax(z))  # a tie goes to index 0 (fake), as torch.argmax in the reference
        self.verdict = "real" if self.label == 1 else "fake"
        self.cls_logits = [float(v) for v in z]
        return self.skip_if_real is not None and float(p[1]) >= float(self.skip_if_real)

    def prefill(self) -> Step:
        """Clone the prompt-prefix KV, run the image embeds + prompt suffix; returns the first token's step."""
        eng = self.engine
        llm = eng._backend.llm
        s = self.clock()
        self.cache = llm.clone_cache(eng._prefix_cache, eng.prompt_length + self.opts.max_new_tokens)
        first = np.concatenate(
            [
                np.asarray(self.image_embeds, dtype=np.float32).reshape(1, -1, eng.hidden_size),
                eng._embed_ids(eng.suffix_ids),
            ],
            axis=1,
        )  # [1, 576 + len(suffix), H]
        clone_s = self.clock() - s
        self._decoder = Decoder(llm, self.cache, eng._embed_ids, self.opts, eng.eos_id, self.clock)
        step = self._decoder.prefill(first)
        self.timings["prefill"] = step.seconds + clone_s
        self.timings["time_to_first_token"] = self.clock() - self.t0
        return step

    def decode_step(self) -> Step:
        """One decode step (the KV cache grows by one position)."""
        step = self._decoder.step()
        self._decode_s += step.seconds
        self._steps += 1
        return step

    def accept(self, step: Step) -> Iterator[TokenEvent | MaskEvent]:
        """Record a generated token: its text delta, a mask job for a [SEG], then the masks now ready."""
        eng = self.engine
        self.generated.append(step.token_id)
        delta = self._text.push(step.token_id)
        if self._decoder.done:
            delta += self._text.flush()  # held-back bytes of an incomplete character, if any
        self._phrase.push(delta)
        if step.token_id == eng.seg_id:
            self.submit_mask(step.hidden, len(self.generated) - 1)
        yield TokenEvent(step.token_id, delta)
        yield from self.ready_masks(final=False)

    def submit_mask(self, hidden: np.ndarray, token_index: int) -> None:
        """Queue one [SEG]'s hidden state f32 [H] (a DeviceBuffer [1, H] when the LLM keeps it on the device) for
        the mask head; a drain job in the mask pool takes it."""
        fut = self._masks.add(token_index)
        with self._pending_lock:
            self._pending.append((hidden, fut))
        rd = self._rd
        if rd is not None:
            rd.acquire()
            job = self.engine._mask_pool.submit(self._drain_masks, rd)
            job.add_done_callback(rd.release)
        else:
            self.engine._mask_pool.submit(self._drain_masks)

    def _drain_masks(self, rd=None) -> None:
        """Mask job: every [SEG] pending at this moment (several pile up while the SAM embedding is not ready).
        ``rd``: the device buffers (device path), bound at submission."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            if self._cancel.is_set():
                raise _Cancelled()
            embedding, _ = self._sam.result()  # usually finished long ago
            eng = self.engine
            s = self.clock()
            # One mask-head call per [SEG] (N = 1), never a timing-dependent batch: ONNX Runtime's result for a row
            # differs in the last bits between N = 1 and N > 1 (measured 1.5e-7), and a mask must not depend on how
            # many [SEG] happened to be waiting. Upsampling is batched (rows independent).
            if rd is not None:  # device path: the same N = 1 calls on device buffers, packed masks back
                masks, _union, bboxes, areas = self._dev.masks(
                    eng._backend, rd, [h for h, _ in batch], self.resized, self.size, check=self._check_cancel
                )
            else:
                rows = []
                for h, _ in batch:
                    if self._cancel.is_set():  # cancelled while this job waited for the SAM embedding
                        raise _Cancelled()
                    rows.append(eng._backend.mask_head(h[None].astype(np.float32), embedding))
                low = np.concatenate(rows)  # [N, 256, 256]
                masks, _union, bboxes, areas = eng._ops.postprocess_masks(
                    np.ascontiguousarray(low, dtype=np.float32),
                    self.resized,
                    self.size,
                    with_stats=True,
                    num_threads=eng.threads,
                )
            seconds = self.clock() - s
            for i, (_, fut) in enumerate(batch):
                b = bboxes[i]
                box = (int(b[0]), int(b[1]), int(b[2]), int(b[3]))
                # the batch's time is counted once, with its first mask
                fut.set_result((masks[i], box, int(areas[i]), seconds if i == 0 else 0.0))
        except BaseException as e:  # delivered to the request's thread by the futures
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)

    def _check_cancel(self) -> None:
        if self._cancel.is_set():  # cancelled while this job waited for the SAM embedding
            raise _Cancelled()

    def ready_masks(self, final: bool) -> Iterator[MaskEvent]:
        """MaskEvents for the masks ready now, in [SEG] order (``final``: wait for all of them)."""
        phrases = None
        for i, token_index, (mask, bbox, area, seconds) in self._masks.take(
            final=final, hold=self._phrase.open
        ):
            if phrases is None:
                phrases = pair_phrases(
                    self.engine.detok, self._prompt_ids, self.generated, self.engine.seg_id
                )
            art = Artifact(
                phrase=phrases[i] if i < len(phrases) else None,
                mask=mask,
                bbox=bbox,
                area=area,
                index=i,
                token_index=token_index,
            )
            self._mask_s += seconds
            if math.isnan(self._first_mask_at):
                self._first_mask_at = self.clock() - self.t0
            self.artifacts.append(art)
            yield MaskEvent(art)

    def finish(self) -> Result:
        """Text post-processing, final phrase pairing, union mask and timings."""
        eng = self.engine
        t = self.timings
        t["decode"] = self._decode_s
        t["decode_tokens"] = float(self._steps)
        t["ms_per_token"] = 1000.0 * self._decode_s / self._steps if self._steps else 0.0
        t["masks"] = self._mask_s
        sam = self._sam
        if sam is not None and sam.done() and not sam.cancelled() and sam.exception() is None:
            t["sam_encoder"] = sam.result()[
                1
            ]  # the job returns its time; it never writes the request's fields
        t["time_to_first_mask"] = self._first_mask_at
        out = postprocess_text(eng.detok.decode(self._prompt_ids + self.generated))
        final_phrases = pair_phrases(eng.detok, self._prompt_ids, self.generated, eng.seg_id)
        for i, a in enumerate(self.artifacts):
            # The pairing on the full text is authoritative. It differs from the one a MaskEvent carried only when
            # later text moved the answer's start (a generated "ASSISTANT: "): then the Result corrects it.
            p = final_phrases[i] if i < len(final_phrases) else None
            if p != a.phrase:
                self.artifacts[i] = dataclasses.replace(a, phrase=p)
        if self.artifacts:
            union = np.logical_or.reduce([a.mask for a in self.artifacts])
        else:
            union = np.zeros(self.size, dtype=bool)
        t["total"] = self.clock() - self.t0
        return self._result(
            explanation=out.explanation, text=out.answer, mask=union, phrases=list(out.phrases), skipped=False
        )

    def _result(self, *, explanation, text, mask, phrases, skipped) -> Result:
        return Result(
            verdict=self.verdict,
            fake_probability=self.fake_probability,
            explanation=explanation,
            text=text,
            token_ids=list(self.generated),
            artifacts=list(self.artifacts),
            mask=mask,
            timings=self.timings,
            label=self.label,
            cls_logits=self.cls_logits,
            skipped=skipped,
            phrases=phrases,
            image_size=self.size,
            model=dict(self.engine.model_identity),
            image=self.image_name,
        )

    # ------------------------------------------------------------------------------------------ the driver
    def _check(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled()
        if self.deadline is not None and self.clock() >= self.deadline:
            raise DeadlineError(
                f"deadline passed: timeout_s={self.timeout_s} after {len(self.generated)} generated tokens; "
                "the request was stopped"
            )

    def _run(self) -> Iterator[TokenEvent | MaskEvent | DoneEvent]:
        try:
            mode = self.engine.sam_start
            gated = self.skip_if_real is not None
            self._check()
            self.preprocess()
            if mode == "early" and not gated:
                self.start_sam()
            self._check()
            if self.vision():
                self.timings["total"] = self.clock() - self.t0
                self.timings["time_to_first_token"] = float("nan")
                self.timings["time_to_first_mask"] = float("nan")
                yield DoneEvent(
                    self._result(
                        explanation=None,
                        text=None,
                        mask=np.zeros(self.size, dtype=bool),
                        phrases=[],
                        skipped=True,
                    )
                )
                return
            if mode != "after_prefill":
                self.start_sam()
            self._check()
            step = self.prefill()
            self.start_sam()  # "after_prefill": the prefill had the cores to itself
            while True:
                yield from self.accept(step)
                if self._decoder.done:
                    break
                self._check()
                step = self.decode_step()
            s = self.clock()
            for ev in self.ready_masks(final=True):
                self._check()
                yield ev
            self.timings["wait_masks"] = self.clock() - s
            if (
                not self._sam.done()
            ):  # no [SEG]: the SAM embedding is unused; do not make the caller wait for it
                self._sam.cancel()
            result = self.finish()
            self._cleanup()  # before the last event: a consumer that stops at DoneEvent leaves nothing behind
            yield DoneEvent(result)
        except _Cancelled:
            return
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        """Idempotent: drop pending work, free the KV cache, give the admission slot back."""
        if self._finished:
            return
        self._finished = True
        if self._sam is not None and not self._sam.done():
            self._sam.cancel()  # not started yet: never runs; running: its result is dropped
        with self._pending_lock:
            self._pending = []
        self._cancel.set()  # mask jobs still queued see it and skip their work
        self._masks.cancel()
        self._decoder = None
        self.cache = None  # the KV buffers go with the last reference
        rd, self._rd = self._rd, None
        # the request's own reference; the buffers go back once the device jobs are done too
        if rd is not None:
            rd.release()
        release, self._release = self._release, None
        if release is not None:
            release()
