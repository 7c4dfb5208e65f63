"""The vision health counts: image tokens, text-only samples and the connector's output norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmscale.training.metrics import COUNTS, ConnectorOutput, vision_record


def _meta(*tiles: tuple[int, ...]) -> dict:
    return {"samples": [(f"s{i}", 10, t) for i, t in enumerate(tiles)]}


def test_a_decoder_batch_counts_its_image_tokens_and_their_norms():
    connector = nn.Linear(3, 2)
    probe = ConnectorOutput(connector)
    out = connector(torch.randn(2, 5, 3))  # 2 images of 5 tokens
    assert probe.count({}, _meta((1,), (), (1,))) == 1  # the text-only sample has no image in the batch
    second = connector(torch.randn(1, 5, 3))
    assert probe.count({}, _meta((1,))) == 0
    counts = probe.take()  # the window's sums
    assert counts["image_tokens"] == 15
    assert counts["connector_norm_sum"] == pytest.approx((out.norm(dim=-1).sum() + second.norm(dim=-1).sum()).item())
    assert probe.take() == {}  # the next window starts from nothing


def test_a_batch_without_images_counts_no_tokens_for_the_blank_image_it_runs():
    connector = nn.Linear(3, 2)
    probe = ConnectorOutput(connector)
    connector(torch.zeros(1, 5, 3))  # the blank image every rank runs to keep the tower in the step
    assert probe.count({}, _meta((), ())) == 2 and probe.take() == {}


def test_cross_attention_counts_only_the_tiles_a_token_sees():
    connector = nn.Linear(3, 2)
    probe = ConnectorOutput(connector)
    connector(torch.randn(2, 2, 4, 5, 3))  # (rows, images, tiles, patches, width)
    mask = torch.zeros(2, 7, 2, 4, dtype=torch.long)  # (rows, tokens, images, tiles)
    mask[0, 2:, 0, :3] = 1  # row 0: one image of 3 tiles; row 1: one image of 1 tile
    mask[1, 4:, 0, :1] = 1
    probe.count({"cross_attention_mask": mask}, _meta((3,), (1,)))
    assert probe.take()["image_tokens"] == (3 + 1) * 5


def test_the_record_means_over_steps_samples_and_tokens():
    totals = dict.fromkeys(COUNTS, 0.0) | {"all_steps": 4, "samples": 16, "text_only": 4, "image_tokens": 200,
                                           "connector_norm_sum": 300.0}
    # 2 ranks x 2 steps: every rank counts every step.
    assert vision_record(totals, world=2) == {"image_tokens_per_step": 100.0, "text_only": 0.25, "connector_norm": 1.5}
    assert vision_record(dict.fromkeys(COUNTS, 0.0), world=1)["connector_norm"] is None
