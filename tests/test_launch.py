"""Tests for the launch/*.sh scripts.

Every gcloud call is checked as an exact argv list twice: parsed from the
--dry_run output, and recorded by a fake `gcloud` on PATH (a script that
appends its argv as one JSON list per line). The commands the scripts send
to the TPU workers over ssh are then run here with bash in a sandbox $HOME,
with fake `python3` / `git` recording what they were asked to do, which
checks the install, the start-once / restart behaviour of training, log
tailing and stopping. No real gcloud, pip or training runs.
"""

import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
SCRIPTS = sorted(p.name for p in LAUNCH.glob('*.sh') if p.name != 'common.sh')
GCLOUD_SCRIPTS = [s for s in SCRIPTS if s != 'local_smoke.sh']
# Environment defaults the scripts read; removed so the host cannot leak in.
ENV_VARS = ('TPU_NAME', 'ZONE', 'PROJECT', 'ACCELERATOR_TYPE',
            'RUNTIME_VERSION', 'TF_VERSION', 'PRESET', 'BUCKET', 'DATA_DIR',
            'MODEL_DIR', 'REGION', 'IMAGE_URI', 'ACCELERATOR', 'REPO_URL',
            'REPO_REF')
PRESET = 'efficientnet-b2-lars-4096'
TPU = ['--name=t1', '--zone=europe-west4-a']
SSH = ['compute', 'tpus', 'tpu-vm', 'ssh', 't1', '--zone=europe-west4-a']

FAKE_GCLOUD = """#!{python}
import json, os, sys
with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
"""

# Stands in for python3 on a TPU worker: records argv, cwd, pid and the TPU
# environment variables, prints a line, then stays alive for a while.
FAKE_PYTHON = """#!{python}
import json, os, sys, time
keys = ('TPU_LOAD_LIBRARY', 'NEXT_PLUGGABLE_DEVICE_USE_C_API',
        'TF_PLUGGABLE_DEVICE_LIBRARY_PATH')
record = dict(argv=sys.argv[1:], cwd=os.getcwd(), pid=os.getpid(),
              env={{k: os.environ.get(k) for k in keys}})
with open(os.environ['FAKE_PYTHON_LOG'], 'a') as f:
  f.write(json.dumps(record) + '\\n')
print('fake python3 output', flush=True)
time.sleep(float(os.environ.get('FAKE_PYTHON_SLEEP', '0')))
"""

FAKE_GIT = """#!{python}
import json, os, sys
with open(os.environ['FAKE_GIT_LOG'], 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
os.makedirs(sys.argv[-1])
"""


@dataclasses.dataclass
class Sandbox:
  root: pathlib.Path
  env: dict
  gcloud_log: pathlib.Path
  home: pathlib.Path
  worker_bin: pathlib.Path

  def run(self, script, *args, env=None):
    return subprocess.run(['bash', str(LAUNCH / script), *args],
                          env=dict(self.env, **(env or {})), cwd=self.root,
                          capture_output=True, text=True, timeout=60)

  def logged_calls(self):
    if not self.gcloud_log.exists():
      return []
    calls = [json.loads(l) for l in self.gcloud_log.read_text().splitlines()]
    self.gcloud_log.unlink()
    return calls

  def calls(self, script, *args, env=None):
    """The commands of `script`: dry-run printout == fake gcloud's record."""
    dry = self.run(script, '--dry_run', *args, env=env)
    assert dry.returncode == 0, dry.stderr
    printed = [shlex.split(l) for l in dry.stdout.splitlines() if l.strip()]
    assert self.logged_calls() == [], 'a dry run must not call gcloud'
    real = self.run(script, *args, env=env)
    assert real.returncode == 0, real.stderr
    logged = self.logged_calls()
    assert [c for c in printed if c[0] == 'gcloud'] == [
        ['gcloud', *c] for c in logged]
    return printed, logged

  def worker_env(self, **extra):
    return dict(HOME=str(self.home),
                PATH=f'{self.worker_bin}:/usr/bin:/bin',
                FAKE_PYTHON_LOG=str(self.root / 'python3_calls.jsonl'),
                FAKE_GIT_LOG=str(self.root / 'git_calls.jsonl'), **extra)

  def run_on_worker(self, command, **extra_env):
    """Runs an ssh --command payload with bash, as a TPU worker would."""
    return subprocess.run(['bash', '-c', command],
                          env=self.worker_env(**extra_env), cwd=self.home,
                          capture_output=True, text=True, timeout=60)

  def python_calls(self):
    path = self.root / 'python3_calls.jsonl'
    if not path.exists():
      return []
    return [json.loads(l) for l in path.read_text().splitlines()]


