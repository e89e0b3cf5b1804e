"""Measures shared by the recipes: transcript normalisation, edit distance, character error rate (CER), and the
id-sequence distance used for the speaker-invariance of speech tokens.

CER is corpus-level, as the field reports it (total character edits / total reference characters, both sides
normalised); ``tests/test_metrics.py`` cross-checks it against ``jiwer.cer`` where jiwer is installed.
"""
from __future__ import annotations

import re
from typing import Sequence

__all__ = ["normalize_text", "edit_distance", "character_error_rate", "dedup_consecutive",
           "normalized_edit_distance"]


def normalize_text(text: str) -> str:
    """Transcript as CTC targets see it: lower case, letters, apostrophe and single spaces; hyphens become
    spaces, every other character (punctuation, digits) is dropped. ``"Where's Dunmere?"`` -> ``"where's dunmere"``."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    text = re.sub(r"[-\s]+", " ", text.lower())
    text = re.sub(r"[^a-z' ]", "", text)
    return re.sub(r" +", " ", text).strip()


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1) between two sequences."""
    a, b = list(a), list(b)
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER: total character edits / total reference characters, both sides ``normalize_text``-ed."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need equally many references and hypotheses (>= 1), got {len(references)} and "
                         f"{len(hypotheses)}")
    edits = sum(edit_distance(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses))
    total = sum(len(normalize_text(r)) for r in references)
    return edits / max(total, 1)


def dedup_consecutive(ids: Sequence[int]) -> list[int]:
    """Merge runs of one repeated id: ``[5, 5, 7, 5, 5] -> [5, 7, 5]`` (removes duration, keeps the order)."""
    out: list[int] = []
    for value in ids:
        if not out or value != out[-1]:
            out.append(value)
    return out


def normalized_edit_distance(a: Sequence[int], b: Sequence[int], dedup: bool = True) -> float:
    """Edit distance / length of the longer sequence, in [0, 1]; repeats are merged first when ``dedup``."""
    if dedup:
        a, b = dedup_consecutive(a), dedup_consecutive(b)
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0
