#!/usr/bin/env bash
# Device check (issue 27): the train step, the metanetwork forward+backward, the meta-training
# step and the pruned network's speed-up on whatever accelerator jax finds, with and without the
# XLA:CPU settings where they would apply (metaprune_jax/backends/xla_hints.py), written to one JSON file.
#
#   benchmarks/device_check.sh [OUT.json] [extra args for device_check.py, e.g. --tiny]
#
# Run from the repository root (or anywhere: the script finds it). Default output:
# benchmarks/results/device_check_<backend>_<UTC date>.json. The whole run is limited to
# 9.5 minutes (DEVICE_CHECK_TIMEOUT seconds to change it); on a GPU it takes ~3-5 minutes,
# most of it compilation. Commit the JSON it writes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-}"
if [[ $# -gt 0 ]]; then shift; fi
if [[ -z "$out" ]]; then
  backend="$(python -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo unknown)"
  out="benchmarks/results/device_check_${backend}_$(date -u +%Y-%m-%d_%H%M).json"
fi
mkdir -p "$(dirname "$out")"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# leave the tuning choice to the script (it switches modes itself)
unset METAPRUNE_JAX_BACKEND_TUNING
# GPUs: let XLA take what it needs, not 75% up front (the check compiles many programs)
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
timeout "${DEVICE_CHECK_TIMEOUT:-570}" python benchmarks/device_check.py --out "$out" "$@"
echo "device check written to $out" >&2
