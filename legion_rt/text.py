"""Compatibility name: the text side of the runtime is split into legion_rt/detokenizer.py (ids -> text,
streaming deltas) and legion_rt/answer.py (the reference's answer post-processing, [SEG] phrase pairing).
``legion_rt.text`` keeps re-exporting both for code written against the old module."""

from .answer import TextOutput, pair_phrases, postprocess_text, replace_tracking
from .detokenizer import Detokenizer, TextStream, clean_up_tokenization

__all__ = [
    "Detokenizer",
    "TextOutput",
    "TextStream",
    "clean_up_tokenization",
    "pair_phrases",
    "postprocess_text",
    "replace_tracking",
]
