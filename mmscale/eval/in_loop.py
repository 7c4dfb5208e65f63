"""Evaluation during training (train.eval_every): the model being trained answers the first
train.eval_samples questions of data.eval, scored as `mmscale eval` scores them.

Each rank answers its share. Under ZeRO-3 every forward gathers parameters collectively, so
all ranks must run the same number of forwards: each answers as many questions (the last
rank repeats one it does not count) and generates the full number of tokens, the answer
being cut at the first stop token afterwards.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from mmscale.config import Recipe
from mmscale.data.loader import resolve_shards
from mmscale.data.tokenizer import image_token_id
from mmscale.eval.models import stop_ids
from mmscale.eval.prompts import build_prompt_encoder
from mmscale.eval.run import MAX_NEW_TOKENS, answer_text
from mmscale.eval.samples import read_eval_samples
from mmscale.eval.score import is_correct
from mmscale.models.generate import greedy


class InLoopEval:
    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase):
        shards = resolve_shards(recipe.data.eval, "data.eval")
        self.samples = list(read_eval_samples(shards, recipe.train.eval_samples))
        self.types = sorted({s.question_type for s in self.samples})
        self.prompts = build_prompt_encoder(recipe.model, tokenizer)
        self.tokenizer = tokenizer
        self.stop = stop_ids(tokenizer)
        self.banned = {image_token_id(tokenizer)}

    def _answer(self, model: nn.Module, raw: dict, device: torch.device) -> str:
        inputs = {k: v.to(device) for k, v in self.prompts(raw).items()}
        tokens = greedy(model, inputs, MAX_NEW_TOKENS, self.banned)  # never stops early: see the module
        return answer_text(self.tokenizer, tokens, self.stop)

    @torch.no_grad()
    def counts(self, model: nn.Module, device: torch.device, rank: int, world: int) -> torch.Tensor:
        """(question types, 2): this rank's correct answers and questions per type (self.types order)."""
        counts = torch.zeros(len(self.types), 2, dtype=torch.float64)
        for i in range(-(-len(self.samples) // world)):
            index = rank + i * world
            sample = self.samples[min(index, len(self.samples) - 1)]
            correct = is_correct(self._answer(model, sample.raw, device), sample.answer)
            if index < len(self.samples):
                counts[self.types.index(sample.question_type)] += torch.tensor([float(correct), 1.0])
        return counts
