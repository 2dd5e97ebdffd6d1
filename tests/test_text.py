"""legion_rt/text.py: decoding vs the REAL transformers 4.28.0 (tests/fixtures/hf428_tiny.json) and vs the
sentencepiece-based oracle (export.tokenizer.SlowLlamaTokenizer, itself checked against the fixture in
tests/test_tokenizer.py), streaming, the reference text post-processing and [SEG] phrase pairing."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from pathlib import Path

import pytest

from legion_rt.errors import ArtifactError
from legion_rt.text import Detokenizer, TextOutput, pair_phrases, postprocess_text, replace_tracking

FIXTURE = Path(__file__).parent / "fixtures" / "hf428_tiny.json"
SEG, P_START, P_END, EOS = 1004, 1005, 1006, 2


@pytest.fixture(scope="module")
def fx() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    """An artifact-like directory: tokenizer.json + the checkpoint's tokenizer files (export needs sentencepiece)."""
    pytest.importorskip("sentencepiece", reason="writing tokenizer.json is an export-stage step")
    from legion_rt.export.tokenizer import write_tiny_tokenizer, write_tokenizer_json

    d = tmp_path_factory.mktemp("tok-art")
    write_tiny_tokenizer(d)
    write_tokenizer_json(d, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def det(art) -> Detokenizer:
    return Detokenizer.from_dir(art)


@pytest.fixture(scope="module")
def oracle(art):
    from legion_rt.export.tokenizer import SlowLlamaTokenizer

    return SlowLlamaTokenizer.from_dir(art)


@pytest.fixture(scope="module")
def prompt(art) -> list[int]:
    """Prompt ids as the reference decodes them (image index removed)."""
    from legion_rt.export.tokenizer import prompt_ids

    prefix, suffix = prompt_ids(art)
    return prefix + suffix


def random_ids(det: Detokenizer, rng: random.Random, n: int) -> list[int]:
    """Every kind of id, with valid and broken UTF-8 byte runs, specials and added tokens in runs."""
    byte0 = 3  # <0x00>
    out: list[int] = []
    while len(out) < n:
        r = rng.random()
        if r < 0.45:
            out.append(rng.randrange(259, 1000))
        elif r < 0.55:
            out.append(rng.randrange(byte0, byte0 + 256))
        elif r < 0.65:
            ch = rng.choice("\u00e9\u4e2d\U0001f600\x00 \n\ufffd")
            out.extend(byte0 + b for b in ch.encode("utf-8")[: rng.choice([1, 2, 4, 4, 4])])
        elif r < 0.78:
            out.append(rng.choice([0, 1, 2]))
        else:
            out.append(rng.randrange(1000, 1007))
    return out


# -- decoding --------------------------------------------------------------------------------------------------------


def test_decode_equals_real_428(det, fx):
    assert det.clean_up_tokenization_spaces is fx["clean_up_tokenization_spaces"] is False
    for case in fx["decodes"]:
        assert det.decode(case["ids"]) == case["text"], case["ids"]


def test_decode_clean_up_equals_real_428(art, fx, tmp_path):
    cfg = json.loads((art / "tokenizer_config.json").read_text())
    cfg["clean_up_tokenization_spaces"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    det_clean = Detokenizer.from_files(art / "tokenizer.json", tmp_path / "tokenizer_config.json")
    assert det_clean.clean_up_tokenization_spaces is True
    for case in fx["decodes_clean_up"]:
        assert det_clean.decode(case["ids"]) == case["text"], case["ids"]


def test_decode_equals_oracle_fuzz(det, oracle):
    rng = random.Random(0)
    for _ in range(1500):
        ids = random_ids(det, rng, rng.randrange(0, 40))
        assert det.decode(ids) == oracle.decode(ids), ids


def test_decode_errors(det, art, tmp_path):
    with pytest.raises(ArtifactError, match="outside the tokenizer vocabulary"):
        det.decode([5, 1007])
    with pytest.raises(ArtifactError, match="outside"):
        det.decode([-200])
    with pytest.raises(ArtifactError, match="tokenizer.json"):
        Detokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    with pytest.raises(ArtifactError, match="BPE"):
        Detokenizer.from_dir(tmp_path)


def test_decode_speed(det, prompt):
    ids = prompt + random_ids(det, random.Random(1), 600 - len(prompt))
    det.decode(ids)
    t0 = time.perf_counter()
    for _ in range(50):
        det.decode(ids)
    per_call = (time.perf_counter() - t0) / 50
    print(f"decode of 600 ids: {per_call * 1e3:.3f} ms")  # measured 0.16-0.27 ms on the 2-core dev box
    assert per_call < 3e-3


# -- streaming -------------------------------------------------------------------------------------------------------


def _stream_all(det, prefix, gen):
    s = det.stream(prefix)
    deltas = [s.push(i) for i in gen]
    deltas.append(s.flush())
    return deltas, s


def test_stream_invariant_fuzz(det, oracle):
    rng = random.Random(2)
    exact = 0
    for _ in range(800):
        ids = random_ids(det, rng, rng.randrange(1, 50))
        cut = rng.randrange(0, len(ids))
        while cut and det.kinds[ids[cut - 1]] == 1:  # the prefix must not end inside a byte run
            cut -= 1
        prefix, gen = ids[:cut], ids[cut:]
        deltas, s = _stream_all(det, prefix, gen)
        streamed = "".join(deltas)
        # Always: exact up to the retroactive space before a run that </s>/<s>/<unk> follows.
        assert oracle.decode(prefix, space_before_special=False) + streamed == oracle.decode(
            ids, space_before_special=False
        ), (prefix, gen)
        if s.missed_spaces == 0 and det.decode(ids).startswith(det.decode(prefix)):
            assert det.decode(prefix) + streamed == det.decode(ids), (prefix, gen)
            exact += 1
    assert exact > 100


def test_stream_legion_answer(det, prompt, oracle):
    answer = oracle.encode(
        " <p> the left hand </p> [SEG] has six fingers, caf\u00e9 \U0001f600.", add_bos=False
    )
    deltas, s = _stream_all(det, prompt, answer)
    assert det.decode(prompt) + "".join(deltas) == det.decode(prompt + answer)
    assert s.missed_spaces == 0
    # With </s>, 4.28 puts a space before " has six fingers..." (already streamed): counted, left out.
    deltas, s = _stream_all(det, prompt, answer + [EOS])
    assert s.missed_spaces == 1 and "".join(deltas).endswith("</s>")
    assert oracle.decode(prompt + answer + [EOS]).replace("[SEG]  has", "[SEG] has") == det.decode(
        prompt
    ) + "".join(deltas)


def test_stream_holds_back_partial_utf8(det):
    emoji = [3 + b for b in "\U0001f600".encode()]
    s = det.stream([1, 500])
    assert [s.push(i) for i in emoji] == ["", "", "", "\U0001f600"]
    s = det.stream([1, 500])
    assert [s.push(i) for i in emoji[:2]] == ["", ""]
    assert s.push(3 + ord("A")) == "\ufffd\ufffdA"  # invalidated: one U+FFFD per byte, as sentencepiece
    s = det.stream([1, 500])
    s.push(emoji[0])
    assert s.flush() == "\ufffd"


def test_stream_clean_up_fuzz(art, tmp_path):
    cfg = json.loads((art / "tokenizer_config.json").read_text())
    cfg["clean_up_tokenization_spaces"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    det_clean = Detokenizer.from_files(art / "tokenizer.json", tmp_path / "tokenizer_config.json")
    det_plain = dataclasses.replace(det_clean, clean_up_tokenization_spaces=False)
    # Pieces (and raw bytes) that spell the clean-up patterns, so patterns straddle token boundaries often.
    wanted = {" ", ".", ",", "'", "?", " n", "t", "re", "m", "s", "e", "v", " s", " m", " re", " t", "ve"}
    pool = [i for i in range(259, 1000) if det_clean.texts[i] in wanted] + [3 + ord(c) for c in " '!.n"]
    assert len(pool) > 15
    rng = random.Random(3)
    changed = 0
    for _ in range(500):
        gen = [rng.choice(pool) for _ in range(rng.randrange(1, 30))]
        prefix = [1, 500]  # decodes to one word, no trailing space
        deltas, _ = _stream_all(det_clean, prefix, gen)
        assert det_clean.decode(prefix) + "".join(deltas) == det_clean.decode(prefix + gen), gen
        changed += det_clean.decode(prefix + gen) != det_plain.decode(prefix + gen)
    assert changed > 100  # the clean-up really acted in many cases


def test_stream_push_is_constant_time(det, prompt):
    gen = random_ids(det, random.Random(4), 4000)
    gen = [i for i in gen if det.kinds[i] != 2]  # no specials: one long run, the worst case for re-decoding
    best = float("inf")
    for _ in range(3):  # the machine is shared: keep the best of three
        s = det.stream(prompt)
        for i in gen[:-500]:
            s.push(i)
        t0 = time.perf_counter()
        for i in gen[-500:]:
            s.push(i)
        best = min(best, (time.perf_counter() - t0) / 500)
    print(f"push after ~3500 tokens: {best * 1e6:.1f} us")  # measured ~1.7 us; re-decoding all would be ~1 ms
    assert best < 100e-6


# -- post-processing (independent reference written from infer.py's steps) -------------------------------------------


def reference_postprocess(text_output: str):
    """infer.py's lines, one to one (kept literal on purpose)."""
    text_output = text_output.replace("\n", "").replace("  ", " ")
    text_output = text_output.split("ASSISTANT: ")[-1]
    cleaned_str = re.sub(r"<.*?>", "", text_output)
    pattern = re.compile(r"<p>(.*?)<\/p>")
    phrases = pattern.findall(text_output)
    phrases = [p.strip() for p in phrases]
    cleaned_str = cleaned_str.replace("[SEG]", "")
    cleaned_str = " ".join(cleaned_str.split()).strip("'")
    cleaned_str = cleaned_str.strip()
    return text_output, cleaned_str, phrases


TRICKY_DECODED = [
    "",
    "no marker at all",
    "USER: hi ASSISTANT: <p> The hand </p> [SEG] is deformed.</s>",
    "ASSISTANT: a ASSISTANT: b <p>x</p>",
    "ASSISTANT:  <p>  two  spaces </p>   [SEG]   three   spaces\n\nnew\nlines</s>",
    "ASSISTANT: 'quoted' [SEG]'",
    "ASSISTANT: <p> a [SEG] inside </p> [SEG] <p></p> <p> unclosed",
    "ASSISTANT: <p>multi\nline</p> <im_start> <bbox> 3 < 4 > 2",
    "ASSISTANT: ''  ' inner '  ''",
    "ASSISTANT:\u3000<p>\u3000ideographic\u3000</p>\u00a0nbsp",
    "ASSISTANT: [SEG][SEG] <<p>> <p><p>nested</p></p>",
    "<s> A chat ... ASSISTANT: \t tab <p> t\tab </p></s>",
]


def test_postprocess_text_matches_infer_py():
    rng = random.Random(5)
    pieces = [
        "ASSISTANT: ",
        "<p>",
        "</p>",
        " [SEG]",
        "[SEG]",
        " ",
        "  ",
        "\n",
        "'",
        "x",
        "word",
        "</s>",
        "<",
        ">",
    ]
    cases = TRICKY_DECODED + [
        "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 25))) for _ in range(500)
    ]
    for decoded in cases:
        out = postprocess_text(decoded)
        assert isinstance(out, TextOutput)
        assert (out.answer, out.explanation, out.phrases) == reference_postprocess(decoded), repr(decoded)


# -- phrase pairing ----------------------------------------------------------------------------------------------------


def _gen(oracle, text: str) -> list[int]:
    return oracle.encode(text, add_bos=False)


def test_pair_phrases_basic(det, oracle, prompt):
    gen = _gen(
        oracle, " <p> the left hand </p> [SEG] is deformed, <p> the sky </p> [SEG] [SEG] and [SEG]"
    ) + [EOS]
    assert gen.count(SEG) == 4
    phrases = postprocess_text(det.decode(prompt + gen)).phrases
    assert phrases == ["the left hand", "the sky"]
    assert pair_phrases(det, prompt, gen, SEG) == ["the left hand", "the sky", "the sky", "the sky"]


def test_pair_phrases_edge_cases(det, oracle, prompt):
    # [SEG] before any phrase; [SEG] inside a phrase (the enclosing phrase, which contains "[SEG]").
    gen = _gen(oracle, " [SEG] first <p> a [SEG] b </p> [SEG]")
    assert pair_phrases(det, prompt, gen, SEG) == [None, "a [SEG] b", "a [SEG] b"]
    assert postprocess_text(det.decode(prompt + gen)).phrases == ["a [SEG] b"]
    # "[SEG]" spelled with ordinary pieces is text, not a token: not counted, and it does not shift positions.
    spelled = oracle.sp.encode("x[SEG]y")
    assert SEG not in spelled
    gen = _gen(oracle, " <p> p1 </p>") + spelled + _gen(oracle, "[SEG]")
    assert "[SEG]y" in det.decode(prompt + gen)
    assert pair_phrases(det, prompt, gen, SEG) == ["p1"]
    # A generated "ASSISTANT: " moves the answer start: [SEG]s before it have no phrase.
    gen = _gen(oracle, " <p> old </p> [SEG] ASSISTANT: <p> new </p> [SEG]")
    assert pair_phrases(det, prompt, gen, SEG) == [None, "new"]
    # Newlines and double spaces (steps 2-3 shift positions) and an unclosed phrase.
    gen = _gen(oracle, "\n\n <p>  two  words \n</p>\n [SEG]  <p> open [SEG]")
    assert pair_phrases(det, prompt, gen, SEG) == ["two words", "two words"]
    assert pair_phrases(det, prompt, [], SEG) == []


def test_pair_phrases_fuzz_against_text_positions(det, oracle, prompt):
    """Every result is one of the reference phrases, one per [SEG], and equals a brute-force rule that marks each
    real [SEG] with a private character before post-processing."""
    rng = random.Random(6)
    words = ["<p>", "</p>", "[SEG]", " ", "  ", "\n", "hand", "ASSISTANT: ", "'", "<", "x"]
    for _ in range(300):
        gen = _gen(oracle, "".join(rng.choice(words) for _ in range(rng.randrange(0, 20))))
        gen = gen + [EOS] if rng.random() < 0.5 else gen
        got = pair_phrases(det, prompt, gen, SEG)
        assert len(got) == gen.count(SEG)
        phrases = postprocess_text(det.decode(prompt + gen)).phrases
        assert all(p is None or p in phrases for p in got)
        # Brute force: the real [SEG] sub-texts are the " "-joined pieces equal to "[SEG]" that come from the id.
        marked = det.decode(prompt + [i if i != SEG else 1003 for i in gen])  # <point> stands in for [SEG]
        marked = marked.replace("<point>", "\ue000")  # a private-use character no token produces here
        text = marked.replace("\n", "").replace("  ", " ")
        answer_start = text.rfind("ASSISTANT: ")
        answer_start = answer_start + len("ASSISTANT: ") if answer_start >= 0 else 0
        expected = [None] * text[:answer_start].count("\ue000")
        answer_marked = text[answer_start:]
        answer = answer_marked.replace("\ue000", "[SEG]")
        phrase_matches = list(re.finditer(r"<p>(.*?)<\/p>", answer))
        for j, m in enumerate(re.finditer("\ue000", answer_marked)):
            rel = m.start() + 4 * j  # each earlier marker grew from 1 to 5 characters
            before = [mm for mm in phrase_matches if mm.start() < rel]
            expected.append(before[-1].group(1).strip() if before else None)
        assert got == expected, gen


def test_replace_tracking_moves_positions():
    rng = random.Random(7)
    for _ in range(500):
        text = "".join(rng.choice(["a", " ", "  ", "\n", "b"]) for _ in range(rng.randrange(0, 30)))
        positions = [i for i, c in enumerate(text) if c in "ab"]
        new, moved = replace_tracking(text, (("\n", ""), ("  ", " ")), positions)
        assert new == text.replace("\n", "").replace("  ", " ")
        assert [new[p] for p in moved] == [text[p] for p in positions]


def test_runtime_text_imports_no_heavy_modules(art):
    """legion_rt.text runs on tokenizer.json alone: no torch, transformers, sentencepiece, tokenizers, export."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from legion_rt.text import Detokenizer; "
        f"d = Detokenizer.from_dir({str(art)!r}); print(repr(d.decode(np.array([1, 500, 1004, 2])))); "
        "bad = [m for m in ('torch', 'transformers', 'sentencepiece', 'tokenizers', 'export') if m in sys.modules]; "
        "assert not bad, bad"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert out.returncode == 0, out.stderr
    assert "[SEG]" in out.stdout and "</s>" in out.stdout
