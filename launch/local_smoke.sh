#!/usr/bin/env bash
# Local CPU smoke run: the pod code path (4 simulated replicas, group BN,
# per-host input, sharded eval, EMA, LARS) on a scaled-down EfficientNet-B0
# and built-in synthetic data. Extra flags are passed through.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: launch/local_smoke.sh [--dry_run] [--model_dir=DIR] [FLAGS...]

Trains a tiny EfficientNet on synthetic data on 4 logical CPU replicas with
the package's cpu_smoke preset, evaluates it, and prints the final metrics.
Re-running with the same --model_dir resumes from its last checkpoint.

  --dry_run        print the command instead of running it
  --model_dir=DIR  where checkpoints and summaries go
                   (default: \${TMPDIR:-/tmp}/efficientnet_tpu_smoke)
  FLAGS            any efficientnet-tpu-train flag, e.g. --num_cpu_replicas=8
USAGE
}

model_dir="${TMPDIR:-/tmp}/efficientnet_tpu_smoke"
dry_run=0
extra=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --dry_run) dry_run=1 ;;
    --model_dir=*) model_dir="${arg#--model_dir=}" ;;
    *) extra+=("$arg") ;;
  esac
done

cmd=(python3 -m efficientnet_tpu.main
     --preset=cpu_smoke
     "--model_dir=${model_dir}" "${extra[@]+"${extra[@]}"}")
if (( dry_run )); then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "${cmd[@]}"
