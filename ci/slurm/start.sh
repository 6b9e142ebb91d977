#!/usr/bin/env bash
# Start a single-node SLURM cluster whose every file lives under STATE_DIR:
#   ci/slurm/start.sh STATE_DIR [PARTITION]
# writes STATE_DIR/slurm.conf (this host's name, CPUs and memory; see slurm.conf.in), starts munged
# (its own key and socket), slurmctld and slurmd, waits until the node is idle, and prints
#   export SLURM_CONF=STATE_DIR/slurm.conf
# for the shell that submits (sbatch, squeue, scancel, submitit read SLURM_CONF). Stop: ci/slurm/stop.sh STATE_DIR.
# Ports: SLURMCTLD_PORT / SLURMD_PORT (default 6817 / 6818).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="$(realpath -m "${1:?usage: start.sh STATE_DIR [PARTITION]}")"
partition="${2:-debug}"
mkdir -p "$dir"/{munge,state,spool,run,log}
chmod 700 "$dir/munge"
host="$(hostname -s)"
cpus="$(nproc)"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
user="$(id -un)"
sed -e "s|@HOST@|$host|g" -e "s|@USER@|$user|g" -e "s|@DIR@|$dir|g" -e "s|@CPUS@|$cpus|g" \
    -e "s|@MEM_MB@|$mem_mb|g" -e "s|@PARTITION@|$partition|g" \
    -e "s|@CTLD_PORT@|${SLURMCTLD_PORT:-6817}|g" -e "s|@SLURMD_PORT@|${SLURMD_PORT:-6818}|g" \
    "$here/slurm.conf.in" > "$dir/slurm.conf"
export SLURM_CONF="$dir/slurm.conf"
mungekey_bin="$(command -v mungekey || echo /usr/sbin/mungekey)"
[ -f "$dir/munge/munge.key" ] || "$mungekey_bin" -c -k "$dir/munge/munge.key"
chmod 600 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket.2" \
       --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
slurmctld -f "$dir/slurm.conf"
slurmd -f "$dir/slurm.conf"
for _ in $(seq 1 60); do
  state="$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)"
  case "$state" in idle*|mixed*|allocated*) echo "export SLURM_CONF=$dir/slurm.conf"; exit 0 ;; esac
  sleep 0.5
done
echo "ci/slurm/start.sh: the node did not become idle (state '${state:-none}'); logs in $dir/log" >&2
exit 1
