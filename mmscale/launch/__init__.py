"""Launching training on SLURM clusters.

    rendezvous.py   where a job's ranks meet, from SLURM's variables (also read by `mmscale train`)
    ending.py       how a rank ends (every `mmscale train` process)
    submit.py       `mmscale submit`: a submitit job that requeues itself and resumes
    jobs.py         `mmscale jobs`: a run's jobs, states, logs and last checkpoint

Nothing is imported here: `mmscale train` reads rendezvous.py without paying for submitit. The
two subcommands' arguments are in mmscale/cli_launch.py (launch never imports mmscale.plan).
"""
