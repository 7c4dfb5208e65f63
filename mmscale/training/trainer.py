"""The training loop. One optimizer step is `train_step`; everything else is bookkeeping."""

from __future__ import annotations

import contextlib
import functools
import json
import random
import time
import warnings
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Protocol, TextIO

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mmscale.config import Recipe
from mmscale.data.schema import SKIP_REASONS
from mmscale.data.stream import StatefulLoader
from mmscale.errors import UserError
from mmscale.launch.ending import StopSignals, short_stop_lead
from mmscale.models.attention import kernel_report
from mmscale.models.flops import output_layer_training, training_flops_per_sample
from mmscale.models.loss import LossTokens, labelled_tokens
from mmscale.monitor.alerts import Alert
from mmscale.monitor.console import progress
from mmscale.monitor.predictions import Prediction
from mmscale.monitor.timeline import Timeline
from mmscale.monitor.timeline import metrics as time_metrics
from mmscale.training.budget import Budget
from mmscale.training.checkpoint import MARKER, SaveFailed, load_latest_checkpoint, save_checkpoint
from mmscale.training.distributed import PeerLost, gather_objects, peer_lost
from mmscale.training.engine import lr_ratio, set_lr, skip_if_not_finite
from mmscale.training.freeze import FrozenWeights, parameter_table
from mmscale.training.metrics import COUNTS, ConnectorOutput, Window, alignment_counts, peak_flops, peak_memory_gb
from mmscale.training.metrics import record as window_record
from mmscale.training.signals import SaveClock, agree
from mmscale.training.tracking import Tracker, cut_after


