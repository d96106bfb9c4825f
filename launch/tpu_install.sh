#!/usr/bin/env bash
# Installs efficientnet_tpu on every worker of a TPU VM or pod slice, or,
# with --local, on this machine with the same steps.
#
# The TensorFlow TPU runtime (tpu-vm-tf-*) comes with a TPU-enabled
# TensorFlow and a Keras 3. The package asks for no TensorFlow without an
# extra, but pip could still replace the runtime's TensorFlow or TensorBoard,
# so the package is installed with --no-deps, followed by the light
# dependencies of requirements.txt. Keras is one of them on purpose: the
# runtimes of TF 2.18 and 2.19 carry a Keras older than the floor (3.10, what
# TF 2.20 itself requires; docs/design_decisions.md), and their TensorFlow
# accepts any keras>=3.5, so pip upgrades only an older Keras and keeps a
# newer one.
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
       launch/tpu_install.sh --local [--python=PYTHON] [--keras=SPEC]

Copies this checkout to every worker (or clones --repo_url there) into
~/$REMOTE_DIR, then runs on every worker:
  pip install --no-deps ~/$REMOTE_DIR   (keeps the runtime's TPU TensorFlow)
  pip install <the light dependencies of requirements.txt, Keras included>
  python3 -c <the stack check: one line naming what is too old>
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
  --keras=SPEC             the Keras requirement (default: requirements.txt's,
                           $DEFAULT_KERAS); pip keeps an installed Keras
                           that meets it. e.g. --keras=keras==3.10.0 pins
                           the floor
  --local                  run the install steps on this machine, from this
                           checkout, with --python (no gcloud, no copy): what
                           a worker runs, for a runtime-like environment here
  --python=PYTHON          the interpreter of --local (default: python3 on
                           PATH, e.g. a virtual environment's)
  --dry_run                print the commands instead of running them
  -h, --help               this help
USAGE
}

# The light dependencies: requirements.txt without what the TPU runtime
# provides (tensorflow, tensorboard), so pip cannot replace them. Keras stays
# (see the top of this file); --keras replaces its line.
DEFAULT_KERAS=''
light_deps=()
while IFS= read -r line; do
  line="${line%%#*}"
  line="${line//[[:space:]]/}"
  case "$line" in
    ''|-*|tensorflow*|tensorboard*) ;;
    keras[\<\>=~!]*) DEFAULT_KERAS="$line" ;;
    *) light_deps+=("$line") ;;
  esac
done < "$REPO_ROOT/requirements.txt"

name="${TPU_NAME:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
accelerator_type="${ACCELERATOR_TYPE:-v3-8}"
repo_url="${REPO_URL:-}"
ref="${REPO_REF:-}"
keras="$DEFAULT_KERAS"
local_install=0
python_bin=python3
for arg in "$@"; do
  tpu_flag "$arg" && continue
  case "$arg" in
    --accelerator_type=*) accelerator_type="${arg#*=}" ;;
    --repo_url=*) repo_url="${arg#*=}" ;;
    --ref=*) ref="${arg#*=}" ;;
    --keras=*) keras="${arg#*=}" ;;
    --local) local_install=1 ;;
    --python=*) python_bin="${arg#*=}" ;;
    *) unknown_flag "$arg" ;;
  esac
done

if [[ ! "$keras" =~ ^keras([<>=~!].*)?$ ]]; then
  die "--keras: expected a requirement on keras such as 'keras>=3.10', got '$keras'"
fi
light_deps=("$keras" "${light_deps[@]}")
# The stack check: the versions found, or one line naming what is too old
# (efficientnet_tpu/stack.py), with a non-zero exit status.
check=(-m efficientnet_tpu.stack)

if (( local_install )); then
  if [[ -n "$repo_url" || -n "$ref" ]]; then
    die "--local: installs this checkout; --repo_url and --ref are for TPU workers"
  fi
  if ! command -v "$python_bin" >/dev/null 2>&1; then
    die "--python: '$python_bin' is not an executable on PATH"
  fi
  # The same three steps as on a worker, in the same order.
  run "$python_bin" -m pip install --quiet --no-deps --force-reinstall "$REPO_ROOT"
  run "$python_bin" -m pip install --quiet "${light_deps[@]}"
  # From outside the checkout, so the installed copy is what is checked.
  (cd / && run "$python_bin" "${check[@]}")
  exit 0
fi

require name "$name" TPU_NAME
require zone "$zone" ZONE
if [[ -n "$ref" && -z "$repo_url" ]]; then
  die "--ref: only used with --repo_url"
fi

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
remote="set -e; $fetch"
remote+="; python3 -m pip install --quiet --no-deps --force-reinstall $dir"
remote+="; $(quote_cmd python3 -m pip install --quiet "${light_deps[@]}")"
remote+="; $(quote_cmd python3 "${check[@]}")"

run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=all \
  --command="$remote"
note "Next: launch/tpu_train.sh --name=$name --zone=$zone --accelerator_type=$accelerator_type --preset=PRESET --bucket=BUCKET"
