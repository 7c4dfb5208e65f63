#!/usr/bin/env bash
# Install the Debian packages of the local test cluster (slurm/local-cluster/start.sh), if missing.
#
#   slurm/local-cluster/install.sh        # quick no-op when everything is installed
#
# `make test` runs it before pytest, so CI (a fresh Debian machine, as root) gets a real
# slurmctld for the tests marked `slurm`. Where packages cannot be installed (not root, no
# apt-get, no package mirror) it says why and exits 0: those tests then skip with that reason,
# and every other test still runs. Set MMSCALE_SLURM_INSTALL=0 to skip the installation.
set -uo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

skip() { echo "local SLURM cluster: not installing ${missing[*]}: $*; tests marked slurm will be skipped" >&2; exit 0; }
[ "${MMSCALE_SLURM_INSTALL:-1}" = 0 ] && skip "MMSCALE_SLURM_INSTALL=0"
[ "$(id -u)" = 0 ] || skip "not root"
command -v apt-get >/dev/null || skip "no apt-get (the cluster scripts expect Debian or Ubuntu)"

echo "local SLURM cluster: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101 keeps the packages' init scripts from starting daemons: start.sh starts
# its own, with its own configuration, and stop.sh stops exactly those.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && added_policy=1; fi
apt-get update -qq >/dev/null 2>&1 || echo "apt-get update failed; trying the cached package lists" >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/mmscale-slurm-install.log 2>&1
status=$?
[ "$added_policy" = 1 ] && rm -f "$policy"
[ "$status" = 0 ] || { tail -5 /tmp/mmscale-slurm-install.log >&2; skip "apt-get install failed (log: /tmp/mmscale-slurm-install.log)"; }
echo "local SLURM cluster: installed $(slurmd -V)" >&2
