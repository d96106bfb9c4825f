#!/usr/bin/env bash
# Submits a training run as a Vertex AI custom job (TPU VM, GPUs or CPU).
#
# gcloud reference (flags --region, --display-name, --worker-pool-spec,
# --command, --args):
#   https://cloud.google.com/sdk/gcloud/reference/ai/custom-jobs/create
# --worker-pool-spec keys: machine-type, replica-count, accelerator-type,
# accelerator-count, container-image-uri; tpu-topology sets
# MachineSpec.tpuTopology (for TPU machine types with a topology, e.g. v5e):
#   https://cloud.google.com/vertex-ai/docs/reference/rest/v1/MachineSpec
# Accelerator types (TPU_V2, TPU_V3, NVIDIA_TESLA_A100, NVIDIA_H100_80GB,
# NVIDIA_L4, ...) are MachineSpec.acceleratorType values. Vertex AI allows
# one replica in the first worker pool; more replicas go in a second pool,
# and Vertex AI sets TF_CONFIG for MultiWorkerMirroredStrategy.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: launch/submit_job.sh --region=REGION --image_uri=IMAGE --preset=PRESET
           (--bucket=BUCKET | --data_dir=DIR --model_dir=DIR) [options]
           [-- TRAIN_FLAGS...]

Runs "python3 -m efficientnet_tpu.main --preset=PRESET ... TRAIN_FLAGS" in
IMAGE, a container with the package installed (the presets ship inside it;
docs/quickstart.md has a Dockerfile). The strategy flag follows
the hardware: TPU --tpu=local, GPUs --strategy=gpu, more than one replica
--strategy=multi_worker (TF_CONFIG from Vertex AI), CPU --strategy=cpu.

  --region=REGION           Vertex AI region, e.g. us-central1 (\$REGION)
  --project=PROJECT         GCP project (\$PROJECT; default: gcloud config)
  --image_uri=IMAGE         training container (\$IMAGE_URI)
  --display_name=NAME       job name (default efficientnet-tpu-PRESET)
  --accelerator=KIND        machine shorthand (\$ACCELERATOR; default tpu-v3-8):
                              tpu-v2-8  cloud-tpu + 8 x TPU_V2
                              tpu-v3-8  cloud-tpu + 8 x TPU_V3
                              a100x8    a2-highgpu-8g + 8 x NVIDIA_TESLA_A100
                              h100x8    a3-highgpu-8g + 8 x NVIDIA_H100_80GB
                              l4x1      g2-standard-8 + 1 x NVIDIA_L4
                              t4x1      n1-standard-8 + 1 x NVIDIA_TESLA_T4
                              cpu       n1-standard-16, no accelerator
  --machine_type=TYPE       override the shorthand's machine type
  --accelerator_type=TYPE   override its accelerator type ('' = none)
  --accelerator_count=N     override its accelerator count
  --tpu_topology=TOPOLOGY   tpu-topology, e.g. 2x2 (TPU machine types that
                            take one)
  --replica_count=N         machines (default 1; N > 1: multi-worker GPU/CPU)
  --preset=PRESET           a preset shipped with the package (\$PRESET; list:
                            efficientnet-tpu-train --preset=list)
  --bucket=BUCKET           gs://BUCKET/imagenet and gs://BUCKET/runs/PRESET
                            as default data and model dirs (\$BUCKET)
  --data_dir=DIR            ImageNet TFRecords, gs:// (\$DATA_DIR)
  --model_dir=DIR           checkpoints and summaries, gs:// (\$MODEL_DIR);
                            resubmitting with the same one resumes
  --dry_run                 print the gcloud command instead of running it
  -h, --help                this help
  -- TRAIN_FLAGS            more efficientnet-tpu-train flags
USAGE
}

region="${REGION:-}"
project="${PROJECT:-}"
image_uri="${IMAGE_URI:-}"
display_name=''
accelerator="${ACCELERATOR:-tpu-v3-8}"
machine_type=''
accelerator_type='unset'
accelerator_count=''
tpu_topology=''
replica_count=1
preset="${PRESET:-}"
bucket="${BUCKET:-}"
data_dir="${DATA_DIR:-}"
model_dir="${MODEL_DIR:-}"
extra=()
while (( $# )); do
  arg="$1"
  shift
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --region=*) region="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --image_uri=*) image_uri="${arg#*=}" ;;
    --display_name=*) display_name="${arg#*=}" ;;
    --accelerator=*) accelerator="${arg#*=}" ;;
    --machine_type=*) machine_type="${arg#*=}" ;;
    --accelerator_type=*) accelerator_type="${arg#*=}" ;;
    --accelerator_count=*) accelerator_count="${arg#*=}" ;;
    --tpu_topology=*) tpu_topology="${arg#*=}" ;;
    --replica_count=*) replica_count="${arg#*=}" ;;
    --preset=*) preset="${arg#*=}" ;;
    --bucket=*) bucket="${arg#*=}" ;;
    --data_dir=*) data_dir="${arg#*=}" ;;
    --model_dir=*) model_dir="${arg#*=}" ;;
    --) extra=("$@"); break ;;
    *) unknown_flag "$arg" ;;
  esac