def rng_state() -> dict:
    """This process's random generators: nothing in a step draws from them today (the data
    streams carry their own seeded generators), but dropout or sampling added later will."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class BadSteps(UserError):
    """train.max_bad_steps optimizer steps in a row had a non-finite loss or gradient norm."""


def ending_of(error: BaseException, step: int) -> Alert:
    """The alert of a run that ends by raising `error` at `step`."""
    kinds = ((BadSteps, "bad_steps"), (PeerLost, "lost_rank"), (SaveFailed, "save_failed"))
    kind = next((k for cls, k in kinds if isinstance(error, cls)), "error")
    return Alert(kind, step, str(error) if kind != "error" else f"{type(error).__name__}: {error}")


class Evaluator(Protocol):
    """What the trainer asks of evaluation during training (mmscale.eval.in_loop.InLoopEval, which
    `mmscale train` passes in): training itself does not depend on the evaluation code."""

    types: list[str]  # the question types, in the order of `counts`' rows

    def counts(self, model: torch.nn.Module, device: torch.device, rank: int, world: int
               ) -> tuple[torch.Tensor, list[tuple[int, str]]]: ...

    def prediction(self, index: int, answer: str) -> Prediction: ...


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        engine: deepspeed.DeepSpeedEngine,
        train_loader: StatefulLoader,
        val_loader: StatefulLoader | None,
        run_dir: Path,
        budget: Budget,
        tracker: Tracker,
        evaluator: Evaluator | None = None,
        frozen: FrozenWeights | None = None,
        timeline: Timeline | None = None,
    ):
        self.recipe, self.cfg, self.budget = recipe, recipe.train, budget
        self.evaluator, self.frozen = evaluator, frozen  # frozen: weights the checkpoints leave out
        self.engine, self.train_loader, self.val_loader = engine, train_loader, val_loader
        self.run_dir, self.tracker = run_dir, tracker
        self.rank = dist.get_rank()
        # Where this attempt's time goes (mmscale.monitor.timeline); from now, if the caller kept none.
        self.timeline = timeline or Timeline(started_at=time.time())
        self.timeline.attach(run_dir, self.rank, dist.get_world_size())
        self.connector = ConnectorOutput(engine.module.connector)
        self.step = 0
        self.tokens_seen = 0
        self.samples_seen = 0  # over all ranks
        self.warmup_done_at = 0.0  # the fraction of the budget done when warmup ended
        self.bad_steps = 0  # optimizer steps skipped for a non-finite gradient norm, and in a row
        self.bad_in_a_row = 0
        self.step_seconds = 0.0  # the last step's, for the stop lead a save needs
        self.window = Window()
        self.peak = peak_flops(engine.device)
        vocab = engine.module.language_model.lm_head.out_features
        self.sample_flops = functools.lru_cache(maxsize=65536)(
            functools.partial(training_flops_per_sample, recipe.model, vocab_size=vocab,
                              trainable=recipe.trainable_parts)
        )
        # The output head runs only at labelled positions: the samples' FLOPs less it elsewhere.
        self.head_flops = output_layer_training(recipe.model, 1, vocab, recipe.trainable_parts)
        # See train_step: DeepSpeed's division by grad_accum and average over ranks, undone.
        self.loss_scale = recipe.train.grad_accum * dist.get_world_size()
        # VIRAL normalises its term by the step's image tokens (the placeholders of a decoder VLM).
        self.aligned_token_id = engine.module.image_token_id if recipe.model.aligned else None

    # ---- one step -------------------------------------------------------------------------

    def train_step(self, batches: Iterator[dict]) -> tuple[list[str], int]:
        """Forward/backward over `grad_accum` micro-batches, then one optimizer step; returns the
        ids of the samples this rank consumed and the step's samples over all ranks.

        The step's micro-batches are read first (they wait in host memory together), so that
        their labelled (and VIRAL's image) tokens can be counted over all ranks: each micro-batch's loss is then its share of the
        step's global token mean (mmscale.models.loss), and the gradient is the same however
        the step is split. When the global gradient norm is not finite (a NaN or Inf loss or
        gradient on any rank), ZeRO skips the optimizer step and clears the gradients
        (DeepSpeed's overflow check, on for fp32 and, by our config, bf16): see `after_step`.
        """
        start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(self.cfg.grad_accum)]
        self.window.add(data_wait_s=time.perf_counter() - start)
        loss_tokens, step_samples = self._step_counts(micro_batches)
        losses, samples, parts = [], [], []
        for batch in micro_batches:
            start = time.perf_counter()
            samples += batch["meta"]["samples"]
            loss, counts = self._forward(batch, loss_tokens)
            # DeepSpeed divides each micro-batch's loss by grad_accum and averages the gradients
            # over ranks; the loss is already its share of the step's mean, so both are undone.
            self.engine.backward(skip_if_not_finite(loss) * self.loss_scale)  # a non-finite loss skips the step too
            self.engine.step()
            losses.append(loss.item())
            # VIRAL's loss terms (mmscale.alignment.AlignedVLM), when the model has them.
            if getattr(self.engine.module, "last_parts", None) is not None:
                parts.append(self.engine.module.last_parts)
            self.window.add(compute_s=time.perf_counter() - start, **counts)
        sample_ids = [sample_id for sample_id, *_ in samples]
        self.window.add(all_steps=1)
        self.after_step(losses, sample_ids, alignment_counts(parts, loss_tokens.aligned))
        return sample_ids, step_samples

    def _step_counts(self, micro_batches: list[dict]) -> tuple[LossTokens, int]:
        """The step's labelled tokens, image tokens to align (VIRAL) and samples, over all ranks."""
        local = torch.zeros(3, dtype=torch.float64)
        for batch in micro_batches:
            aligned = (batch["input_ids"] == self.aligned_token_id).sum() if self.aligned_token_id is not None else 0
            local += torch.tensor([labelled_tokens(batch["labels"]), int(aligned), len(batch["meta"]["samples"])])
        labelled, aligned, samples = (int(n) for n in self._sum_over_ranks(local).tolist())
        return LossTokens(labelled, aligned), samples

    def after_step(self, losses: list[float], sample_ids: list[str], alignment: dict[str, float] | None = None) -> None:
        """Count the step's loss (and VIRAL's terms) and gradient norm, or, if ZeRO skipped it, log and count that."""
        if self.engine.was_step_applied():
            self.bad_in_a_row = 0
            self.window.add(loss_sum=sum(losses), steps=1, **(alignment or {}))
            norm = self.engine.get_global_grad_norm()  # None when clipping is off
            if norm is not None:
                self.window.add(grad_norm_sum=float(norm), grad_norm_steps=1)
            return
        self.bad_steps += 1
        self.bad_in_a_row += 1
        everyone = gather_objects(sample_ids)  # every rank skipped, so every rank gathers
        ids = [i for rank_ids in everyone for i in rank_ids]
        self.log_line(
            f"step {self.step + 1}: non-finite loss or gradient norm (rank 0's micro-batches' shares of the step "
            f"loss: {losses}); optimizer "
            f"step skipped. Samples: {', '.join(ids[:16])}{' ...' if len(ids) > 16 else ''}"
        )
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            raise BadSteps(
                f"{self.bad_in_a_row} optimizer steps in a row, the last at step {self.step + 1}, had a non-finite "
                f"loss or gradient norm (train.max_bad_steps={self.cfg.max_bad_steps}); stopped without saving, so "
                "the last checkpoint is the newest good state. Lower train.lr, or check the samples logged above"
            )

    def _forward(self, batch: dict, loss_tokens: LossTokens | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch (normalised by `loss_tokens`, else its own mean), and its counts
        of real tokens, labelled tokens, slots, samples and FLOPs."""
        meta = batch.pop("meta")
        inputs = {k: v.to(self.engine.device) for k, v in batch.items()}
        loss = self.engine(**inputs, loss_tokens=loss_tokens)
        tokens, labelled = int(meta["lengths"].sum()), labelled_tokens(batch["labels"])
        samples = sum(self.sample_flops(tokens=t, image_tiles=tiles) for _, t, tiles in meta["samples"])
        counts = {
            "tokens": tokens,
            "labelled": labelled,
            "slots": meta["slots"],
            "samples": len(meta["samples"]),
            "flops": samples - (tokens - labelled) * self.head_flops,
        }
        if self.engine.module.training:  # the vision health counts are the training steps'
            counts["text_only"] = self.connector.count(inputs, meta)
        return loss, counts

    # ---- the loop -------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        return self.cfg.micro_batch_size * self.cfg.grad_accum * dist.get_world_size()

    def describe(self) -> str:
        """What is being trained: parameters per part, trainable and frozen, and the batch."""
        world = dist.get_world_size()
        model = self.recipe.model
        llm_heads, *tower_heads = model.self_attention_head_dims  # a tower only in a decoder VLM
        dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        kernels = kernel_report(self.engine.device, dtype, llm_heads, tower_heads[0] if tower_heads else None,
                                self.recipe.data.pack, model.attention, both_ways=model.is_molmo2)
        return (
            f"{parameter_table(self.engine.module)}\n{kernels}\n"
            f"global batch {self.cfg.micro_batch_size} x {self.cfg.grad_accum} "
            f"accumulation x {world} ranks = {self.global_batch} rows; "
            f"ZeRO stage {self.cfg.zero_stage}"
            + ("; checkpoints leave out the frozen weights (model.pretrained gives them)" if self.frozen else "")
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
        cfg = self.cfg
        ratio = lr_ratio(self.step, done, self.warmup_done_at, cfg.warmup_steps, cfg.min_lr_ratio, cfg.schedule)
        lr = self.cfg.lr * ratio
        set_lr(self.engine, lr)
        return lr

    def train(self, stop: StopSignals | None = None) -> None:
        """Resume, then train until the budget is spent or a stop signal asks for a save and an
        exit. `stop`: the signals caught since the process started, else caught from here on;
        either way before the loader's workers fork, so that they inherit the flag-only handlers
        and a signal sent to the whole process group (as SLURM sends it) does not kill them."""
        try:
            ending = self._resume_and_train(stop)
        except BaseException as error:
            try:
                self.report_end(ending_of(error, self.step))
            except Exception as report_error:  # noqa: BLE001 - the run's own error is the one to raise
                warnings.warn(f"the end of the run could not be reported ({report_error!r})", stacklevel=2)
            raise
        self.report_end(ending)

    def _resume_and_train(self, stop: StopSignals | None) -> Alert:
        with contextlib.ExitStack() as stack:
            if stop is None:
                stop = stack.enter_context(StopSignals())
            self.log_line(self.describe())
            self.timeline.switch("resume")
            self.resume()
            if self.rank == 0:
                self.report_restart()
            if self.finished():
                self.log_line(f"run {self.run_dir} already finished at step {self.step}; nothing to do")
                return Alert("finished", self.step, "the run had finished before this start")
            if agree(stop.requested(), self.engine.device):  # during start-up: nothing new to save
                return Alert("stopped", self.step, f"stopped by a signal before step {self.step + 1} (during start-up: "
                             f"{stop.name()}); run the same command to resume")
            self.timeline.switch("train")
            stopped = self._train(stop)
            if stopped:
                return Alert("stopped", self.step, f"{stopped} reached the job; checkpoint step {self.step} committed; "
                             "a requeued start, or the same command, resumes from it")
            return Alert("finished", self.step, f"the training budget is spent; final checkpoint step {self.step}")

    def report_restart(self) -> None:
        """Alert that this attempt resumes the run (rank 0), saying how the one before ended."""
        kept = self.timeline.accounting().attempts
        if len(kept) < 2:
            return
        before, now = kept[-2], kept[-1].attempt
        start = f"went on from the checkpoint of step {now.resumed_from}" if now.resumed_from else "started afresh"
        ended = before.attempt.ended or "without a record of why (killed)"
        self.tracker.alert(Alert("resumed", self.step, (
            f"attempt {now.number}{f' ({now.job})' if now.job else ''} {start}; attempt {before.attempt.number} "
            f"ended {ended} after step {before.attempt.last_step}, so {before.lost_steps} of its steps are trained "
            "again")))

    def report_end(self, ending: Alert) -> None:
        """Log, alert and summarise how this attempt ends (rank 0's files and W&B only: no collective)."""
        self.timeline.switch("stop")
        self.timeline.end(ending.kind)
        summary = {"step": self.step, **time_metrics(self.timeline.accounting())} if self.rank == 0 else {}
        self.tracker.end(ending, summary)

    def _train(self, stop: StopSignals) -> str | None:
        """Train until done or asked to stop; returns the stop signal's name if asked."""
        batches = iter(self.train_loader)  # a generator: its workers start at the first batch
        try:
            with self._sample_log() as sample_log:
                return self._train_until_done_or_stopped(stop, batches, sample_log)
        except RuntimeError as e:
            lost = peer_lost(e, self.rank, self.step + 1)
            if lost is None:
                raise
            raise lost from e
        finally:
            # Stops the loader's workers now, even when a step raised: they ignore SIGTERM
            # (see data.loader), so at exit multiprocessing would wait for them forever.
            batches.close()

    def _sample_log(self) -> contextlib.AbstractContextManager[TextIO | None]:
        """RUN_DIR/samples/rank_N.jsonl opened for appending if train.log_sample_ids, without the
        steps after the resumed one (trained again now): every step once."""
        if not self.cfg.log_sample_ids:
            return contextlib.nullcontext()
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        cut_after(folder / f"rank_{self.rank}.jsonl", self.step)
        if self.rank == 0:  # and the logs of ranks that a run resumed on fewer ranks no longer has
            for path in folder.glob("rank_*.jsonl"):
                if int(path.stem.split("_")[1]) >= dist.get_world_size():
                    cut_after(path, self.step)
        return open(folder / f"rank_{self.rank}.jsonl", "a")

    def _train_until_done_or_stopped(
        self, stop_signals: StopSignals, batches: Generator[dict, None, None], sample_log: TextIO | None
    ) -> str | None:
        clock = SaveClock(self.cfg.checkpoint_every_minutes, self.engine.device)
        window_start = time.perf_counter()
        by_steps = self.budget.unit == "steps"
        with progress(
            self.budget.total, self.step if by_steps else self.samples_seen, self.budget.unit, "train", self.rank == 0
        ) as bar:  # closed however the loop ends
            while not self.finished():
                self.engine.train()
                lr = self.set_lr()
                # step_samples is summed over ranks, so all ranks agree on when a sample budget ends.
                started = time.perf_counter()
                sample_ids, step_samples = self.train_step(batches)
                self.step_seconds = time.perf_counter() - started
                self.step += 1
                self.timeline.stepped(self.step)
                if sample_log is not None:
                    sample_log.write(json.dumps({"step": self.step, "ids": sample_ids}) + "\n")
                    sample_log.flush()
                self.samples_seen += step_samples
                bar.update(1 if by_steps else step_samples)
                last = self.finished()
                # Collectives on every rank after every step, so that all ranks stop, or save, after the same one.
                stopping = agree(stop_signals.requested(), self.engine.device)
                stopped_at = time.monotonic()  # when this rank learnt of another rank's signal
                timed = clock.due()
                validating = (self.cfg.val_every and self.step % self.cfg.val_every == 0) or last
                evaluating = self.evaluator is not None and (self.step % self.cfg.eval_every == 0 or last)
                scheduled = self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0
                saving = scheduled or last or stopping or timed
                # Validating or saving closes the logging window: their time is not training
                # throughput, and a checkpoint's tokens_seen then counts every step before it.
                if not (self.step % self.cfg.log_every == 0 or validating or evaluating or saving):
                    continue
                record = self._reduce_window(time.perf_counter() - window_start, lr)
                bar.set_postfix(loss=f"{record['loss'] or float('nan'):.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                lr=f"{record['lr']:.2e}")
                self.write_metrics(record)
                self.timeline.write()
                self.window.reset()
                # Asked to stop: save first (the signal's lead is short), without validation or the eval.
                # A signal during them saves at once, not a step later.
                if validating and not stopping:
                    self.validate()
                    stopping = agree(stop_signals.requested(), self.engine.device)
                if evaluating and not stopping:
                    self.evaluate()
                    stopping = agree(stop_signals.requested(), self.engine.device)
                if saving or stopping:
                    self.save(may_fail=not (last or stopping))
                    clock.restart()
                if stopping:
                    since = time.monotonic() - (stop_signals.received_at or stopped_at)
                    self.log_line(f"step {self.step}: stopped by a signal, checkpoint committed {since:.1f} s after it "
                                  "reached this rank; run the same command to resume")
                    return stop_signals.name()
                window_start = time.perf_counter()
        return None

    def _reduce_window(self, seconds: float, lr: float) -> dict:
        """Sum a logging window's counts over ranks and turn them into one metrics record."""
        self.window.add(**self.connector.take())
        skipped = torch.tensor(list(self.train_loader.skipped().values()), dtype=torch.float64)
        totals = self._sum_over_ranks(torch.cat([self.window.counts, skipped])).tolist()
        named = dict(zip(COUNTS, totals))
        self.tokens_seen += int(named["tokens"])
        memory = torch.tensor([peak_memory_gb(self.engine.device)], dtype=torch.float64)
        return {
            "step": self.step,
            "lr": lr,
            **window_record(named, seconds, dist.get_world_size(), self.peak),
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "peak_mem_gb": float(self._sum_over_ranks(memory, dist.ReduceOp.MAX)),  # the fullest rank
            "skipped_steps": self.bad_steps,  # optimizer steps skipped for non-finite gradients, so far
            # Bad samples skipped since the start of the run, all ranks, by reason.
            "skipped": {reason: int(n) for reason, n in zip(SKIP_REASONS, totals[len(COUNTS) :]) if n},
            # Goodput and where the allocated time went, all attempts so far (rank 0 keeps the files).
            **(time_metrics(self.timeline.accounting()) if self.rank == 0 else {}),
        }

    def _sum_over_ranks(self, values: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        # On the engine's device: an NCCL process group cannot reduce CPU tensors.
        values = values.to(self.engine.device)
        dist.all_reduce(values, op=op)
        return values.cpu()

    @torch.no_grad()
    def validate(self) -> float | None:
        """Token-weighted mean loss over `val_batches` batches per rank (the same batches every time)."""
        if self.val_loader is None:
            return None
        with self.timeline.phase("validate"):
            return self._validate()

    def _validate(self) -> float:
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with contextlib.closing(iter(self.val_loader)) as batches:  # stops its workers however it ends
            for _ in range(self.cfg.val_batches):
                loss, counts = self._forward(next(batches))
                total += torch.tensor([loss.item() * counts["labelled"], counts["labelled"]], dtype=torch.float64)
        loss_sum, labelled = self._sum_over_ranks(total).tolist()
        val_loss = loss_sum / labelled
        self.write_metrics({"step": self.step, "val_loss": val_loss})
        self.log_line(f"step {self.step}: val_loss {val_loss:.4f}")
        return val_loss

    def evaluate(self) -> None:
        """Answer the eval questions (mmscale.eval.in_loop); log the accuracy per question type and the
        predictions table."""
        with self.timeline.phase("eval"):
            self._evaluate()

    def _evaluate(self) -> None:
        self.engine.eval()
        local, table = self.evaluator.counts(self.engine.module, self.engine.device, self.rank, dist.get_world_size())
        counts = self._sum_over_ranks(local.flatten()).view(-1, 2).tolist()
        answers = sorted(answer for rank_answers in gather_objects(table) for answer in rank_answers)
        accuracy = {t: correct / n for t, (correct, n) in zip(self.evaluator.types, counts) if n}
        overall = sum(c for c, _ in counts) / sum(n for _, n in counts)
        self.write_metrics({"step": self.step, "eval_accuracy": accuracy, "eval_overall": overall,
                            "eval_samples": int(sum(n for _, n in counts))})
        if self.rank == 0:
            self.tracker.log_predictions(self.step, [self.evaluator.prediction(i, answer) for i, answer in answers])
        self.log_line(f"step {self.step}: eval accuracy {overall:.3f} (" +
                      ", ".join(f"{t} {a:.3f}" for t, a in accuracy.items()) + ")")

    # ---- state ----------------------------------------------------------------------------

    def save(self, may_fail: bool = False) -> None:
        """Save a checkpoint; with train.on_save_error=continue a failed save that `may_fail`
        (a periodic one) is logged and training goes on."""
        with self.timeline.phase("save"):
            self._save(may_fail)

    def _save(self, may_fail: bool) -> None:
        # Every rank's loader position goes into the state DeepSpeed commits, so the data
        # position and the weights of a checkpoint always belong together.
        per_rank = gather_objects((self.train_loader.state_dict(), rng_state()))
        loaders, rngs = (list(states) for states in zip(*per_rank))
        state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen,
            "warmup_done_at": self.warmup_done_at, "bad_steps": self.bad_steps, "loaders": loaders, "rng": rngs,
            "global_batch": self.global_batch,
        }
        started = time.perf_counter()
        try:
            path = save_checkpoint(self.engine, self.run_dir, self.step, state, keep=self.cfg.checkpoint_keep,
                                   frozen=self.frozen)
        except SaveFailed as e:
            if not (may_fail and self.cfg.on_save_error == "continue"):
                raise
            self.tracker.alert(Alert("save_skipped", self.step, f"{e} (train.on_save_error=continue)"))
            return
        self.timeline.saved(self.step)
        seconds = time.perf_counter() - started
        if self.rank == 0:  # the cost of a save, next to the stop signal's lead (slurm/README.md)
            size = sum(json.loads((path / MARKER).read_text())["files"].values()) / 1e9
            self.log_line(f"step {self.step}: checkpoint {path} ({size:.2f} GB in {seconds:.1f} s)")
            short = short_stop_lead(self.step_seconds, seconds)
            if short is not None:
                self.log_line(f"warning: {short}")

    def resume(self) -> None:
        restored = load_latest_checkpoint(self.engine, self.run_dir, self.frozen)
        # The records of steps after the checkpoint are those of steps about to be trained again.
        self.tracker.rewind(restored.client_state["step"] if restored is not None else 0)
        if restored is None:
            return
        self.timeline.resumed(restored.client_state["step"])
        state = restored.client_state
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise UserError(
                f"checkpoint {restored.path} trained with a global batch of {state['global_batch']} rows and this "
                f"start has {self.global_batch} ({dist.get_world_size()} ranks x {self.cfg.micro_batch_size} x "
                f"{self.cfg.grad_accum} accumulation); set train.global_batch_size={state['global_batch']} so that "
                "accumulation follows the number of ranks"
            )
        self.step, self.tokens_seen, self.samples_seen = state["step"], state["tokens_seen"], state["samples_seen"]
        self.warmup_done_at, self.bad_steps = state["warmup_done_at"], state["bad_steps"]
        world = dist.get_world_size()
        change = self.train_loader.resume(state["loaders"], self.rank, world)
        if change is None:
            set_rng_state(state["rng"][self.rank])
            self.log_line(f"resumed from step {self.step}: {restored.path}")
            return
        # On other ranks nothing continues bit for bit; the generators keep this start's seeds.
        self.log_line(
            f"resumed from step {self.step}: {restored.path}, written by {restored.world_size} ranks, on {world} "
            f"(the global batch stays {self.global_batch} rows: accumulation {self.cfg.grad_accum}); optimizer "
            f"states resharded through a DeepSpeed universal checkpoint; {change}"
        )

    # ---- output ---------------------------------------------------------------------------

    def write_metrics(self, record: dict) -> None:
        self.tracker.log(record)

    def log_line(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text)
