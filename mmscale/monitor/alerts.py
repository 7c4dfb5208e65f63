"""Why an attempt ended, said once in the log, as a W&B alert and in the W&B run's summary; and
that a later attempt resumed the run (a requeue), with what the one before it lost.

W&B delivers alerts by e-mail or Slack (the user's W&B settings); an offline run keeps them in
its .wandb log, and `wandb sync` sends them later. A normal end sends none.
"""

from __future__ import annotations

from dataclasses import dataclass

# kind -> (W&B alert level, or None for no alert; what happened)
KINDS = {
    "finished": (None, "run finished"),
    "stopped": ("WARN", "run stopped by a signal, checkpoint saved"),
    "bad_steps": ("ERROR", "run stopped: too many non-finite steps in a row"),
    "lost_rank": ("ERROR", "run stopped: a rank was lost"),
    "save_failed": ("ERROR", "run stopped: a checkpoint could not be saved"),
    "error": ("ERROR", "run crashed"),
    "save_skipped": ("WARN", "checkpoint failed, training goes on"),  # not an end: on_save_error=continue
    # Not an end: a start after another, whose own alert a preemption's SIGTERM may have kept from W&B.
    "resumed": ("INFO", "run resumed"),
}


@dataclass(frozen=True)
class Alert:
    kind: str  # a key of KINDS
    step: int  # the last step done
    text: str  # what happened and what to do, as the log says it

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown alert kind {self.kind!r}")

    @property
    def level(self) -> str | None:
        return KINDS[self.kind][0]

    def title(self, run_name: str) -> str:
        return f"{run_name}: {KINDS[self.kind][1]} after step {self.step}"

    def line(self) -> str:
        """The one log line."""
        return f"{KINDS[self.kind][1]} after step {self.step}: {self.text}"
