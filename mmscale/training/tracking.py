"""Experiment tracking: each metrics record of a run goes to RUN_DIR/metrics.jsonl and, with
run.wandb.enabled, to Weights & Biases. Only rank 0 writes; other ranks' trackers do nothing.

    RUN_DIR/metrics.jsonl            one JSON line per record, whatever the W&B settings; each step once
    RUN_DIR/metrics.replaced.jsonl   records of steps that a resume trained again (after a crash
                                     past the last checkpoint, or a rollback), moved out of metrics.jsonl
    RUN_DIR/wandb_id                 the W&B run id, chosen on the first start and reused on every resume
    RUN_DIR/wandb/                   W&B's own files; offline runs are uploaded with `wandb sync RUN_DIR/wandb`
    RUN_DIR/predictions.jsonl        the predictions table of each in-loop eval (mmscale.monitor.predictions)

Besides records, a tracker takes the predictions table, alerts (mmscale.monitor.alerts: a W&B
alert, which an offline run keeps in its log) and the run's summary (why it ended, its goodput).

Steps. W&B silently drops a row whose step is below the last one it saw, and a run resumed
from an earlier checkpoint than its last logged record repeats trainer steps. So the
trainer's step is logged as the metric "step" (the x-axis of every chart, through
`define_metric`), and W&B's own step counts the records ever written (the lines of both
files), which only grows: nothing is dropped, and repeated trainer steps show up twice on
W&B's "step" axis (W&B cannot take a row back; metrics.jsonl can). Counting lines also covers
offline mode: an offline run resumed with the same id starts again at W&B step 0 in a new
RUN_DIR/wandb/offline-run-* folder (it cannot ask the server where it stopped), and `wandb
sync` uploads those folders one after another into one run, where repeated steps would collide.
"""

from __future__ import annotations

import json
import secrets
import string
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from mmscale.config import Recipe
from mmscale.errors import UserError
from mmscale.monitor.alerts import Alert
from mmscale.monitor.predictions import PREDICTIONS_FILE, Prediction, wandb_table, write_local
from mmscale.utils.files import write_durably

METRICS_FILE = "metrics.jsonl"
REPLACED_FILE = "metrics.replaced.jsonl"
WANDB_ID_FILE = "wandb_id"
STEP_METRIC = "step"

_ID_CHARS = string.ascii_lowercase + string.digits


