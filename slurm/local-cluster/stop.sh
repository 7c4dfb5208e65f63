#!/usr/bin/env bash
# Stop the daemons slurm/local-cluster/start.sh started, and only those (its pid files in $BASE/run).
#
#   slurm/local-cluster/stop.sh      # idempotent; ~7 s
#
# A pid is signalled only while it still belongs to the program that wrote the pid file (a
# recycled pid is left alone). Independent daemons stop together, in three waves: the slurmd
# and slurmctld, then slurmdbd (which they report to), then MariaDB and munged.
# The configuration, /etc/hosts entries, state and logs stay, so start.sh is quick again.
set -uo pipefail

BASE="${MMSCALE_SLURM_BASE:-/tmp/mmscale-slurm}"
RUN="$BASE/run"

stop_wave() { # stop_wave PIDFILE:PROGRAM...: TERM all of them, then wait for each (KILL after 15 s)
  local stopping=() item file program pid
  for item in "$@"; do
    file="${item%%:*}" program="${item##*:}"
    [ -s "$file" ] || continue
    pid=$(cat "$file")
    if kill -0 "$pid" 2> /dev/null && [ "$(cat "/proc/$pid/comm" 2> /dev/null)" = "$program" ]; then
      kill -TERM "$pid" && stopping+=("$pid:$program")
    fi
    rm -f "$file"
  done
  for item in ${stopping[@]+"${stopping[@]}"}; do
    pid="${item%%:*}" program="${item##*:}"
    for _ in $(seq 1 150); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2> /dev/null; then
      echo "$program ($pid) ignored SIGTERM for 15 s; sending SIGKILL"
      kill -KILL "$pid"
    fi
    echo "stopped $program ($pid)"
  done
}

slurmds=()
for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && slurmds+=("$f:slurmd"); done
stop_wave ${slurmds[@]+"${slurmds[@]}"} "$RUN/slurmctld.pid:slurmctld"
stop_wave "$RUN/slurmdbd.pid:slurmdbd"
stop_wave "$RUN/mariadb.pid:mariadbd" "$RUN/munged.pid:munged"
