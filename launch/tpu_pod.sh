#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; jax.distributed.initialize() finds the
# coordinator and process ids from the TPU metadata. Run from your workstation:
#   launch/tpu_pod.sh my-tpu us-central2-b configs/resnet56_cifar10.py gs://bucket/work \
#       --config.data_dir=gs://bucket/tfds
# (the repository must be checked out at ~/metaprune-jax on every worker, with jax[tpu] installed;
# workdir and data_dir must be paths every worker sees, e.g. GCS buckets).
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config file}; WORKDIR=${4:?workdir}; shift 4
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="\
  cd ~/metaprune-jax && METAPRUNE_MULTIHOST=1 python -m metaprune_jax \
  --config=$CONFIG --workdir=$WORKDIR $ARGS"
