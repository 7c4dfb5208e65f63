"""The benchmarks' data: demo shards whose sample lengths follow the LLaVA-665K-like mix.

The demo corpus (`mmscale.demo.corpus`) has samples of nearly one length, so padding wastes
little on it and a packing benchmark on it would flatter nobody. This corpus keeps the demo's
images and questions but shapes each conversation's length after `llava_665k_like_samples`,
scaled to the model's image size: a sample of L tokens with one 576-token image becomes one
with `image_tokens` image tokens and (L - 576) x image_tokens / 576 text tokens (a text-only
one: L x image_tokens / 576 tokens), so the ratios of lengths, and with them the padding
waste, are the mix's. A conversation grows by repeating its own question/answer turns and
takes the most turns that stay within its target; it cannot be shorter than one turn (about
15 tokens of chat template, question and answer), which lifts the shortest samples. That
narrows the spread of lengths, so padding wastes a little less here than on the mix itself
(the benchmarks report both).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from transformers import PreTrainedTokenizerBase

from benchmarks.length_mix import LLAVA_IMAGE_TOKENS, llava_665k_like_samples
from mmscale.data.schema import IMAGE_PLACEHOLDER, TAR_MTIME, validate_sample
from mmscale.data.tokenizer import encode_conversation, load_tokenizer
from mmscale.demo.corpus import build_demo_dataset, make_sample

MIX_MAX_LEN = 2048  # the mix's longest sample (LLaVA-1.5's model_max_length)


@dataclass(frozen=True)
class MixCorpus:
    shards: Path  # a folder of .tar shards
    tokenizer: Path
    image_size: int
    image_tokens: int
    max_seq_len: int  # the mix's 2,048 tokens, scaled
    lengths: list[int]  # each sample's tokens, images expanded, in shard order
    has_image: list[bool]


def build_mix_corpus(out: Path, samples: int, image_size: int, image_tokens: int, shards: int = 4) -> MixCorpus:
    """Write `samples` demo samples with scaled LLaVA-665K-like lengths into `out`/mix (see the module docstring)."""
    demo = out / "demo"
    # The demo build brings the tokenizer; its own shards are few and small.
    build_demo_dataset(demo, image_size=image_size, train_samples=64, val_samples=8, samples_per_shard=64)
    tokenizer = load_tokenizer(demo / "tokenizer")
    scale = image_tokens / LLAVA_IMAGE_TOKENS
    folder = out / "mix"
    folder.mkdir(parents=True, exist_ok=True)
    lengths, has_images = [], []
    pattern = str(folder).replace("%", "%%") + "/mix-%06d.tar"  # ShardWriter fills in `%` fields
    with wds.ShardWriter(pattern, maxcount=math.ceil(samples / shards), verbose=0, mtime=TAR_MTIME) as sink:
        for index, (length, has_image) in enumerate(llava_665k_like_samples(samples)):
            target = scaled_length(length, has_image, scale, image_tokens)
            sample, tokens = mix_sample(tokenizer, index, target, has_image, image_size, image_tokens)
            sink.write(sample)
            lengths.append(tokens)
            has_images.append(has_image)
    max_len = math.ceil(MIX_MAX_LEN * scale)
    return MixCorpus(folder, demo / "tokenizer", image_size, image_tokens, max_len, lengths, has_images)


def scaled_length(length: int, has_image: bool, scale: float, image_tokens: int) -> int:
    if has_image:
        return image_tokens + round((length - LLAVA_IMAGE_TOKENS) * scale)
    return round(length * scale)


def mix_sample(
    tokenizer: PreTrainedTokenizerBase, index: int, target: int, has_image: bool, image_size: int, image_tokens: int
) -> tuple[dict, int]:
    """Demo sample `index` grown or cut to about `target` tokens: its WebDataset members and its length."""
    key, demo, png = make_sample(0, "mix", index, image_size)
    pairs = [demo["messages"][i : i + 2] for i in range(0, len(demo["messages"]), 2)]
    pairs = [[{**m, "content": m["content"].replace(f"{IMAGE_PLACEHOLDER}\n", "")} for m in pair] for pair in pairs]
    # Special tokens delimit the template's pieces, so a conversation's length is the sum of its turns'.
    start = 1 + (image_tokens + 1 if has_image else 0)  # BOS, the image and its newline
    sizes = [turn_tokens(tokenizer, pair) for pair in pairs]
    messages, tokens = [], start
    for pair, size in itertools.cycle(zip(pairs, sizes)):
        if messages and tokens + size > target:
            break
        messages, tokens = messages + pair, tokens + size
    if has_image:
        messages[0] = {**messages[0], "content": f"{IMAGE_PLACEHOLDER}\n{messages[0]['content']}"}
    sample = {"id": key, "source": "demo/mix", "images": ["img0.png"] if has_image else [], "messages": messages,
              "meta": demo["meta"]}
    validate_sample(sample, f"mix sample {key}")
    members = {"__key__": key, "json": sample}
    if has_image:
        members["img0.png"] = png
    return members, len(encode_conversation(tokenizer, messages, image_tokens, 10**9, key)[0])


def turn_tokens(tokenizer: PreTrainedTokenizerBase, pair: list[dict]) -> int:
    """Tokens a user/assistant turn adds to a conversation (without the BOS that starts it)."""
    text = tokenizer.apply_chat_template(pair, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1
