"""Tokenizer side of the export stage: the LEGION prompt, its ids exactly as transformers 4.28 makes them, the
``tokenizers`` ``tokenizer.json`` the runtime decodes with, and the tiny tokenizer files of test checkpoints.

The reference (``opendatalab/LEGION`` ``scripts/loc_exp/infer.py``) loads the checkpoint's tokenizer with
``AutoTokenizer.from_pretrained(ckpt, use_fast=False)`` under transformers 4.28.0 / sentencepiece 0.1.99, i.e. the
slow ``LlamaTokenizer`` with the 7 added tokens read back from ``added_tokens.json`` (plain strings, not
``AddedToken`` objects), and builds the prompt ids with LLaVA's ``tokenizer_image_token``. ``SlowLlamaTokenizer``
below re-implements exactly the parts of that tokenizer the reference uses, on top of ``sentencepiece`` alone
(never transformers: a fast tokenizer gives different ids). ``tests/fixtures/hf428_tiny.json``, made by the real
4.28.0 (``tests/fixtures/make_hf428_fixture.py``), proves it.

Rules of 4.28's slow tokenizer that matter here (``PreTrainedTokenizer.tokenize`` / ``LlamaTokenizer``):

* The text is split on every "no split" token: ``<s>``, ``</s>``, ``<unk>`` and the 7 added tokens. No token is a
  prefix of another, so leftmost matching equals 4.28's trie.
* ``<s>``/``</s>``/``<unk>`` are ``AddedToken(lstrip=False, rstrip=False)``: the text around them is kept. The 7 added
  tokens are plain strings: ``str.rstrip()`` of the text before and ``str.lstrip()`` of the text after (all Unicode
  whitespace, newlines included), applied left to right.
* Every remaining non-empty text piece is encoded by sentencepiece on its own (so it gets its own dummy-prefix
  ``▁``); pieces map to ids with added tokens first, then ``piece_to_id``. BOS is prepended (add_bos_token), no EOS.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from legion_rt.errors import CheckpointError

from .config import read_json

# ----------------------------------------------------------------------------------------------------------------
# Prompt (docs/REFERENCE.md "Prompt"; infer.py + LLaVA's conv_templates["llava_v1"], SeparatorStyle.TWO)
# ----------------------------------------------------------------------------------------------------------------

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
# Fixed instruction of infer.py (also the training instruction). It contains no '<', '>' or '&', so infer.py's
# bleach.clean() leaves it unchanged.
INSTRUCTION = (
    "Please provide a detailed analysis of artifacts in this photo, considering physical artifacts (e.g., optical "
    "display issues, violations of physical laws, and spatial/perspective errors), structural artifacts (e.g., "
    "deformed objects, asymmetry, or distorted text), and distortion artifacts (e.g., color/texture distortion, "
    "noise/blur, artistic style errors, and material misrepresentation). Output with interleaved segmentation masks "
    "for the corresponding parts of the answer."
)
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
# conv.get_prompt() with messages [("USER", begin_str + instruction), ("ASSISTANT", "")]:
#   system + " " + "USER: " + message + " " + "ASSISTANT:"
PROMPT_TEMPLATE = (
    SYSTEM
    + " USER: The <im_start><image><im_end> provides an overview of the picture.\n{instruction} ASSISTANT:"
)

# The 7 tokens GLaMM/LEGION add, in id order from the sentencepiece vocabulary size V.
ADDED_TOKENS = ("<im_start>", "<im_end>", "<bbox>", "<point>", "[SEG]", "<p>", "</p>")
# Keys of special_token_ids() for the added tokens, same order.
ADDED_TOKEN_KEYS = ("im_start", "im_end", "bbox", "point", "seg", "p_start", "p_end")

TINY_TOKENIZER_MODEL = Path(__file__).with_name("assets") / "tiny_tokenizer.model"


def build_prompt(instruction: str = INSTRUCTION) -> str:
    """The full prompt string of infer.py for an instruction (one '<image>' placeholder)."""
    return PROMPT_TEMPLATE.format(instruction=instruction)


PROMPT = build_prompt()


# ----------------------------------------------------------------------------------------------------------------
# The slow tokenizer, emulated on sentencepiece
# ----------------------------------------------------------------------------------------------------------------


def _token_content(value) -> str | None:
    """A special token as saved by transformers: a plain string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"tokenizer config: unsupported special token value {value!r}")


