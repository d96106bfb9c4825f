"""The pod's client/worker split, emulated with local processes.

Two TensorFlow servers (tests/pod_host.py, two CPU cores each) play a pod's
hosts; a client process (tests/pod_client.py) connects to them as
TPUStrategy's client does, builds each host's input pipeline on that host's
device, trains, evaluates, checkpoints and exports through a strategy whose
replicas are one host's cores, and writes files with ops placed on a host.
References: the same input functions and training run locally in the
client (its local devices), and the working directories of the processes.
What this covers and what only a TPU shows: docs/architecture.md.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import free_ports
from tests.test_input_pipeline import write_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, 'tests')
INPUTS = ('train', 'train_randaugment', 'train_autoaugment',
          'train_skip_corrupt', 'eval')


def _start_host(cluster, index, cwd):
  proc = subprocess.Popen(
      [sys.executable, os.path.join(TESTS, 'pod_host.py'),
       json.dumps(cluster), str(index), '2'], cwd=cwd,
      env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2'),
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  return proc


@pytest.fixture(scope='module')
def pod(tmp_path_factory):
  """Starts two hosts and runs the client once; the hosts are killed at the
  end of the module whatever happened. Returns (results, arrays, dirs)."""
  root = tmp_path_factory.mktemp('pod')
  data_dir = root / 'data'
  # Labels 1..5 (1-based records), colours by label: distinct images.
  write_split(str(data_dir), 'train', [8] * 4,
              label_fn=lambda f, j: (f * 8 + j) % 5 + 1,
              color_fn=lambda label: (label * 40 % 256, label * 13, 200))
  write_split(str(data_dir), 'validation', [10, 10],
              label_fn=lambda f, j: (f * 3 + j) % 5 + 1)
  # For skip_corrupt: one record in 8 has label 0 (outside 1..5), skipped.
  bad_data_dir = root / 'bad_data'
  write_split(str(bad_data_dir), 'train', [8] * 4,
              label_fn=lambda f, j: 0 if j == 3 else (f * 8 + j) % 5 + 1)
  dirs = {name: root / name for name in ('host0', 'host1', 'client')}
  for d in dirs.values():
    d.mkdir()
  cluster = {'worker': [f'127.0.0.1:{p}' for p in free_ports(2)]}
  hosts = []
  try:
    for i in range(2):
      hosts.append(_start_host(cluster, i, dirs[f'host{i}']))
    for h in hosts:  # Serving before the client connects.
      assert h.stdout.readline().strip() == 'serving'
    out = subprocess.run(
        [sys.executable, os.path.join(TESTS, 'pod_client.py'),
         json.dumps(cluster), str(data_dir), str(bad_data_dir), str(root)],
        cwd=dirs['client'],
        env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2'),
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((root / 'results.json').read_text())
    assert 'crashed' not in results, results['crashed']
    with np.load(root / 'arrays.npz') as f:
      arrays = dict(f)
    yield results, arrays, dirs
  finally:
    for h in hosts:
      h.kill()
      h.wait()


def _files(d):
  return sorted(os.path.relpath(os.path.join(p, f), d)
                for p, _, fs in os.walk(d) for f in fs)


@pytest.mark.parametrize('name', INPUTS)
def test_input_runs_on_each_host_like_locally(pod, name):
  """Every input option runs inside the host's server (no Python in the
  graph: `--skip_corrupt` needs issue 27 item 2) and yields what the same
  input function yields in the client."""
  results, arrays, _ = pod
  hosts = (1,) if 'augment' in name else (0, 1)
  for i in hosts:
    remote, local = results[f'{name}/{i}/remote'], results[f'{name}/{i}/local']
    assert 'error' not in local, local
    assert 'error' not in remote, remote
    assert remote['device'] == f'/job:worker/replica:0/task:{i}/device:CPU:0'
    fields = sorted(k.rsplit('/', 1)[1] for k in arrays
                    if k.startswith(f'{name}/{i}/local/'))
    assert fields == (['images', 'labels', 'mask'] if name == 'eval'
                      else ['images', 'labels'])
    for field in fields:
      got = arrays[f'{name}/{i}/remote/{field}']
      want = arrays[f'{name}/{i}/local/{field}']
      assert got.dtype == want.dtype and got.shape == want.shape, field
      # Per replica: 8 images over 4 replicas, 2 batches.
      assert got.shape[:2] == (2, 2), got.shape
      if 'augment' not in name:  # RandAugment draws unseeded.
        np.testing.assert_array_equal(got, want, err_msg=field)
    labels = arrays[f'{name}/{i}/remote/labels']
    assert ((labels >= 0) & (labels < 5)).all()
    # The host ran it all: no call back into the client's Python (the
    # pod's hosts cannot make it; here the client's server answers).
    assert remote['client_callbacks'] == 0, (
        f'{name}: the host input called back into the client '
        f'{remote["client_callbacks"]} times (tf.py_function)')
  if len(hosts) == 2:  # The two hosts read different records.
    assert not np.array_equal(arrays[f'{name}/0/local/images'],
                              arrays[f'{name}/1/local/images'])


def test_steps_eval_checkpoint_and_export_through_a_remote_host(pod):
  """The trainer and evaluator with replicas on a host's cores, driven by
  the client: the same weights and metrics as on the client's cores."""
  results, arrays, dirs = pod
  train = results['train']
  assert train['devices'] == ['/job:worker/replica:0/task:0/device:CPU:0',
                              '/job:worker/replica:0/task:0/device:CPU:1']
  update = np.abs(arrays['train/local'] - arrays['train/initial']).max()
  mismatch = np.abs(arrays['train/remote'] - arrays['train/local']).max()
  assert update > 1e-3
  assert mismatch <= 1e-5 * max(update, 1.0), (mismatch, update)
  local, remote = train['local'], train['remote']
  np.testing.assert_allclose(remote['loss'], local['loss'], rtol=1e-5)
  assert remote['top_1_accuracy'] == local['top_1_accuracy']
  assert remote['eval/num_examples'] == 20
  # model_dir was absolute: the client's files and the host's checkpoint
  # data land in one place (one machine here; on a pod only a shared
  # file system does this).
  run = dirs['client'] / 'remote_run'
  names = os.listdir(run)
  assert 'ckpt-2.index' in names and 'checkpoint' in names, names
  assert (run / 'train').is_dir() and (run / 'eval').is_dir()
  assert (dirs['client'] / 'remote_run_export' / 'saved_model.pb').exists()
  for d in (dirs['host0'], dirs['host1']):
    assert not [f for f in _files(d) if 'ckpt' in f], _files(d)


def test_relative_paths_written_on_a_host_land_in_its_directory(pod):
  """Ops placed on host 1 resolve relative paths in host 1's working
  directory, not the client's: on a pod, on another machine's disk."""
  results, _, dirs = pod
  written = _files(dirs['host1'])
  # A summary writer made on the host: the events file is the host's.
  assert [f for f in written if f.startswith('summaries/events.out')], written
  assert not (dirs['client'] / 'summaries').exists()
  # A checkpoint of a variable on the host: the client makes the directory
  # and writes its own part; the host's part goes to the host's directory,
  # which does not exist there: the save fails, nothing is complete.
  assert results['paths/checkpoint']['error'].startswith('NotFoundError')
  assert not [f for f in written if f.startswith('checkpoints')], written
  client = _files(dirs['client'])
  assert [f for f in client if f.startswith('checkpoints/model_temp/')]
  assert 'checkpoints/model.index' not in client
