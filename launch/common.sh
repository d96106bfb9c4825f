# shellcheck shell=bash
# Shared helpers for launch/*.sh; sourced, never run on its own.
#
# Every script takes --flag=value options whose defaults come from
# environment variables, --dry_run (print the exact commands, one
# shell-quoted line each, instead of running them) and --help. Errors are a
# single line on stderr that names the flag, with exit status 2. Hints for
# the user go to stderr too, so that a dry run's stdout holds only commands.

DRY_RUN=0
SCRIPT_NAME="$(basename "$0")"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
# Used by the scripts that source this file.
export LAUNCH_DIR REPO_ROOT

# On every TPU VM worker, relative to the login user's $HOME: the unpacked
# source (tpu_install.sh), and the log and pid file of the training process
# (tpu_train.sh, tpu_logs.sh, tpu_delete.sh --stop_training).
REMOTE_DIR='efficientnet_tpu'
REMOTE_LOG='efficientnet_tpu-train.log'
REMOTE_PID='efficientnet_tpu-train.pid'
export REMOTE_DIR REMOTE_LOG REMOTE_PID

# TensorFlow version of the default TPU VM runtime (see default_runtime).
DEFAULT_TF_VERSION='2.18.0'

die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

note() {
  printf '%s\n' "$*" >&2
}

unknown_flag() {
  die "unknown flag '$1' (see --help)"
}

# tpu_flag ARG: handles the flags every TPU script takes (--help, --dry_run,
# --name, --zone, --project) into DRY_RUN, name, zone and project of the
# calling script; returns 1 for any other flag, which the caller parses.
# shellcheck disable=SC2034  # name, zone, project: set for the caller.
tpu_flag() {
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry_run) DRY_RUN=1 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    *) return 1 ;;
  esac
}

# resolve_run_dirs: normalizes preset, bucket, data_dir and model_dir of the
# calling script (data and runs default to gs://BUCKET/imagenet and
# gs://BUCKET/runs/PRESET) and requires all three.
# shellcheck disable=SC2034  # preset, data_dir, model_dir: for the caller.
resolve_run_dirs() {
  require preset "$preset" PRESET
  preset="$(preset_name "$preset")"
  bucket="${bucket#gs://}"
  bucket="${bucket%/}"
  if [[ -z "$data_dir" && -n "$bucket" ]]; then
    data_dir="gs://$bucket/imagenet"
  fi
  if [[ -z "$model_dir" && -n "$bucket" ]]; then
    model_dir="gs://$bucket/runs/$preset"
  fi
  require data_dir "$data_dir" DATA_DIR
  require model_dir "$model_dir" MODEL_DIR
}

# require FLAG VALUE [ENV_VAR]: one-line error when VALUE is empty.
require() {
  if [[ -z "$2" ]]; then
    if [[ -n "${3:-}" ]]; then
      die "--$1 is required (or set \$$3)"
    fi
    die "--$1 is required"
  fi
}

# quote_arg ARG: ARG as is when it is plain, else in single quotes (POSIX
# shell syntax, readable in printed commands).
quote_arg() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote_cmd ARGS...: ARGS as one line that a shell parses back into ARGS.
quote_cmd() {
  local arg sep=''
  for arg in "$@"; do
    printf '%s' "$sep"
    quote_arg "$arg"
    sep=' '
  done
}

# run ARGS...: runs ARGS, or with --dry_run prints them (quote_cmd).
run() {
  if (( DRY_RUN )); then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    "$@"
  fi
}

# is_multi_host ACCELERATOR_TYPE: true for pod slices with more than one TPU
# VM host. The number after the dash counts TensorCores (v2, v3, v4, v5p) or
# chips (v5litepod, v6e); in every family one host holds at most 8, so more
# than 8 means several hosts.
is_multi_host() {
  local type="$1" count
  count="${type##*-}"
  if [[ "$type" != v*-* || ! "$count" =~ ^[0-9]+$ || "$count" -lt 1 ]]; then
    die "--accelerator_type: expected a TPU type such as v3-8, v3-32, v4-8, v5p-128 or v5litepod-16, got '$type'"
  fi
  (( count > 8 ))
}

# default_runtime ACCELERATOR_TYPE: the TensorFlow TPU VM runtime, named
# tpu-vm-tf-X.Y.Z[-pod][-pjrt] (https://cloud.google.com/tpu/docs/runtimes):
# "-pod" for multi-host slices, whose runtime starts the TPU gRPC server on
# every worker; "-pjrt" for the PJRT device API.
default_runtime() {
  local tf_version="${TF_VERSION:-$DEFAULT_TF_VERSION}"
  if is_multi_host "$1"; then
    printf 'tpu-vm-tf-%s-pod-pjrt' "$tf_version"
  else
    printf 'tpu-vm-tf-%s-pjrt' "$tf_version"
  fi
}

# preset_name PRESET: checks that the package ships preset NAME
# (efficientnet_tpu/presets/NAME.cfg, loaded by the trainer's --preset=NAME)
# and prints NAME. PRESET may be a name, NAME.cfg or a path to the file.
preset_name() {
  local name
  name="$(basename "$1" .cfg)"
  if [[ ! -f "$REPO_ROOT/efficientnet_tpu/presets/$name.cfg" ]]; then
    die "--preset: expected the name of a preset in efficientnet_tpu/presets/ (e.g. efficientnet-b2-lars-4096; efficientnet-tpu-train --preset=list), got '$1'"
  fi
  printf '%s' "$name"
}