class Tracker:
    """Created on every rank with the same arguments; `log` and `close` act on rank 0 only."""

    def __init__(self, recipe: Recipe, run_dir: Path, rank: int):
        self.run_dir, self.run_name = run_dir, recipe.run.wandb.name or recipe.run.name
        self.writes = rank == 0
        self._wandb_run: Any = None  # wandb.Run; wandb is imported only when enabled
        self._wandb_step = 0
        if self.writes and recipe.run.wandb.enabled:
            self._wandb_run = start_wandb(recipe, run_dir)
            # An online resume knows the server's next step; offline it is 0 (see the module docstring).
            written = count_lines(run_dir / METRICS_FILE) + count_lines(run_dir / REPLACED_FILE)
            self._wandb_step = max(written, self._wandb_run.step)

    def log(self, record: dict) -> None:
        """Append `record` (with a "step") to metrics.jsonl and, when enabled, to W&B."""
        if not self.writes:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._to_wandb(lambda run: run.log(flatten(record), step=self._wandb_step))
        self._wandb_step += self._wandb_run is not None

    def log_predictions(self, step: int, predictions: list[Prediction]) -> None:
        """The predictions table of the eval at `step`: RUN_DIR/predictions.jsonl, and W&B's
        "eval/predictions" (in the W&B row of the step's metrics, which came just before)."""
        if not self.writes or not predictions:
            return
        # The table is a view of the run: a bad image or a full disk costs the table, not the run or W&B.
        try:
            write_local(self.run_dir, step, predictions)
        except OSError as e:
            warnings.warn(f"the predictions table of step {step} was not written ({e})", stacklevel=2)
        if self._wandb_run is None:
            return
        try:
            table = wandb_table(step, predictions)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for an image it cannot convert
            warnings.warn(f"the predictions table of step {step} was not sent to W&B ({e!r})", stacklevel=2)
            return
        self._to_wandb(lambda run: run.log({STEP_METRIC: step, "eval/predictions": table}, step=self._wandb_step - 1))

    def alert(self, alert: Alert) -> None:
        """Say `alert` in the log and, when it has a level, send it as a W&B alert."""
        if not self.writes:
            return
        print(f"mmscale: {alert.line()}", flush=True)
        if alert.level is not None:
            self._to_wandb(lambda run: run.alert(title=alert.title(self.run_name), text=alert.text, level=alert.level))

    def end(self, ending: Alert, summary: dict) -> None:
        """How the attempt ended: its alert, and the W&B run's summary (`ended`, `ended_why`, `summary`).
        A run stopped by a signal ends its W&B run as finished (exit 0) with `ended` "stopped": the
        requeued start opens it again."""
        self.alert(ending)
        self._to_wandb(lambda run: run.summary.update({"ended": ending.kind, "ended_why": ending.text,
                                                       **flatten(summary)}))

    def _to_wandb(self, call: Any) -> None:
        if self._wandb_run is None:
            return
        try:
            call(self._wandb_run)
        except Exception as e:  # noqa: BLE001 - W&B's failures must never cost the run
            self._give_up_on_wandb(e)

    def rewind(self, step: int) -> None:
        """Move the records of steps after `step` (which the resumed run trains again) out of
        metrics.jsonl into metrics.replaced.jsonl, so that every step appears once; and cut the
        predictions tables after it."""
        if not self.writes:
            return
        dropped = cut_after(self.run_dir / METRICS_FILE, step)
        if dropped:
            with open(self.run_dir / REPLACED_FILE, "a") as f:
                f.writelines(line + "\n" for line in dropped)
        cut_after(self.run_dir / PREDICTIONS_FILE, step)

    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run (a non-zero exit_code marks it failed). Safe to call twice."""
        if self._wandb_run is not None:
            try:
                self._wandb_run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                self._give_up_on_wandb(e)
            self._wandb_run = None

    def _give_up_on_wandb(self, error: Exception) -> None:
        # SLURM's SIGTERM reaches every process of a job, W&B's service too: it exits at once,
        # and the next log call fails just before the trainer's stop checkpoint. The metrics
        # file stays complete, so losing W&B must not lose the save.
        warnings.warn(f"W&B stopped working ({error!r}); metrics go on to {METRICS_FILE} only", stacklevel=3)
        self._wandb_run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close(exit_code=0 if kind is None else 1)


def start_wandb(recipe: Recipe, run_dir: Path) -> Any:
    """Start (or resume, by the id in RUN_DIR/wandb_id) the W&B run of `run_dir`; returns the wandb.Run."""
    try:
        import wandb
    except ImportError as e:
        raise UserError(
            "run.wandb.enabled is true but the wandb package is not installed; "
            "install it (pip install wandb) or set run.wandb.enabled=false"
        ) from e
    cfg = recipe.run.wandb
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or recipe.run.name,
        tags=list(cfg.tags),
        config=recipe.model_dump(mode="json"),
        dir=run_dir,
        mode=cfg.mode,
        id=wandb_run_id(run_dir),
        resume="allow",  # the first start creates the run, later starts continue it
    )
    run.define_metric(STEP_METRIC)
    run.define_metric("*", step_metric=STEP_METRIC)
    return run


def wandb_run_id(run_dir: Path) -> str:
    """The run id stored in RUN_DIR/wandb_id, chosen and stored (atomically) on the first call."""
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        run_id = path.read_text().strip()
        if not run_id:
            raise UserError(f"{path} is empty; delete it to start a new W&B run for {run_dir}")
        return run_id
    # secrets, not random: the trainer seeds `random`, which would give every run the same id.
    run_id = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
    write_durably(path, run_id + "\n")
    return run_id


def flatten(record: dict, prefix: str = "", sep: str = "/") -> dict:
    """Nested dicts become "outer/inner" keys (e.g. skipped/too_long), the way W&B groups charts;
    with sep=".", a recipe's dotted keys (train.lr)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def cut_after(path: Path, step: int) -> list[str]:
    """Rewrite the JSON-lines file `path` (if any) without the records whose "step" is after
    `step`, and without a line a crash cut short; returns the lines taken out."""
    if not path.exists():
        return []
    kept, dropped = [], []
    for line in path.read_text().splitlines():
        try:
            within = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # a line cut by a crash
            within = False
        (kept if within else dropped).append(line)
    if dropped:
        write_durably(path, "".join(line + "\n" for line in kept))
    return dropped


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
