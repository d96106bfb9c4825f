"""The training loop: learns, checkpoints, resumes, and replicates exactly."""

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import experiment
from efficientnet_tpu import losses
from efficientnet_tpu import run_dir
from efficientnet_tpu import train as train_lib
from tests.helpers import small_config, strategy_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoothed_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=6)
  got = losses.smoothed_cross_entropy(tf.constant(labels, tf.int32),
                                         tf.constant(logits), 4, 0.1).numpy()
  targets = np.full((6, 4), 0.1 / 4)
  targets[np.arange(6), labels] += 0.9
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(got, -(targets * log_probs).sum(1), rtol=1e-5)


def test_loss_falls_on_a_learnable_task(tmp_path):
  cfg = small_config(tmp_path, train=dict(train_steps=60,
                                          iterations_per_loop=20))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  losses = [trainer.train_loop(20)['loss'] for _ in range(3)]
  assert losses[-1] < 0.6 * losses[0], losses


def _weights(trainer):
  return [v.numpy().copy() for v in trainer.model.variables]


# One device, and replicas (mirrored weights, replica-local BN statistics,
# EMA averages on every replica): 2 take the same code path as more, at a
# fraction of the graph size.
@pytest.mark.parametrize('num_replicas', [1, 2])
def test_trains_checkpoints_and_resumes(tmp_path, num_replicas, caplog):
  cfg = small_config(tmp_path, num_replicas=num_replicas,
                     optimizer=dict(moving_average_decay=0.9))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  # absl's logger gets its level from absl's flags once parsed (other
  # tests parse them): capture INFO from it explicitly.
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO,
                                                      logger='absl'):
    metrics = trainer.train()
  assert trainer.global_step == 4
  assert np.isfinite(metrics['loss'])
  # Progress: the compile is announced and timed apart from the steps, and
  # every loop line says where the run is and when it ends.
  log = [r.getMessage() for r in caplog.records]
  compiling = [i for i, m in enumerate(log)
               if m.startswith('Compiling the training step')]
  compiled = [i for i, m in enumerate(log)
              if m.startswith('Compiled the training step in')]
  loops = [m for m in log if m.startswith('step ')]
  assert len(compiling) == len(compiled) == 1 and compiling < compiled
  assert [m.split(' (')[0] for m in loops] == ['step 2/4', 'step 4/4']
  assert all('/replica) elapsed ' in m for m in loops)
  assert loops[-1].endswith(' ETA 0:00:00')
  assert metrics['eta_s'] == 0 and metrics['elapsed_s'] > 0
  assert metrics['images_per_second_per_replica'] == pytest.approx(
      metrics['images_per_second'] / num_replicas)
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-4')
  assert (tmp_path / 'ckpt-2.index').exists()
  assert (tmp_path / run_dir.CONFIG_FILENAME).exists()
  assert list((tmp_path / 'train').glob('events.out.tfevents.*'))
  saved = _weights(trainer)
  saved_ema = [a.numpy().copy() for a in trainer.ema.averages]

  # A new process-equivalent trainer with a longer schedule resumes at 4.
  cfg = cfg.with_settings(train_steps=6)
  resumed = experiment.build_trainer(cfg, strategy_for(cfg))
  assert resumed.restore() == 4
  for got, want in zip(_weights(resumed), saved):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(resumed.ema.averages, saved_ema):
    np.testing.assert_array_equal(got.numpy(), want)
  resumed.train()
  assert resumed.global_step == 6
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-6')


