"""`mmscale submit`: a training run as a SLURM job, through submitit, that requeues itself when
SLURM preempts it or its time runs out, and resumes exactly where it stopped.

The job runs one task per node (submitit's srun); each task runs torchrun for its node's ranks,
with the rendezvous of mmscale/launch/rendezvous.py. Its files:

    RUN_DIR/slurm/JOBID/JOBID_K_log.out   node K's log: the task, torchrun and its ranks, over all requeues
    RUN_DIR/slurm/JOBID/recipe.yaml        the resolved recipe the job trains, fixed when it was submitted

Stopping. SLURM signals every process of the job step, so the trainer ranks get the signal
themselves: they save a checkpoint after their current step and exit 0 (mmscale/training/signals.py);
torchrun forwards it as well and waits for them. The task meanwhile only notes which signals came,
and acts once torchrun is gone:
  - SIGUSR2 (sent `signal_delay_s` before the time limit, or by `scancel --signal=USR2`, or by
    submitit's `job._interrupt()`): node 0's task hands the signal on to submitit's own handler,
    which calls `TrainJob.checkpoint()` and requeues the job with the DelayedSubmission it returns.
  - SIGTERM alone (preemption, `scontrol requeue`, scancel): SLURM itself requeues or ends the job.
Either way the task writes no result, so whoever waits on the job keeps waiting for its next start,
which runs the same TrainJob: it resumes from the newest complete checkpoint, with the same W&B
run id (RUN_DIR/wandb_id).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mmscale.config import Recipe, dump_recipe
from mmscale.errors import UserError
from mmscale.launch.ending import MIN_STOP_LEAD_S, STOP_LEAD_VAR, StopSignals
from mmscale.launch.rendezvous import rendezvous_port
from mmscale.monitor.timeline import LAUNCHED_AT_VAR, process_started_at
from mmscale.utils.files import write_durably

if TYPE_CHECKING:  # submitit is imported where a job is submitted or run, not with the package
    import submitit

# torchrun's default list plus SIGUSR2, SLURM's advance notice: without it torchrun would die of
# the signal at once instead of waiting for its ranks to save.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"


class TrainingFailed(RuntimeError):
    """torchrun ended with an error on a node without having been asked to stop."""


@dataclass(frozen=True)
class SlurmRequest:
    """What `mmscale submit` asks SLURM for, and how the job may be requeued."""

    nodes: int = 1
    gpus_per_node: int = 8  # 0: CPU nodes (gloo), with no GPU request
    ranks_per_node: int | None = None  # None: one per GPU, or 1 on CPU nodes
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None  # node features, e.g. "h100"
    time_min: int = 240  # the job's time limit; a job stopped by it is requeued
    cpus_per_task: int | None = None  # CPUs of each node's task, shared by its ranks and their loader workers
    mem: str | None = None  # memory per node in sbatch's syntax ("0": all of it)
    max_requeues: int = 10  # no requeue on SIGUSR2 once SLURM_RESTART_COUNT (any requeue, SLURM's own too) reaches it
    signal_delay_s: int = MIN_STOP_LEAD_S  # SIGUSR2 this long before the time limit: time to finish a step and save
    shutdown_timeout_s: int = 300  # how long torchrun waits for its ranks to save after a signal
    setup: tuple[str, ...] = ()  # shell lines run before srun: `module load ...`, `source venv/bin/activate`
    srun_args: tuple[str, ...] = ()  # extra srun arguments, e.g. a container: "--container-image=..."
    python: str | None = None  # the job's python command; None: this interpreter
    sbatch: dict[str, str] = field(default_factory=dict)  # any other sbatch option, e.g. {"exclusive": ""}

    def __post_init__(self) -> None:
        # (field, its `mmscale submit` option, least value)
        for name, option, least in (("nodes", "nodes", 1), ("gpus_per_node", "gpus-per-node", 0),
                                    ("ranks_per_node", "ranks-per-node", 1), ("time_min", "time", 1),
                                    ("cpus_per_task", "cpus-per-task", 1), ("max_requeues", "max-requeues", 0),
                                    ("signal_delay_s", "signal-delay", 0), ("shutdown_timeout_s", "shutdown-timeout", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise UserError(f"--{option} must be at least {least}, got {value}")

    @property
    def ranks(self) -> int:
        """Ranks per node."""
        return self.ranks_per_node or self.gpus_per_node or 1


def executor_parameters(request: SlurmRequest, job_name: str) -> dict:
    """submitit SlurmExecutor parameters for `request`: one task per node, requeueable."""
    optional = {"partition": request.partition, "account": request.account, "qos": request.qos,
                "constraint": request.constraint, "cpus_per_task": request.cpus_per_task, "mem": request.mem,
                "gpus_per_node": request.gpus_per_node or None}
    extra = {key: value or True for key, value in request.sbatch.items()}  # a bare flag: "#SBATCH --exclusive"
    cpus = [f"--cpus-per-task={request.cpus_per_task}"] if request.cpus_per_task else []
    return {
        "job_name": job_name,
        "nodes": request.nodes,
        "ntasks_per_node": 1,
        "time": request.time_min,
        "signal_delay_s": request.signal_delay_s,
        "stderr_to_stdout": True,  # one log per node, the ranks' errors in their order
        # One node failing stops the others at once rather than at their collective timeout; and
        # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05).
        "srun_args": ["--kill-on-bad-exit=1", *cpus, *request.srun_args],
        "setup": list(request.setup),
        "additional_parameters": {"requeue": True, **extra},
        **{key: value for key, value in optional.items() if value is not None},
    }


def torchrun_command(python: str, nodes: int, node_rank: int, ranks_per_node: int, master_addr: str,
                     master_port: int, shutdown_timeout_s: int, recipe_file: Path) -> list[str]:
    """One node's torchrun (static rendezvous: node 0's agent hosts the store) training `recipe_file`."""
    return [
        python, "-m", "torch.distributed.run",
        f"--nnodes={nodes}", f"--node-rank={node_rank}", f"--nproc-per-node={ranks_per_node}",
        f"--master-addr={master_addr}", f"--master-port={master_port}",
        f"--signals-to-handle={FORWARDED_SIGNALS}", f"--shutdown-timeout={shutdown_timeout_s}",
        "-m", "mmscale", "train", str(recipe_file),
    ]  # fmt: skip


class TrainJob:
    """The callable submitit runs in each node's task (see the module docstring); checkpointable:
    submitit calls `checkpoint()` on node 0 when the job is to be requeued."""

    def __init__(self, recipe_yaml: str, run_dir: str, workdir: str, request: SlurmRequest):
        self.recipe_yaml, self.run_dir, self.workdir, self.request = recipe_yaml, run_dir, workdir, request

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        recipe_file = self._write_recipe(Path(env.paths.folder))
        command = torchrun_command(sys.executable, env.num_nodes, env.node, self.request.ranks, env.hostnames[0],
                                   rendezvous_port(env.raw_job_id), self.request.shutdown_timeout_s, recipe_file)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        node = env.hostnames[env.node]  # SLURM's name of this node
        say(f"node {env.node} of {env.num_nodes} ({node}), start {int(restarts) + 1}: {shlex.join(command)}")
        # Noted, not acted on: the ranks save first; submitit's own handlers come back afterwards.
        with StopSignals() as signals:
            variables = {
                **os.environ,
                STOP_LEAD_VAR: str(self.request.signal_delay_s),  # the trainer compares its saves with it
                LAUNCHED_AT_VAR: str(process_started_at()),  # the trainer's time accounting starts here
            }
            code = subprocess.call(command, cwd=self.workdir, env=variables)
        if not signals.received:
            if code:
                raise TrainingFailed(
                    f"torchrun exited with code {code} on node {env.node} ({node}) of job {env.job_id}; "
                    "the failing rank's error is above in this log or in another node's log beside it"
                )
            return self.run_dir
        say(f"node {env.node}: torchrun exited with code {code} after {signals.name()}")
        if signal.SIGUSR2 in signals.received and env.global_rank == 0:
            # submitit's handler calls checkpoint() and requeues the job, then exits; past
            # max_requeues it raises instead, which fails the job.
            signal.raise_signal(signal.SIGUSR2)
        # No result: the job comes back (requeued by node 0 or by SLURM) or SLURM ends it.
        raise SystemExit(0)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """The job to requeue: this one again, which resumes from the checkpoint its ranks saved on
        the signal; None (no requeue, the job fails) once it was requeued `max_requeues` times."""
        import submitit

        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.request.max_requeues:
            say(f"not requeueing: the job was requeued {restarts} times already (--max-requeues {self.request.max_requeues})")
            return None
        say(f"requeueing (requeue {restarts + 1} of at most {self.request.max_requeues}); it resumes from the newest checkpoint")
        return submitit.helpers.DelayedSubmission(self)

    def _write_recipe(self, folder: Path) -> Path:
        # Every node writes the same text; each through its own temporary file (write_durably's), so a
        # reader never sees a part.
        path = folder / "recipe.yaml"
        write_durably(path, self.recipe_yaml)
        return path


def say(text: str) -> None:
    print(f"mmscale submit: {text}", flush=True)


def submit(recipe: Recipe, request: SlurmRequest) -> submitit.Job:
    """Create the run directory and submit `recipe` as a SLURM job; returns submitit's Job."""
    import submitit
    from submitit.core.utils import FailedJobError

    run_dir = Path(recipe.run.dir)
    folder = run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=request.max_requeues, python=request.python)
    executor.update_parameters(**executor_parameters(request, recipe.run.name))
    job = TrainJob(dump_recipe(recipe), str(run_dir), os.getcwd(), request)
    try:
        return executor.submit(job)
    except FileNotFoundError as e:
        raise UserError(f"cannot submit: {e.filename} not found; run `mmscale submit` where SLURM's commands are") from e
    except FailedJobError as e:
        raise UserError(f"sbatch refused the job: {e}") from e
