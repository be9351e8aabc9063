#!/usr/bin/env bash
# Several hosts, one process per host (each drives its local devices), e.g. one SLURM task per
# node:  srun --nodes=4 --ntasks-per-node=1 launch/multihost.sh configs/x.py $WORK ...
# The coordinator address, process count and id come from the environment:
#   JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID;
# under SLURM they default to the first node of the allocation, SLURM_NTASKS, SLURM_PROCID.
# The workdir must be on a filesystem every host sees (checkpoints are written collectively).
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
if [[ -z "${JAX_COORDINATOR_ADDRESS:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  export JAX_COORDINATOR_ADDRESS="${HEAD}:${JAX_COORDINATOR_PORT:-12345}"
fi
export JAX_NUM_PROCESSES=${JAX_NUM_PROCESSES:-${SLURM_NTASKS:?set JAX_NUM_PROCESSES}}
export JAX_PROCESS_ID=${JAX_PROCESS_ID:-${SLURM_PROCID:?set JAX_PROCESS_ID}}
: "${JAX_COORDINATOR_ADDRESS:?set JAX_COORDINATOR_ADDRESS=host:port of process 0}"
export METAPRUNE_MULTIHOST=1
exec python -m metaprune_jax --config="$CONFIG" --workdir="$WORKDIR" "$@"
