#!/usr/bin/env bash
# The floor stack, as a Cloud TPU VM runtime has it, built and tested here.
#
# A fresh Python 3.10 virtual environment gets the floor TensorFlow's CPU
# build (tensorflow-cpu stands in for a TF 2.18 TPU runtime's TensorFlow) and
# the Keras that was current when TF 2.18.0 came out (3.6.0, what such a
# runtime carries). Then, as a user would:
#   1. the CLI refuses that Keras in one line, before any work;
#   2. launch/tpu_install.sh --local installs the package with the worker's
#      steps, pinning the Keras floor (efficientnet_tpu/stack.py);
#   3. a short smoke run on 2 CPU replicas, --mode=eval from --model_dir
#      alone (same top-1 as the run's own eval) and --mode=export;
#   4. the tests marked `floor` (tests/conftest.py lists them).
# Each step prints its time. Environment: FLOOR_VENV (where the environment
# goes), FLOOR_PYTHON (a python3.10 to use).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

RUNTIME_KERAS='3.6.0'
floors="$(python3 -c 'import sys; sys.path.insert(0, "."); from efficientnet_tpu import stack as s; d = lambda v: ".".join(map(str, v)); print(d(s.MIN_PYTHON), d(s.MIN_TENSORFLOW), d(s.MIN_KERAS))')"
read -r PY_FLOOR TF_FLOOR KERAS_FLOOR <<<"$floors"

t0=$SECONDS
step() {
  printf '[floor %4ds] %s\n' "$((SECONDS - t0))" "$*"
}
fail() {
  printf 'floor stack: error: %s\n' "$*" >&2
  exit 1
}

# Python 3.10: under pyenv's root (installed by pyenv if missing), or on
# PATH. A pyenv shim on PATH may exist without working, so each candidate
# must run.
runs() { [[ -n "$1" && -x "$1" ]] && "$1" -c 'import venv' >/dev/null 2>&1; }
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
if command -v pyenv >/dev/null 2>&1; then
  pyenv_root="$(pyenv root)"
fi
find_pyenv_python() {
  local candidate
  for candidate in "$pyenv_root/versions/$PY_FLOOR".*/bin/python"$PY_FLOOR"; do
    if runs "$candidate"; then python="$candidate"; fi
  done
  return 0
}
python="${FLOOR_PYTHON:-}"
if [[ -z "$python" ]]; then
  find_pyenv_python
fi
if [[ -z "$python" ]] && command -v pyenv >/dev/null 2>&1; then
  step "installing Python $PY_FLOOR with pyenv"
  pyenv install -s "$PY_FLOOR" || true
  find_pyenv_python
fi
if [[ -z "$python" ]] && runs "$(command -v "python$PY_FLOOR" || true)"; then
  python="$(command -v "python$PY_FLOOR")"
fi
runs "$python" || fail "no working python$PY_FLOOR found (set FLOOR_PYTHON)"

venv="${FLOOR_VENV:-${TMPDIR:-/tmp}/efficientnet_tpu_floor}"
work="$(mktemp -d "${TMPDIR:-/tmp}/efficientnet_tpu_floor_run.XXXXXX")"
trap 'rm -rf "$work"' EXIT

step "runtime-like environment: $("$python" --version), tensorflow-cpu==$TF_FLOOR.*, keras==$RUNTIME_KERAS in $venv"
"$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "tensorflow-cpu==$TF_FLOOR.*" \
  "keras==$RUNTIME_KERAS"
export TF_CPP_MIN_LOG_LEVEL=2

step "1. the runtime's Keras $RUNTIME_KERAS is refused in one line"
set +e
(cd "$work" && PYTHONPATH="$REPO" "$venv/bin/python" -m efficientnet_tpu.main \
  --preset=cpu_smoke --model_dir="$work/refused" 2>"$work/refused.err")
rc=$?
set -e
[[ $rc == 2 ]] || { cat "$work/refused.err" >&2; fail "exit status $rc, expected 2"; }
grep -q "^error: keras $RUNTIME_KERAS found, efficientnet_tpu needs keras >= $KERAS_FLOOR" \
  "$work/refused.err" || { cat "$work/refused.err" >&2; fail "no one-line refusal"; }
! grep -q Traceback "$work/refused.err" || fail "a traceback"
[[ ! -e "$work/refused" ]] || fail "the refused run wrote its model_dir"
grep '^error:' "$work/refused.err"

step "2. launch/tpu_install.sh --local --keras=keras==$KERAS_FLOOR.*"
bash launch/tpu_install.sh --local --python="$venv/bin/python" \
  --keras="keras==$KERAS_FLOOR.*"

train="$venv/bin/efficientnet-tpu-train"
step "3a. smoke run: 2 CPU replicas, 20 steps"
(cd "$work" && "$train" --preset=cpu_smoke --num_cpu_replicas=2 \
  --train_steps=20 --eval_every_steps=20 --model_dir="$work/run" \
  2>"$work/train.err" | tail -1) || { tail -20 "$work/train.err" >&2; fail "smoke run"; }

step "3b. --mode=eval from --model_dir alone"
(cd "$work" && "$train" --mode=eval --model_dir="$work/run" \
  2>"$work/eval.err" | tail -1 >"$work/eval.json") \
  || { tail -20 "$work/eval.err" >&2; fail "eval from model_dir"; }
cat "$work/eval.json"
"$venv/bin/python" - "$work" <<'PY'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
runs = [json.loads(l) for l in
        (work / 'run' / 'eval_results.jsonl').read_text().splitlines()]
again = json.loads((work / 'eval.json').read_text())
first = [r for r in runs if r.get('step') == 20][0]
key = [k for k in first if k.endswith('top_1_accuracy')][0]
top_1 = again['top_1_accuracy']  # --mode=eval prints the eval's own keys.
assert abs(top_1 - first[key]) < 1e-9, (again, first)
print(f'eval top-1 {top_1} == the run\'s own {first[key]}')
PY

step "3c. --mode=export"
(cd "$work" && "$train" --mode=export --model_dir="$work/run" \
  --export_dir="$work/export" 2>"$work/export.err" | tail -1) \
  || { tail -20 "$work/export.err" >&2; fail "export from model_dir"; }
[[ -f "$work/export/saved_model.pb" ]] || fail "no saved_model.pb"

step "4. tests marked floor"
"$venv/bin/python" -m pip install --quiet 'pytest>=7.0' 'scikit-learn>=1.2'
"$venv/bin/python" -m pytest -q -m floor -p no:cacheprovider
step "done"
