"""legion_rt/request.py on its own: the stages, ordered mask delivery, phrase tracking, cancellation, deadlines and
admission, with a scripted stand-in LLM and backend (no ONNX Runtime). The real tokenizer decodes the text, the
real native core upsamples the masks."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from legion_rt import ops
from legion_rt.admission import Admission
from legion_rt.decode import DecodeOptions
from legion_rt.errors import BusyError, DeadlineError, RequestError
from legion_rt.request import OrderedMasks, PhraseTracker, Request
from legion_rt.result import DoneEvent, MaskEvent, TokenEvent

EOS, SEG, P_START, P_END = 2, 1004, 1005, 1006
WORD_A, WORD_B, WORD_C = 100, 300, 400  # "a", "b", "are" in the tiny vocabulary
H = 8  # hidden size of the stand-in LLM
SIZE = 64  # the pictures are SIZE x SIZE


# ---------------------------------------------------------------------------------------------- units
def test_phrase_tracker_sees_tags_split_over_deltas():
    t = PhraseTracker()
    assert t.push("x <") is False
    assert t.push("p> y") is True  # "<p>" spelled over two deltas
    assert t.push(" z </") is True
    assert t.push("p>") is False
    assert t.push("<p>a</p><p>") is True  # the last tag wins
    assert t.push("b</p>") is False


def test_ordered_masks_deliver_in_order_hold_and_final():
    m = OrderedMasks()
    f0, f1, f2 = m.add(3), m.add(5), m.add(9)
    f1.set_result("one")
    assert list(m.take(final=False)) == []  # [SEG] 0 is not ready: nothing overtakes it
    f0.set_result("zero")
    assert list(m.take(final=False, hold=True)) == []  # a phrase is open: wait for its "</p>"
    assert list(m.take(final=False)) == [(0, 3, "zero"), (1, 5, "one")]
    threading.Timer(0.05, f2.set_result, ("two",)).start()
    assert list(m.take(final=True, hold=True)) == [(2, 9, "two")]  # final waits, whatever the phrase
    g = m.add(11)
    m.cancel()
    assert g.cancelled() and len(m) == 4 and m.delivered == 3


def test_ordered_masks_raise_a_failed_job():
    m = OrderedMasks()
    m.add(0).set_exception(ValueError("mask head failed"))
    with pytest.raises(ValueError, match="mask head failed"):
        list(m.take(final=False))


def test_admission_fifo_busy_and_deadline():
    a = Admission(1, 1)
    a.acquire()
    assert (a.running, a.waiting) == (1, 0)
    order = []

    def waiter(name):
        a.acquire()
        order.append(name)

    t1 = threading.Thread(target=waiter, args=("first",))
    t1.start()
    while a.waiting != 1:
        time.sleep(0.001)
    with pytest.raises(BusyError, match="1 requests running and 1 waiting"):
        a.acquire()  # the queue (1) is full
    a.release()
    t1.join(5)
    assert order == ["first"] and (a.running, a.waiting) == (1, 0)
    with pytest.raises(DeadlineError, match="waiting for a free slot"):
        a.acquire(deadline=time.monotonic() + 0.05)
    assert a.waiting == 0  # a timed-out waiter leaves the queue
    a.release()
    unlimited = Admission()
    for _ in range(100):
        unlimited.acquire()
    assert unlimited.running == 100
    for bad in ((0, None), (None, -1), (True, None), (1.5, None)):
        with pytest.raises(RequestError):
            Admission(*bad)


def test_admission_serves_waiters_in_arrival_order():
    a = Admission(1, None)
    a.acquire()
    order, threads = [], []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: (a.acquire(), order.append(i), a.release()))
        t.start()
        threads.append(t)
        while a.waiting != i + 1:  # each one queued before the next starts
            time.sleep(0.001)
    a.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4] and a.running == 0


# ------------------------------------------------------------------------------------ stand-in engine
class FakeCache:
    def __init__(self, max_len):
        self.max_len = max_len
        self.length = 0
        self.step = 0
        self.kv = np.zeros(1024, np.float32)  # something to free


class FakeLLM:
    """Emits ``script`` (one token per forward); the hidden state of a forward is [step] * H, so a mask can be
    traced back to the forward whose logits produced its [SEG]."""

    def __init__(self, script, *, delay=0.0, vocab=1007):
        self.script, self.delay, self.vocab = list(script), delay, vocab
        self.calls = 0
        self.caches = []

    def clone_cache(self, prefix, max_len):
        c = FakeCache(max_len)
        self.caches.append(weakref.ref(c))
        return c

    def forward(self, cache, embeds):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        cache.length += embeds.shape[1]
        tok = self.script[cache.step % len(self.script)]
        logits = np.zeros(self.vocab, np.float32)
        logits[tok] = 1.0
        hidden = np.full(H, float(cache.step), np.float32)
        cache.step += 1
        return logits, hidden


class FakeBackend:
    def __init__(self, llm, *, real_p=0.25, sam_delay=0.01, sam_gate=None):
        self.llm, self.real_p, self.sam_delay, self.sam_gate = llm, real_p, sam_delay, sam_gate
        self.mask_calls = 0

    def vision(self, clip_px):
        z = np.log(np.array([[1 - self.real_p, self.real_p]], np.float64)).astype(np.float32)
        return np.zeros((1, 4, H), np.float32), z

    def sam_encoder(self, sam_px):
        if self.sam_gate is not None:
            self.sam_gate.wait(10)
        time.sleep(self.sam_delay)
        return np.zeros((1, 256, 64, 64), np.float32)

    def mask_head(self, seg_hidden, embedding):
        """A 32-row band of the 256 x 256 logits, at band ``step % 8``: 8 rows of the 64 x 64 picture."""
        self.mask_calls += 1
        step = int(seg_hidden[0, 0])
        low = np.full((1, 256, 256), -1.0, np.float32)
        band = step % 8
        low[0, band * 32 : (band + 1) * 32, :] = 1.0
        return low


@pytest.fixture(scope="module")
def detok(tmp_path_factory):
    pytest.importorskip("sentencepiece", reason="writing tokenizer.json is an export-stage step")
    from legion_rt.detokenizer import Detokenizer
    from legion_rt.export.tokenizer import prompt_ids, write_tiny_tokenizer, write_tokenizer_json

    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    write_tokenizer_json(d, d / "tokenizer.json")
    return Detokenizer.from_dir(d), prompt_ids(d)


@pytest.fixture
def pools():
    sam, mask = ThreadPoolExecutor(2), ThreadPoolExecutor(1)
    yield sam, mask
    sam.shutdown(wait=True, cancel_futures=True)
    mask.shutdown(wait=True, cancel_futures=True)


def _engine(detok, pools, backend, *, sam_start="after_prefill"):
    det, (prefix, suffix) = detok
    return SimpleNamespace(
        prefix_ids=list(prefix),
        suffix_ids=list(suffix),
        seg_id=SEG,
        eos_id=EOS,
        hidden_size=H,
        prompt_length=len(prefix) + 4 + len(suffix),
        detok=det,
        model_identity={"name": "fake", "manifest_sha256": "0" * 64},
        sam_start=sam_start,
        threads=None,
        _prefix_cache=None,
        _sam_pool=pools[0],
        _mask_pool=pools[1],
        _ops=ops,
        _backend=backend,
        _embed_ids=lambda ids: np.zeros((1, len(ids), H), np.float32),
        _preprocess=lambda rgb: (None, None, (1024, 1024)),
    )


def _request(engine, *, max_new_tokens=64, ignore_eos=False, skip_if_real=None, timeout_s=None, release=None):
    opts = DecodeOptions(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos)
    t0 = time.perf_counter()
    return Request(
        engine,
        np.zeros((SIZE, SIZE, 3), np.uint8),
        opts,
        skip_if_real=skip_if_real,
        t0=t0,
        deadline=None if timeout_s is None else t0 + timeout_s,
        timeout_s=timeout_s,
        release=release,
    )


# ----------------------------------------------------------------------------------------- the stages
def test_events_masks_in_seg_order_with_the_producing_hidden_state(detok, pools):
    # steps:      0       1    2       3    4      5        6    7
    script = [WORD_B, SEG, P_START, WORD_C, SEG, P_END, SEG, EOS]
    backend = FakeBackend(FakeLLM(script))
    events = list(_request(_engine(detok, pools, backend)))
    tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
    masks = [e.artifact for e in events if isinstance(e, MaskEvent)]
    assert tokens == script and isinstance(events[-1], DoneEvent)
    result = events[-1].result
    assert [m.index for m in masks] == [0, 1, 2] and [m.token_index for m in masks] == [1, 4, 6]
    # the [SEG] at step t is paired with the hidden state of forward t (the one whose logits chose it)
    for m, step in zip(masks, (1, 4, 6), strict=True):
        band = step % 8
        assert m.bbox == (0, band * 8, SIZE, band * 8 + 8) and m.area == 8 * SIZE
        assert m.mask[band * 8 : band * 8 + 8].all() and m.mask.sum() == m.area
    # the [SEG] inside "<p> are [SEG] </p>" waits for the "</p>": its event comes after that token
    pos = {id(e): i for i, e in enumerate(events)}
    p_end_event = next(e for e in events if isinstance(e, TokenEvent) and e.token_id == P_END)
    assert (
        pos[id(next(e for e in events if isinstance(e, MaskEvent) and e.artifact.index == 1))]
        > pos[id(p_end_event)]
    )
    # the reference's phrase: <p>(.*?)</p> stripped, [SEG] included
    assert [m.phrase for m in result.artifacts] == [None, "are [SEG]", "are [SEG]"]
    assert result.token_ids == script and result.mask.sum() == 3 * 8 * SIZE
    assert backend.mask_calls == 3  # one mask-head call per [SEG]
    t = result.timings
    assert t["sam_encoder"] >= 0.01 and t["masks"] > 0 and t["decode_tokens"] == len(script) - 1
    assert t["time_to_first_mask"] >= t["time_to_first_token"] > 0
    assert result.model == {"name": "fake", "manifest_sha256": "0" * 64}


def test_detect_first_gate_stops_before_the_llm(detok, pools):
    llm = FakeLLM([WORD_B, EOS])
    backend = FakeBackend(llm, real_p=0.9)
    events = list(_request(_engine(detok, pools, backend), skip_if_real=0.8))
    assert len(events) == 1 and events[0].result.skipped and events[0].result.verdict == "real"
    assert llm.calls == 0 and events[0].result.token_ids == []
    events = list(_request(_engine(detok, pools, backend), skip_if_real=0.95))
    assert not events[-1].result.skipped and llm.calls == 2


def test_no_seg_does_not_wait_for_the_sam_encoder(detok, pools):
    gate = threading.Event()  # the SAM encoder never finishes on its own
    backend = FakeBackend(FakeLLM([WORD_B, WORD_C, EOS]), sam_gate=gate)
    t0 = time.perf_counter()
    events = list(_request(_engine(detok, pools, backend)))
    assert time.perf_counter() - t0 < 5 and events[-1].result.artifacts == []
    gate.set()


# ------------------------------------------------------------------------------ cancel, close, deadline
def test_close_stops_decoding_drops_mask_jobs_and_frees_the_cache(detok, pools):
    gate = threading.Event()  # SAM held back: the [SEG]s' mask jobs stay pending
    llm = FakeLLM([WORD_B, SEG], delay=0.002)
    backend = FakeBackend(llm, sam_gate=gate)
    released = []
    req = _request(_engine(detok, pools, backend), max_new_tokens=500, ignore_eos=True,
                   release=lambda: released.append(1))  # fmt: skip
    for _, ev in zip(range(10), req, strict=False):
        assert isinstance(ev, TokenEvent)
    cache = weakref.ref(req.cache)
    calls = llm.calls
    req.close()
    assert released == [1] and req.cache is None
    gate.set()  # the SAM encoder may finish now; the dropped mask jobs must not run the mask head
    time.sleep(0.1)
    gc.collect()
    assert llm.calls == calls and cache() is None and backend.mask_calls == 0
    assert list(req) == []  # a closed request yields nothing more
    req.close()  # idempotent
    assert released == [1]


def test_cancel_from_another_thread_stops_within_one_step(detok, pools):
    llm = FakeLLM([WORD_B, WORD_C], delay=0.005)
    req = _request(_engine(detok, pools, FakeBackend(llm)), max_new_tokens=2000, ignore_eos=True)
    seen = []
    t = threading.Thread(target=lambda: seen.extend(req))
    t.start()
    while len(seen) < 5:
        time.sleep(0.001)
    req.cancel()
    t.join(5)
    assert not t.is_alive()
    calls = llm.calls
    assert len(seen) < 2000 and not any(isinstance(e, DoneEvent) for e in seen)
    assert calls <= len(seen) + 2  # at most the step in flight ran after the cancel
    gc.collect()
    assert all(ref() is None for ref in llm.caches)


def test_deadline_stops_the_request_and_frees_it(detok, pools):
    llm = FakeLLM([WORD_B, WORD_C], delay=0.01)
    released = []
    req = _request(_engine(detok, pools, FakeBackend(llm)), max_new_tokens=2000, ignore_eos=True,
                   timeout_s=0.2, release=lambda: released.append(1))  # fmt: skip
    t0 = time.perf_counter()
    with pytest.raises(DeadlineError, match="timeout_s=0.2"):
        for _ in req:
            pass
    assert time.perf_counter() - t0 < 1.5 and released == [1] and req.cache is None
    calls = llm.calls
    time.sleep(0.05)
    assert llm.calls == calls < 2000


def test_a_request_never_iterated_gives_its_slot_back_when_dropped(detok, pools):
    released = []
    req = _request(_engine(detok, pools, FakeBackend(FakeLLM([EOS]))), release=lambda: released.append(1))
    del req
    gc.collect()
    assert released == [1]


def test_generator_close_mid_stream_from_a_for_loop(detok, pools):
    """The consumer's way: break out of the loop, then drop or close the iterator."""
    llm = FakeLLM([WORD_B, SEG, WORD_C], delay=0.001)
    backend = FakeBackend(llm)
    released = []
    req = _request(_engine(detok, pools, backend), max_new_tokens=300, ignore_eos=True,
                   release=lambda: released.append(1))  # fmt: skip
    for i, _ in enumerate(req):
        if i == 20:
            break
    req.close()
    calls = llm.calls
    time.sleep(0.05)
    assert llm.calls == calls and released == [1]
