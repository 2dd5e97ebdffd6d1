"""Train the tiny LLaMA-like sentencepiece model shipped as ``export/assets/tiny_tokenizer.model``.

Run once from the repository root (the output is committed; tests never retrain)::

    python export/assets/train_tiny_tokenizer.py            # writes export/assets/tiny_tokenizer.model

The trainer options are LLaMA's own (read from the real LLaMA ``tokenizer.model``'s ``trainer_spec``): BPE,
byte fallback, unk 0 / bos 1 / eos 2, no pad, dummy prefix, identity normalization, extra whitespace kept,
digits split, whitespace-only pieces allowed. Only the vocabulary size (1000) and the corpus differ. The corpus is
English text generated here from a fixed seed: the LEGION system prompt and instruction, artifact descriptions in
the style of LEGION's answers (with ``<p>``/``[SEG]`` markup as plain text), digits and punctuation.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import sentencepiece as spm

# The prompt strings live in one place: export/tokenizer.py (run from a checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from legion_rt.export.tokenizer import INSTRUCTION, SYSTEM  # noqa: E402

VOCAB_SIZE = 1000
SEED = 20240501

SUBJECTS = [
    "the left hand",
    "the right hand",
    "the fingers",
    "the face",
    "the eyes",
    "the ears",
    "the teeth",
    "the hair",
    "the dog's paw",
    "the cat's tail",
    "the horse's legs",
    "the bird's wings",
    "the car wheel",
    "the bicycle frame",
    "the window frame",
    "the building facade",
    "the street sign",
    "the text on the sign",
    "the clock face",
    "the shadow of the tree",
    "the reflection in the water",
    "the mirror",
    "the staircase",
    "the railing",
    "the background crowd",
    "the table legs",
    "the chair",
    "the cup handle",
    "the fence",
    "the roof tiles",
    "the sky",
    "the clouds",
    "the mountains",
    "the grass",
    "the flowers",
    "the leaves",
    "the shoes",
    "the jacket",
    "the glasses",
    "the necklace",
    "the street lamp",
    "the door handle",
    "the keyboard",
    "the book spine",
]
PROBLEMS = [
    "is deformed",
    "has an unnatural shape",
    "appears distorted",
    "shows extra fingers",
    "is blurred",
    "has inconsistent lighting",
    "casts a shadow in the wrong direction",
    "violates the laws of physics",
    "has an impossible perspective",
    "is asymmetric",
    "merges into the background",
    "has a texture that looks plastic",
    "shows color bleeding",
    "contains illegible text",
    "has noisy edges",
    "is floating in the air",
    "lacks a proper reflection",
    "has a smooth, waxy surface",
    "is duplicated",
    "is missing a part",
    "has misaligned proportions",
    "shows a painterly style inconsistent with the photo",
]
REASONS = [
    "which is not consistent with the rest of the scene",
    "suggesting that the image was generated",
    "because real objects do not look like this",
    "which breaks the spatial layout",
    "as the light source is on the other side",
    "and the details are smeared",
    "so the material is misrepresented",
    "which is a typical generation artifact",
    "and the structure is physically implausible",
]
EXTRA = [
    "The image is real.",
    "The image is fake.",
    "No obvious artifacts were found.",
    "Overall, the photo looks synthetic.",
    "There are 3 people and 2 dogs in the picture.",
    "The clock shows 10:45 but the shadows suggest noon.",
    "Resolution: 1024x768 pixels, 24-bit color, 300 dpi.",
    "Version 1.5, released in 2023; about 7 billion parameters.",
    "Prices: $19.99, 42%, 3.14, 1,000,000 and 0.5 km.",
    "Optical display issues, "
    "violations of physical laws, spatial/perspective errors, deformed objects, asymmetry, distorted text, "
    "color/texture distortion, noise/blur, artistic style errors and material misrepresentation.",
    "USER: What is wrong with this picture? ASSISTANT: Several regions are inconsistent.",
    "Segmentation masks highlight the corresponding parts of the answer.",
]


def corpus(n_answers: int = 3000, seed: int = SEED) -> str:
    """The training text, one sentence per line, deterministic for a given seed."""
    rng = random.Random(seed)
    lines = [SYSTEM, INSTRUCTION] * 20 + EXTRA * 10
    for _ in range(n_answers):
        parts = []
        for _ in range(rng.randint(1, 3)):
            subj = rng.choice(SUBJECTS)
            sentence = f"{subj} {rng.choice(PROBLEMS)}, {rng.choice(REASONS)}."
            if rng.random() < 0.5:
                sentence = f"<p> {subj} </p> [SEG] {rng.choice(PROBLEMS)}, {rng.choice(REASONS)}."
            parts.append(sentence[0].upper() + sentence[1:])
        lines.append(" ".join(parts))
        lines.append(
            f"In region {rng.randint(0, 99)} at ({rng.randint(0, 1023)}, {rng.randint(0, 1023)}) "
            f"the score is {rng.random():.3f}."
        )
    return "\n".join(lines) + "\n"


def train(out_path: Path) -> None:
    """Train with LLaMA's trainer options and write the serialized model to out_path."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus().splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=0.99995,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        max_sentencepiece_length=16,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_surface=" \u2047 ",
        vocabulary_output_piece_score=True,
        num_threads=1,
        minloglevel=2,
    )
    out_path.write_bytes(model.getvalue())


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("tiny_tokenizer.model")
    train(out)
    sp = spm.SentencePieceProcessor(model_file=str(out))
    print(f"wrote {out}: vocab {sp.get_piece_size()}, {out.stat().st_size} bytes")
