"""Text side of the runtime: ids -> text exactly as the reference decodes them, streaming deltas, and the
reference's text post-processing (docs/REFERENCE.md "Text output").

No torch, transformers or sentencepiece: the detokenizer runs over ``tokenizer.json`` (written at export time by
``export.tokenizer.write_tokenizer_json``) in pure Python, re-implementing the decode path of transformers 4.28's
slow ``LlamaTokenizer.decode(ids, skip_special_tokens=False)`` with sentencepiece 0.1.99's piece decoding:

1. Ids >= the sentencepiece vocabulary size are *added tokens* (``<im_start>`` ... ``</p>``); each is its own
   sub-text, and the runs of other ids between them are decoded separately. Sub-texts are joined with ``" "``.
2. Inside a run, *special tokens* (``<s>``, ``</s>``, ``<unk>``) cut it into segments: each segment is decoded by
   sentencepiece and followed by the special token's text; when a special token directly follows a non-empty
   segment (not at the run's start), a space goes *before that segment's text*.
3. Sentencepiece decoding of a segment: "▁" -> " "; the first non-byte piece loses one leading "▁" unless a
   byte-fallback piece came before it in the segment; each maximal run of byte pieces ``<0xHH>`` is decoded as
   UTF-8 where every structurally invalid byte (a stray continuation byte, a truncated or overlong sequence, a
   surrogate) becomes one U+FFFD.
4. ``clean_up_tokenization_spaces`` (from ``tokenizer_config.json``, default false as LlamaTokenizer's) applies
   4.28's fixed replaces (" ." -> ".", ... " 're" -> "'re").

``tests/fixtures/hf428_tiny.json`` holds the real 4.28.0 output this is tested against.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import read_json_object
from .errors import ArtifactError

_META = "\u2581"  # sentencepiece's whitespace symbol
_REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")

# Token kinds.
_TEXT, _BYTE, _SPECIAL, _ADDED = 0, 1, 2, 3

_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


def clean_up_tokenization(text: str) -> str:
    """transformers 4.28 ``clean_up_tokenization``: these replaces, in this order, each one pass over the text."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def _utf8_lead_length(b: int) -> int:
    """Bytes a sequence starting with b needs (sentencepiece's DecodeUTF8 lead classes); 0 = invalid lead."""
    if b < 0x80:
        return 1
    if 0xC0 <= b <= 0xDF:
        return 2
    if 0xE0 <= b <= 0xEF:
        return 3
    if 0xF0 <= b <= 0xF7:
        return 4
    return 0


def _utf8_char(seq: bytes) -> str | None:
    """The character of a complete candidate sequence, or None when sentencepiece calls it invalid (non-trail byte,
    overlong form, surrogate, > U+10FFFF). Python's strict decoder rejects exactly the same sequences."""
    try:
        return seq.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _decode_bytes(data: bytes, final: bool) -> tuple[str, int]:
    """Decode a run of byte-fallback bytes as sentencepiece does (each invalid byte -> one U+FFFD, scanning left to
    right). Returns (text, consumed). When not final, stops before a sequence that is still incomplete (it may
    become valid with the next bytes) and reports how many bytes were consumed."""
    if final:
        try:
            return data.decode("utf-8"), len(data)  # fast path: valid UTF-8 decodes the same either way
        except UnicodeDecodeError:
            pass
    out: list[str] = []
    i, n = 0, len(data)
    while i < n:
        need = _utf8_lead_length(data[i])
        if need == 0:
            out.append(_REPLACEMENT)
            i += 1
        elif need == 1:
            out.append(chr(data[i]))
            i += 1
        elif n - i < need:
            if not final and all(0x80 <= b <= 0xBF for b in data[i + 1 : n]):
                break  # still a possible prefix of a valid character: wait for more bytes
            out.append(_REPLACEMENT)
            i += 1
        else:
            ch = _utf8_char(data[i : i + need])
            if ch is None:
                out.append(_REPLACEMENT)
                i += 1
            else:
                out.append(ch)
                i += need
    return "".join(out), i


