#!/usr/bin/env bash
# Train (then evaluate) on a Cloud TPU VM slice, every worker running the same command.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE --type=v5litepod-16 [options] CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# 1. creates the TPU VM NAME (or reuses it if it exists),
# 2. copies this checkout (git archive HEAD) to every worker and installs it there (venv, requirements,
#    jax[tpu]),
# 3. starts train then eval on all workers at once (--worker=all), with the process and device counts
#    the slice must have: every process prints its index, the process count and the device counts at start,
#    and stops at once with a one-line error when they disagree.
# WORKDIR must be a path every worker sees (a gcsfuse-mounted bucket, or Filestore NFS): orbax writes one
# checkpoint from all hosts together. A preempted (spot) slice: rerun the same command; training resumes.
#
# Options: --project=P  --version=RUNTIME (default v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base otherwise)
#          --spot  --processes=N --devices=N (override the table below)  --skip-create  --skip-install
#          --eval-only  --dry-run (print every command instead of running it)
set -euo pipefail
usage="usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --type=TYPE [options] CONFIG WORKDIR [--config.KEY=VALUE ...]"
name="" zone="" type="" project="" version="" spot=0 dry=0 processes="" devices="" create=1 install=1 train=1
rest=()
for a in "$@"; do
  case "$a" in
    --name=*) name=${a#*=} ;;
    --zone=*) zone=${a#*=} ;;
    --type=*) type=${a#*=} ;;
    --project=*) project=${a#*=} ;;
    --version=*) version=${a#*=} ;;
    --processes=*) processes=${a#*=} ;;
    --devices=*) devices=${a#*=} ;;
    --spot) spot=1 ;;
    --skip-create) create=0 ;;
    --skip-install) install=0 ;;
    --eval-only) train=0 ;;
    --dry-run) dry=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) rest+=("$a") ;;
  esac
done
[ -n "$name" ] && [ -n "$zone" ] && [ -n "$type" ] && [ ${#rest[@]} -ge 2 ] || { echo "$usage" >&2; exit 2; }
config=${rest[0]} workdir=${rest[1]}
overrides=("${rest[@]:2}")

# Processes (hosts) and jax devices of a slice type. v2/v3: every TensorCore is a device, 8 per host.
# v4/v5p: the number is TensorCores, 2 per chip, one device per chip (megacore), 4 chips per host.
# v5e (v5litepod)/v6e: the number is chips = devices; up to 8 chips on one host, 4 per host above that.
gen=${type%-*} n=${type##*-}
[[ "$n" =~ ^[0-9]+$ ]] || { echo "tpu_pod.sh: cannot read a size from --type=$type (e.g. v4-32, v5litepod-16)" >&2; exit 2; }
case "$gen" in
  v2|v3) want_devices=$n; want_processes=$(( (n + 7) / 8 )) ;;
  v4|v5p) want_devices=$(( n / 2 )); want_processes=$(( (n / 2 + 3) / 4 )) ;;
  v5litepod|v5e|v6e) want_devices=$n; if [ "$n" -le 8 ]; then want_processes=1; else want_processes=$(( n / 4 )); fi ;;
  *) echo "tpu_pod.sh: unknown TPU generation in --type=$type; pass --processes and --devices" >&2
     [ -n "$processes" ] && [ -n "$devices" ] || exit 2 ;;
esac
processes=${processes:-$want_processes} devices=${devices:-$want_devices}
if [ -z "$version" ]; then
  case "$gen" in v6e) version=v2-alpha-tpuv6e ;; *) version=tpu-ubuntu2204-base ;; esac
fi

gc=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[ -n "$project" ] && where+=(--project="$project")
# Shell-quoted for copy and paste; a remote --command is shown in single quotes, as one would type it.
q() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" == --command=* ]]; then a=${a#--command=}; out+="--command='${a//\'/\'\\\'\'}' "
    else out+="$(printf '%q' "$a") "; fi
  done
  echo "${out% }"
}
run() { if [ $dry = 1 ]; then q "$@"; else echo "+ $(q "$@")" >&2; "$@"; fi; }

echo "# slice $name ($type): $processes processes, $devices devices; config $config, workdir $workdir" >&2
if [ $create = 1 ]; then
  if [ $dry = 0 ] && "${gc[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
    echo "reusing TPU VM $name" >&2
  else
    create_cmd=("${gc[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version")
    [ $spot = 1 ] && create_cmd+=(--spot)
    [ $dry = 1 ] && echo "# if '$(q "${gc[@]}" describe "$name" "${where[@]}")' fails:"
    run "${create_cmd[@]}"
  fi
fi

remote_dir=semflow_jax
if [ $install = 1 ]; then
  archive=/tmp/semflow_jax_$$.tar.gz
  run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
  run "${gc[@]}" scp "$archive" "$name:semflow_jax.tar.gz" "${where[@]}" --worker=all
  install_cmd="rm -rf $remote_dir && mkdir $remote_dir && tar -xzf semflow_jax.tar.gz -C $remote_dir && cd $remote_dir"
  install_cmd+=" && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e ."
  install_cmd+=" && .venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
  run "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command="$install_cmd"
fi

flags="--config=$config --workdir=$workdir --expect_processes=$processes --expect_devices=$devices"
[ "$processes" -gt 1 ] && flags+=" --distributed"  # jax.distributed.initialize() finds the slice's hosts
for o in "${overrides[@]}"; do flags+=" $(printf '%q' "$o")"; done
job="cd $remote_dir"
[ $train = 1 ] && job+=" && .venv/bin/python -m semflow_jax.train $flags"
job+=" && .venv/bin/python -m semflow_jax.eval $flags"
run "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command="$job"
