"""The reference's answer post-processing (docs/REFERENCE.md "Text output", steps 2-5, as LEGION's infer.py) and
the phrase of each [SEG] (legion_rt's addition; the reference keeps no such pairing).

Input: the decoded text of ``prompt ids + generated ids`` (legion_rt/detokenizer.py).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .detokenizer import Detokenizer, replace_tracking

_PHRASE_RE = re.compile(r"<p>(.*?)<\/p>")
_TAG_RE = re.compile(r"<.*?>")
_ANSWER_MARK = "ASSISTANT: "


@dataclass(frozen=True)
class TextOutput:
    """answer: the decoded text after steps 2-3 (newlines removed, one "  " -> " " pass, text after the last
    "ASSISTANT: "), markup kept (``<p>``, ``[SEG]``, ``</s>``); explanation: the reference's cleaned string;
    phrases: the reference's phrase list (each stripped; may contain "[SEG]")."""

    answer: str
    explanation: str
    phrases: list[str]


def _answer_text(decoded: str) -> str:
    text = decoded.replace("\n", "").replace("  ", " ")
    return text.split(_ANSWER_MARK)[-1]


def postprocess_text(decoded: str) -> TextOutput:
    """infer.py's post-processing of ``tokenizer.decode(prompt + generated ids)``."""
    answer = _answer_text(decoded)
    phrases = [p.strip() for p in _PHRASE_RE.findall(answer)]
    cleaned = _TAG_RE.sub("", answer).replace("[SEG]", "")
    explanation = " ".join(cleaned.split()).strip("'").strip()
    return TextOutput(answer=answer, explanation=explanation, phrases=phrases)


def pair_phrases(det: Detokenizer, prefix_ids, generated_ids, seg_id: int) -> list[str | None]:
    """The phrase of each generated ``[SEG]`` token, in order (one entry per occurrence of ``seg_id`` in
    generated_ids; the reference keeps no such pairing, this is legion_rt's addition).

    Rule: decode ``prefix_ids + generated_ids`` exactly as postprocess_text's input, follow each real ``[SEG]``
    token (by id, so a "[SEG]" spelled by ordinary pieces is never taken for one) through steps 2-3 to its offset
    in the answer text, and find the reference's phrase matches (``<p>(.*?)</p>`` on that answer text). The
    [SEG]'s phrase is the last match that *starts* before it (so a [SEG] inside ``<p> ... </p>`` gets that
    phrase, and several [SEG]s after one phrase all get it), stripped: always an element of
    ``postprocess_text(...).phrases``. None when no match starts before it, or when the [SEG] lies before the
    answer (before the last "ASSISTANT: ").
    """
    prefix = [int(i) for i in prefix_ids]
    ids = prefix + [int(i) for i in generated_ids]
    text, positions = det.decode_with_positions(ids, seg_id)
    n_prefix = sum(1 for i in prefix if i == seg_id)
    positions = positions[n_prefix:]
    text, positions = replace_tracking(text, (("\n", ""), ("  ", " ")), positions)
    mark = text.rfind(_ANSWER_MARK)
    start = mark + len(_ANSWER_MARK) if mark >= 0 else 0
    answer = text[start:]
    matches = [(m.start(), m.group(1).strip()) for m in _PHRASE_RE.finditer(answer)]
    match_starts = [s for s, _ in matches]
    out: list[str | None] = []
    for p in positions:
        rel = p - start
        k = bisect.bisect_left(match_starts, rel)  # matches starting strictly before rel
        out.append(matches[k - 1][1] if rel >= 0 and k else None)
    return out
