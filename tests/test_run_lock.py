"""One training run per model_dir; a read-only model_dir fails before work.

Lock holders are real processes (`python -c`), killed with SIGKILL to check
that a crashed run's lock is taken over without manual cleanup.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

from absl import flags
import pytest
import tensorflow as tf

from efficientnet_tpu import distribute
from efficientnet_tpu import run_lock
from efficientnet_tpu.config import ConfigError
from tests.test_main import _reset_flags  # pylint: disable=unused-import
from tests.test_main import _run

FLAGS = flags.FLAGS
REPO = os.path.join(os.path.dirname(__file__), '..')
HOST = socket.gethostname()
# Marker mode, scaled down: a beat every 0.2 s, dead after 1.5 s.
HEARTBEAT_S, STALE_S = 0.2, 1.5

_HOLDER = """
import sys, time
if sys.argv[2] == 'marker':
  # The other run's marker I/O goes through a local stand-in for
  # tf.io.gfile: importing TensorFlow would take most of this test's time.
  # This process uses the real one.
  import os, types
  gfile = types.SimpleNamespace(
      GFile=open, makedirs=lambda p: os.makedirs(p, exist_ok=True),
      remove=os.remove, rename=lambda a, b, overwrite: os.replace(a, b))
  sys.modules['tensorflow'] = types.SimpleNamespace(
      io=types.SimpleNamespace(gfile=gfile),
      errors=types.SimpleNamespace(NotFoundError=FileNotFoundError))
from efficientnet_tpu import run_lock
lock = run_lock.ModelDirLock(sys.argv[1], mode=sys.argv[2],
                             heartbeat_s=float(sys.argv[3]),
                             stale_s=float(sys.argv[4]))
