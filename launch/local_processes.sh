#!/usr/bin/env bash
# N processes on this machine, joined by jax.distributed as if they were N hosts: a rehearsal of
# a multi-host run (the same code paths as launch/multihost.sh) on a laptop or CI box.
#   launch/local_processes.sh 2 configs/digits.py /tmp/mp_2proc [--config.x=y ...]
# Each process gets JAX_NUM_DEVICES_PER_PROCESS CPU devices (default 1); process i logs to
# <workdir>.process<i>.log; the script exits with the first non-zero status.
set -euo pipefail
N=${1:?number of processes}; CONFIG=${2:?config file}; WORKDIR=${3:?workdir}; shift 3
cd "$(dirname "$0")/.."
PORT=${JAX_COORDINATOR_PORT:-$(python -c "import portpicker; print(portpicker.pick_unused_port())")}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu \
    XLA_FLAGS="--xla_force_host_platform_device_count=${JAX_NUM_DEVICES_PER_PROCESS:-1}" \
    launch/multihost.sh "$CONFIG" "$WORKDIR" "$@" > "${WORKDIR%/}.process${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; ((status)) || status=$rc; }
done
exit "$status"
