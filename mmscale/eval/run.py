"""`mmscale eval`: the table of contents."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from mmscale.data.shards import resolve_shards
from mmscale.errors import UserError
from mmscale.eval.answers import BATCH_SIZE, MAX_NEW_TOKENS, answer_text
from mmscale.eval.models import load_model_under_test
from mmscale.eval.prompts import build_prompt_encoder
from mmscale.eval.samples import read_eval_samples
from mmscale.eval.score import Prediction, report, score

def evaluate(
    path: Path, data: str, max_samples: int | None = None, step: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = BATCH_SIZE, tokenizer: str | None = None,
) -> dict:
    """Every eval sample of `data` answered greedily by the model at `path`, `batch_size` at a
    time, scored; the report (see score.report)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    shards = resolve_shards(data, "--data")  # before the model loads: a typo costs nothing
    if not path.exists():
        raise UserError(f"{path} does not exist; give an mmscale run or checkpoint directory or a transformers folder")
    model = load_model_under_test(path, step, max_new_tokens, tokenizer)
    prompts = build_prompt_encoder(model.cfg, model.tokenizer)
    started = time.perf_counter()
    predictions: list[Prediction] = []
    samples = read_eval_samples(shards, max_samples)
    while batch := list(itertools.islice(samples, batch_size)):  # itertools.batched needs Python 3.12
        answers = model.generate(*prompts([sample.raw for sample in batch]))
        for sample, tokens in zip(batch, answers):
            predicted = answer_text(model.tokenizer, tokens, model.stop)
            predictions.append(score(sample.id, sample.question_type, sample.answer, predicted))
    if not predictions:
        raise UserError(f"--data {data}: the shards hold no samples")
    facts = {"model": model.description, "data": data, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
             "seconds": round(time.perf_counter() - started, 2)}
    return report(predictions, facts)
