"""Packing: several samples in one row of a token budget, so batches carry little padding.

First-fit-decreasing over a block of samples: a classic bin-packing heuristic that uses
at most 11/9 of the optimal number of rows, and far closer on many small samples. Each
sample keeps its own positions (restarting at 0) and a segment id, so the model's
block-diagonal attention sees exactly what it would see for the sample alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmscale.data.tokenizer import IGNORE_INDEX

# Keys of an encoded sample with entries per image (SquareImages / TiledImages / MultiCropImages, cached
# VIRAL targets), concatenated in row order.
PER_IMAGE = ("pixel_values", "aspect_ratio_ids", "num_tiles", "teacher_features",
             "image_pooling", "image_crops", "image_windows", "image_grid")


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `budget` tokens; deterministic.

    Rows are returned in the order they were opened; within a row, samples keep their
    input order (so their images stay in order too).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if target is None:
            rows.append([])
            room.append(budget)
            target = len(rows) - 1
        rows[target].append(i)
        room[target] -= lengths[i]
    return [sorted(row) for row in rows]


@dataclass(frozen=True)
class Packer:
    budget: int  # tokens per row
    block: int  # samples packed together; larger fills rows better, costs memory and delay

    def __call__(self, samples: list[dict], rows: list[list[int]] | None = None) -> list[dict]:
        """Encoded samples -> packed rows with input_ids, labels, position_ids, segment_ids and the images.

        Per-image tensors are concatenated in row order; `image_spans` (cross-attention
        models) move with their sample's offset in the row, so each image stays visible
        only to its own sample's tokens. `rows`: the grouping `rows_of` gives, where the caller
        has it already.
        """
        lengths = [len(s["input_ids"]) for s in samples]
        packed = []
        for row in rows if rows is not None else self.rows_of(samples):
            labels = []
            for i in row:
                # A sample's first token is never the target of the previous sample's last.
                labels.append(torch.cat([torch.tensor([IGNORE_INDEX]), samples[i]["labels"][1:]]))
            packed_row = {
                "input_ids": torch.cat([samples[i]["input_ids"] for i in row]),
                "labels": torch.cat(labels),
                "position_ids": torch.cat([torch.arange(lengths[i]) for i in row]),
                "segment_ids": torch.cat([torch.full((lengths[i],), n + 1) for n, i in enumerate(row)]),
                "samples": [s for i in row for s in samples[i]["samples"]],
            }
            packed_row.update({key: torch.cat([samples[i][key] for i in row]) for key in PER_IMAGE if key in samples[0]})
            if "image_spans" in samples[0]:
                offsets = [sum(lengths[j] for j in row[:n]) for n in range(len(row))]
                packed_row["image_spans"] = torch.cat([samples[i]["image_spans"] + off for i, off in zip(row, offsets)])
            packed.append(packed_row)
        return packed

    def rows_of(self, samples: list[dict]) -> list[list[int]]:
        """The indices of `samples` in each row that packing them makes, in row order."""
        return first_fit_decreasing([len(s["input_ids"]) for s in samples], self.budget)