@dataclass
class SlowLlamaTokenizer:
    """transformers 4.28 ``LlamaTokenizer`` (slow) + added tokens, as loaded by ``from_pretrained(use_fast=False)``.

    ``sp`` is a ``sentencepiece.SentencePieceProcessor``. ``added`` maps each added token (``added_tokens.json``) to
    its id (>= sp vocabulary size). ``special`` holds the strings of ``all_special_tokens`` (bos, eos, unk, pad and
    any ``additional_special_tokens``); ``strip_flags`` maps each special token that is an ``AddedToken`` to its
    (lstrip, rstrip) flags: lstrip strips the text on its left, rstrip the text on its right. 4.28's LlamaTokenizer
    makes bos/eos/unk/pad ``AddedToken(lstrip=False, rstrip=False)`` when given as strings. Every other no-split
    token (the added tokens) is a plain string: the text on both sides is stripped.
    """

    sp: object
    added: dict[str, int]
    special: tuple[str, ...]
    strip_flags: dict[str, tuple[bool, bool]]
    bos_id: int
    eos_id: int
    unk_id: int
    clean_up_tokenization_spaces: bool = False
    _split_re: re.Pattern = field(init=False, repr=False)
    _added_by_id: dict[int, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        no_split = sorted(set(self.added) | set(self.special), key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in no_split) + ")")
        self._added_by_id = {i: t for t, i in self.added.items()}

    # -- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, tokenizer_dir: str | Path) -> SlowLlamaTokenizer:
        """Load ``tokenizer.model`` + ``added_tokens.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``
        (the last three optional) the way 4.28's ``from_pretrained`` combines them."""
        import sentencepiece as spm

        d = Path(tokenizer_dir)
        model_path = d / "tokenizer.model"
        if not model_path.is_file():
            raise CheckpointError(f"{model_path}: missing sentencepiece model")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as err:
            raise CheckpointError(f"{model_path}: not a sentencepiece model ({err})") from err
        config = read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        # 4.28: special_tokens_map.json entries override tokenizer_config.json's init kwargs.
        if (d / "special_tokens_map.json").is_file():
            config.update(read_json(d / "special_tokens_map.json"))
        # (lstrip, rstrip) of the special tokens that are AddedToken objects in 4.28. LlamaTokenizer.__init__ wraps
        # bos/eos/unk/pad given as strings in AddedToken(lstrip=False, rstrip=False); from_pretrained turns dicts
        # (tokenizer_config / special_tokens_map) into AddedToken; plain-string additional_special_tokens stay plain.
        strip_flags: dict[str, tuple[bool, bool]] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}.get(key))
            if isinstance(value, dict):
                strip_flags[_token_content(value)] = (bool(value.get("lstrip")), bool(value.get("rstrip")))
            elif isinstance(value, str):
                strip_flags.setdefault(value, (False, False))
        for value in config.get("additional_special_tokens", []) or []:
            if isinstance(value, dict):
                strip_flags[_token_content(value)] = (bool(value.get("lstrip")), bool(value.get("rstrip")))
        bos = _token_content(config.get("bos_token", "<s>"))
        eos = _token_content(config.get("eos_token", "</s>"))
        unk = _token_content(config.get("unk_token", "<unk>"))
        pad = _token_content(config.get("pad_token"))
        extra = [_token_content(t) for t in config.get("additional_special_tokens", []) or []]
        special = tuple(dict.fromkeys(t for t in (bos, eos, unk, pad, *extra) if t))

        added: dict[str, int] = {}
        if (d / "added_tokens.json").is_file():
            raw = read_json(d / "added_tokens.json")
            size = sp.get_piece_size()
            for tok, idx in sorted(raw.items(), key=lambda kv: kv[1]):
                # 4.28 checks that added ids continue the vocabulary without gaps.
                if not isinstance(idx, int) or idx != size + len(added):
                    raise CheckpointError(
                        f"{d / 'added_tokens.json'}: id {idx!r} of {tok!r} is not contiguous"
                    )
                added[tok] = idx
        clean_up = config.get(
            "clean_up_tokenization_spaces", False
        )  # LlamaTokenizer.__init__ default in 4.28
        return cls(
            sp=sp,
            added=added,
            special=special,
            # LlamaTokenizer.__init__ wraps bos/eos/unk (and pad when given as str) in AddedToken(lstrip=False,
            # rstrip=False); additional_special_tokens given as plain strings stay plain (stripped both sides).
            strip_flags=strip_flags,
            bos_id=sp.piece_to_id(bos),
            eos_id=sp.piece_to_id(eos),
            unk_id=sp.piece_to_id(unk),
            clean_up_tokenization_spaces=bool(clean_up),
        )

    @property
    def sp_vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.sp_vocab_size + len(self.added)

    # -- encoding -------------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """``PreTrainedTokenizer.tokenize`` of 4.28 (token strings)."""
        parts = self._split_re.split(text)  # odd indices are no-split tokens
        for i in range(1, len(parts), 2):
            # Plain-string tokens: "We strip left and right by default".
            strip_left, strip_right = self.strip_flags.get(parts[i], (True, True))
            if strip_right and i + 1 < len(parts) and parts[i + 1]:
                parts[i + 1] = parts[i + 1].lstrip()
            if strip_left and parts[i - 1]:
                parts[i - 1] = parts[i - 1].rstrip()
        out: list[str] = []
        for i, part in enumerate(parts):
            if not part:  # fully stripped pieces are skipped
                continue
            if i % 2:
                out.append(part)
            else:
                out.extend(self.sp.encode(part, out_type=str))
        return out

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.added[t] if t in self.added else self.sp.piece_to_id(t) for t in tokens]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """``tokenizer(text).input_ids`` (add_bos_token=True, add_eos_token=False)."""
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return [self.bos_id, *ids] if add_bos else ids

    def tokenizer_image_token(self, prompt: str) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: chunks split at '<image>', BOS kept only on the first chunk, each
        '<image>' replaced by IMAGE_TOKEN_INDEX."""
        chunks = [self.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
        ids: list[int] = []
        offset = 0
        if chunks and chunks[0] and chunks[0][0] == self.bos_id:
            offset = 1
            ids.append(chunks[0][0])
        for k, chunk in enumerate(chunks):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[offset:])
        return ids

    # -- decoding (the oracle the runtime's Detokenizer is tested against) ------------------------------------------
    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._added_by_id[i] if i in self._added_by_id else self.sp.id_to_piece(i) for i in ids]

    def convert_tokens_to_string(self, tokens: list[str], *, space_before_special: bool = True) -> str:
        """``LlamaTokenizer.convert_tokens_to_string`` of 4.28: sp-decode the runs between special tokens; a space
        goes before a run that a special token directly follows (unless the special token comes first)."""
        out = ""
        run: list[str] = []
        prev_is_special = False
        for i, tok in enumerate(tokens):
            if tok in self.special:
                if not prev_is_special and i != 0 and space_before_special:
                    out += " "
                out += self.sp.decode(run) + tok
                prev_is_special = True
                run = []
            else:
                run.append(tok)
                prev_is_special = False
        return out + self.sp.decode(run)

    def decode(
        self,
        ids: list[int],
        *,
        clean_up_tokenization_spaces: bool | None = None,
        space_before_special: bool = True,
    ) -> str:
        """``decode(ids, skip_special_tokens=False)`` of 4.28 (``PreTrainedTokenizer._decode``): added tokens are
        separate sub-texts, everything is joined with " ", then optional clean-up. ``space_before_special=False``
        drops the one retroactive rule (used to state the streaming invariant in tests)."""
        sub_texts: list[str] = []
        run: list[str] = []
        for tok in self.convert_ids_to_tokens(ids):
            if tok in self.added:
                if run:
                    sub_texts.append(
                        self.convert_tokens_to_string(run, space_before_special=space_before_special)
                    )
                    run = []
                sub_texts.append(tok)
            else:
                run.append(tok)
        if run:
            sub_texts.append(self.convert_tokens_to_string(run, space_before_special=space_before_special))
        text = " ".join(sub_texts)
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        return clean_up_tokenization(text) if clean else text


def clean_up_tokenization(text: str) -> str:
    """``PreTrainedTokenizerBase.clean_up_tokenization`` of 4.28 (sequential single-pass replaces)."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


