#!/usr/bin/env bash
# Stops training, stops the TPU VM, or deletes it (and its queued resource).
#
# gcloud reference:
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu_delete.sh --name=NAME --zone=ZONE [options]

Deletes the TPU VM (default), or with --queued its queued resource together
with the TPU (queued-resources delete --force). Checkpoints in --model_dir
are not touched: recreate the TPU and rerun tpu_train.sh to resume.

  --name=NAME        TPU name, and queued resource id with --queued (\$TPU_NAME)
  --zone=ZONE        zone (\$ZONE)
  --project=PROJECT  GCP project (\$PROJECT; default: gcloud config)
  --queued           the TPU was created with tpu_create.sh --queued
  --stop_training    only stop the training process (kill the pid in
                     ~/$REMOTE_PID on every worker); the TPU stays
  --stop             stop (not delete) the TPU VM; start it again with
                     gcloud compute tpus tpu-vm start
  --yes              do not ask for confirmation (gcloud --quiet)
  --dry_run          print the gcloud command instead of running it
  -h, --help         this help
USAGE
}

name="${TPU_NAME:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
queued=0
stop_training=0
stop=0
yes=0
for arg in "$@"; do
  tpu_flag "$arg" && continue
  case "$arg" in
    --queued) queued=1 ;;
    --stop_training) stop_training=1 ;;
    --stop) stop=1 ;;
    --yes) yes=1 ;;
    *) unknown_flag "$arg" ;;
  esac
done

require name "$name" TPU_NAME
require zone "$zone" ZONE
if (( stop_training + stop + queued > 1 )); then
  die "--stop_training, --stop and --queued: expected at most one of them"
fi

scope=(--zone="$zone")
if [[ -n "$project" ]]; then
  scope+=(--project="$project")
fi
quiet=()
if (( yes )); then
  quiet=(--quiet)
fi

if (( stop_training )); then
  pid_file="\"\$HOME/$REMOTE_PID\""
  run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=all \
    --command="if [ -f $pid_file ]; then kill \"\$(cat $pid_file)\" 2>/dev/null || true; rm -f $pid_file; fi"
elif (( stop )); then
  run gcloud compute tpus tpu-vm stop "$name" "${scope[@]}" \
    "${quiet[@]+"${quiet[@]}"}"
elif (( queued )); then
  run gcloud compute tpus queued-resources delete "$name" "${scope[@]}" \
    --force "${quiet[@]+"${quiet[@]}"}"
else
  run gcloud compute tpus tpu-vm delete "$name" "${scope[@]}" \
    "${quiet[@]+"${quiet[@]}"}"
fi
