"""The decode loop: prefill after the cached prompt prefix, then one token per step with the KV cache written in
place, greedy by default (temperature / top-p sampling with a seed as options).

Which hidden state makes a mask (docs/REFERENCE.md "Generation"): the reference builds ``ids[:, 1:] == SEG``
over the full sequence, so the [SEG] token generated at step t is paired with the final-norm hidden state at the
position whose logits produced it. In this loop that is exactly the ``hidden`` returned together with the logits
the token was picked from: the last prefill position for the first generated token, the previous step's single
position afterwards. No extra forward pass is needed.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import RequestError


@dataclass(frozen=True)
class DecodeOptions:
    """Per-request generation options (validated by ``validate``).

    max_new_tokens: 1.. (prompt length + max_new_tokens must fit in the model's max positions)
    temperature:   0 -> greedy (argmax, first index on ties, as torch.argmax); > 0 -> sampling
    top_p:         (0, 1], nucleus sampling (only with temperature > 0)
    seed:          int seed of the sampler (None: fresh entropy); same seed -> same tokens
    ignore_eos:    keep generating after EOS (benchmarks force a fixed token count this way)
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def validate(self, *, prompt_len: int, max_positions: int) -> DecodeOptions:
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise RequestError(f"max_new_tokens={m!r}: must be an integer >= 1")
        if prompt_len + m > max_positions:
            raise RequestError(
                f"max_new_tokens={m}: the prompt takes {prompt_len} positions, so at most "
                f"{max_positions - prompt_len} new tokens fit in the model's {max_positions} positions"
            )
        t = self.temperature
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise RequestError(f"temperature={t!r}: must be a finite number >= 0 (0 = greedy)")
        p = self.top_p
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not (0.0 < p <= 1.0):
            raise RequestError(f"top_p={p!r}: must be in (0, 1]")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
        ):
            raise RequestError(f"seed={self.seed!r}: must be an integer or None")
        return self


class Sampler:
    """Picks the next token from logits [V]. Greedy when temperature == 0."""

    def __init__(self, opts: DecodeOptions):
        self.temperature = float(opts.temperature)
        self.top_p = float(opts.top_p)
        self.rng = np.random.default_rng(opts.seed) if self.temperature > 0 else None

    def __call__(self, logits: np.ndarray) -> int:
        if self.rng is None:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
            keep = order[: int(np.searchsorted(cum, self.top_p, side="left")) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(p.shape[0], p=p))


@dataclass
class Step:
    """One generated token and the hidden state [H] of the position whose logits produced it."""

    token_id: int
    hidden: np.ndarray
    seconds: float  # time of the forward pass that produced the logits (prefill for the first token)


class Decoder:
    """Greedy (or sampled) decoding over one KV cache: ``prefill`` once, then ``step`` until ``done``.

    ``llm``: an OrtLLM-like runner (``forward(cache, embeds f32 [1, S, H]) -> (logits f32 [V], hidden f32 [H])``);
    ``cache``: its KV cache, already holding the prompt prefix; ``embed_ids(ids) -> f32 [1, len(ids), H]``.
    ``done`` turns True after EOS (unless ``opts.ignore_eos``) or ``opts.max_new_tokens`` tokens; the last token
    is never fed back.
    """

    def __init__(self, llm, cache, embed_ids, opts: DecodeOptions, eos_id: int, clock=time.perf_counter):
        self.llm, self.cache, self.embed_ids = llm, cache, embed_ids
        self.opts, self.eos_id, self.clock = opts, int(eos_id), clock
        self.sample = Sampler(opts)
        self.tokens: list[int] = []
        self.done = False

    def prefill(self, first_embeds: np.ndarray) -> Step:
        """Run the S positions of ``first_embeds`` f32 [1, S, H] after the cached prefix; the first token."""
        if self.tokens:
            raise RuntimeError("prefill() runs once, before any step()")
        t0 = self.clock()
        logits, hidden = self.llm.forward(self.cache, first_embeds)
        return self._emit(logits, hidden, self.clock() - t0)

    def step(self) -> Step:
        """Feed the last token back (one position, K/V written in place) and pick the next one."""
        if self.done or not self.tokens:
            raise RuntimeError("step() after the last token or before prefill()")
        t0 = self.clock()
        logits, hidden = self.llm.forward(self.cache, self.embed_ids([self.tokens[-1]]))
        return self._emit(logits, hidden, self.clock() - t0)

    def _emit(self, logits: np.ndarray, hidden: np.ndarray, seconds: float) -> Step:
        token = self.sample(logits)
        self.tokens.append(token)
        self.done = (token == self.eos_id and not self.opts.ignore_eos) or len(
            self.tokens
        ) >= self.opts.max_new_tokens
        return Step(token, hidden, seconds)


def generate(
    llm, cache, first_embeds: np.ndarray, embed_ids, opts: DecodeOptions, eos_id: int, clock=time.perf_counter
) -> Iterator[Step]:
    """``Decoder`` as a generator: the prefill's token, then one ``Step`` per decode step until done."""
    dec = Decoder(llm, cache, embed_ids, opts, eos_id, clock)
    yield dec.prefill(first_embeds)
    while not dec.done:
        yield dec.step()
