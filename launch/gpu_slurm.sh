#!/usr/bin/env bash
# Train (then evaluate) on several GPU nodes under SLURM: one process per node, each using all its GPUs.
#
#   launch/gpu_slurm.sh --nodes=N --gpus-per-node=G [options] CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# Writes a batch script and submits it with sbatch. srun starts the same command on every node;
# jax.distributed.initialize() finds the coordinator from SLURM's environment, every process prints its
# index, the process count and the device counts at start, and all stop at once when they disagree with
# N processes and N*G devices. WORKDIR must be on a filesystem all nodes share. With --requeue a preempted
# job is requeued and resumes from its newest checkpoint (SIGTERM: the current step finishes and is saved).
#
# Options: --partition=P --account=A --time=HH:MM:SS --job-name=NAME --venv=DIR (default .venv here)
#          --requeue  --dry-run (print the batch script instead of submitting it)
set -euo pipefail
usage="usage: launch/gpu_slurm.sh --nodes=N --gpus-per-node=G [options] CONFIG WORKDIR [--config.KEY=VALUE ...]"
here=$(cd "$(dirname "$0")/.." && pwd)
nodes="" gpus="" partition="" account="" time_limit="24:00:00" job=semflow venv="$here/.venv" requeue=0 dry=0
rest=()
for a in "$@"; do
  case "$a" in
    --nodes=*) nodes=${a#*=} ;;
    --gpus-per-node=*) gpus=${a#*=} ;;
    --partition=*) partition=${a#*=} ;;
    --account=*) account=${a#*=} ;;
    --time=*) time_limit=${a#*=} ;;
    --job-name=*) job=${a#*=} ;;
    --venv=*) venv=${a#*=} ;;
    --requeue) requeue=1 ;;
    --dry-run) dry=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) rest+=("$a") ;;
  esac
done
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] && [[ "$gpus" =~ ^[1-9][0-9]*$ ]] && [ ${#rest[@]} -ge 2 ] || { echo "$usage" >&2; exit 2; }
config=${rest[0]} workdir=${rest[1]}
flags="--config=$config --workdir=$workdir --expect_processes=$nodes --expect_devices=$(( nodes * gpus ))"
[ "$nodes" -gt 1 ] && flags+=" --distributed"  # jax.distributed.initialize() reads SLURM's environment
for o in "${rest[@]:2}"; do flags+=" $(printf '%q' "$o")"; done

script="#!/usr/bin/env bash
#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --cpus-per-task=16
#SBATCH --time=$time_limit
#SBATCH --signal=TERM@120
#SBATCH --output=$workdir/slurm-%j.out"
[ -n "$partition" ] && script+=$'\n'"#SBATCH --partition=$partition"
[ -n "$account" ] && script+=$'\n'"#SBATCH --account=$account"
[ $requeue = 1 ] && script+=$'\n'"#SBATCH --requeue"
script+="
set -euo pipefail
cd $here
srun --kill-on-bad-exit=1 $venv/bin/python -m semflow_jax.train $flags
srun --kill-on-bad-exit=1 $venv/bin/python -m semflow_jax.eval $flags
"
if [ $dry = 1 ]; then
  echo "# sbatch this (install first on a shared filesystem: python3 -m venv $venv && $venv/bin/pip install -r requirements.txt 'jax[cuda12]' -e .):"
  echo "$script"
else
  mkdir -p "$workdir"
  echo "$script" | sbatch
fi
