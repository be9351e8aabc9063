#!/usr/bin/env bash
# One host, CPU or however many local GPUs JAX sees (jit shards the batch over all of them).
#   launch/local.sh configs/digits.py /tmp/mp_digits [--config.x=y ...]
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
exec python -m metaprune_jax --config="$CONFIG" --workdir="$WORKDIR" "$@"
