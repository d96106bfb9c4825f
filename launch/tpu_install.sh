#!/usr/bin/env bash
# Installs efficientnet_tpu on every worker of a TPU VM or pod slice.
#
# The TensorFlow TPU runtime (tpu-vm-tf-*) comes with a TPU-enabled
# TensorFlow and Keras 3. The package asks for no TensorFlow without an
# extra, but pip could still upgrade the runtime's Keras or TensorBoard, so
# the package is installed with --no-deps, followed by the light
# dependencies of requirements.txt (less keras and tensorboard) only.
#
# gcloud reference:
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/scp
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu_install.sh --name=NAME --zone=ZONE [options]

Copies this checkout to every worker (or clones --repo_url there) into
~/$REMOTE_DIR, then runs on every worker:
  pip install --no-deps ~/$REMOTE_DIR   (keeps the runtime's TPU TensorFlow)
  pip install <the light dependencies of requirements.txt>
and prints the versions it finds. Rerunning replaces the copy.

  --name=NAME              TPU name (\$TPU_NAME)
  --zone=ZONE              zone (\$ZONE)
  --project=PROJECT        GCP project (\$PROJECT; default: gcloud config)
  --accelerator_type=TYPE  as given to tpu_create.sh (\$ACCELERATOR_TYPE;
                           default v3-8); multi-host slices also get the
                           Google API client that --tpu=NAME needs
  --repo_url=URL           git clone URL instead of copying this checkout
                           (\$REPO_URL)
  --ref=REF                branch or tag to clone (\$REPO_REF)
  --dry_run                print the commands instead of running them
  -h, --help               this help
USAGE
}

name="${TPU_NAME:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
accelerator_type="${ACCELERATOR_TYPE:-v3-8}"
repo_url="${REPO_URL:-}"
ref="${REPO_REF:-}"
for arg in "$@"; do
  tpu_flag "$arg" && continue
  case "$arg" in
    --accelerator_type=*) accelerator_type="${arg#*=}" ;;
    --repo_url=*) repo_url="${arg#*=}" ;;
    --ref=*) ref="${arg#*=}" ;;
    *) unknown_flag "$arg" ;;
  esac
done

require name "$name" TPU_NAME
require zone "$zone" ZONE
if [[ -n "$ref" && -z "$repo_url" ]]; then
  die "--ref: only used with --repo_url"
fi

# The light dependencies: requirements.txt without what the TPU runtime
# provides (tensorflow, keras, tensorboard), so pip cannot replace them.
light_deps=()
while IFS= read -r line; do
  line="${line%%#*}"
  line="${line//[[:space:]]/}"
  case "$line" in
    ''|-*|tensorflow*|keras*|tensorboard*) ;;
    *) light_deps+=("$line") ;;
  esac
done < "$REPO_ROOT/requirements.txt"
if is_multi_host "$accelerator_type"; then
  # TPUClusterResolver(tpu=NAME) looks the slice up through the Cloud TPU
  # API with these (TensorFlow's built-in client). Not cloud-tpu-client: it
  # would downgrade protobuf.
  light_deps+=(google-api-python-client oauth2client)
fi

scope=(--zone="$zone")
if [[ -n "$project" ]]; then
  scope+=(--project="$project")
fi

dir="\"\$HOME/$REMOTE_DIR\""
if [[ -n "$repo_url" ]]; then
  clone=(git clone --depth=1)
  if [[ -n "$ref" ]]; then
    clone+=(--branch "$ref")
  fi
  fetch="rm -rf $dir && $(quote_cmd "${clone[@]}" "$repo_url") $dir"
else
  tarball="${TMPDIR:-/tmp}/efficientnet_tpu-src.tar.gz"
  run tar -czf "$tarball" -C "$REPO_ROOT" --exclude=__pycache__ \
    --exclude='*.egg-info' setup.py requirements.txt README.md \
    efficientnet_tpu launch
  run gcloud compute tpus tpu-vm scp "$tarball" \
    "$name:efficientnet_tpu-src.tar.gz" "${scope[@]}" --worker=all
  fetch="rm -rf $dir && mkdir -p $dir && tar -xzf \"\$HOME/efficientnet_tpu-src.tar.gz\" -C $dir"
fi
check='import sys, keras, tensorflow as tf, efficientnet_tpu as e; print("efficientnet_tpu", e.__version__, "tensorflow", tf.__version__, "keras", keras.__version__); sys.exit(None if int(keras.__version__.split(".")[0]) >= 3 else "efficientnet_tpu needs Keras 3: use a TPU runtime with TensorFlow >= 2.16")'
remote="set -e; $fetch"
remote+="; python3 -m pip install --quiet --no-deps --force-reinstall $dir"
remote+="; $(quote_cmd python3 -m pip install --quiet "${light_deps[@]}")"
remote+="; $(quote_cmd python3 -c "$check")"

run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=all \
  --command="$remote"
note "Next: launch/tpu_train.sh --name=$name --zone=$zone --accelerator_type=$accelerator_type --preset=PRESET --bucket=BUCKET"
