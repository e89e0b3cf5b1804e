"""fac_mini.train.metrics: transcript normalisation, edit distances and CER, cross-checked against jiwer."""
import random

import pytest

from fac_mini.train.metrics import (character_error_rate, dedup_consecutive, edit_distance, normalize_text,
                                    normalized_edit_distance)


def test_normalisation_and_distances():
    assert normalize_text("  Where's  Dunmere?  Well-known, yes.") == "where's dunmere well known yes"
    assert edit_distance("kitten", "sitting") == 3 and edit_distance([], [1, 2]) == 2
    assert character_error_rate(["abcd"], ["abxd"]) == 0.25
    assert dedup_consecutive([5, 5, 7, 5, 5]) == [5, 7, 5]
    assert normalized_edit_distance([1, 1, 2, 2], [1, 2]) == 0.0
    assert normalized_edit_distance([1, 1, 2, 2], [1, 2], dedup=False) == 0.5
    with pytest.raises(ValueError, match="equally many"):
        character_error_rate(["a"], [])


def test_cer_equals_jiwer_on_random_corpora():
    jiwer = pytest.importorskip("jiwer")
    rng = random.Random(0)
    alphabet = "abcde '"
    for _ in range(20):
        references = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))).strip() or "a"
                      for _ in range(rng.randint(1, 6))]
        hypotheses = ["".join(c for c in ref if rng.random() > 0.2) + rng.choice(["", "x", "ab"])
                      for ref in references]
        normalized = [normalize_text(r) for r in references], [normalize_text(h) for h in hypotheses]
        if not all(normalized[0]):
            continue
        assert character_error_rate(references, hypotheses) == pytest.approx(jiwer.cer(*normalized), abs=1e-12)
