"""Eval shards made from the demo's validation samples following mmscale.eval.samples' contract
(one question, one answer)."""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from mmscale.data.encode import parse_sample
from mmscale.data.schema import IMAGE_PLACEHOLDER

EVAL_SAMPLES = 12


def eval_sample(meta: dict) -> dict:
    """A demo validation sample's first question as an eval sample (a caption prompt asks for the name)."""
    question, answer = meta["messages"][0]["content"], meta["messages"][1]["content"]
    assert question.startswith(IMAGE_PLACEHOLDER)
    qtype = "name" if meta["source"] == "demo/caption" else meta["meta"]["question_types"][0]
    return {**meta, "messages": meta["messages"][:2], "meta": {"question_type": qtype, "answer": answer}}


def write_eval_shards(val: Path, out: Path, samples: int = EVAL_SAMPLES, per_shard: int = 5) -> Path:
    out.mkdir(parents=True)
    written = 0
    with wds.ShardWriter(str(out / "eval-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in wds.DataPipeline(wds.SimpleShardList(sorted(str(p) for p in val.glob("*.tar"))),
                                       wds.tarfile_to_samples()):
            meta, images = parse_sample(sample, sample["__key__"])
            record = eval_sample(meta)
            sink.write({"__key__": sample["__key__"], "json": json.dumps(record).encode(),
                        **dict(zip(meta["images"], images))})
            written += 1
            if written == samples:
                break
    return out
