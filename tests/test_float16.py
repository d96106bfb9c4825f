"""float16 mixed precision with dynamic loss scaling (loss_scale.py).

The skip decision is checked against gradients made non-finite on purpose
(on one replica only), the updates against numpy and the float32 trainer,
and the scale against the halve / double rule.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import experiment
from efficientnet_tpu import loss_scale as loss_scale_lib
from efficientnet_tpu import model as model_lib
from efficientnet_tpu import optimizers
from efficientnet_tpu.config import ConfigError, OptimizerConfig
from efficientnet_tpu.data import preprocessing
from tests.helpers import cpu_replicas
from tests.helpers import per_replica
from tests.helpers import small_config
from tests.helpers import strategy_for


def _one_step(strategy, opt_name, grads_per_replica, growth_interval=3):
  """One `DynamicLossScale.apply_gradients` of per-replica grads [2]."""
  with strategy.scope():
    var = keras.Variable(np.array([1.0, -2.0], np.float32), name='w')
    opt = optimizers.build_optimizer(
        OptimizerConfig(name=opt_name, weight_decay=0.0), 0.1)
    opt.build([var])
    scale = loss_scale_lib.DynamicLossScale(initial_scale=8.0,
                                            growth_interval=growth_interval)
  grads = per_replica(strategy, [np.asarray(g, np.float32)
                                 for g in grads_per_replica])

  @tf.function
  def step(g):
    return strategy.run(
        lambda g: scale.apply_gradients(opt, [g], [var]), args=(g,))

  before = [v.numpy().copy() for v in opt.variables]
  finite = step(grads)
  return var, opt, scale, before, finite


@pytest.mark.parametrize('opt_name', ['lars', 'lamb', 'rmsprop', 'momentum'])
def test_overflow_on_one_replica_skips_the_step_everywhere(opt_name):
  strategy = cpu_replicas(2)
  var, opt, scale, before, finite = _one_step(
      strategy, opt_name, [[0.5, 0.25], [np.inf, 0.25]])
  assert not any(np.asarray(f) for f in
                 strategy.experimental_local_results(finite))
  # Weights and every slot untouched, on both replicas; the step counted.
  for v in strategy.experimental_local_results(var.value):
    np.testing.assert_array_equal(v.numpy(), [1.0, -2.0])
  assert int(opt.iterations.numpy()) == 1
  for b, v in zip(before[1:], opt.variables[1:]):
    np.testing.assert_array_equal(v.numpy(), b)
  assert float(scale.scale.numpy()) == 4.0
  assert int(scale.good_steps.numpy()) == 0


def test_finite_step_applies_the_summed_gradient():
  strategy = cpu_replicas(2)
  g0, g1 = np.array([0.5, 0.25]), np.array([-0.125, 1.0])
  var, opt, scale, _, finite = _one_step(strategy, 'sgd', [g0, g1])
  assert all(np.asarray(f) for f in
             strategy.experimental_local_results(finite))
  expected = np.array([1.0, -2.0]) - 0.1 * (g0 + g1)  # SUM all-reduce.
  for v in strategy.experimental_local_results(var.value):
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6)
  assert int(opt.iterations.numpy()) == 1
  assert float(scale.scale.numpy()) == 8.0
  assert int(scale.good_steps.numpy()) == 1


def test_scale_doubles_after_growth_interval_good_steps():
  strategy = cpu_replicas(1)
  with strategy.scope():
    var = keras.Variable(np.zeros(2, np.float32))
    opt = keras.optimizers.SGD(0.1)
    opt.build([var])
    scale = loss_scale_lib.DynamicLossScale(initial_scale=8.0,
                                            growth_interval=2)

  @tf.function
  def step(g):
    return strategy.run(
        lambda g: scale.apply_gradients(opt, [g], [var]), args=(g,))

  bad, good = tf.constant([np.nan, 0.0]), tf.constant([1.0, 1.0])
  # Reference: halve on a bad step, double after 2 good ones in a row.
  expected, run = 8.0, 0
  for g in (good, good, good, bad, good, good, good):
    step(g)
    if np.all(np.isfinite(g.numpy())):
      run += 1
      if run == 2:
        expected, run = expected * 2, 0
    else:
      expected, run = expected / 2, 0
    assert float(scale.scale.numpy()) == expected
  assert int(opt.iterations.numpy()) == 7
  np.testing.assert_allclose(var.numpy(), -0.1 * 6 * np.ones(2), rtol=1e-6)


def test_bad_arguments_name_themselves():
  with pytest.raises(ValueError, match='initial_scale'):
    loss_scale_lib.DynamicLossScale(initial_scale=0.0)
  with pytest.raises(ValueError, match='growth_interval'):
    loss_scale_lib.DynamicLossScale(growth_interval=0)


def test_config_refuses_two_precisions_and_float16_on_tpu(tmp_path):
  with pytest.raises(ConfigError, match='^use_float16: .*use_bfloat16'):
    small_config(tmp_path, model=dict(use_float16=True, use_bfloat16=True))
  with pytest.raises(ConfigError, match='^use_float16: .*use_bfloat16'):
    small_config(tmp_path, model=dict(use_float16=True),
                 distribute=dict(strategy='tpu', tpu='local'))


def _weights(trainer):
  return [v.numpy().copy() for v in trainer.model.trainable_variables]


def test_trainer_float16_skips_overflows_adapts_and_checkpoints(tmp_path):
  cfg = small_config(tmp_path, num_replicas=2, model=dict(use_float16=True),
                     train=dict(train_steps=40, iterations_per_loop=1))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  ls = trainer.state.loss_scale
  assert trainer.model.layers[1].compute_dtype == 'float16'
  # 2^16 overflows this model's float16 gradients (2^12 does not); 2 good
  # steps in a row double the scale.
  ls.scale.assign(2.0 ** 16)
  ls.growth_interval = 2
  history = []
  for _ in range(7):
    w0, s0 = _weights(trainer), float(ls.scale.numpy())
    step0 = trainer.global_step
    trainer.train_loop(1)
    w1, s1 = _weights(trainer), float(ls.scale.numpy())
    assert trainer.global_step == step0 + 1
    assert all(np.isfinite(w).all() for w in w1)
    moved = any(not np.array_equal(a, b) for a, b in zip(w0, w1))
    if s1 == s0 / 2:  # Skipped: nothing moved.
      assert not moved
    else:
      assert moved and s1 in (s0, 2 * s0)
    history.append(s1 / s0)
  assert history[0] == 0.5  # The first steps overflow ...
  assert 1.0 in history or 2.0 in history  # ... until the scale fits.
  assert float(ls.scale.numpy()) < 2.0 ** 16
  saved = (float(ls.scale.numpy()), int(ls.good_steps.numpy()))
  trainer.save_checkpoint()

  resumed = experiment.build_trainer(cfg, strategy_for(cfg))
  assert float(resumed.state.loss_scale.scale.numpy()) == 2.0 ** 15
  assert resumed.restore() == 7
  assert (float(resumed.state.loss_scale.scale.numpy()),
          int(resumed.state.loss_scale.good_steps.numpy())) == saved


def test_first_float16_update_is_close_to_float32(tmp_path):
  cfg = small_config(tmp_path, model=dict(use_float16=True),
                     optimizer=dict(optimizer='sgd', weight_decay=0.0),
                     train=dict(iterations_per_loop=1))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  trainer.state.loss_scale.scale.assign(2.0 ** 10)
  w0 = _weights(trainer)
  trainer.train_loop(1)
  assert float(trainer.state.loss_scale.scale.numpy()) == 2.0 ** 10
  got = [b - a for a, b in zip(w0, _weights(trainer))]

  # Reference: one float32 SGD step, -lr * grad of the mean cross-entropy,
  # on the same batch and weights.
  ref_model = model_lib.build_model(
      dataclasses.replace(cfg.model, use_float16=False))
  ref_model.set_weights([v.numpy() for v in trainer.model.variables])
  for v, w in zip(ref_model.trainable_variables, w0):
    v.assign(w)
  batch = next(iter(experiment.train_input(cfg)(0).fn(
      tf.distribute.InputContext())))
  with tf.GradientTape() as tape:
    logits = ref_model(preprocessing.normalize(batch['images']),
                       training=True)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        batch['labels'], logits))
  grads = tape.gradient(loss, ref_model.trainable_variables)
  want = np.concatenate([(-0.1 * g.numpy()).ravel() for g in grads])
  got = np.concatenate([u.ravel() for u in got])
  assert np.linalg.norm(want) > 1e-3  # A real update, not two zeros.
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 0.05, rel  # float16 rounding: ~3% here.
