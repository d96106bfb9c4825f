#!/usr/bin/env bash
# Streams the training log that tpu_train.sh writes on a TPU VM worker.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu_logs.sh --name=NAME --zone=ZONE [options]

Shows the last lines of ~/$REMOTE_LOG and follows it (Ctrl-C stops
following; training goes on). Training runs on worker 0, also on pod
slices, so that is where the log is.

  --name=NAME        TPU name (\$TPU_NAME)
  --zone=ZONE        zone (\$ZONE)
  --project=PROJECT  GCP project (\$PROJECT; default: gcloud config)
  --worker=W         worker index, or 'all' (default 0)
  --lines=N          lines of history to show (default 100)
  --no_follow        print and exit instead of following
  --dry_run          print the gcloud command instead of running it
  -h, --help         this help
USAGE
}

name="${TPU_NAME:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
worker=0
lines=100
follow=1
for arg in "$@"; do
  tpu_flag "$arg" && continue
  case "$arg" in
    --worker=*) worker="${arg#*=}" ;;
    --lines=*) lines="${arg#*=}" ;;
    --no_follow) follow=0 ;;
    *) unknown_flag "$arg" ;;
  esac
done

require name "$name" TPU_NAME
require zone "$zone" ZONE
if [[ ! "$worker" =~ ^([0-9]+|all)$ ]]; then
  die "--worker: expected a worker index or 'all', got '$worker'"
fi
if [[ ! "$lines" =~ ^[0-9]+$ ]]; then
  die "--lines: expected a number of lines, got '$lines'"
fi

scope=(--zone="$zone")
if [[ -n "$project" ]]; then
  scope+=(--project="$project")
fi
tail_cmd="tail -n $lines"
if (( follow )); then
  tail_cmd+=" -F"
fi
run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker="$worker" \
  --command="$tail_cmd \"\$HOME/$REMOTE_LOG\""