lock.acquire()
print('locked', flush=True)
time.sleep(600)
"""

# A real (tiny) training run: one replica, one step.
_TINY = ['--mode=train', '--train_steps=1', '--iterations_per_loop=1',
         '--lr_warmup_epochs=0', '--num_cpu_replicas=1', '--bn_group_size=1',
         '--train_batch_size=8', '--eval_batch_size=8',
         '--moving_average_decay=0']


@pytest.fixture
def holder():
  """Starts lock holders in other processes; kills what is left at the end."""
  procs = []

  def start(model_dir, mode='flock'):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(REPO),
               TF_CPP_MIN_LOG_LEVEL='3')
    proc = subprocess.Popen(
        [sys.executable, '-c', _HOLDER, str(model_dir), mode,
         str(HEARTBEAT_S), str(STALE_S)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    procs.append(proc)
    line = proc.stdout.readline()  # Blocks until it holds the lock.
    assert line.strip() == 'locked', proc.stderr.read()
    return proc

  yield start
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def _kill9(proc):
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()


def _listing(model_dir):
  return {p: (os.path.getsize(os.path.join(model_dir, p)),
              os.path.getmtime(os.path.join(model_dir, p)))
          for p in sorted(os.listdir(model_dir))}


def test_second_training_run_is_refused_naming_the_holder(tmp_path, capsys,
                                                          holder):
  model_dir = tmp_path / 'run'
  proc = holder(model_dir)
  before = _listing(model_dir)
  rc, out = _run(capsys, f'--model_dir={model_dir}')
  assert rc == 2
  lines = out.err.strip().splitlines()
  assert len(lines) == 1, out.err
  assert lines[0].startswith(f'error: --model_dir: {model_dir} is in use'), (
      lines[0])
  assert f'pid {proc.pid}' in lines[0] and f'host {HOST}' in lines[0]
  assert 'started 20' in lines[0] and 'use another --model_dir' in lines[0]
  # The refused run wrote nothing: no config.json, no checkpoint, and the
  # holder's lock file is untouched.
  assert _listing(model_dir) == before
  assert json.loads((model_dir / '.lock').read_text())['pid'] == proc.pid
  # A dry run does not lock.
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--dry_run')
  assert rc == 0, out.err


def test_eval_beside_a_training_run_does_not_lock(tmp_path, capsys, holder,
                                                  monkeypatch):
  model_dir = tmp_path / 'run'
  holder(model_dir)

  def reached(unused_cfg):
    raise ConfigError('strategy', 'reached')

  # Side-car evaluation gets past the lock to the strategy (stopped there).
  monkeypatch.setattr(distribute, 'build_strategy', reached)
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval')
  assert (rc, out.err) == (2, 'error: --strategy: reached\n')
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=train')
  assert rc == 2 and 'is in use by another training run' in out.err


def test_flock_of_a_killed_run_is_taken_over(tmp_path, holder):
  proc = holder(tmp_path)
  with pytest.raises(ConfigError, match=f'pid {proc.pid}'):
    run_lock.ModelDirLock(str(tmp_path)).acquire()
  _kill9(proc)
  with run_lock.ModelDirLock(str(tmp_path)) as lock:
    assert lock.mode == 'flock'
    info = json.loads((tmp_path / '.lock').read_text())
    assert info['pid'] == os.getpid() and info['host'] == HOST
  # Released: emptied, and free for the next run.
  assert (tmp_path / '.lock').read_text() == ''
  run_lock.ModelDirLock(str(tmp_path)).acquire().release()


def test_lock_is_released_on_an_exception(tmp_path):
  with pytest.raises(RuntimeError, match='boom'):
    with run_lock.ModelDirLock(str(tmp_path)):
      raise RuntimeError('boom')
  assert not (tmp_path / '.lock').read_text()  # Emptied, unlocked.
  with pytest.raises(RuntimeError, match='boom'):
    with run_lock.ModelDirLock(str(tmp_path), mode='marker',
                               heartbeat_s=HEARTBEAT_S, stale_s=STALE_S):
      raise RuntimeError('boom')
  assert not (tmp_path / '.lock').exists()  # The marker is deleted.
  # Held in this process: a second lock (another open file) is refused.
  with run_lock.ModelDirLock(str(tmp_path)):
    with pytest.raises(ConfigError, match=f'pid {os.getpid()}'):
      run_lock.ModelDirLock(str(tmp_path)).acquire()


def test_no_flock_on_the_filesystem_falls_back_to_a_marker(tmp_path,
                                                          monkeypatch):
  import fcntl  # pylint: disable=g-import-not-at-top

  def no_locks(*unused_args):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(fcntl, 'flock', no_locks)
  with run_lock.ModelDirLock(str(tmp_path), heartbeat_s=HEARTBEAT_S,
                             stale_s=STALE_S) as lock:
    assert lock.mode == 'marker'
    assert json.loads((tmp_path / '.lock').read_text())['pid'] == os.getpid()
  assert not (tmp_path / '.lock').exists()


def _marker_lock(path):
  return run_lock.ModelDirLock(str(path), mode='marker',
                               heartbeat_s=HEARTBEAT_S, stale_s=STALE_S)


def test_marker_live_is_kept_and_killed_is_taken_over(tmp_path, holder,
                                                      monkeypatch):
  # One holder process for both checks.
  proc = holder(tmp_path, mode='marker')
  first = json.loads((tmp_path / '.lock').read_text())
  time.sleep(STALE_S + 0.5)
  # Started longer than stale_s ago, but its heartbeat keeps it fresh.
  with pytest.raises(ConfigError, match=f'pid {proc.pid}.*heartbeat'):
    _marker_lock(tmp_path).acquire()
  assert json.loads((tmp_path / '.lock').read_text())['heartbeat'] > (
      first['heartbeat'])
  _kill9(proc)
  # As seen from another host (or pid namespace): only the stale timeout
  # tells that the run is dead. A checker with a long timeout refuses the
  # marker (however long this machine takes to get there), one with the
  # short timeout takes it over once the last beat is older than that.
  monkeypatch.setattr(run_lock, '_pid_exists', lambda pid: True)
  with pytest.raises(ConfigError, match=f'pid {proc.pid}'):
    run_lock.ModelDirLock(str(tmp_path), mode='marker',
                          heartbeat_s=HEARTBEAT_S, stale_s=600).acquire()
  time.sleep(STALE_S + 0.1)
  with _marker_lock(tmp_path) as lock:
    marker = json.loads((tmp_path / '.lock').read_text())
    assert marker['pid'] == os.getpid() and marker['host'] == HOST
    assert marker['token'] == lock._token  # pylint: disable=protected-access
    # This run's heartbeat thread rewrites it (a beat every 0.2 s; waited
    # for, not timed, so a busy machine only makes it slower).
    deadline = time.time() + 120
    while json.loads((tmp_path / '.lock').read_text())['heartbeat'] <= (
        marker['heartbeat']):
      assert time.time() < deadline, 'no heartbeat'
      time.sleep(HEARTBEAT_S)
  assert not (tmp_path / '.lock').exists()  # Released.


def test_marker_of_a_dead_pid_on_this_host_is_taken_over_sooner(tmp_path):
  """The markers' ages are set by their heartbeat times, not by sleeping,
  so the checks do not depend on how fast this machine gets to them."""
  proc = subprocess.Popen(['sleep', '60'])  # A pid that no longer runs.
  proc.kill()
  proc.wait()
  heartbeat_s, stale_s = 10.0, 600.0

  def acquire(pid, age):
    marker = {'host': HOST, 'pid': pid, 'started': '2024-01-01T00:00:00Z',
              'token': 'x', 'heartbeat': time.time() - age}
    (tmp_path / '.lock').write_text(json.dumps(marker))
    return run_lock.ModelDirLock(str(tmp_path), mode='marker',
                                 heartbeat_s=heartbeat_s,
                                 stale_s=stale_s).acquire()

  with pytest.raises(ConfigError, match=f'pid {proc.pid}'):
    acquire(proc.pid, 0)  # Not even one beat missed yet.
  # Two missed beats, well before the stale timeout: a live pid's marker of
  # that age is kept, a dead one's is taken over.
  missed = 2 * heartbeat_s + 5
  with pytest.raises(ConfigError, match=f'pid {os.getpid()}'):
    acquire(os.getpid(), missed)
  acquire(proc.pid, missed).release()


def test_training_releases_the_lock_and_a_rerun_resumes(tmp_path, capsys,
                                                        holder):
  model_dir = tmp_path / 'run'
  rc, out = _run(capsys, f'--model_dir={model_dir}', *_TINY)
  assert rc == 0, out.err
  assert (model_dir / 'ckpt-1.index').exists()
  assert (model_dir / '.lock').read_text() == ''  # Released.
  proc = holder(model_dir)
  _kill9(proc)
  # The killed run's lock is no obstacle; the rerun resumes at step 1.
  rc, out = _run(capsys, f'--model_dir={model_dir}', *_TINY)
  assert rc == 0, out.err
  assert not (model_dir / 'ckpt-2.index').exists()


def _assert_not_writable(out, model_dir):
  lines = out.err.strip().splitlines()
  assert len(lines) == 1, out.err
  assert lines[0].startswith(f'error: --model_dir: {model_dir} is not '
                             'writable ('), lines[0]
  assert 'use another --model_dir' in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason='root ignores permissions')
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_read_only_model_dir_fails_on_one_line(tmp_path, capsys, mode):
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  model_dir.chmod(0o555)
  try:
    rc, out = _run(capsys, f'--model_dir={model_dir}', f'--mode={mode}')
  finally:
    model_dir.chmod(0o755)
  assert rc == 2
  _assert_not_writable(out, model_dir)


@pytest.mark.parametrize('mode', ['train_and_eval', 'eval'])
def test_model_dir_that_cannot_be_created_fails_on_one_line(tmp_path, capsys,
                                                            mode):
  # Works as root too: no one can create a directory under a regular file.
  (tmp_path / 'file').write_text('not a directory')
  model_dir = tmp_path / 'file' / 'run'
  rc, out = _run(capsys, f'--model_dir={model_dir}', f'--mode={mode}')
  assert rc == 2
  _assert_not_writable(out, model_dir)


def test_permission_denied_writing_model_dir_fails_on_one_line(
    tmp_path, capsys, monkeypatch):
  # What a read-only model_dir (local or gs://) raises, simulated for root.
  real_gfile = tf.io.gfile.GFile

  def read_only(path, mode='r'):
    if 'w' in mode or 'a' in mode:
      raise tf.errors.PermissionDeniedError(
          None, None, f'{path}; Permission denied\nmore detail')
    return real_gfile(path, mode)

  monkeypatch.setattr(tf.io.gfile, 'GFile', read_only)
  model_dir = tmp_path / 'run'
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval')
  assert rc == 2
  _assert_not_writable(out, model_dir)
  assert 'Permission denied)' in out.err
