"""legion_rt/decode.py on its own: options, the sampler and the Decoder loop over a scripted stand-in LLM."""

from __future__ import annotations

import numpy as np
import pytest

from legion_rt.decode import DecodeOptions, Decoder, Sampler, generate
from legion_rt.errors import RequestError

EOS = 2
V, H = 16, 4


class ScriptLLM:
    """forward() #k returns logits whose argmax is script[k] and hidden [k] * H; records the embeds it was fed."""

    def __init__(self, script):
        self.script = list(script)
        self.fed = []

    def forward(self, cache, embeds):
        k = len(self.fed)
        self.fed.append(np.array(embeds))
        cache["length"] += embeds.shape[1]
        logits = np.zeros(V, np.float32)
        logits[self.script[k]] = 1.0
        return logits, np.full(H, float(k), np.float32)


def embed(ids):
    return np.asarray(ids, np.float32).reshape(1, -1, 1).repeat(H, axis=2)  # row i == id i: traceable


def _run(script, **opts):
    llm, cache = ScriptLLM(script), {"length": 3}
    steps = list(generate(llm, cache, np.zeros((1, 5, H), np.float32), embed, DecodeOptions(**opts), EOS))
    return steps, llm, cache


def test_greedy_stops_at_eos_and_feeds_back_each_token_but_the_last():
    steps, llm, cache = _run([7, 9, EOS, 11], max_new_tokens=10)
    assert [s.token_id for s in steps] == [7, 9, EOS]
    assert [float(s.hidden[0]) for s in steps] == [0.0, 1.0, 2.0]  # the hidden of the forward that chose it
    assert len(llm.fed) == 3 and llm.fed[0].shape == (1, 5, H)  # prefill, then one position per step
    assert [int(f[0, 0, 0]) for f in llm.fed[1:]] == [7, 9]  # EOS itself is never fed back
    assert cache["length"] == 3 + 5 + 2


def test_max_new_tokens_and_ignore_eos():
    steps, llm, _ = _run([EOS, EOS, 5, 6, 7], max_new_tokens=4, ignore_eos=True)
    assert [s.token_id for s in steps] == [EOS, EOS, 5, 6] and len(llm.fed) == 4
    steps, llm, _ = _run([4, 5, 6], max_new_tokens=1)
    assert [s.token_id for s in steps] == [4] and len(llm.fed) == 1


def test_decoder_stages_refuse_wrong_order():
    dec = Decoder(ScriptLLM([3, EOS]), {"length": 0}, embed, DecodeOptions(max_new_tokens=5), EOS)
    with pytest.raises(RuntimeError, match="before prefill"):
        dec.step()
    assert dec.prefill(np.zeros((1, 2, H), np.float32)).token_id == 3 and not dec.done
    with pytest.raises(RuntimeError, match="once"):
        dec.prefill(np.zeros((1, 2, H), np.float32))
    assert dec.step().token_id == EOS and dec.done and dec.tokens == [3, EOS]
    with pytest.raises(RuntimeError, match="after the last token"):
        dec.step()


def test_greedy_ties_go_to_the_first_index_as_torch_argmax():
    s = Sampler(DecodeOptions())
    assert s(np.array([0.0, 3.0, 3.0, 1.0], np.float32)) == 1


def test_seeded_sampling_is_reproducible_and_top_p_keeps_the_head():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draw = lambda seed, top_p: [Sampler(DecodeOptions(temperature=1.0, top_p=top_p, seed=seed))(logits)  # noqa: E731
                                for _ in range(1)]  # fmt: skip
    a = Sampler(DecodeOptions(temperature=1.0, seed=3))
    b = Sampler(DecodeOptions(temperature=1.0, seed=3))
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]
    s = Sampler(DecodeOptions(temperature=1.0, top_p=0.5, seed=0))
    assert {s(logits) for _ in range(200)} == {0}  # 0.5 of the mass is reached by the first token alone
    s = Sampler(DecodeOptions(temperature=1.0, top_p=0.75, seed=0))
    assert {s(logits) for _ in range(400)} == {0, 1}
    assert draw(1, 1e-9) == [0]  # the most likely token is always kept


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"max_new_tokens": True}, "max_new_tokens=True"),
        ({"max_new_tokens": 2.0}, "max_new_tokens=2.0"),
        ({"max_new_tokens": 99}, "at most 90 new tokens"),
        ({"temperature": -1}, "temperature=-1"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"top_p": 0}, "top_p=0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"seed": "1"}, "seed='1'"),
    ],
)
def test_options_are_validated(opts, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(")):
        DecodeOptions(**{"max_new_tokens": 8, **opts}).validate(prompt_len=10, max_positions=100)
