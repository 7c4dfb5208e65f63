"""Eval samples: ordinary schema-valid samples with one question and its expected answer.

    {"id", "source", "images": ["img0.png"],
     "messages": [{"role": "user", "content": "<image>\\nHow many cats are there?"},
                  {"role": "assistant", "content": "3"}],
     "meta": {"question_type": "count", "answer": "3"}}

Question types of the demo: "count", "left_right", "above_below", "name"; any other string
is scored under its own name. A sample that breaks the contract stops the evaluation,
naming shard and key: a sample silently left out would change the score.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import webdataset as wds

from mmscale.data.encode import parse_sample
from mmscale.data.schema import IMAGE_PLACEHOLDER, SampleError
from mmscale.errors import UserError


@dataclass(frozen=True)
class EvalSample:
    id: str
    question_type: str
    answer: str
    raw: dict  # the WebDataset sample (members as bytes, __key__, __url__), as the loader gets it
    question: str  # the user turn without its image placeholder
    image: str  # the image's member name in `raw`


def contract_problem(meta: dict) -> str | None:
    """What keeps a schema-valid sample JSON from being an eval sample, or None."""
    messages, extra = meta["messages"], meta.get("meta")
    if [m["role"] for m in messages] != ["user", "assistant"]:
        return f"its turns are {[m['role'] for m in messages]}, not one user and one assistant turn"
    if len(meta["images"]) != 1 or not messages[0]["content"].startswith(IMAGE_PLACEHOLDER):
        return f"it must have one image, its {IMAGE_PLACEHOLDER} at the start of the user turn"
    if not isinstance(extra, dict) or not all(isinstance(extra.get(k), str) for k in ("question_type", "answer")):
        return 'its "meta" lacks the strings "question_type" and "answer"'
    return None


def read_eval_samples(shards: list[str], max_samples: int | None = None) -> Iterator[EvalSample]:
    """The eval samples of `shards`, in shard order, at most `max_samples`; UserError on a
    shard that cannot be read or a sample that breaks the schema or the contract."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
    count = 0
    samples = iter(pipeline)
    while max_samples is None or count < max_samples:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except Exception as e:  # tarfile and webdataset raise many types for a broken shard
            raise UserError(f"--data: a shard cannot be read ({type(e).__name__}: {e})") from e
        where = f"shard {sample.get('__url__')} sample {sample.get('__key__')}"
        try:
            meta, _ = parse_sample(sample, where)
        except SampleError as e:
            raise UserError(f"--data: {e}") from e
        problem = contract_problem(meta)
        if problem:
            raise UserError(f"--data: {where} is not an eval sample: {problem}")
        question = meta["messages"][0]["content"].removeprefix(IMAGE_PLACEHOLDER).strip()
        yield EvalSample(meta["id"], meta["meta"]["question_type"], meta["meta"]["answer"], sample, question,
                         meta["images"][0])
        count += 1