# ----------------------------------------------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------------------------------------------


def encode_like_hf428(text: str, tokenizer_dir: str | Path, *, add_bos: bool = True) -> list[int]:
    """``LlamaTokenizer.from_pretrained(tokenizer_dir, use_fast=False)(text).input_ids`` of transformers 4.28."""
    return SlowLlamaTokenizer.from_dir(tokenizer_dir).encode(text, add_bos=add_bos)


def prompt_ids(tokenizer_dir: str | Path, instruction: str = INSTRUCTION) -> tuple[list[int], list[int]]:
    """(prefix_ids, suffix_ids): infer.py's ``tokenizer_image_token(prompt)`` split at IMAGE_TOKEN_INDEX.

    prefix_ids start with BOS and end with ``<im_start>``; suffix_ids start with ``<im_end>`` and end with the
    pieces of "ASSISTANT:". The 576 image embeddings go between them (docs/FORMAT.md "manifest.json", ``prompt``).
    """
    ids = SlowLlamaTokenizer.from_dir(tokenizer_dir).tokenizer_image_token(build_prompt(instruction))
    if ids.count(IMAGE_TOKEN_INDEX) != 1:
        raise CheckpointError(
            f"prompt for {tokenizer_dir}: expected one image placeholder, got {ids.count(IMAGE_TOKEN_INDEX)}"
        )
    cut = ids.index(IMAGE_TOKEN_INDEX)
    return ids[:cut], ids[cut + 1 :]


