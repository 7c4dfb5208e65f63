"""`computed_in_fp32`: a 16-bit model computes exactly what its fp32 copy computes, a part at a time."""

from __future__ import annotations

import copy

import pytest
import torch

from mmscale.convert.verify import computed_in_fp32
from tests.helpers.molmo2 import hf_inputs, make_pair, our_images, samples


@pytest.mark.parametrize("share", [0.125, 0.01])  # 0.01: every layer a part, the largest split
def test_16_bit_weights_compute_as_their_fp32_copies_and_stay_16_bit(tmp_path, share):
    theirs, ours = make_pair(tmp_path)
    batch = samples(torch.Generator().manual_seed(1))
    inputs = hf_inputs(batch)
    with torch.no_grad():
        for model, run in ((theirs, lambda m: m(**inputs).logits),
                           (ours, lambda m: m.logits(inputs["input_ids"], **our_images(batch)))):
            model.to(torch.bfloat16)
            expected = run(copy.deepcopy(model).float())
            with computed_in_fp32(model, share) as fp32:
                got = run(fp32)
            assert got.dtype == torch.float32 and torch.equal(got, expected)
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # restored, all of them
