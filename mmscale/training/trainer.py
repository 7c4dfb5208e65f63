"""The training loop. One optimizer step is `train_step`; everything else is bookkeeping."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from mmscale.config import Recipe
from mmscale.data.schema import SKIP_REASONS
from mmscale.data.stream import StatefulLoader
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.errors import UserError
from mmscale.training.budget import Budget
from mmscale.training.checkpoint import load_latest_checkpoint, save_checkpoint
from mmscale.training.engine import lr_ratio, set_lr
from mmscale.training.freeze import parameter_table

STATS = ("loss_sum", "micro_batches", "tokens", "labelled", "slots", "samples")
SAMPLES = STATS.index("samples")


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        engine: deepspeed.DeepSpeedEngine,
        train_loader: StatefulLoader,
        val_loader: StatefulLoader | None,
        run_dir: Path,
        budget: Budget,
    ):
        self.recipe, self.cfg, self.budget = recipe, recipe.train, budget
        self.engine, self.train_loader, self.val_loader = engine, train_loader, val_loader
        self.run_dir = run_dir
        self.rank = dist.get_rank()
        self.step = 0
        self.tokens_seen = 0
        self.samples_seen = 0  # over all ranks
        self.warmup_done_at = 0.0  # the fraction of the budget done when warmup ended

    # ---- one step -------------------------------------------------------------------------

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        """Forward/backward over `grad_accum` micro-batches, then one optimizer step.

        DeepSpeed scales each micro-batch loss by 1/grad_accum and only steps the optimizer
        on the accumulation boundary. Each micro-batch loss is a mean over its own labelled
        tokens, so micro-batches with few labels weigh as much as full ones (as in LLaVA).
        Returns [loss sum, micro-batches, tokens, labelled tokens, token slots, samples] on this rank.
        """
        stats = torch.zeros(len(STATS), dtype=torch.float64)
        for _ in range(self.cfg.grad_accum):
            loss, counts = self._forward(next(batches))
            self.engine.backward(loss)
            self.engine.step()
            stats += torch.tensor([loss.item(), 1, *counts], dtype=torch.float64)
        return stats

    def _forward(self, batch: dict) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Loss of one micro-batch, and its counts of real tokens, labelled tokens, slots and samples."""
        meta = batch.pop("meta")
        loss = self.engine(**{k: v.to(self.engine.device) for k, v in batch.items()})
        labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return loss, (int(meta["lengths"].sum()), labelled, meta["slots"], meta["samples"])

    # ---- the loop -------------------------------------------------------------------------

    def describe(self) -> str:
        """What is being trained: parameters per part, trainable and frozen, and the batch."""
        world = dist.get_world_size()
        return (
            f"{parameter_table(self.engine.module)}\nglobal batch {self.cfg.micro_batch_size} x {self.cfg.grad_accum} "
            f"accumulation x {world} ranks = {self.cfg.micro_batch_size * self.cfg.grad_accum * world} rows; "
            f"ZeRO stage {self.cfg.zero_stage}"
        )

    def finished(self) -> bool:
        return self.budget.done(self.step, self.samples_seen) >= 1

    def set_lr(self) -> float:
        """Set and return the learning rate of the coming step (see `lr_ratio`)."""
        if self.step == self.cfg.warmup_steps:
            self.warmup_done_at = self.budget.done(self.step, self.samples_seen)
        # By steps, the decay counts this step as done; by samples, only those seen so far
        # (this step's count is known after it).
        done = self.budget.done(self.step + 1, self.samples_seen)
        lr = self.cfg.lr * lr_ratio(self.step, done, self.warmup_done_at, self.cfg.warmup_steps, self.cfg.min_lr_ratio)
        set_lr(self.engine, lr)
        return lr

    def train(self) -> None:
        self.log_line(self.describe())
        self.resume()
        if self.finished():
            self.log_line(f"run {self.run_dir} already finished at step {self.step}; nothing to do")
            return
        batches = iter(self.train_loader)
        stats = torch.zeros(len(STATS), dtype=torch.float64)
        window_start = time.perf_counter()
        by_steps = self.budget.unit == "steps"
        bar = tqdm(
            total=self.budget.total, initial=self.step if by_steps else self.samples_seen, unit=self.budget.unit,
            disable=self.rank != 0, desc="train", dynamic_ncols=True,
        )
        while not self.finished():
            self.engine.train()
            lr = self.set_lr()
            step_stats = self.train_step(batches)
            # Summed over ranks every step, so that all ranks agree on when a sample budget ends.
            step_samples = int(self._sum_over_ranks(step_stats[SAMPLES : SAMPLES + 1]).item())
            stats += step_stats
            self.step += 1
            self.samples_seen += step_samples
            bar.update(1 if by_steps else step_samples)
            last = self.finished()
            validating = (self.cfg.val_every and self.step % self.cfg.val_every == 0) or last
            saving = (self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0) or last
            # Validating or saving closes the logging window: their time is not training
            # throughput, and a checkpoint's tokens_seen then counts every step before it.
            if not (self.step % self.cfg.log_every == 0 or validating or saving):
                continue
            record = self._reduce_window(stats, time.perf_counter() - window_start, lr)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{record['lr']:.2e}")
            self.write_metrics(record)
            stats.zero_()
            if validating:
                self.validate()
            if saving:
                self.save()
            window_start = time.perf_counter()
        bar.close()

    def _reduce_window(self, stats: torch.Tensor, seconds: float, lr: float) -> dict:
        """Sum a logging window's stats over ranks and turn them into one metrics record."""
        skipped = torch.tensor(list(self.train_loader.skipped().values()), dtype=torch.float64)
        totals = self._sum_over_ranks(torch.cat([stats, skipped])).tolist()
        loss_sum, micro_batches, tokens, labelled, slots, samples = totals[: len(STATS)]
        self.tokens_seen += int(tokens)
        return {
            "step": self.step,
            "loss": loss_sum / micro_batches,
            "lr": lr,
            "samples_seen": self.samples_seen,
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "loss_tokens_per_s": labelled / seconds,  # the honest throughput of supervised finetuning
            "tokens_seen": self.tokens_seen,
            "fill": tokens / slots,  # real tokens / all token slots of the batches (padding wastes the rest)
            # Bad samples skipped since the start of the run, all ranks, by reason.
            "skipped": {reason: int(n) for reason, n in zip(SKIP_REASONS, totals[len(STATS) :]) if n},
        }

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        # On the engine's device: an NCCL process group cannot reduce CPU tensors.
        values = values.to(self.engine.device)
        dist.all_reduce(values)
        return values.cpu()

    @torch.no_grad()
    def validate(self) -> float | None:
        """Token-weighted mean loss over `val_batches` batches per rank (the same batches every time)."""
        if self.val_loader is None:
            return None
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        batches = iter(self.val_loader)
        for _ in range(self.cfg.val_batches):
            loss, (_, labelled, _, _) = self._forward(next(batches))
            total += torch.tensor([loss.item() * labelled, labelled], dtype=torch.float64)
        loss_sum, labelled = self._sum_over_ranks(total).tolist()
        val_loss = loss_sum / labelled
        self.write_metrics({"step": self.step, "val_loss": val_loss})
        self.log_line(f"step {self.step}: val_loss {val_loss:.4f}")
        return val_loss

    # ---- state ----------------------------------------------------------------------------

    def save(self) -> None:
        # Every rank's loader position goes into the state DeepSpeed commits, so the data
        # position and the weights of a checkpoint always belong together.
        loaders = [None] * dist.get_world_size()
        dist.all_gather_object(loaders, self.train_loader.state_dict())
        state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen,
            "warmup_done_at": self.warmup_done_at, "loaders": loaders,
        }
        path = save_checkpoint(self.engine, self.run_dir, self.step, state)
        self.log_line(f"step {self.step}: checkpoint {path}")

    def resume(self) -> None:
        state = load_latest_checkpoint(self.engine, self.run_dir)
        if state is None:
            return
        if len(state["loaders"]) != dist.get_world_size():
            raise UserError(
                f"the checkpoint in {self.run_dir} was written by {len(state['loaders'])} ranks; resume it "
                f"with the same number of ranks (ZeRO optimizer shards and data positions are per rank)"
            )
        self.step, self.tokens_seen, self.samples_seen = state["step"], state["tokens_seen"], state["samples_seen"]
        self.warmup_done_at = state["warmup_done_at"]
        self.train_loader.load_state_dict(state["loaders"][self.rank])
        self.log_line(f"resumed from step {self.step} of {self.run_dir}")

    # ---- output ---------------------------------------------------------------------------

    def write_metrics(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_line(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text)
