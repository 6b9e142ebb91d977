#!/usr/bin/env bash
# Stop what ci/slurm/start.sh STATE_DIR started (slurmd, slurmctld, munged), by the pids in its files.
set -uo pipefail
dir="$(realpath -m "${1:?usage: stop.sh STATE_DIR}")"
for pidfile in "$dir/run/slurmd.pid" "$dir/run/slurmctld.pid" "$dir/munge/munged.pid"; do
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [ -n "$pid" ] || continue
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
done
exit 0
