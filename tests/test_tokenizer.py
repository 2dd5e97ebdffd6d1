"""export/tokenizer.py against the REAL transformers 4.28.0 slow LlamaTokenizer (tests/fixtures/hf428_tiny.json,
made by tests/fixtures/make_hf428_fixture.py in a separate 4.28.0 + sentencepiece 0.1.99 environment)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

sentencepiece = pytest.importorskip("sentencepiece", reason="the export stage needs sentencepiece")

from legion_rt.errors import CheckpointError  # noqa: E402
from legion_rt.export import tokenizer as T  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "hf428_tiny.json"


@pytest.fixture(scope="module")
def fx() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-tok")
    T.write_tiny_tokenizer(d)
    return d


def test_fixture_is_from_real_428_and_this_asset(fx):
    assert fx["versions"]["transformers"] == "4.28.0"
    assert fx["versions"]["sentencepiece"] == "0.1.99"
    assert fx["tokenizer_class"] == "LlamaTokenizer"
    # The fixture was made from exactly the shipped tokenizer model.
    assert hashlib.sha256(T.TINY_TOKENIZER_MODEL.read_bytes()).hexdigest() == fx["tokenizer_model_sha256"]
    # Training (base tokenizer + add_tokens(special_tokens=True)) and inference (added_tokens.json) tokenize alike.
    assert fx["train_path_same_ids"] is True


def test_write_tiny_tokenizer_files(tmp_path, fx):
    vocab = T.write_tiny_tokenizer(tmp_path)
    assert vocab == fx["vocab_size"] == 1007
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "added_tokens.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    added = json.loads((tmp_path / "added_tokens.json").read_text())
    assert added == fx["added_tokens_encoder"]
    assert [t for t, _ in sorted(added.items(), key=lambda kv: kv[1])] == list(T.ADDED_TOKENS)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer" and cfg["clean_up_tokenization_spaces"] is False
    assert fx["clean_up_tokenization_spaces"] is False


def test_tiny_model_has_llama_trainer_settings():
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(T.TINY_TOKENIZER_MODEL.read_bytes())
    ts, ns = m.trainer_spec, m.normalizer_spec
    assert ts.model_type == pb.TrainerSpec.BPE and ts.vocab_size == 1000 and len(m.pieces) == 1000
    assert ts.byte_fallback and ts.split_digits and ts.allow_whitespace_only_pieces
    assert (ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id) == (0, 1, 2, -1)
    assert ns.name == "identity" and ns.add_dummy_prefix and not ns.remove_extra_whitespaces


def test_training_script_reproduces_the_asset(tmp_path):
    if sentencepiece.__version__ != "0.2.3":
        pytest.skip(f"the asset was trained with sentencepiece 0.2.3, this is {sentencepiece.__version__}")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_tiny", T.TINY_TOKENIZER_MODEL.with_name("train_tiny_tokenizer.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.train(tmp_path / "t.model")
    assert (tmp_path / "t.model").read_bytes() == T.TINY_TOKENIZER_MODEL.read_bytes()


def test_prompt_text_is_the_reference_template(fx):
    # Spelled out independently from docs/REFERENCE.md "Prompt".
    expected = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: The <im_start><image><im_end> provides an "
        "overview of the picture.\nPlease provide a detailed analysis of artifacts in this photo, considering "
        "physical artifacts (e.g., optical display issues, violations of physical laws, and spatial/perspective "
        "errors), structural artifacts (e.g., deformed objects, asymmetry, or distorted text), and distortion "
        "artifacts (e.g., color/texture distortion, noise/blur, artistic style errors, and material "
        "misrepresentation). Output with interleaved segmentation masks for the corresponding parts of the "
        "answer. ASSISTANT:"
    )
    assert T.PROMPT == expected == fx["prompt"]["text"]


def test_prompt_ids_equal_428(tok_dir, fx):
    prefix, suffix = T.prompt_ids(tok_dir)
    assert prefix + [T.IMAGE_TOKEN_INDEX] + suffix == fx["prompt"]["input_ids"]
    slow = T.SlowLlamaTokenizer.from_dir(tok_dir)
    assert [slow.encode(c) for c in T.PROMPT.split("<image>")] == fx["prompt"]["chunk_input_ids"]
    ids = fx["token_ids"]
    assert prefix[0] == ids["bos"] and prefix[-1] == ids["im_start"] and suffix[0] == ids["im_end"]
    assert ids["bos"] not in suffix  # BOS only on the first chunk


def test_encodings_equal_428(tok_dir, fx):
    slow = T.SlowLlamaTokenizer.from_dir(tok_dir)
    for case in fx["encodings"]:
        assert slow.tokenize(case["text"]) == case["tokens"], repr(case["text"])
        assert T.encode_like_hf428(case["text"], tok_dir) == case["input_ids"], repr(case["text"])


def test_special_token_ids_equal_428(tok_dir, fx):
    assert T.special_token_ids(tok_dir) == fx["token_ids"]


def test_oracle_decode_equals_428(tok_dir, fx):
    """The sentencepiece-based emulation of 4.28's decode (the oracle of tests/test_text.py)."""
    slow = T.SlowLlamaTokenizer.from_dir(tok_dir)
    for case in fx["decodes"]:
        assert slow.decode(case["ids"]) == case["text"], case["ids"]
    for case in fx["decodes_clean_up"]:
        assert slow.decode(case["ids"], clean_up_tokenization_spaces=True) == case["text"], case["ids"]


def test_tokenizer_json_loads_in_tokenizers(tok_dir, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="checks the file with the tokenizers library")
    path = T.write_tokenizer_json(tok_dir, tmp_path / "tokenizer.json")
    fast = tokenizers.Tokenizer.from_file(str(path))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    assert fast.get_vocab_size() == 1007
    assert all(fast.id_to_token(i) == sp.id_to_piece(i) for i in range(sp.get_piece_size()))
    for k, t in enumerate(T.ADDED_TOKENS):
        assert fast.token_to_id(t) == 1000 + k
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert {(e["id"], e["content"], e["special"]) for e in doc["added_tokens"] if e["id"] < 1000} == {
        (0, "<unk>", True),
        (1, "<s>", True),
        (2, "</s>", True),
    }
    # Plain text through the BPE merges: the same pieces as sentencepiece on simple words (not used for prompt
    # ids, which come from prompt_ids; this only shows the merges are sane).
    text = "The left hand is deformed"
    assert fast.encode(text, add_special_tokens=False).ids == sp.encode(text)


def test_bad_tokenizer_dirs_raise(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        T.prompt_ids(tmp_path)
    T.write_tiny_tokenizer(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<im_start>": 1000, "<im_end>": 1002}))
    with pytest.raises(CheckpointError, match="not contiguous"):
        T.prompt_ids(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<im_start>": 1000}))
    with pytest.raises(CheckpointError, match="missing added token"):
        T.special_token_ids(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        T.prompt_ids(tmp_path)


def test_strip_flags_variant_equal_428(tok_dir, fx, tmp_path):
    """Special tokens saved as AddedToken dicts with lstrip/rstrip (another checkpoint's files): same ids as 4.28."""
    for name in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(fx["variant"]["special_tokens_map"]))
    slow = T.SlowLlamaTokenizer.from_dir(tmp_path)
    default = T.SlowLlamaTokenizer.from_dir(tok_dir)
    differ = 0
    for case in fx["variant"]["encodings"]:
        assert slow.encode(case["text"]) == case["input_ids"], repr(case["text"])
        differ += default.encode(case["text"]) != case["input_ids"]
    assert differ >= 3  # the flags really changed some encodings
