#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host, e.g. v3-8) or pod slice (several hosts,
# e.g. v3-32), directly or through a queued resource.
#
# gcloud reference:
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/create
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu_create.sh --name=NAME --zone=ZONE [options]

Creates a TPU VM or pod slice with a TensorFlow TPU runtime.

  --name=NAME               TPU name (\$TPU_NAME); with --queued also the
                            queued resource's id
  --zone=ZONE               zone, e.g. europe-west4-a (\$ZONE)
  --project=PROJECT         GCP project (\$PROJECT; default: gcloud config)
  --accelerator_type=TYPE   v3-8, v3-32, v4-8, v5p-128, v3-1024, ...
                            (\$ACCELERATOR_TYPE; default v3-8)
  --runtime_version=VERSION TPU software version (\$RUNTIME_VERSION; default
                            tpu-vm-tf-\${TF_VERSION:-$DEFAULT_TF_VERSION}-pjrt, or
                            tpu-vm-tf-...-pod-pjrt for multi-host slices).
                            List what a zone offers with
                            gcloud compute tpus tpu-vm versions list --zone=ZONE
  --spot                    Spot capacity (cheaper, can be preempted)
  --preemptible             legacy preemptible TPU (not with --queued)
  --reserved                use reserved capacity
  --queued                  request through 'queued-resources create', which
                            waits for capacity instead of failing
  --dry_run                 print the gcloud command instead of running it
  -h, --help                this help

Next: launch/tpu_install.sh, then launch/tpu_train.sh. A preempted Spot TPU
is deleted by the service: create it again, reinstall, and rerun
tpu_train.sh with the same --model_dir to resume.
USAGE
}

name="${TPU_NAME:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
accelerator_type="${ACCELERATOR_TYPE:-v3-8}"
runtime_version="${RUNTIME_VERSION:-}"
spot=0
preemptible=0
reserved=0
queued=0
for arg in "$@"; do
  tpu_flag "$arg" && continue
  case "$arg" in
    --accelerator_type=*) accelerator_type="${arg#*=}" ;;
    --runtime_version=*) runtime_version="${arg#*=}" ;;
    --spot) spot=1 ;;
    --preemptible) preemptible=1 ;;
    --reserved) reserved=1 ;;
    --queued) queued=1 ;;
    *) unknown_flag "$arg" ;;
  esac
done

require name "$name" TPU_NAME
require zone "$zone" ZONE
if [[ -z "$runtime_version" ]]; then
  runtime_version="$(default_runtime "$accelerator_type")"
else
  is_multi_host "$accelerator_type" || true  # Validates the type.
fi
if (( spot + preemptible + reserved > 1 )); then
  die "--spot, --preemptible and --reserved: expected at most one of them"
fi
if (( queued && preemptible )); then
  die "--preemptible: not available with --queued (use --spot)"
fi

scope=(--zone="$zone")
if [[ -n "$project" ]]; then
  scope+=(--project="$project")
fi
capacity=()
if (( spot )); then capacity=(--spot); fi
if (( preemptible )); then capacity=(--preemptible); fi
if (( reserved )); then capacity=(--reserved); fi

if (( queued )); then
  run gcloud compute tpus queued-resources create "$name" \
    --node-id="$name" "${scope[@]}" \
    --accelerator-type="$accelerator_type" \
    --runtime-version="$runtime_version" "${capacity[@]+"${capacity[@]}"}"
  note "Queued. Watch it with: gcloud compute tpus queued-resources describe $name --zone=$zone"
else
  run gcloud compute tpus tpu-vm create "$name" "${scope[@]}" \
    --accelerator-type="$accelerator_type" \
    --version="$runtime_version" "${capacity[@]+"${capacity[@]}"}"
fi
note "Next: launch/tpu_install.sh --name=$name --zone=$zone"
