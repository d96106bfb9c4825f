"""MultiWorkerMirroredStrategy: two worker processes on localhost."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from efficientnet_tpu import run_dir
from tests.digits import write_digits_tfrecords
from tests.helpers import free_ports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Model and optimizer of every run here (the checkpoints of one run must
# restore in the next).
_MODEL_FLAGS = ('--model_name=efficientnet-b0', '--width_coefficient=0.1',
                '--depth_coefficient=0.1', '--image_size=16',
                '--num_label_classes=10', '--dropout_rate=0',
                '--stochastic_depth_rate=0', '--train_batch_size=32',
                '--eval_batch_size=16', '--optimizer=lars',
                '--lr_scaling=none', '--base_learning_rate=1.0',
                '--lr_schedule=poly', '--lr_warmup_epochs=0',
                '--moving_average_decay=0.9', '--bn_group_size=0')


def _start_two_workers(model_dirs, extra_flags):
  """Two worker processes; worker i uses model_dirs[i]. Local paths on
  one machine: declared shared."""
  workers = [f'127.0.0.1:{p}' for p in free_ports(2)]
  procs = []
  for index in range(2):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2',
               TF_CONFIG=json.dumps({'cluster': {'worker': workers},
                                     'task': {'type': 'worker',
                                              'index': index}}))
    cmd = [sys.executable, '-m', 'efficientnet_tpu.main',
           '--strategy=multi_worker', f'--model_dir={model_dirs[index]}',
           '--shared_filesystem', *_MODEL_FLAGS, '--train_steps=6',
           '--iterations_per_loop=3', '--mode=train_and_eval',
           '--eval_every_steps=3', *extra_flags]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _run_two_workers(model_dir, extra_flags, timeout=600):
  procs = _start_two_workers([model_dir] * 2, extra_flags)
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      assert p.returncode == 0, err[-3000:]
      outs.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      p.kill()
  return outs


def _assert_same_and_exact(outs, num_eval):
  chief, worker = outs
  for key in ('loss', 'top_1_accuracy', 'eval/top_1_accuracy',
              'eval/top_5_accuracy', 'eval/loss', 'eval/num_examples'):
    assert chief[key] == worker[key], (key, chief[key], worker[key])
  assert chief['eval/num_examples'] == num_eval


@pytest.mark.slow
def test_two_workers_real_tfrecords(tmp_path):
  """Per-host input from files (train shards and the eval plan by file).
  Synthetic data on two worker processes: the chief + worker test in
  test_accelerator_paths."""
  data_dir, num_train, num_eval = write_digits_tfrecords(
      str(tmp_path), size=20, num_eval=101)
  outs = _run_two_workers(tmp_path / 'run', [
      f'--data_dir={data_dir}', f'--num_train_images={num_train}',
      f'--num_eval_images={num_eval}'])
  _assert_same_and_exact(outs, num_eval)
  # Only the chief writes into model_dir; scratch dirs are cleaned up.
  assert (tmp_path / 'run' / 'ckpt-6.index').exists()
  assert not list((tmp_path / 'run').glob('.worker_*'))


@pytest.mark.slow
def test_workers_with_different_model_dirs_stop_on_one_line(tmp_path):
  """Per-machine directories that hold different checkpoints (steps 4 and
  2): both workers refuse to start training, in bounded time, with one
  line naming model_dir, instead of diverging or hanging."""
  first = tmp_path / 'first'
  made = subprocess.run(
      [sys.executable, '-m', 'efficientnet_tpu.main', '--strategy=cpu',
       '--num_cpu_replicas=2', f'--model_dir={first}', *_MODEL_FLAGS,
       '--train_steps=4', '--iterations_per_loop=2', '--mode=train'],
      env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2'),
      capture_output=True, text=True, timeout=600)
  assert made.returncode == 0, made.stderr[-3000:]
  second = tmp_path / 'second'
  shutil.copytree(first, second)
  for path in second.glob('ckpt-4.*'):
    path.unlink()
  run_dir.record_latest_checkpoint(str(second / 'ckpt-2'))
  procs = _start_two_workers([first, second], [])
  try:
    # Bounded: a hang here fails the test instead of blocking the suite.
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for index, (p, err) in enumerate(zip(procs, errs)):
    lines = [l for l in err.splitlines() if l.startswith('error: ')]
    assert p.returncode == 2 and len(lines) == 1, err[-3000:]
    mine = (first, second)[index]
    assert lines[0].startswith(
        'error: --model_dir: the workers would resume from different steps '
        f'(2, 4; this worker: {4 - 2 * index} in {mine})'), lines[0]
    assert 'Traceback' not in err
  # Nothing was trained: each directory keeps its checkpoints.
  assert tf.train.latest_checkpoint(str(first)).endswith('ckpt-4')
  assert tf.train.latest_checkpoint(str(second)).endswith('ckpt-2')
