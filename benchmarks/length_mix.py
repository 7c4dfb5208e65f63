"""The LLaVA-665K-like length mix: sample lengths shaped like LLaVA-1.5's finetuning data, drawn
without downloading it, for the benchmarks (packing fill, GPU MFU) and their corpus (corpus.py)."""

from __future__ import annotations

import random

# LLaVA-1.5's image: CLIP ViT-L/14 at 336 px, 24 x 24 patches.
LLAVA_IMAGE_TOKENS = 576


def llava_665k_like_samples(n: int, seed: int = 0) -> list[tuple[int, bool]]:
    """(tokens, has an image) of samples shaped like LLaVA-1.5's 665K mix, in a Llama-class tokenizer.

    Documented assumption (no corpus is downloaded): 88% of samples carry one 336-px image,
    576 image tokens, plus text drawn log-normally around 100 tokens (median; sigma 0.9,
    multi-turn VQA); 12% are text-only ShareGPT conversations, log-normal around 500
    tokens (sigma 0.8). Everything is clipped to [8, 2048] tokens.
    """
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        has_image = rng.random() < 0.88
        if has_image:
            length = LLAVA_IMAGE_TOKENS + int(rng.lognormvariate(4.6, 0.9))
        else:
            length = int(rng.lognormvariate(6.2, 0.8))
        samples.append((min(2048, max(8, length)), has_image))
    return samples


def llava_665k_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Token lengths of `llava_665k_like_samples`."""
    return [length for length, _ in llava_665k_like_samples(n, seed)]
