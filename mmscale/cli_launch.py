"""The `mmscale submit` and `mmscale jobs` subcommands (cli.py adds them from here): the CLI side of
mmscale.launch, beside it rather than in it because `submit` prints and checks the run's plan
first, and mmscale.plan imports mmscale.launch (how a rank ends), never the other way round.

What a command runs is imported inside it, as in cli.py: mmscale.plan and submitit take seconds to
import (torch, transformers), which `mmscale --help` or another command need not pay.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mmscale.config import Recipe, load_recipe
from mmscale.errors import UserError
from mmscale.utils.options import given

if TYPE_CHECKING:  # for the annotation only: importing mmscale.plan costs seconds (see above)
    from mmscale.plan import Plan


def _key_value(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY or KEY=VALUE")
    return key, value


def _submit(args: argparse.Namespace) -> None:
    from mmscale.launch.jobs import node_logs, wait_for_job
    from mmscale.launch.submit import SlurmRequest, submit
    from mmscale.plan import stop_lead_s

    recipe = load_recipe(args.recipe, args.overrides)
    request = SlurmRequest(
        ranks_per_node=args.ranks_per_node, partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, cpus_per_task=args.cpus_per_task, mem=args.mem, setup=tuple(args.setup),
        srun_args=tuple(args.srun_arg), python=args.python, sbatch=dict(args.sbatch),
        **given(args, "nodes", "gpus_per_node", "time_min", "max_requeues", "signal_delay_s", "shutdown_timeout_s"),
    )
    plan = None
    if request.gpus_per_node and not args.skip_plan:
        plan = check_plan(recipe, request.nodes, request.gpus_per_node, **given(args, "gpu_memory_gb"))
    if args.signal_delay_s is None and plan is not None:
        # The stop signal's lead: time for the step under way and a save of this run's checkpoint.
        request = replace(request, signal_delay_s=stop_lead_s(plan))
    job = submit(recipe, request)
    run_dir = Path(recipe.run.dir)
    folder = run_dir / "slurm" / job.job_id
    print(f"submitted job {job.job_id}: {request.nodes} node(s) x {request.ranks} rank(s), run {run_dir}")
    print(f"logs: {folder}/{job.job_id}_K_log.out for node K = 0..{request.nodes - 1}")
    print(f"status: mmscale jobs {run_dir}", flush=True)
    if not args.wait:
        return
    state = wait_for_job(job.job_id)
    print(f"job {job.job_id}: {state}")
    if state != "COMPLETED":
        logs = ", ".join(str(p) for p in node_logs(run_dir, job.job_id)) or f"none in {folder}"
        print(f"mmscale submit: job {job.job_id} ended {state}; see its logs: {logs}", file=sys.stderr)
        sys.exit(1)


def check_plan(recipe: Recipe, nodes: int, gpus_per_node: int, **cluster: float) -> Plan:
    """Print the run's plan (mmscale plan) on `nodes` x `gpus_per_node` GPUs (`cluster`: the other
    Cluster fields) and refuse a job that would not fit them."""
    from mmscale.plan import Cluster, make_plan, report

    plan = make_plan(recipe, Cluster(nodes, gpus_per_node, **cluster))
    print(report(plan), flush=True)
    if not plan.fits:
        raise UserError(
            "the run does not fit its GPUs (see the plan above for the settings that would); nothing was "
            "submitted. --skip-plan submits it anyway"
        )
    return plan


def _jobs(args: argparse.Namespace) -> None:
    from mmscale.launch.jobs import describe_jobs

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    print(describe_jobs(run_dir))


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `submit` and `jobs` to the `mmscale` subcommands."""
    submit = commands.add_parser(
        "submit", help="train a recipe as a SLURM job that requeues itself and resumes (submitit)",
        description="Submit RECIPE as a SLURM job: one task per node, each running torchrun for its ranks. "
        "On SIGUSR2 (sent --signal-delay seconds before the time limit) the ranks save a checkpoint and "
        "the job requeues itself, up to --max-requeues times; each start resumes from the newest checkpoint.",
    )
    submit.add_argument("recipe", help="recipe YAML")
    submit.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. train.steps=50")
    submit.add_argument("--nodes", type=int, help="default 1")
    submit.add_argument("--gpus-per-node", type=int, help="0 for CPU nodes (gloo); default 8")
    submit.add_argument("--ranks-per-node", type=int, help="default: --gpus-per-node, or 1 on CPU nodes")
    submit.add_argument("--partition")
    submit.add_argument("--account")
    submit.add_argument("--qos")
    submit.add_argument("--constraint", help="node features, e.g. h100")
    submit.add_argument("--time", type=int, dest="time_min", help="time limit of each start, minutes (default 240)")
    submit.add_argument("--cpus-per-task", type=int, help="CPUs per node for its ranks and loader workers")
    submit.add_argument("--mem", help="memory per node, e.g. 480G (0: all)")
    submit.add_argument("--max-requeues", type=int, help="default 10")
    submit.add_argument("--signal-delay", type=int, dest="signal_delay_s",
                        help="seconds between SIGUSR2 and the time limit (default: the plan's stop lead, at least 90)")
    submit.add_argument("--shutdown-timeout", type=int, dest="shutdown_timeout_s",
                        help="seconds torchrun waits for its ranks to save after a signal (default 300)")
    submit.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="shell line run before srun (repeatable), e.g. 'module load cuda/12.4'")
    submit.add_argument("--srun-arg", action="append", default=[], metavar="ARG",
                        help="extra srun argument (repeatable), e.g. --srun-arg=--container-image=IMG")
    submit.add_argument("--python", help="the job's python command (default: this interpreter)")
    submit.add_argument("--sbatch", action="append", default=[], type=_key_value, metavar="KEY[=VALUE]",
                        help="any other sbatch option (repeatable), e.g. --sbatch exclusive --sbatch mail-type=END")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 unless it COMPLETED")
    submit.add_argument("--gpu-memory", type=float, dest="gpu_memory_gb",
                        help="GB per GPU, for the plan printed first (default: an H100's, 80)")
    submit.add_argument("--skip-plan", action="store_true", help="submit even if the plan says it does not fit")
    submit.set_defaults(func=_submit)

    jobs = commands.add_parser("jobs", help="the SLURM jobs of a run directory, their states and the last checkpoint")
    jobs.add_argument("run_dir", help="the run directory (run.dir)")
    jobs.set_defaults(func=_jobs)
