"""Resuming continues the training stream; --deterministic resumes exactly.

References: the stream of an uninterrupted input pipeline (for the input
position), and an uninterrupted training process (for the weights after a
real `kill -9` and a rerun).
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu.config import DataConfig
from efficientnet_tpu.data import pipeline as data_pipeline
from efficientnet_tpu.data import tfrecord
from tests.helpers import input_context
from tests.test_input_pipeline import write_split

SIZE = 16
ROOT = os.path.join(os.path.dirname(__file__), '..')


@pytest.fixture(scope='module')
def train_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('resume_data')
  write_split(str(d), 'train', [5, 7, 4, 6])  # Uneven files, 22 records.
  return str(d)


def _batches(cfg, ctx, start_step, n, global_batch):
  if cfg.source == 'synthetic':
    train = data_pipeline.make_input(cfg, 5, SIZE, True, global_batch,
                                     start_step=start_step)
  else:
    train = data_pipeline.build_input(cfg, SIZE, True, global_batch,
                                      start_step=start_step)
  return [{k: v.numpy() for k, v in b.items()}
          for b in train.fn(ctx).take(n)]


def _assert_same(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g['labels'], w['labels'])
    np.testing.assert_array_equal(g['images'], w['images'])


@pytest.mark.parametrize('source', ['tfrecord', 'synthetic'])
@pytest.mark.parametrize('pipelines', [1, 2])
def test_deterministic_resume_continues_the_exact_stream(train_dir, source,
                                                         pipelines):
  """Resumed at step s (mid-epoch and on an epoch boundary, several epochs
  in), each pipeline yields exactly batches s, s+1, ... of its
  uninterrupted stream: images (random crops and flips) and labels."""
  cfg = DataConfig(source=source, data_dir=train_dir if source != 'synthetic'
                   else None, num_train_images=22, shuffle_buffer=8,
                   deterministic=True, seed=3)
  global_batch = 2 * pipelines
  for i in range(pipelines):
    ctx = input_context(pipelines, i, pipelines)
    reference = _batches(cfg, ctx, 0, 30, global_batch)
    # Over 2.5 epochs of each pipeline's 9-13 records.
    for step in (4, 11, 25):
      _assert_same(_batches(cfg, ctx, step, 5, global_batch),
                   reference[step:step + 5])


def test_resume_without_deterministic_does_not_replay_the_start(train_dir):
  cfg = DataConfig(source='tfrecord', data_dir=train_dir,
                   num_train_images=22, shuffle_buffer=8)
  first = _batches(cfg, input_context(1, 0, 1), 0, 2, 4)
  resumed = _batches(cfg, input_context(1, 0, 1), 3, 2, 4)
  assert not all(np.array_equal(a['labels'], b['labels'])
                 for a, b in zip(first, resumed))


def test_resume_with_skip_corrupt_counts_the_broken_file(tmp_path):
  """The epoch length on resume counts a truncated file as its readable
  records plus the one skipped record the lenient reader yields for the
  rest; training resumes and counts the skip."""
  write_split(str(tmp_path), 'train', [3, 3])
  path = str(tmp_path / 'train-00001-of-00002')
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:-10])
  counts = tfrecord.count_records([path], tolerate_corrupt=True)
  readable = sum(1 for _ in tf.data.TFRecordDataset(path).ignore_errors())
  assert readable == 2 and counts == [readable + 1]
  cfg = DataConfig(source='tfrecord', data_dir=str(tmp_path),
                   num_train_images=6, shuffle_buffer=4, skip_corrupt=True)
  train = data_pipeline.build_input(cfg, SIZE, True, 2, start_step=7)
  assert len(list(train.fn(input_context(1, 0, 1)).take(4))) == 4
  assert train.skipped.total >= 1


# ---- a real kill -9 -----------------------------------------------------------

# The run must stay finite for its end state to tell runs apart: a NaN
# state compares unequal to itself (np.array_equal) or, bitwise, equal to
# any other NaN state. At 16 px the last blocks see 1x1 maps, so with 2
# images per replica their batch norms normalize 2 values per channel and
# amplify gradients (~1e5 at init); at LR 0.5 the run reached NaN by step
# 12 on some CPUs. At 32 px and a small LR it stays finite.
KILL_SIZE = 32


def _train_command(model_dir, data_dir, steps):
  return [
      sys.executable, '-m', 'efficientnet_tpu.main',
      f'--model_dir={model_dir}', '--strategy=cpu', '--num_cpu_replicas=2',
      '--data=tfrecord', f'--data_dir={data_dir}', '--num_train_images=22',
      '--num_label_classes=5', '--width_coefficient=0.1',
      '--depth_coefficient=0.1', f'--image_size={KILL_SIZE}',
      '--dropout_rate=0.3', '--stochastic_depth_rate=0.2',
      '--train_batch_size=4', f'--train_steps={steps}',
      '--iterations_per_loop=2', '--mode=train', '--optimizer=lars',
      '--base_learning_rate=0.005', '--lr_scaling=none',
      '--lr_warmup_epochs=0.5', '--moving_average_decay=0.9',
      '--shuffle_buffer=8', '--bn_group_size=1', '--deterministic', '--seed=3',
  ]


def _weights(model_dir):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if k != '_CHECKPOINTABLE_OBJECT_GRAPH'}


def test_kill_9_then_rerun_ends_bitwise_equal(tmp_path):
  """A --deterministic run killed with SIGKILL after a checkpoint and rerun
  ends with bitwise the weights, EMA, optimizer slots and RNG state of an
  uninterrupted run with the same --seed."""
  steps, kill_after = 40, 10
  train_dir = str(tmp_path / 'data')
  write_split(train_dir, 'train', [5, 7, 4, 6],
              label_fn=lambda f, j: (f + j) % 5 + 1)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT)
  whole_dir, killed_dir = tmp_path / 'whole', tmp_path / 'killed'
  run = lambda d: subprocess.Popen(  # pylint: disable=g-long-lambda
      _train_command(d, train_dir, steps), env=env, cwd=ROOT,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  whole, victim = run(whole_dir), run(killed_dir)
  marker = killed_dir / f'ckpt-{kill_after}.index'
  deadline = time.time() + 300
  while not marker.exists() and victim.poll() is None:
    assert time.time() < deadline, 'no checkpoint to kill after'
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  assert victim.wait() == -signal.SIGKILL, victim.stderr.read()[-3000:]
  latest = tf.train.latest_checkpoint(str(killed_dir))
  assert latest and int(latest.rsplit('-', 1)[1]) < steps
  rerun = run(killed_dir)
  for p in (whole, rerun):
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]

  # The rerun placed itself in the stream from record counts it cached.
  assert (killed_dir / 'record_counts.json').exists()
  assert not (whole_dir / 'record_counts.json').exists()
  want, got = _weights(whole_dir), _weights(killed_dir)
  assert set(got) == set(want)
  assert any('rng' in k for k in got)  # Dropout state is checkpointed.
  diverged = [k for k, v in want.items()
              if v.dtype.kind == 'f' and not np.isfinite(v).all()]
  assert not diverged, f'the run diverged, nothing to compare: {diverged[:5]}'
  different = [k for k in want if (got[k].dtype, got[k].shape) != (
      want[k].dtype, want[k].shape) or got[k].tobytes() != want[k].tobytes()]
  assert not different, different[:5]
