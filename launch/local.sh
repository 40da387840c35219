#!/usr/bin/env bash
# Train then evaluate on this machine (all local devices): launch/local.sh CONFIG WORKDIR [--dry-run] [overrides]
# Example: bash launch/local.sh configs/shapes.py runs/shapes --config.train.steps=500
set -euo pipefail
usage="usage: launch/local.sh CONFIG WORKDIR [--dry-run] [--config.KEY=VALUE ...]"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
config=$1 workdir=$2; shift 2
dry=0 overrides=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then dry=1; else overrides+=("$a"); fi
done
python=${PYTHON:-python}
cmds=(
  "$python -m semflow_jax.train --config=$config --workdir=$workdir ${overrides[*]:-}"
  "$python -m semflow_jax.eval --config=$config --workdir=$workdir ${overrides[*]:-}"
)
for c in "${cmds[@]}"; do
  if [ $dry = 1 ]; then echo "$c"; else echo "+ $c"; eval "$c"; fi
done