def special_token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """{"bos", "eos", "unk", "pad", "im_start", "im_end", "bbox", "point", "seg", "p_start", "p_end"} -> id.

    pad is the unk id (infer.py sets ``tokenizer.pad_token = tokenizer.unk_token``). Added token ids are read the
    way infer.py reads ``seg_token_idx``: ``tokenizer(tok, add_special_tokens=False).input_ids[0]``."""
    tok = SlowLlamaTokenizer.from_dir(tokenizer_dir)
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id, "pad": tok.unk_id}
    for key, text in zip(ADDED_TOKEN_KEYS, ADDED_TOKENS, strict=True):
        if text not in tok.added:
            raise CheckpointError(
                f"{Path(tokenizer_dir) / 'added_tokens.json'}: missing added token {text!r}"
            )
        ids[key] = tok.encode(text, add_bos=False)[0]
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Tiny tokenizer files (test checkpoints)
# ----------------------------------------------------------------------------------------------------------------


def _added_token_dict(content: str, typed: bool) -> dict:
    d = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **d} if typed else d


def write_tiny_tokenizer(ckpt_dir: str | Path, *, pieces: int | None = None) -> int:
    """Write the shipped tiny LLaMA-like tokenizer into ckpt_dir as a GLaMM/LEGION checkpoint holds it.

    ``pieces``: grow the sentencepiece vocabulary to that many pieces (the released LLaMA tokenizer has 32000, so
    the added tokens sit at 32000..32006 as in LEGION) with filler pieces ``▁fillerNNNNN`` that no text contains:
    every encoding stays the same, only ids past the tiny vocabulary become decodable pieces.

    Files: ``tokenizer.model`` (export/assets/tiny_tokenizer.model, vocab V = 1000), ``added_tokens.json`` (the 7
    tokens at V..V+6), ``special_tokens_map.json`` and ``tokenizer_config.json`` exactly in the form
    transformers 4.28's ``save_pretrained`` writes them (LlamaTokenizer, bos/eos/unk as AddedToken, pad "<unk>",
    ``clean_up_tokenization_spaces: false``, ``model_max_length`` 1536, ``padding_side`` "right" as LEGION's
    training passes them). Returns V + 7, the model's ``vocab_size``.
    """
    import sentencepiece as spm

    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    if pieces is None:
        shutil.copyfile(TINY_TOKENIZER_MODEL, d / "tokenizer.model")
    else:
        (d / "tokenizer.model").write_bytes(_grown_tokenizer_model(pieces))
    vocab = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).get_piece_size()
    added = {tok: vocab + k for k, tok in enumerate(ADDED_TOKENS)}
    (d / "added_tokens.json").write_text(json.dumps(added, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special_map = {
        "bos_token": _added_token_dict("<s>", typed=False),
        "eos_token": _added_token_dict("</s>", typed=False),
        "pad_token": "<unk>",
        "unk_token": _added_token_dict("<unk>", typed=False),
    }
    (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token_dict("<s>", typed=True),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token_dict("</s>", typed=True),
        "model_max_length": 1536,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token_dict("<unk>", typed=True),
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return vocab + len(ADDED_TOKENS)


def _grown_tokenizer_model(pieces: int) -> bytes:
    """The tiny tokenizer.model with NORMAL filler pieces appended up to ``pieces`` (scores below every real piece,
    text no prompt or answer contains: digits keep them out of make-tiny's word picks)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(TINY_TOKENIZER_MODEL.read_bytes())
    have = len(proto.pieces)
    if pieces < have:
        raise ValueError(f"tokenizer pieces {pieces} < the tiny tokenizer's {have}")
    low = min(p.score for p in proto.pieces)
    for k in range(pieces - have):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"\u2581filler{k:05d}", low - 1.0 - k, _SP_NORMAL
    return proto.SerializeToString()


# ----------------------------------------------------------------------------------------------------------------
# tokenizer.json for the runtime
# ----------------------------------------------------------------------------------------------------------------

# sentencepiece ModelProto.SentencePiece.Type values.
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def _sp_pieces(model_path: Path) -> tuple[list[tuple[str, int]], object]:
    """[(piece, type)] in id order and the parsed ModelProto of a sentencepiece model file."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(model_path.read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError type
        raise CheckpointError(f"{model_path}: not a sentencepiece model ({err})") from err
    return [(p.piece, p.type) for p in proto.pieces], proto


def write_tokenizer_json(tokenizer_dir: str | Path, out_path: str | Path) -> Path:
    """Convert the checkpoint's tokenizer to a ``tokenizers`` ``tokenizer.json`` (what the runtime decodes with).

    The file is a regular LLaMA-style ``tokenizers`` BPE file (vocabulary = the sentencepiece pieces in id order,
    merges derived from the vocabulary as transformers' converter does, byte fallback, "▁" metaspace normalizer and
    decoder) plus ``added_tokens``: the slow tokenizer's special tokens that are sentencepiece pieces (``<unk>``,
    ``<s>``, ``</s>``: ``"special": true``) and the added tokens of ``added_tokens.json`` (ids >= the sentencepiece
    vocabulary size, ``"special": false`` as 4.28 loads them). ``legion_rt.text.Detokenizer`` relies on exactly
    this: ``model.vocab`` gives id -> piece, pieces ``<0xHH>`` are byte-fallback pieces, added_tokens with
    ``special`` and id < len(vocab) are the slow tokenizer's ``all_special_tokens``, those with id >= len(vocab) are
    its added tokens. Do not use the file's encoder for prompt ids: they come from ``prompt_ids``.
    """
    d = Path(tokenizer_dir)
    tok = SlowLlamaTokenizer.from_dir(d)
    pieces, proto = _sp_pieces(d / "tokenizer.model")
    if proto.trainer_spec.model_type != 2:  # BPE
        raise CheckpointError(
            f"{d / 'tokenizer.model'}: not a BPE sentencepiece model (LLaMA tokenizers are BPE)"
        )
    if not proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.remove_extra_whitespaces:
        raise CheckpointError(
            f"{d / 'tokenizer.model'}: expected LLaMA's normalizer (add_dummy_prefix, remove_extra_whitespaces off)"
        )
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    added_tokens = []
    for i, (piece, kind) in enumerate(pieces):
        if kind in (_SP_UNKNOWN, _SP_CONTROL):
            # 4.28 decodes these only through convert_tokens_to_string's special-token branch; a control piece that
            # is not a special token would reach sentencepiece (empty surface), which the runtime does not model.
            if piece not in tok.special:
                raise CheckpointError(
                    f"{d / 'tokenizer.model'}: control piece {piece!r} (id {i}) is not a special token"
                )
            added_tokens.append(
                {
                    "id": i,
                    "content": piece,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }  # fmt: skip
            )
        elif kind not in (_SP_NORMAL, _SP_BYTE):
            raise CheckpointError(
                f"{d / 'tokenizer.model'}: unsupported piece type {kind} of {piece!r} (id {i})"
            )
    for content, i in sorted(tok.added.items(), key=lambda kv: kv[1]):
        added_tokens.append(
            {
                "id": i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }  # fmt: skip
        )
    # Merges as transformers' SentencePieceExtractor orders them: by the merged piece's id, then by the ids of
    # the two halves.
    merges = []
    for piece, kind in pieces:
        if kind != _SP_NORMAL:
            continue
        local = [
            (piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend([list(lr) for lr in local])
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                bos,
                {"Sequence": {"id": "A", "type_id": 0}},
                bos,
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [tok.bos_id], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": vocab,
            "merges": merges,
        },
    }
    out = Path(out_path)
    out.write_text(
        json.dumps(doc, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    return out
