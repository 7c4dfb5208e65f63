"""How a model's answer to an eval question is generated and read, for `mmscale eval` and the
evaluation during training alike: the token budget, the batch size, the ids that end an answer
and the cut at the first of them. Nothing here loads a model, so in-loop evaluation (training)
needs none of the conversion code that `mmscale eval` loads models with.
"""

from __future__ import annotations

from collections.abc import Collection

from transformers import PreTrainedTokenizerBase

MAX_NEW_TOKENS = 16  # the demo's answers are a few tokens; a name is at most about ten
BATCH_SIZE = 16  # prompts answered together
END_OF_TURN_TOKENS = ("<|end|>", "<|eot_id|>", "<|im_end|>")  # mmscale's demo, Llama 3, ChatML


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """eos and the template's end-of-turn token, where the vocabulary has them as special tokens."""
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    ids = {tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS if t in special}
    return frozenset(ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def answer_text(tokenizer: PreTrainedTokenizerBase, tokens: list[int], stop: Collection[int]) -> str:
    """The decoded answer: the tokens before the first stop token."""
    end = next((i for i, token in enumerate(tokens) if token in stop), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True)
