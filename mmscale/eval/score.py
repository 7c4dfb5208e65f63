"""Exact match after normalisation, accuracy per question type, the table and the JSON report."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass

TRAILING_PUNCTUATION = re.compile(r"[\s.,!?;:]+$")


def normalise(answer: str) -> str:
    """Lowercase, whitespace collapsed and stripped, trailing punctuation removed: "Yes." == "yes"."""
    return TRAILING_PUNCTUATION.sub("", " ".join(answer.lower().split()))


def is_correct(predicted: str, expected: str) -> bool:
    return normalise(predicted) == normalise(expected)


@dataclass(frozen=True)
class Prediction:
    id: str
    question_type: str
    expected: str
    predicted: str
    correct: bool


def score(sample_id: str, question_type: str, expected: str, predicted: str) -> Prediction:
    return Prediction(sample_id, question_type, expected, predicted, is_correct(predicted, expected))


def _accuracy(predictions: list[Prediction]) -> dict:
    n, correct = len(predictions), sum(p.correct for p in predictions)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None}


def summarise(predictions: list[Prediction]) -> dict:
    """{"per_type": {type: {n, correct, accuracy}}, "overall": {...}}, types sorted by name."""
    by_type: dict[str, list[Prediction]] = defaultdict(list)
    for p in predictions:
        by_type[p.question_type].append(p)
    return {"per_type": {t: _accuracy(by_type[t]) for t in sorted(by_type)}, "overall": _accuracy(predictions)}


def report(predictions: list[Prediction], facts: dict) -> dict:
    """The JSON `--out` writes: what was evaluated, the accuracies, every sample's answer."""
    return {**facts, **summarise(predictions), "samples": [asdict(p) for p in predictions]}


def table(summary: dict) -> str:
    rows = [*summary["per_type"].items(), ("overall", summary["overall"])]
    width = max(len("question type"), *(len(name) for name, _ in rows))
    lines = [f"{'question type':<{width}}  {'n':>5}  {'accuracy':>8}"]
    for name, acc in rows:
        lines.append(f"{name:<{width}}  {acc['n']:>5}  {acc['accuracy']:>8.3f}")
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