def _write_exe(path, text):
  path.write_text(text.format(python=sys.executable))
  path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path):
  local_bin = tmp_path / 'bin'
  worker_bin = tmp_path / 'worker_bin'
  home = tmp_path / 'home'
  for d in (local_bin, worker_bin, home):
    d.mkdir()
  _write_exe(local_bin / 'gcloud', FAKE_GCLOUD)
  _write_exe(worker_bin / 'python3', FAKE_PYTHON)
  _write_exe(worker_bin / 'git', FAKE_GIT)
  env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
  env.update(PATH=f'{local_bin}:{env["PATH"]}',
             FAKE_GCLOUD_LOG=str(tmp_path / 'gcloud_calls.jsonl'),
             TMPDIR=str(tmp_path))
  return Sandbox(tmp_path, env, tmp_path / 'gcloud_calls.jsonl', home,
                 worker_bin)


def _command(argv):
  """The --command= payload of an ssh argv, and the argv without it."""
  assert argv[-1].startswith('--command=')
  return argv[-1][len('--command='):], argv[:-1]


def _wait_for(predicate, timeout=120.0):
  """Polls predicate; the timeout only bounds a failing test (a loaded
  machine may take seconds to start a process)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie counts as gone.
  state = subprocess.run(['ps', '-o', 'stat=', '-p', str(pid)],
                         capture_output=True, text=True).stdout.strip()
  return bool(state) and not state.startswith('Z')


def _worker_requirements(keras=None):
  """requirements.txt as a TPU worker installs it (independently parsed):
  without the runtime's TensorFlow and TensorBoard, Keras first (`keras`
  replaces its line)."""
  out, keras_line = [], None
  for line in (REPO / 'requirements.txt').read_text().splitlines():
    line = line.split('#')[0].replace(' ', '')
    if not line or line.startswith('-'):
      continue
    name = re.match(r'[A-Za-z0-9_.\-]+', line).group(0).lower()
    if name == 'keras':
      keras_line = line
    elif name not in ('tensorflow', 'tensorflow-cpu', 'tensorboard'):
      out.append(line)
  return [keras or keras_line] + out


# ---- interface -------------------------------------------------------------


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_exits_zero_and_calls_nothing(sandbox, script):
  result = sandbox.run(script, '--help')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f'Usage: launch/{script}')
  assert sandbox.logged_calls() == []


@pytest.mark.parametrize('script,args,message', [
    ('tpu_create.sh', ['--zone=z'], '--name is required (or set $TPU_NAME)'),
    ('tpu_create.sh', ['--name=t1'], '--zone is required (or set $ZONE)'),
    ('tpu_install.sh', ['--name=t1'], '--zone is required (or set $ZONE)'),
    ('tpu_train.sh', TPU + ['--bucket=b'],
     '--preset is required (or set $PRESET)'),
    ('tpu_train.sh', TPU + [f'--preset={PRESET}', '--model_dir=gs://m'],
     '--data_dir is required (or set $DATA_DIR)'),
    ('tpu_train.sh', TPU + ['--preset=no-such-preset', '--bucket=b'],
     "--preset: expected the name of a preset in efficientnet_tpu/presets/"),
    ('tpu_logs.sh', ['--zone=z'], '--name is required (or set $TPU_NAME)'),
    ('tpu_logs.sh', TPU + ['--worker=x'], "--worker: expected a worker"),
    ('tpu_delete.sh', ['--name=t1'], '--zone is required (or set $ZONE)'),
    ('tpu_delete.sh', TPU + ['--stop', '--queued'], 'expected at most one'),
    ('submit_job.sh', [f'--preset={PRESET}', '--image_uri=i', '--bucket=b'],
     '--region is required (or set $REGION)'),
    ('submit_job.sh', ['--region=r', f'--preset={PRESET}', '--bucket=b'],
     '--image_uri is required (or set $IMAGE_URI)'),
    ('submit_job.sh', ['--region=r', '--image_uri=i', f'--preset={PRESET}',
                       '--bucket=b', '--replica_count=2'],
     '--replica_count: expected 1 for a TPU job'),
    ('submit_job.sh', ['--region=r', '--image_uri=i', f'--preset={PRESET}',
                       '--bucket=b', '--accelerator=tpu-v9'],
     "--accelerator: expected one of"),
    ('tpu_create.sh', TPU + ['--accelerator_type=big'],
     "--accelerator_type: expected a TPU type"),
    ('tpu_create.sh', TPU + ['--queued', '--preemptible'],
     '--preemptible: not available with --queued'),
    ('tpu_create.sh', TPU + ['--spot', '--reserved'], 'expected at most one'),
    ('tpu_create.sh', TPU + ['--nmae=t2'], "unknown flag '--nmae=t2'"),
])
def test_bad_or_missing_flags_fail_with_one_line(sandbox, script, args,
                                                 message):
  result = sandbox.run(script, *args)
  assert result.returncode != 0
  assert result.stdout == ''
  assert result.stderr.count('\n') == 1, result.stderr
  assert result.stderr.startswith(f'{script}: error: ')
  assert message in result.stderr
  assert sandbox.logged_calls() == []


def test_shellcheck_is_clean():
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed (.ci/run installs it with '
                'apt-get install shellcheck)')
  result = subprocess.run(
      ['shellcheck', '-x', *(f'launch/{p.name}' for p in
                             sorted(LAUNCH.glob('*.sh')))],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr


def test_local_smoke_dry_run_prints_the_command(sandbox, tmp_path):
  result = sandbox.run('local_smoke.sh', '--dry_run',
                       f'--model_dir={tmp_path}/smoke',
                       '--num_cpu_replicas=8')
  assert result.returncode == 0, result.stderr
  argv = shlex.split(result.stdout)
  assert argv[:3] == ['python3', '-m', 'efficientnet_tpu.main']
  assert '--preset=cpu_smoke' in argv
  assert f'--model_dir={tmp_path}/smoke' in argv
  assert argv[-1] == '--num_cpu_replicas=8'
  assert not (tmp_path / 'smoke').exists()


# ---- tpu_create.sh ---------------------------------------------------------


def test_create_single_host_vm(sandbox):
  _, calls = sandbox.calls('tpu_create.sh', *TPU)
  assert calls == [['compute', 'tpus', 'tpu-vm', 'create', 't1',
                    '--zone=europe-west4-a', '--accelerator-type=v3-8',
                    '--version=tpu-vm-tf-2.18.0-pjrt']]


def test_create_pod_slice_spot_from_environment(sandbox):
  env = dict(TPU_NAME='pod', ZONE='us-central1-a', PROJECT='proj',
             ACCELERATOR_TYPE='v3-32')
  _, calls = sandbox.calls('tpu_create.sh', '--spot', env=env)
  assert calls == [['compute', 'tpus', 'tpu-vm', 'create', 'pod',
                    '--zone=us-central1-a', '--project=proj',
                    '--accelerator-type=v3-32',
                    '--version=tpu-vm-tf-2.18.0-pod-pjrt', '--spot']]


def test_create_flags_override_environment(sandbox):
  env = dict(TPU_NAME='from-env', ACCELERATOR_TYPE='v3-32')
  _, calls = sandbox.calls('tpu_create.sh', *TPU, '--accelerator_type=v4-8',
                           '--preemptible', env=env)
  assert calls == [['compute', 'tpus', 'tpu-vm', 'create', 't1',
                    '--zone=europe-west4-a', '--accelerator-type=v4-8',
                    '--version=tpu-vm-tf-2.18.0-pjrt', '--preemptible']]


def test_create_queued_resource(sandbox):
  _, calls = sandbox.calls('tpu_create.sh', *TPU, '--queued', '--spot',
                           '--accelerator_type=v5p-128',
                           '--runtime_version=tpu-vm-tf-2.16.1-pod-pjrt')
  assert calls == [['compute', 'tpus', 'queued-resources', 'create', 't1',
                    '--node-id=t1', '--zone=europe-west4-a',
                    '--accelerator-type=v5p-128',
                    '--runtime-version=tpu-vm-tf-2.16.1-pod-pjrt', '--spot']]


def test_create_runtime_follows_tf_version(sandbox):
  _, calls = sandbox.calls('tpu_create.sh', *TPU,
                           '--accelerator_type=v3-1024',
                           env=dict(TF_VERSION='2.19.0'))
  assert calls[0][-1] == '--version=tpu-vm-tf-2.19.0-pod-pjrt'


# ---- tpu_install.sh --------------------------------------------------------


@pytest.mark.parametrize('accelerator_type,pod', [('v3-8', False),
                                                  ('v4-32', True)])
def test_install_copies_the_source_and_installs_without_deps(
    sandbox, accelerator_type, pod):
  printed, calls = sandbox.calls('tpu_install.sh', *TPU,
                                 f'--accelerator_type={accelerator_type}')
  tarball = sandbox.root / 'efficientnet_tpu-src.tar.gz'
  assert printed[0][:3] == ['tar', '-czf', str(tarball)]
  assert calls[0] == ['compute', 'tpus', 'tpu-vm', 'scp', str(tarball),
                      't1:efficientnet_tpu-src.tar.gz',
                      '--zone=europe-west4-a', '--worker=all']
  command, ssh = _command(calls[1])
  assert ssh == SSH + ['--worker=all']
  assert len(calls) == 2

  # The source tarball holds the package and the presets, not the tests.
  with tarfile.open(tarball) as tar:
    names = tar.getnames()
  assert 'setup.py' in names and 'efficientnet_tpu/main.py' in names
  assert f'efficientnet_tpu/presets/{PRESET}.cfg' in names
  assert not any(n.startswith(('tests', '.git')) or '__pycache__' in n
                 for n in names)

  # What scp would have done, then the ssh payload on the "worker".
  shutil.copy(tarball, sandbox.home / 'efficientnet_tpu-src.tar.gz')
  stale = sandbox.home / 'efficientnet_tpu' / 'stale.txt'
  stale.parent.mkdir()
  stale.write_text('from an older install')
  result = sandbox.run_on_worker(command)
  assert result.returncode == 0, result.stderr
  src = sandbox.home / 'efficientnet_tpu'
  assert (src / 'setup.py').read_text() == (REPO / 'setup.py').read_text()
  assert (src / 'efficientnet_tpu' / 'presets' / f'{PRESET}.cfg').exists()
  assert not stale.exists()
  pip_no_deps, pip_deps, check = [c['argv'] for c in sandbox.python_calls()]
  assert pip_no_deps == ['-m', 'pip', 'install', '--quiet', '--no-deps',
                         '--force-reinstall', str(src)]
  expected = _worker_requirements()
  if pod:
    expected += ['google-api-python-client', 'oauth2client']
  assert pip_deps == ['-m', 'pip', 'install', '--quiet', *expected]
  # The runtime's TPU TensorFlow and TensorBoard are never replaced; Keras
  # is named with a floor, which pip meets by keeping a newer one.
  assert not any(a.startswith(('tensorflow', 'tensorboard'))
                 for a in pip_deps)
  assert pip_deps[4].startswith('keras>=')
  assert check == ['-m', 'efficientnet_tpu.stack']


def test_install_local_runs_the_worker_steps_on_this_machine(sandbox):
  """--local: the worker's three steps, here, from this checkout, with the
  given interpreter; the dry run prints exactly what runs."""
  python = sandbox.worker_bin / 'python3'
  args = ['--local', f'--python={python}', '--keras=keras==3.10.0']
  env = dict(FAKE_PYTHON_LOG=str(sandbox.root / 'python3_calls.jsonl'))
  dry = sandbox.run('tpu_install.sh', '--dry_run', *args, env=env)
  assert dry.returncode == 0, dry.stderr
  printed = [shlex.split(l) for l in dry.stdout.splitlines() if l.strip()]
  assert sandbox.python_calls() == []
  result = sandbox.run('tpu_install.sh', *args, env=env)
  assert result.returncode == 0, result.stderr
  assert sandbox.logged_calls() == []  # No gcloud.
  calls = [c['argv'] for c in sandbox.python_calls()]
  assert printed == [[str(python), *c] for c in calls]
  assert calls == [
      ['-m', 'pip', 'install', '--quiet', '--no-deps', '--force-reinstall',
       str(REPO)],
      ['-m', 'pip', 'install', '--quiet',
       *_worker_requirements(keras='keras==3.10.0')],
      ['-m', 'efficientnet_tpu.stack']]
  # The check runs outside the checkout: the installed copy is checked.
  assert sandbox.python_calls()[-1]['cwd'] == '/'


@pytest.mark.parametrize('args,message', [
    (['--local', '--keras=numpy>=2'], "--keras: expected a requirement on "
     "keras such as 'keras>=3.10', got 'numpy>=2'"),
    (['--local', '--repo_url=https://example.com/r.git'],
     '--local: installs this checkout; --repo_url and --ref are for TPU '
     'workers'),
    (['--local', '--python=no-such-python3'],
     "--python: 'no-such-python3' is not an executable on PATH"),
])
def test_install_local_refusals(sandbox, args, message):
  result = sandbox.run('tpu_install.sh', *args)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [f'tpu_install.sh: error: {message}']
  assert sandbox.python_calls() == []


def test_install_from_git(sandbox):
  printed, calls = sandbox.calls('tpu_install.sh', *TPU,
                                 '--repo_url=https://example.com/r.git',
                                 '--ref=v1')
  assert [c[0] for c in printed] == ['gcloud']  # No local tarball.
  command, ssh = _command(calls[0])
  assert ssh == SSH + ['--worker=all']
  result = sandbox.run_on_worker(command)
  assert result.returncode == 0, result.stderr
  git_calls = [json.loads(l) for l in
               (sandbox.root / 'git_calls.jsonl').read_text().splitlines()]
  assert git_calls == [['clone', '--depth=1', '--branch', 'v1',
                        'https://example.com/r.git',
                        str(sandbox.home / 'efficientnet_tpu')]]
  assert sandbox.python_calls()[0]['argv'][-1] == str(
      sandbox.home / 'efficientnet_tpu')


# ---- tpu_train.sh ----------------------------------------------------------


def _kill_started(sandbox):
  """Kills the fake training processes this test started (recorded or not)."""
  time.sleep(0.2)  # Lets a process that was just launched record itself.
  pids = {call['pid'] for call in sandbox.python_calls()}
  pid_file = sandbox.home / 'efficientnet_tpu-train.pid'
  if pid_file.exists() and pid_file.read_text().strip().isdigit():
    pids.add(int(pid_file.read_text()))
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


# How long a fake training process lives: past every wait of the test below
# (which kills it), so that "already running" cannot depend on the speed of
# the machine.
LIVE_S = '600'


def test_train_single_host_starts_once_and_restarts(sandbox):
  _, calls = sandbox.calls('tpu_train.sh', *TPU, f'--preset={PRESET}',
                           '--bucket=gs://bk/', '--', '--train_steps=10',
                           '--mode=train_and_eval')
  assert len(calls) == 1
  command, ssh = _command(calls[0])
  assert ssh == SSH + ['--worker=0']
  workdir = sandbox.home / 'efficientnet_tpu'
  workdir.mkdir()
  log = sandbox.home / 'efficientnet_tpu-train.log'
  pid_file = sandbox.home / 'efficientnet_tpu-train.pid'
  try:
    first = sandbox.run_on_worker(command, FAKE_PYTHON_SLEEP=LIVE_S)
    assert first.returncode == 0, first.stderr
    assert 'training started' in first.stdout
    assert _wait_for(lambda: sandbox.python_calls())
    [call] = sandbox.python_calls()
    assert call['argv'] == [
        '-m', 'efficientnet_tpu.main',
        f'--preset={PRESET}', '--tpu=local',
        '--data_dir=gs://bk/imagenet', f'--model_dir=gs://bk/runs/{PRESET}',
        '--train_steps=10', '--mode=train_and_eval']
    assert call['cwd'] == str(workdir)
    assert call['env'] == {
        'TPU_LOAD_LIBRARY': None, 'NEXT_PLUGGABLE_DEVICE_USE_C_API': 'true',
        'TF_PLUGGABLE_DEVICE_LIBRARY_PATH': '/lib/libtpu.so'}
    assert int(pid_file.read_text()) == call['pid']
    assert _wait_for(lambda: 'fake python3 output' in log.read_text())

    # Rerun while it runs: nothing new starts.
    again = sandbox.run_on_worker(command, FAKE_PYTHON_SLEEP=LIVE_S)
    assert again.returncode == 0, again.stderr
    assert 'already running' in again.stdout
    time.sleep(0.3)
    assert len(sandbox.python_calls()) == 1

    # After it died (preemption, crash), a rerun starts a new process.
    os.kill(call['pid'], signal.SIGKILL)
    assert _wait_for(lambda: not _alive(call['pid']))
    third = sandbox.run_on_worker(command, FAKE_PYTHON_SLEEP=LIVE_S)
    assert 'training started' in third.stdout
    assert _wait_for(lambda: len(sandbox.python_calls()) == 2)
    second = sandbox.python_calls()[1]
    assert second['argv'] == call['argv']
    assert int(pid_file.read_text()) == second['pid']
    # The log is appended to, not replaced.
    assert _wait_for(
        lambda: log.read_text().count('fake python3 output') == 2)
  finally:
    _kill_started(sandbox)


@pytest.mark.parametrize('paths,extra,warns', [
    (['--data_dir=/data/imagenet', '--model_dir=gs://m/run'], [], True),
    (['--data_dir=gs://d/imagenet', '--model_dir=/runs/b5'], [], True),
    (['--data_dir=/nfs/imagenet', '--model_dir=/nfs/runs'],
     ['--', '--shared_filesystem'], False),
    (['--data_dir=gs://d/imagenet', '--model_dir=gs://m/run'], [], False),
])
def test_train_pod_warns_about_local_paths_unless_declared_shared(
    sandbox, paths, extra, warns):
  """The program refuses them (distribute.check_shared_paths); the script
  says so before starting it in the background."""
  result = sandbox.run('tpu_train.sh', '--dry_run', '--name=pod', '--zone=z',
                       '--accelerator_type=v3-32', f'--preset={PRESET}',
                       *paths, *extra)
  assert result.returncode == 0, result.stderr
  warning = 'the run refuses local paths' in result.stderr
  assert warning == warns, result.stderr
  if warns:
    assert '--shared_filesystem' in result.stderr


def test_train_pod_runs_one_client_on_worker_0(sandbox):
  _, calls = sandbox.calls('tpu_train.sh', '--name=pod', '--zone=z',
                           '--project=proj', '--accelerator_type=v3-32',
                           '--preset=efficientnet_tpu/presets/efficientnet-b5-lars-65536.cfg',
                           '--data_dir=gs://d/imagenet',
                           '--model_dir=gs://m/run 1', '--foreground')
  command, ssh = _command(calls[0])
  assert ssh == ['compute', 'tpus', 'tpu-vm', 'ssh', 'pod', '--zone=z',
                 '--project=proj', '--worker=0']
  (sandbox.home / 'efficientnet_tpu').mkdir()
  result = sandbox.run_on_worker(command)
  assert result.returncode == 0, result.stderr
  assert 'fake python3 output' in result.stdout  # Foreground: streamed.
  [call] = sandbox.python_calls()
  assert call['argv'] == [
      '-m', 'efficientnet_tpu.main',
      '--preset=efficientnet-b5-lars-65536',
      '--tpu=pod', '--tpu_zone=z', '--gcp_project=proj',
      '--data_dir=gs://d/imagenet', '--model_dir=gs://m/run 1']
  assert call['env'] == {'TPU_LOAD_LIBRARY': '0',
                         'NEXT_PLUGGABLE_DEVICE_USE_C_API': None,
                         'TF_PLUGGABLE_DEVICE_LIBRARY_PATH': None}
  log = sandbox.home / 'efficientnet_tpu-train.log'
  assert 'fake python3 output' in log.read_text()


def test_train_stream_executor_runtime_gets_no_pjrt_variables(sandbox):
  env = dict(TPU_NAME='t1', ZONE='z', PRESET=PRESET, DATA_DIR='/data',
             MODEL_DIR='/runs/x', RUNTIME_VERSION='tpu-vm-tf-2.16.1-se')
  _, calls = sandbox.calls('tpu_train.sh', '--foreground', env=env)
  command, _ = _command(calls[0])
  (sandbox.home / 'efficientnet_tpu').mkdir()
  assert sandbox.run_on_worker(command).returncode == 0
  [call] = sandbox.python_calls()
  assert set(call['env'].values()) == {None}
  assert call['argv'][3:] == ['--tpu=local', '--data_dir=/data',
                              '--model_dir=/runs/x']


# ---- tpu_logs.sh and tpu_delete.sh -----------------------------------------


def test_logs_follows_worker_0_by_default(sandbox):
  _, calls = sandbox.calls('tpu_logs.sh', *TPU)
  assert calls == [SSH + ['--worker=0',
                          '--command=tail -n 100 -F '
                          '"$HOME/efficientnet_tpu-train.log"']]


def test_logs_without_following_prints_the_last_lines(sandbox):
  _, calls = sandbox.calls('tpu_logs.sh', *TPU, '--worker=all', '--lines=3',
                           '--no_follow')
  command, ssh = _command(calls[0])
  assert ssh == SSH + ['--worker=all']
  (sandbox.home / 'efficientnet_tpu-train.log').write_text(
      ''.join(f'line {i}\n' for i in range(10)))
  result = sandbox.run_on_worker(command)
  assert result.stdout == 'line 7\nline 8\nline 9\n'


@pytest.mark.parametrize('flags,expected', [
    ([], ['compute', 'tpus', 'tpu-vm', 'delete', 't1',
          '--zone=europe-west4-a']),
    (['--yes', '--project=p'],
     ['compute', 'tpus', 'tpu-vm', 'delete', 't1', '--zone=europe-west4-a',
      '--project=p', '--quiet']),
    (['--queued', '--yes'],
     ['compute', 'tpus', 'queued-resources', 'delete', 't1',
      '--zone=europe-west4-a', '--force', '--quiet']),
    (['--stop'], ['compute', 'tpus', 'tpu-vm', 'stop', 't1',
                  '--zone=europe-west4-a']),
])
def test_delete_and_stop(sandbox, flags, expected):
  _, calls = sandbox.calls('tpu_delete.sh', *TPU, *flags)
  assert calls == [expected]


def test_stop_training_kills_the_recorded_process(sandbox):
  _, calls = sandbox.calls('tpu_delete.sh', *TPU, '--stop_training')
  command, ssh = _command(calls[0])
  assert ssh == SSH + ['--worker=all']
  proc = subprocess.Popen([sys.executable, '-c',
                           'import time; time.sleep(60)'])
  try:
    pid_file = sandbox.home / 'efficientnet_tpu-train.pid'
    pid_file.write_text(f'{proc.pid}\n')
    result = sandbox.run_on_worker(command)
    assert result.returncode == 0, result.stderr
    assert proc.wait(timeout=20) == -signal.SIGTERM
    assert not pid_file.exists()
    # Nothing to stop: still succeeds.
    assert sandbox.run_on_worker(command).returncode == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


# ---- submit_job.sh ---------------------------------------------------------


def _gcloud_list(value):
  """Splits a gcloud list flag value, honouring the ^DELIM^ escape."""
  if value.startswith('^'):
    delim, rest = value[1:].split('^', 1)
    return rest.split(delim)
  return value.split(',')


def test_submit_tpu_job(sandbox):
  _, calls = sandbox.calls('submit_job.sh', '--region=us-central1',
                           '--image_uri=gcr.io/p/img', f'--preset={PRESET}',
                           '--bucket=bk')
  spec = ('machine-type=cloud-tpu,accelerator-type=TPU_V3,'
          'accelerator-count=8,replica-count=1,'
          'container-image-uri=gcr.io/p/img')
  args = (f'--preset={PRESET},--tpu=local,'
          f'--data_dir=gs://bk/imagenet,--model_dir=gs://bk/runs/{PRESET}')
  assert calls == [['ai', 'custom-jobs', 'create', '--region=us-central1',
                    f'--display-name=efficientnet-tpu-{PRESET}',
                    f'--worker-pool-spec={spec}',
                    '--command=python3,-m,efficientnet_tpu.main',
                    f'--args={args}']]


def test_submit_multi_worker_gpu_job_escapes_commas(sandbox):
  env = dict(REGION='europe-west4', IMAGE_URI='img', PRESET=PRESET,
             DATA_DIR='gs://d', MODEL_DIR='gs://m', PROJECT='proj')
  _, calls = sandbox.calls('submit_job.sh', '--accelerator=a100x8',
                           '--replica_count=3', '--display_name=run1', '--',
                           '--weight_decay_exclude=gamma$,beta$',
                           '--train_steps=5', env=env)
  [argv] = calls
  spec = ('machine-type=a2-highgpu-8g,accelerator-type=NVIDIA_TESLA_A100,'
          'accelerator-count=8')
  assert argv[:-1] == [
      'ai', 'custom-jobs', 'create', '--region=europe-west4',
      '--project=proj', '--display-name=run1',
      f'--worker-pool-spec={spec},replica-count=1,container-image-uri=img',
      f'--worker-pool-spec={spec},replica-count=2,container-image-uri=img',
      '--command=python3,-m,efficientnet_tpu.main']
  assert argv[-1].startswith('--args=')
  assert _gcloud_list(argv[-1][len('--args='):]) == [
      f'--preset={PRESET}',
      '--strategy=multi_worker', '--data_dir=gs://d', '--model_dir=gs://m',
      '--weight_decay_exclude=gamma$,beta$', '--train_steps=5']


@pytest.mark.parametrize('flags,spec,strategy', [
    (['--accelerator=l4x1'],
     'machine-type=g2-standard-8,accelerator-type=NVIDIA_L4,'
     'accelerator-count=1', '--strategy=gpu'),
    (['--accelerator=cpu'], 'machine-type=n1-standard-16', '--strategy=cpu'),
    (['--machine_type=ct5lp-hightpu-4t', '--accelerator_type=',
      '--tpu_topology=2x2'],
     'machine-type=ct5lp-hightpu-4t,tpu-topology=2x2', '--tpu=local'),
])
def test_submit_strategy_follows_the_hardware(sandbox, flags, spec, strategy):
  _, calls = sandbox.calls('submit_job.sh', '--region=r', '--image_uri=i',
                           f'--preset={PRESET}', '--bucket=b',
                           *flags)
  [argv] = calls
  assert argv[4] == '--display-name=efficientnet-tpu-' + PRESET
  assert argv[5] == (f'--worker-pool-spec={spec},replica-count=1,'
                     'container-image-uri=i')
  assert _gcloud_list(argv[-1][len('--args='):])[:2] == [
      f'--preset={PRESET}', strategy]
