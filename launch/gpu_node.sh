#!/usr/bin/env bash
# One multi-GPU node: a single process drives all visible GPUs (data parallel over the 'data'
# mesh axis). Restrict GPUs with CUDA_VISIBLE_DEVICES; the global batch must divide by their count.
#   CUDA_VISIBLE_DEVICES=0,1,2,3 launch/gpu_node.sh configs/resnet56_cifar10.py $WORK \
#       --config.data_dir=$DATA
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
# Let XLA take GPU memory as it needs it rather than 75% up front (friendlier on shared nodes).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m metaprune_jax --config="$CONFIG" --workdir="$WORKDIR" "$@"