@dataclass(frozen=True, kw_only=True)
class Detokenizer:
    """Exact ``LlamaTokenizer.decode(ids, skip_special_tokens=False)`` of transformers 4.28 over tokenizer.json.

    ``kinds[i]`` is the kind of id i (text piece, byte piece, special token, added token); ``texts[i]`` its text
    ("▁" already turned into " "; the token string for special/added tokens; "" for byte pieces); ``stripped[i]``
    the text without its first space (for the first piece of a segment); ``byte_values[i]`` the byte of a byte piece.
    """

    kinds: bytes = field(repr=False)
    texts: tuple[str, ...] = field(repr=False)
    stripped: tuple[str, ...] = field(repr=False)
    byte_values: bytes = field(repr=False)
    sp_vocab_size: int
    clean_up_tokenization_spaces: bool = False
    token_ids: dict[str, int] = field(
        default_factory=dict, repr=False
    )  # text -> id of special and added tokens

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, art_dir: str | Path) -> Detokenizer:
        """From an artifact directory: ``tokenizer.json`` + ``tokenizer_config.json`` (optional: default config)."""
        d = Path(art_dir)
        config = d / "tokenizer_config.json"
        return cls.from_files(d / "tokenizer.json", config if config.is_file() else None)

    @classmethod
    def from_files(
        cls, tokenizer_json: str | Path, tokenizer_config: str | Path | None = None
    ) -> Detokenizer:
        tj = Path(tokenizer_json)
        doc = read_json_object(tj)
        model = doc.get("model")
        if (
            not isinstance(model, dict)
            or model.get("type") != "BPE"
            or not isinstance(model.get("vocab"), dict)
        ):
            raise ArtifactError(
                f"{tj}: expected a tokenizers BPE model with a vocab (export.tokenizer writes it)"
            )
        if not model.get("byte_fallback", False):
            raise ArtifactError(f"{tj}: expected byte_fallback (a LLaMA sentencepiece conversion)")
        vocab: dict = model["vocab"]
        size = len(vocab)
        pieces: list[str | None] = [None] * size
        for piece, idx in vocab.items():
            if not isinstance(idx, int) or not 0 <= idx < size or pieces[idx] is not None:
                raise ArtifactError(
                    f"{tj}: vocab id {idx!r} of {piece!r} is not a permutation of 0..{size - 1}"
                )
            pieces[idx] = piece
        specials: dict[int, str] = {}
        added: dict[int, str] = {}
        for entry in doc.get("added_tokens") or []:
            idx, content = entry.get("id"), entry.get("content")
            if not isinstance(idx, int) or not isinstance(content, str):
                raise ArtifactError(f"{tj}: malformed added_tokens entry {entry!r}")
            if idx < size:
                if entry.get("special") and content == pieces[idx]:
                    specials[idx] = content
            else:
                added[idx] = content
        total = size + len(added)
        if sorted(added) != list(range(size, total)):
            raise ArtifactError(
                f"{tj}: added token ids {sorted(added)} do not continue the vocabulary at {size}"
            )

        kinds = bytearray(total)
        texts: list[str] = [""] * total
        stripped: list[str] = [""] * total
        byte_values = bytearray(total)
        for i, piece in enumerate(pieces):
            if i in specials:
                kinds[i], texts[i] = _SPECIAL, piece
                continue
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                kinds[i], byte_values[i] = _BYTE, int(m.group(1), 16)
                continue
            kinds[i] = _TEXT
            texts[i] = piece.replace(_META, " ")
            stripped[i] = piece[1:].replace(_META, " ") if piece.startswith(_META) else texts[i]
        for i, content in added.items():
            kinds[i], texts[i] = _ADDED, content
        # 4.28 compares token *strings*: an sp piece spelled like an added or special token would be treated as one.
        added_strings = set(added.values())
        for i in range(size):
            if kinds[i] == _TEXT and pieces[i] in added_strings:
                raise ArtifactError(f"{tj}: piece {pieces[i]!r} (id {i}) collides with an added token")

        clean_up = False
        if tokenizer_config is not None:
            cfg = read_json_object(Path(tokenizer_config))
            clean_up = cfg.get("clean_up_tokenization_spaces", False)
            if not isinstance(clean_up, bool):
                raise ArtifactError(f"{tokenizer_config}: clean_up_tokenization_spaces must be true or false")
        return cls(
            kinds=bytes(kinds),
            texts=tuple(texts),
            stripped=tuple(stripped),
            byte_values=bytes(byte_values),
            sp_vocab_size=size,
            clean_up_tokenization_spaces=clean_up,
            token_ids={**{t: i for i, t in specials.items()}, **{t: i for i, t in added.items()}},
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids (sentencepiece pieces + added tokens)."""
        return len(self.kinds)

    # -- decoding -------------------------------------------------------------------------------------------------
    def _check(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        n = len(self.kinds)
        for i in ids:
            if not 0 <= i < n:
                raise ArtifactError(f"token id {i} is outside the tokenizer vocabulary (0..{n - 1})")
        return ids

    def _sub_texts(self, ids: list[int]) -> tuple[list[str], list[int]]:
        """4.28 ``_decode``'s sub_texts (before the " " join and the clean-up), and for each sub-text the id of
        the added token it is, or -1 for a run of other tokens."""
        kinds, texts, stripped, byte_values = self.kinds, self.texts, self.stripped, self.byte_values
        subs: list[str] = []
        slots: list[int] = []
        out: list[str] = []  # pieces of the current run's string
        run_len = 0  # tokens in the current run (index i of convert_tokens_to_string)
        seg_start = 0  # index in `out` where the current segment's text starts
        prev_special = False
        first = True  # next non-byte piece is the segment's first (loses one leading "▁")
        pending = bytearray()  # current byte-fallback run

        for i in ids:
            kind = kinds[i]
            if kind == _TEXT:
                if pending:
                    out.append(_decode_bytes(bytes(pending), final=True)[0])
                    pending.clear()
                out.append(stripped[i] if first else texts[i])
                first = prev_special = False
            elif kind == _BYTE:
                pending.append(byte_values[i])
                first = prev_special = False
            elif kind == _SPECIAL:
                if pending:
                    out.append(_decode_bytes(bytes(pending), final=True)[0])
                    pending.clear()
                if not prev_special and run_len:
                    out.insert(seg_start, " ")  # 4.28: the space goes before the segment's text
                out.append(texts[i])
                seg_start = len(out)
                prev_special = first = True
            else:  # _ADDED: closes the run, is its own sub-text
                if run_len:
                    if pending:
                        out.append(_decode_bytes(bytes(pending), final=True)[0])
                        pending.clear()
                    subs.append("".join(out))
                    slots.append(-1)
                    out.clear()
                    run_len, seg_start, prev_special, first = 0, 0, False, True
                subs.append(texts[i])
                slots.append(i)
                continue
            run_len += 1
        if run_len:
            if pending:
                out.append(_decode_bytes(bytes(pending), final=True)[0])
            subs.append("".join(out))
            slots.append(-1)
        return subs, slots

    def decode(self, ids) -> str:
        """``LlamaTokenizer.decode(ids, skip_special_tokens=False)`` of transformers 4.28 (ids: ints; numpy ok)."""
        text = " ".join(self._sub_texts(self._check(ids))[0])
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def decode_with_positions(self, ids, token_id: int) -> tuple[str, list[int]]:
        """decode(ids), and for each occurrence of the added token ``token_id`` in ids (in order) the offset of its
        text in the decoded string. This tells real ``[SEG]`` tokens from the text "[SEG]" spelled by pieces."""
        ids = self._check(ids)
        if not 0 <= token_id < len(self.kinds) or self.kinds[token_id] != _ADDED:
            raise ArtifactError(f"token id {token_id} is not an added token")
        subs, slots = self._sub_texts(ids)
        positions: list[int] = []
        offset = 0
        for sub, slot in zip(subs, slots, strict=True):
            if slot == token_id:
                positions.append(offset)
            offset += len(sub) + 1  # + the " " join
        text = " ".join(subs)
        if self.clean_up_tokenization_spaces:
            text, positions = replace_tracking(text, _CLEAN_UP, positions)
        return text, positions

    def stream(self, prefix_ids=()) -> TextStream:
        """A streaming decoder positioned after ``prefix_ids`` (their text is not emitted). See TextStream."""
        s = TextStream(self)
        for i in self._check(prefix_ids):
            s._feed(i)
        s._emitted.clear()
        s.missed_spaces = 0
        return s


class TextStream:
    """Incremental decoding: ``push(token_id) -> str`` returns the text that token adds (possibly ""), O(1) per
    token (a held-back partial UTF-8 sequence is at most 3 bytes; with clean-up on, at most 3 characters).

    Invariant, for prefix P and pushed ids G (``flush()`` called at the end)::

        det.decode(P) + "".join(deltas) == det.decode(P + G)

    with one exception that no streaming decoder can honour: when ``</s>``, ``<s>`` or ``<unk>`` directly follows
    text of the same run, 4.28 inserts a space *before that text*, i.e. inside what was already streamed. The stream
    leaves that space out (``missed_spaces`` counts them); its deltas then equal the decode with the rule dropped.
    The final, exact text is ``det.decode(P + G)``. Other limits: P must not end inside a byte-fallback sequence
    (LEGION's prompt ends with "ASSISTANT:"), and with clean-up on, decode(P) must not end within 3 characters after
    a space.
    """

    def __init__(self, det: Detokenizer) -> None:
        self._det = det
        self._has_sub = False  # a sub-text has begun (the next one is preceded by the " " join)
        self._run_len = 0
        self._prev_special = False
        self._first = True
        self._pending = bytearray()
        self._emitted: list[str] = []
        self._clean_buf = ""
        self.missed_spaces = 0

    def _flush_bytes(self) -> None:
        if self._pending:
            self._emitted.append(_decode_bytes(bytes(self._pending), final=True)[0])
            self._pending.clear()

    def _feed(self, i: int) -> None:
        det = self._det
        kind = det.kinds[i]
        if kind == _ADDED:
            if self._run_len:
                self._flush_bytes()
                self._run_len, self._prev_special, self._first = 0, False, True
            self._emitted.append((" " if self._has_sub else "") + det.texts[i])
            self._has_sub = True
            return
        if self._run_len == 0:  # a new run: a new sub-text
            if self._has_sub:
                self._emitted.append(" ")
            self._has_sub = True
        if kind == _BYTE:
            self._pending.append(det.byte_values[i])
            text, used = _decode_bytes(bytes(self._pending), final=False)
            if used:
                self._emitted.append(text)
                del self._pending[:used]
            self._first = self._prev_special = False
        elif kind == _TEXT:
            self._flush_bytes()
            self._emitted.append(det.stripped[i] if self._first else det.texts[i])
            self._first = self._prev_special = False
        else:  # _SPECIAL
            self._flush_bytes()
            if not self._prev_special and self._run_len:
                self.missed_spaces += 1
            self._emitted.append(det.texts[i])
            self._prev_special = self._first = True
        self._run_len += 1

    def _take(self, final: bool) -> str:
        out = "".join(self._emitted)
        self._emitted.clear()
        if not self._det.clean_up_tokenization_spaces:
            return out
        buf = self._clean_buf + out
        if final:
            self._clean_buf = ""
            return clean_up_tokenization(buf)
        # Hold back from any space among the last 3 characters: every clean-up pattern starts with a space and is
        # at most 4 characters long, so no pattern can then straddle the cut (see tests).
        cut = len(buf)
        while True:
            lo = max(0, cut - 3)
            k = buf.find(" ", lo, cut)
            if k < 0:
                break
            cut = k
        self._clean_buf = buf[cut:]
        return clean_up_tokenization(buf[:cut])

    def push(self, token_id: int) -> str:
        """Add one token; return the text it adds (may be "" while a UTF-8 sequence is incomplete)."""
        (i,) = self._det._check((token_id,))
        self._feed(i)
        return self._take(final=False)

    def flush(self) -> str:
        """End of generation: the held-back text (incomplete UTF-8 becomes U+FFFD as in decode())."""
        self._flush_bytes()
        return self._take(final=True)


def replace_tracking(text: str, pairs, positions: list[int]) -> tuple[str, list[int]]:
    """Apply ``text = text.replace(old, new)`` for each (old, new) in order, and move each position with its
    character. A position inside a replaced occurrence moves to the replacement's start."""
    positions = list(positions)
    for old, new in pairs:
        starts = []  # occurrences exactly as str.replace finds them: left to right, non-overlapping
        k = text.find(old)
        while k >= 0:
            starts.append(k)
            k = text.find(old, k + len(old))
        if not starts:
            continue
        delta = len(new) - len(old)
        moved = []
        for p in positions:
            before = bisect.bisect_right(starts, p)  # occurrences starting at or before p
            if before and p < starts[before - 1] + len(old):  # p inside the last of them
                moved.append(starts[before - 1] + (before - 1) * delta)
            else:
                moved.append(p + before * delta)
        positions = moved
        text = text.replace(old, new)
    return text, positions


# ----------------------------------------------------------------------------------------------------------------
# Reference text post-processing (docs/REFERENCE.md "Text output", steps 2-5, as scripts/loc_exp/infer.py)
# ----------------------------------------------------------------------------------------------------------------

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
