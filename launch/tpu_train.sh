#!/usr/bin/env bash
# Starts (or resumes) training on a TPU VM or pod slice.
#
# How TensorFlow runs on TPU VMs (see docs/quickstart.md):
# * one host (v2-8, v3-8, v4-8, v5p-8, ...): the program runs on the VM and
#   uses the local chips: --tpu=local.
# * several hosts (v3-32, v4-32, v3-1024, ...): TPUStrategy is single-client.
#   The "-pod" runtime starts a TPU gRPC server on every worker; ONE program,
#   on worker 0, connects to all of them with --tpu=NAME (resolved through
#   the Cloud TPU API) and must not claim the local chips itself, hence
#   TPU_LOAD_LIBRARY=0. Every host still runs its own input pipeline, on its
#   TPU server, so --data_dir and --model_dir must be reachable from every
#   host (gs://, or --shared_filesystem; the program refuses local paths).
# The same rule (pods: worker 0, --tpu=NAME, TPU_LOAD_LIBRARY=0; one host:
# --tpu=local) is what GoogleCloudPlatform/ml-auto-solutions uses for its
# TensorFlow TPU VM tests (dags/solutions_team/configs/tensorflow).
#
# Idempotent: a training process that is still running is left alone, and a
# new one resumes from the last checkpoint in --model_dir.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu_train.sh --name=NAME --zone=ZONE --preset=PRESET
           (--bucket=BUCKET | --data_dir=DIR --model_dir=DIR) [options]
           [-- TRAIN_FLAGS...]

Runs on worker 0, in the background (nohup, survives the ssh session):
  python3 -m efficientnet_tpu.main --preset=PRESET \\
      --tpu=local|NAME --data_dir=... --model_dir=... TRAIN_FLAGS
(--tpu=local on a single-host TPU VM; --tpu=NAME --tpu_zone=ZONE on a pod
slice, where this one process on worker 0 drives every host.)
with output appended to ~/$REMOTE_LOG (see launch/tpu_logs.sh).
If that process is still running, nothing new is started. Otherwise a new
run resumes from the last checkpoint in --model_dir: rerun this script
after a preemption or a crash.

  --name=NAME              TPU name (\$TPU_NAME)
  --zone=ZONE              zone (\$ZONE)
  --project=PROJECT        GCP project (\$PROJECT; default: gcloud config)
  --accelerator_type=TYPE  as given to tpu_create.sh (\$ACCELERATOR_TYPE;
                           default v3-8): more than 8 cores/chips = pod slice
  --runtime_version=VER    as given to tpu_create.sh (\$RUNTIME_VERSION); a
                           single-host PJRT runtime gets the PJRT variables
  --preset=PRESET          a preset shipped with the package (\$PRESET; list:
                           efficientnet-tpu-train --preset=list)
  --bucket=BUCKET          gs://BUCKET/imagenet and gs://BUCKET/runs/PRESET
                           as default data and model dirs (\$BUCKET)
  --data_dir=DIR           ImageNet TFRecords (\$DATA_DIR)
  --model_dir=DIR          checkpoints, summaries, config (\$MODEL_DIR)
  --foreground             run attached to this terminal instead (stops
                           when the ssh session ends)
  --dry_run                print the gcloud command instead of running it
  -h, --help               this help
  -- TRAIN_FLAGS           more efficientnet-tpu-train flags, e.g.
                           -- --mode=train_and_eval --train_steps=1000
USAGE
}

name="${TPU_NAME:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
accelerator_type="${ACCELERATOR_TYPE:-v3-8}"
runtime_version="${RUNTIME_VERSION:-}"
preset="${PRESET:-}"
bucket="${BUCKET:-}"
data_dir="${DATA_DIR:-}"
model_dir="${MODEL_DIR:-}"
foreground=0
extra=()
while (( $# )); do
  arg="$1"
  shift
  tpu_flag "$arg" && continue
  case "$arg" in
    --accelerator_type=*) accelerator_type="${arg#*=}" ;;
    --runtime_version=*) runtime_version="${arg#*=}" ;;
    --preset=*) preset="${arg#*=}" ;;
    --bucket=*) bucket="${arg#*=}" ;;
    --data_dir=*) data_dir="${arg#*=}" ;;
    --model_dir=*) model_dir="${arg#*=}" ;;
    --foreground) foreground=1 ;;
    --) extra=("$@"); break ;;
    *) unknown_flag "$arg" ;;
  esac
done

require name "$name" TPU_NAME
require zone "$zone" ZONE
resolve_run_dirs
if [[ -z "$runtime_version" ]]; then
  runtime_version="$(default_runtime "$accelerator_type")"
fi

scope=(--zone="$zone")
if [[ -n "$project" ]]; then
  scope+=(--project="$project")
fi

if is_multi_host "$accelerator_type"; then
  env_vars=(TPU_LOAD_LIBRARY=0)
  tpu_flags=(--tpu="$name" --tpu_zone="$zone")
  if [[ -n "$project" ]]; then
    tpu_flags+=(--gcp_project="$project")
  fi
  # The program refuses local paths on several hosts (one line in the log,
  # distribute.check_shared_paths); said here too, before it is started in
  # the background.
  if [[ ( "$data_dir" != *://* || "$model_dir" != *://* ) &&
        " ${extra[*]+${extra[*]}} " != *" --shared_filesystem "* ]]; then
    note "warning: on a pod slice every host reads --data_dir and --model_dir, and the run refuses local paths: use gs:// paths, or add -- --shared_filesystem if every host mounts them (NFS, Filestore)"
  fi
else
  env_vars=()
  if [[ "$runtime_version" == *pjrt* ]]; then
    # TensorFlow reaches the chips through the PJRT plugin in libtpu.
    env_vars=(NEXT_PLUGGABLE_DEVICE_USE_C_API=true
              TF_PLUGGABLE_DEVICE_LIBRARY_PATH=/lib/libtpu.so)
  fi
  tpu_flags=(--tpu=local)
fi

train=(env "${env_vars[@]+"${env_vars[@]}"}" python3 -m efficientnet_tpu.main
       "--preset=$preset" "${tpu_flags[@]}"
       "--data_dir=$data_dir" "--model_dir=$model_dir"
       "${extra[@]+"${extra[@]}"}")
dir="\"\$HOME/$REMOTE_DIR\""
log="\"\$HOME/$REMOTE_LOG\""
pid_file="\"\$HOME/$REMOTE_PID\""
if (( foreground )); then
  remote="cd $dir && $(quote_cmd "${train[@]}") 2>&1 | tee -a $log"
else
  remote="cd $dir && pid=\$(cat $pid_file 2>/dev/null || true)"
  remote+="; if [ -n \"\$pid\" ] && ps -p \"\$pid\" -o args= 2>/dev/null | grep -q efficientnet_tpu.main"
  remote+="; then echo \"efficientnet_tpu: training is already running (pid \$pid); not starting another\""
  remote+="; else nohup $(quote_cmd "${train[@]}") >> $log 2>&1 < /dev/null &"
  remote+=" echo \$! > $pid_file; echo \"efficientnet_tpu: training started (pid \$!), log: ~/$REMOTE_LOG\"; fi"
fi

# Worker 0 only: the one host of a single-host TPU, the client of a pod.
run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=0 \
  --command="$remote"
if (( ! foreground )); then
  note "Follow it with: launch/tpu_logs.sh --name=$name --zone=$zone"
fi