def test_replicas_match_one_replica_on_the_global_batch(tmp_path):
  """Loss scaling, gradient sum, L2 applied once and global BN, end to end.

  Two replicas: each bug named below already changes the update by a
  factor of 2 (or BN statistics over half the batch)."""
  common = dict(model=dict(bn_group_size=0),
                optimizer=dict(weight_decay=1e-2, optimizer='momentum'),
                train=dict(train_steps=2, iterations_per_loop=2))
  results = []
  for n in (1, 2):
    cfg = small_config(tmp_path / str(n), num_replicas=n, **common)
    trainer = experiment.build_trainer(cfg, strategy_for(cfg))
    if results:  # Same initial weights as the one-replica run.
      for v, w in zip(trainer.model.variables, results[0][0]):
        v.assign(w)
    initial = _weights(trainer)
    metrics = trainer.train_loop(2)
    results.append((initial, _weights(trainer), metrics))
  (initial, one, one_metrics), (_, two, two_metrics) = results
  # Two replicas' sums differ from one device's only in float32 summation
  # order; BN over a few values per channel amplifies that a little. A bug
  # (loss not divided by the global batch, L2 applied per replica, local BN)
  # moves weights by a sizeable fraction of the update instead.
  update = max(np.abs(a - w).max() for a, w in zip(one, initial))
  mismatch = max(np.abs(a - b).max() for a, b in zip(one, two))
  assert update > 1e-2, 'weights did not move'
  assert mismatch < 2e-3 * update, (mismatch, update)
  # The loss (with L2) and the plain cross entropy are over the global
  # batch, whatever the replicas; the L2 term tells them apart.
  for name in ('loss', 'cross_entropy', 'top_1_accuracy'):
    assert two_metrics[name] == pytest.approx(one_metrics[name], rel=1e-4)
  assert one_metrics['loss'] > one_metrics['cross_entropy'] + 1e-4


@pytest.mark.slow
def test_killed_run_resumes_at_its_last_checkpoint(tmp_path):
  model_dir = tmp_path / 'run'
  base = [sys.executable, '-m', 'efficientnet_tpu.main',
          '--preset=cpu_smoke',
          f'--model_dir={model_dir}', '--num_cpu_replicas=1',
          '--bn_group_size=1', '--iterations_per_loop=5', '--mode=train',
          '--width_coefficient=0.1', '--depth_coefficient=0.1',
          '--image_size=16']
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.Popen(base + ['--train_steps=100000'], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while time.time() < deadline:
      ckpt = tf.train.latest_checkpoint(str(model_dir))
      if ckpt and int(ckpt.rsplit('-', 1)[1]) >= 10:
        break
      time.sleep(0.5)
    else:
      pytest.fail('no checkpoint appeared')
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  last = int(tf.train.latest_checkpoint(str(model_dir)).rsplit('-', 1)[1])
  out = subprocess.run(base + [f'--train_steps={last + 5}'], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f'at step {last}' in out.stderr  # "Restored ... at step N"
  final = tf.train.latest_checkpoint(str(model_dir))
  assert final.endswith(f'ckpt-{last + 5}')


def test_progress_line_reads_like_a_person_would_want():
  metrics = dict(epoch=1.5, loss=2.25, top_1_accuracy=0.5,
                 learning_rate=0.125, images_per_second=1000.0,
                 images_per_second_per_replica=250.0, elapsed_s=3725.4,
                 eta_s=59.6)
  assert train_lib.progress_line(30, 90, metrics) == (
      'step 30/90 (epoch 1.50): loss=2.25 top_1=0.5 lr=0.125 '
      'images/s=1000 (250/replica) elapsed 1:02:05 ETA 0:01:00')
  metrics['skipped_records'] = 3
  assert ' skipped_records=3 elapsed' in train_lib.progress_line(30, 90,
                                                                 metrics)


def test_startup_summary_describes_the_run(tmp_path):
  """Against independent sources: the strategy, the config's batch split,
  the built model's parameter count and the schedule's peak."""
  from efficientnet_tpu import schedules  # pylint: disable=g-import-not-at-top
  cfg = small_config(tmp_path, num_replicas=4, model=dict(bn_group_size=2))
  strategy = strategy_for(cfg)
  trainer = experiment.build_trainer(cfg, strategy)
  text = experiment.startup_summary(cfg, strategy, trainer.state, 'train')
  lines = dict(l.split(': ', 1) for l in text.splitlines())
  assert lines['Strategy'].startswith('MirroredStrategy, 4 replicas, 1 host')
  assert lines['Batch'] == ('32 global, 8 per replica; BN groups of 2 '
                            'replica(s) (16 images)')
  assert f'{trainer.model.count_params() / 1e6:.3g}M parameters' in (
      lines['Model'])
  assert lines['Stack'].startswith('Python ')
  assert lines['Memory'].startswith('~') and 'at 8 images per replica' in (
      lines['Memory'])
  peak = schedules.build_learning_rate_schedule(
      cfg.optimizer.schedule, 32, cfg.steps_per_epoch, 4).peak_learning_rate
  assert f'peak LR {peak:.4g}' in lines['Optimizer']
  assert lines['Precision'] == 'float32; XLA: off'
