"""The predictions table: at each in-loop eval, the model's answers to a fixed sample of the eval
questions next to the truth, so that one question can be followed from eval to eval.

    RUN_DIR/predictions.jsonl    one line per question and eval: COLUMNS, the image as a path
    RUN_DIR/predictions/         each sampled question's image, written once

With W&B on, each eval also logs the table "eval/predictions" (the images inline) at its step.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREDICTIONS_FILE = "predictions.jsonl"
IMAGES_DIR = "predictions"
COLUMNS = ("step", "id", "question_type", "image", "question", "expected", "predicted", "correct")


def table_indices(types: list[str], size: int) -> list[int]:
    """`size` of the questions whose types are `types` (in eval order), taken round robin over the
    types in order of first appearance: every type shows, and every eval picks the same ones."""
    queues: dict[str, list[int]] = {}
    for index, kind in enumerate(types):
        queues.setdefault(kind, []).append(index)
    picked: list[int] = []
    while len(picked) < size and any(queues.values()):
        for queue in queues.values():
            if queue and len(picked) < size:
                picked.append(queue.pop(0))
    return sorted(picked)


@dataclass(frozen=True)
class Prediction:
    id: str
    question_type: str
    question: str
    expected: str
    predicted: str
    correct: bool
    image_name: str  # the member's name in its shard (its extension gives the format)
    image: bytes


def _image_path(prediction: Prediction) -> str:
    """A file name of the id's own characters, and a hash of the id: ids that differ only in the
    characters left out ("a/b", "a_b") keep their own images."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", prediction.id)[:80]
    digest = hashlib.sha1(prediction.id.encode()).hexdigest()[:8]
    return f"{IMAGES_DIR}/{safe}-{digest}{Path(prediction.image_name).suffix}"


def write_local(run_dir: Path, step: int, predictions: list[Prediction]) -> None:
    """Append the eval's rows to RUN_DIR/predictions.jsonl; write the images not written yet."""
    (run_dir / IMAGES_DIR).mkdir(exist_ok=True)
    lines = []
    for p in predictions:
        image = _image_path(p)
        if not (run_dir / image).exists():
            (run_dir / image).write_bytes(p.image)
        row = {"step": step, "id": p.id, "question_type": p.question_type, "image": image, "question": p.question,
               "expected": p.expected, "predicted": p.predicted, "correct": p.correct}
        lines.append(json.dumps(row) + "\n")
    with open(run_dir / PREDICTIONS_FILE, "a") as f:
        f.writelines(lines)


def wandb_table(step: int, predictions: list[Prediction]) -> Any:
    """The eval's rows as a wandb.Table (imported here: only rank 0 with W&B on comes this far)."""
    import wandb
    from PIL import Image

    table = wandb.Table(columns=list(COLUMNS))
    for p in predictions:
        # RGB, as the loader reads images: W&B stores them as PNG, which takes no CMYK.
        image = wandb.Image(Image.open(io.BytesIO(p.image)).convert("RGB"), caption=p.question)
        table.add_data(step, p.id, p.question_type, image, p.question, p.expected, p.predicted, p.correct)
    return table
