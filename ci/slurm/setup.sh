#!/usr/bin/env bash
# Install Debian's SLURM and MUNGE (root with apt-get): slurm-wlm (slurmctld, slurmd, sbatch ...),
# its basic plugins, and munge. Exit 0 when they are (already) there; 1 when they cannot be installed.
set -uo pipefail
if command -v slurmctld >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ci/slurm/setup.sh: installing slurm-wlm and munge needs root and apt-get" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends slurm-wlm slurm-wlm-basic-plugins munge >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends slurm-wlm slurm-wlm-basic-plugins munge >/dev/null 2>&1; } \
  || { echo "ci/slurm/setup.sh: apt-get install slurm-wlm munge failed" >&2; exit 1; }
command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1