done

require region "$region" REGION
require image_uri "$image_uri" IMAGE_URI
resolve_run_dirs
if [[ ! "$replica_count" =~ ^[1-9][0-9]*$ ]]; then
  die "--replica_count: expected a positive integer, got '$replica_count'"
fi

case "$accelerator" in
  tpu-v2-8) shorthand=(cloud-tpu TPU_V2 8) ;;
  tpu-v3-8) shorthand=(cloud-tpu TPU_V3 8) ;;
  a100x8) shorthand=(a2-highgpu-8g NVIDIA_TESLA_A100 8) ;;
  h100x8) shorthand=(a3-highgpu-8g NVIDIA_H100_80GB 8) ;;
  l4x1) shorthand=(g2-standard-8 NVIDIA_L4 1) ;;
  t4x1) shorthand=(n1-standard-8 NVIDIA_TESLA_T4 1) ;;
  cpu) shorthand=(n1-standard-16 '' '') ;;
  *) die "--accelerator: expected one of tpu-v2-8, tpu-v3-8, a100x8, h100x8, l4x1, t4x1, cpu, got '$accelerator'" ;;
esac
machine_type="${machine_type:-${shorthand[0]}}"
if [[ "$accelerator_type" == unset ]]; then
  accelerator_type="${shorthand[1]}"
fi
accelerator_count="${accelerator_count:-${shorthand[2]}}"
if [[ -n "$accelerator_type" && ! "$accelerator_count" =~ ^[1-9][0-9]*$ ]]; then
  die "--accelerator_count: expected a positive integer with --accelerator_type=$accelerator_type, got '$accelerator_count'"
fi

# The strategy flags follow the hardware (they come after the preset's
# --strategy=tpu, and later flags win).
if [[ "$accelerator_type" == TPU_* || "$machine_type" == cloud-tpu || "$machine_type" == ct* ]]; then
  if (( replica_count != 1 )); then
    die "--replica_count: expected 1 for a TPU job (one TPU VM), got $replica_count"
  fi
  strategy_flags=(--tpu=local)
elif (( replica_count > 1 )); then
  strategy_flags=(--strategy=multi_worker)
elif [[ "$accelerator_type" == NVIDIA_* ]]; then
  strategy_flags=(--strategy=gpu)
else
  strategy_flags=(--strategy=cpu)
fi

spec="machine-type=$machine_type"
if [[ -n "$accelerator_type" ]]; then
  spec+=",accelerator-type=$accelerator_type,accelerator-count=$accelerator_count"
fi
if [[ -n "$tpu_topology" ]]; then
  spec+=",tpu-topology=$tpu_topology"
fi
pools=(--worker-pool-spec="$spec,replica-count=1,container-image-uri=$image_uri")
if (( replica_count > 1 )); then
  pools+=(--worker-pool-spec="$spec,replica-count=$((replica_count - 1)),container-image-uri=$image_uri")
fi

train_args=("--preset=$preset"
            "${strategy_flags[@]}" "--data_dir=$data_dir"
            "--model_dir=$model_dir" "${extra[@]+"${extra[@]}"}")
# --args is a comma-separated list; an argument with a comma (e.g.
# --weight_decay_exclude=a,b) needs gcloud's ^DELIM^ escaping
# (gcloud topic escaping).
delim=','
for a in "${train_args[@]}"; do
  if [[ "$a" == *,* ]]; then
    delim='|'
  fi
done
joined="$(IFS="$delim"; printf '%s' "${train_args[*]}")"
if [[ "$delim" != ',' ]]; then
  for a in "${train_args[@]}"; do
    if [[ "$a" == *"$delim"* ]]; then
      die "--args: an argument contains both ',' and '|': '$a'"
    fi
  done
  joined="^$delim^$joined"
fi

scope=(--region="$region")
if [[ -n "$project" ]]; then
  scope+=(--project="$project")
fi
run gcloud ai custom-jobs create "${scope[@]}" \
  --display-name="${display_name:-efficientnet-tpu-$preset}" "${pools[@]}" \
  --command=python3,-m,efficientnet_tpu.main --args="$joined"
note "Follow it with: gcloud ai custom-jobs stream-logs JOB_ID --region=$region"
