"""Normalisation, exact match and the per-type summary."""

from __future__ import annotations

import pytest

from mmscale.eval.score import is_correct, normalise, score, summarise, table


@pytest.mark.parametrize(("text", "expected"), [
    ("Yes", "yes"), ("  yes.  ", "yes"), ("3!", "3"), ("No?!", "no"), ("Red  Apple .", "red apple"),
    ("grinning face", "grinning face"), ("3.5", "3.5"), ("", ""), ("...", ""),
])
def test_normalise_lowercases_strips_and_drops_trailing_punctuation(text, expected):
    assert normalise(text) == expected


def test_exact_match_after_normalisation_only():
    assert is_correct("Yes.", "yes") and is_correct(" 3\n", "3")
    assert not is_correct("yes, it is", "yes")  # exact match: no partial credit
    assert not is_correct("13", "3") and not is_correct("", "0")


def test_summary_counts_per_type_and_overall():
    predictions = [
        score("a", "count", "3", "3"), score("b", "count", "2", "4"), score("c", "name", "cat face", "Cat face."),
        score("d", "left_right", "Yes", "no"),
    ]
    summary = summarise(predictions)
    assert summary["per_type"] == {
        "count": {"n": 2, "correct": 1, "accuracy": 0.5},
        "left_right": {"n": 1, "correct": 0, "accuracy": 0.0},
        "name": {"n": 1, "correct": 1, "accuracy": 1.0},
    }
    assert summary["overall"] == {"n": 4, "correct": 2, "accuracy": 0.5}
    lines = table(summary).splitlines()
    assert lines[1].split() == ["count", "2", "0.500"] and lines[-1].split() == ["overall", "4", "0.500"]
