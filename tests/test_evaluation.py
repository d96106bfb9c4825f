"""Sharded eval on 8 replicas equals a single-device pass over the data."""

import json

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import evaluation
from efficientnet_tpu import experiment
from efficientnet_tpu import run_dir
from efficientnet_tpu.data import pipeline as data_pipeline
from tests.helpers import small_config, strategy_for


def _single_device_metrics(trainer):
  """Top-1/top-5 of the model over every eval image, one device, numpy."""
  cfg = trainer.cfg
  n = cfg.data.num_eval_images
  eval_input = data_pipeline.make_input(
      cfg.data, cfg.model.num_label_classes, cfg.model.image_size, False, n)
  batch = next(iter(eval_input.fn(tf.distribute.InputContext())))
  assert batch['mask'].numpy().sum() == n
  logits = trainer.model(trainer.normalize(batch['images']),
                         training=False).numpy()
  labels = batch['labels'].numpy()
  order = np.argsort(-logits, axis=1)
  return {'top_1_accuracy': np.mean(order[:, 0] == labels),
          'top_5_accuracy': np.mean((order[:, :5] == labels[:, None])
                                    .any(axis=1)),
          'num_examples': n}


def test_eight_replica_eval_is_exact_for_uneven_sizes(tmp_path):
  # 75 images, global batch 16 over 8 replicas: 5 steps, 5 padded slots.
  cfg = small_config(tmp_path, num_replicas=8,
                     data=dict(num_eval_images=75),
                     train=dict(eval_batch_size=16),
                     model=dict(num_label_classes=10))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  # Move BN statistics off their initial values so predictions vary.
  for layer in trainer.model.layers:
    if hasattr(layer, 'moving_mean'):
      layer.moving_mean.assign(
          np.random.default_rng(0).normal(size=layer.moving_mean.shape))
  evaluator = experiment.evaluator_for(trainer)
  got = evaluator.evaluate()
  want = _single_device_metrics(trainer)
  assert got['num_examples'] == 75
  for k in ('top_1_accuracy', 'top_5_accuracy'):
    assert abs(got[k] - want[k]) < 1e-6, (k, got[k], want[k])
  assert 0.0 < want['top_5_accuracy'] < 1.0


def test_eval_uses_ema_weights_and_leaves_training_weights(tmp_path):
  cfg = small_config(tmp_path, num_replicas=2,
                     optimizer=dict(moving_average_decay=0.5))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  evaluator = experiment.evaluator_for(trainer)
  rng = np.random.default_rng(1)
  for v in trainer.model.trainable_variables:
    v.assign(v + rng.normal(scale=0.5, size=v.shape).astype(np.float32))
  trained = [v.numpy().copy() for v in trainer.model.variables]
  got = evaluator.evaluate()
  for v, w in zip(trainer.model.variables, trained):
    np.testing.assert_array_equal(v.numpy(), w)
  # Reference: the same model carrying the averages (= initial weights).
  for v, a in zip(trainer.ema.model_variables, trainer.ema.averages):
    v.assign(a)
  want = _single_device_metrics(trainer)
  assert abs(got['top_1_accuracy'] - want['top_1_accuracy']) < 1e-6


def test_records_results_and_keeps_best_checkpoint(tmp_path):
  cfg = small_config(tmp_path, num_replicas=1)
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  evaluator = experiment.evaluator_for(trainer)
  evaluator.evaluate_and_record(step=3)
  evaluator.evaluate_and_record(step=4)
  lines = (tmp_path / run_dir.RESULTS_FILENAME).read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [3, 4]
  best = json.loads((tmp_path / 'best' / run_dir.BEST_FILENAME)
                    .read_text())
  # Same weights both times: the first stays best (ties do not replace).
  assert best['step'] == 3
  assert tf.train.latest_checkpoint(str(tmp_path / 'best')).endswith('best-3')
  assert (tmp_path / 'eval').is_dir()


def test_eval_time_excludes_tracing(tmp_path, monkeypatch):
  """The eval's time and images/s leave its one-time tracing out: a clock
  that jumps by 1000 s whenever the eval loop has been traced once more
  shows which interval each figure spans."""
  cfg = small_config(tmp_path, num_replicas=1)
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  evaluator = experiment.evaluator_for(trainer)
  ticks = []

  def clock():
    loop = evaluator._eval_loop_fn  # pylint: disable=protected-access
    traced = loop.experimental_get_tracing_count() if loop else 0
    ticks.append(None)
    return 1000.0 * traced + 0.001 * len(ticks)

  monkeypatch.setattr(evaluation.time, 'time', clock)
  first = evaluator.evaluate()
  assert first['eval_compile_time_s'] > 1000
  assert first['eval_time_s'] < 1
  assert first['eval_images_per_second'] == pytest.approx(
      first['num_examples'] / first['eval_time_s'])
  second = evaluator.evaluate()
  assert 'eval_compile_time_s' not in second and second['eval_time_s'] < 1
  assert second['top_1_accuracy'] == first['top_1_accuracy']


def test_continuous_eval_follows_checkpoints_until_training_ends(tmp_path):
  cfg = small_config(tmp_path, num_replicas=1)
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  trainer.train()  # Checkpoints at steps 2 and 4 (= total_steps).
  # A separate evaluator process would build its own trainer: do the same.
  eval_trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  metrics = evaluation.continuous_eval(
      eval_trainer.state, experiment.evaluator_for(eval_trainer),
      cfg.train.model_dir, eval_trainer.total_steps, timeout=5)
  assert eval_trainer.global_step == 4
  assert metrics['num_examples'] == cfg.data.num_eval_images
  steps = [json.loads(l)['step'] for l in
           (tmp_path / run_dir.RESULTS_FILENAME).read_text().splitlines()]
  assert steps[-1] == 4
  # timeout 0: evaluate the latest checkpoint once and return.
  again = evaluation.continuous_eval(
      eval_trainer.state, experiment.evaluator_for(eval_trainer),
      cfg.train.model_dir, eval_trainer.total_steps, timeout=0)
  assert again['top_1_accuracy'] == metrics['top_1_accuracy']
