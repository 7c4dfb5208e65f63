"""Evaluation during training (train.eval_every): the model being trained answers the first
train.eval_samples questions of data.eval, scored as `mmscale eval` scores them; the answers to
train.eval_table_rows of them also come back whole, for the predictions table
(mmscale.monitor.predictions).

Each rank answers its share, in batches. Under ZeRO-3 every forward gathers parameters
collectively, so all ranks must run the same forwards: each answers as many questions in
as many batches (the last rank repeats one it does not count) and generates the full
number of tokens, the answer being cut at the first stop token afterwards.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from mmscale.config import Recipe
from mmscale.data.multicrop import image_ids, ours_only
from mmscale.data.shards import resolve_shards
from mmscale.eval.answers import BATCH_SIZE, MAX_NEW_TOKENS, answer_text, stop_ids
from mmscale.eval.prompts import build_prompt_encoder
from mmscale.eval.samples import read_eval_samples
from mmscale.eval.score import is_correct
from mmscale.models import image_token_ids_for
from mmscale.models.generate import greedy
from mmscale.monitor.predictions import Prediction, table_indices


class InLoopEval:
    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase):
        shards = resolve_shards(recipe.data.eval, "data.eval")
        self.samples = list(read_eval_samples(shards, recipe.train.eval_samples))
        self.types = sorted({s.question_type for s in self.samples})
        self.table = set(table_indices([s.question_type for s in self.samples], recipe.train.eval_table_rows))
        self.prompts = build_prompt_encoder(recipe.model, tokenizer)
        self.tokenizer = tokenizer
        self.stop = stop_ids(tokenizer)
        self.banned = image_ids(image_token_ids_for(recipe.model, tokenizer))

    def _answers(self, model: nn.Module, raws: list[dict], device: torch.device) -> list[str]:
        inputs, lengths = self.prompts(raws)
        inputs = {k: v.to(device) for k, v in ours_only(inputs).items()}
        answers = greedy(model, inputs, MAX_NEW_TOKENS, self.banned, lengths=lengths)  # no stop: see the module
        return [answer_text(self.tokenizer, tokens, self.stop) for tokens in answers]

    @torch.no_grad()
    def counts(self, model: nn.Module, device: torch.device, rank: int, world: int
               ) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """(question types, 2): this rank's correct answers and questions per type (self.types order);
        and its answers to the table's questions, with their indices (`prediction` makes the rows:
        only the answers travel between ranks, every rank holds the questions and images)."""
        counts = torch.zeros(len(self.types), 2, dtype=torch.float64)
        table = []
        share = [rank + i * world for i in range(-(-len(self.samples) // world))]
        for start in range(0, len(share), BATCH_SIZE):
            indices = share[start : start + BATCH_SIZE]
            samples = [self.samples[min(index, len(self.samples) - 1)] for index in indices]
            for index, sample, answer in zip(indices, samples, self._answers(model, [s.raw for s in samples], device)):
                if index < len(self.samples):
                    correct = is_correct(answer, sample.answer)
                    counts[self.types.index(sample.question_type)] += torch.tensor([float(correct), 1.0])
                if index in self.table:
                    table.append((index, answer))
        return counts, table

    def prediction(self, index: int, answer: str) -> Prediction:
        """The predictions table's row of question `index` answered `answer`."""
        sample = self.samples[index]
        return Prediction(sample.id, sample.question_type, sample.question, sample.answer, answer,
                          is_correct(answer, sample.answer), sample.image, sample.raw[sample.image])
