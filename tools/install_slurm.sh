#!/usr/bin/env bash
# Install a single-node Slurm (Debian's slurmctld, slurmd, slurm-client) and munge, for the
# Slurm test (crates/cli/tests/slurm.rs) and tools/slurm_single_node.sh. Needs root (or sudo)
# and apt; exits non-zero, saying why, where it cannot install. Does nothing if already there.
set -euo pipefail
need=(slurmctld slurmd sbatch scontrol munged)
missing=0
for b in "${need[@]}"; do command -v "$b" >/dev/null || missing=1; done
if [ "$missing" = 0 ]; then exit 0; fi
command -v apt-get >/dev/null || { echo "install_slurm: no apt-get on this machine" >&2; exit 1; }
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null && sudo -n true 2>/dev/null || { echo "install_slurm: needs root or passwordless sudo" >&2; exit 1; }
  sudo="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "install_slurm: installed $(dpkg-query -W -f='slurmctld ${Version}, munge ' slurmctld)$(dpkg-query -W -f='${Version}' munge)" >&2
