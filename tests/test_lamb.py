"""Tests of optimizers.LAMB against the paper's algorithm written in numpy."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import optimizers
from efficientnet_tpu.config import ConfigError, OptimizerConfig
from tests.helpers import cpu_replicas, train_custom_loop
from tests.test_optimizers import _apply, _model, _random_grads  # pylint: disable=protected-access
from tests.test_optimizers import assert_round_trip

DEFAULT_EXCLUDE = (r'(^|/)gamma$', r'(^|/)beta$', r'(^|/)bias$')


def np_lamb(weights, grads_per_step, lrs, *, beta_1, beta_2, eps, wd, adapt):
  """Algorithm 2 of arXiv 1904.00962 (bias-corrected, phi(x) = x) in float64.

  Variables with adapt[i] False take the plain Adam step lr * r (no decay,
  no trust ratio).
  """
  w = [np.array(x, np.float64) for x in weights]
  m = [np.zeros_like(x) for x in w]
  v = [np.zeros_like(x) for x in w]
  for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
    for i, g in enumerate(grads):
      g = np.asarray(g, np.float64)
      m[i] = beta_1 * m[i] + (1 - beta_1) * g
      v[i] = beta_2 * v[i] + (1 - beta_2) * g * g
      m_hat = m[i] / (1 - beta_1 ** t)
      v_hat = v[i] / (1 - beta_2 ** t)
      r = m_hat / (np.sqrt(v_hat) + eps)
      if adapt[i]:
        r = r + wd * w[i]
        wn, rn = np.linalg.norm(w[i]), np.linalg.norm(r)
        ratio = wn / rn if wn > 0 and rn > 0 else 1.0
        w[i] = w[i] - lr * ratio * r
      else:
        w[i] = w[i] - lr * r
  return w


def _assert_close(got, want, **kw):
  for i, (g, w) in enumerate(zip(got, want)):
    assert np.all(np.isfinite(g)), i
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=str(i),
                               **kw)


@pytest.mark.parametrize('wd', [0.0, 0.01])
def test_lamb_matches_numpy(wd):
  rng = np.random.default_rng(0)
  model = _model()
  assert [v.path for v in model.trainable_variables] == [
      'fc/kernel', 'fc/bias', 'bn/gamma', 'bn/beta']
  w0 = [v.numpy() for v in model.trainable_variables]
  grads = _random_grads(model, 4, rng)
  schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
      [0, 2], [0.2, 0.1, 0.05])   # step 0: 0.2, steps 1-2: 0.1, step 3: 0.05
  opt = optimizers.LAMB(schedule, beta_1=0.8, beta_2=0.95, epsilon=1e-4,
                        weight_decay=wd)
  got = _apply(opt, model, grads)
  want = np_lamb(w0, grads, [0.2, 0.1, 0.1, 0.05], beta_1=0.8, beta_2=0.95,
                 eps=1e-4, wd=wd, adapt=[True, False, False, False])
  _assert_close(got, want)
  assert opt.excluded_paths() == ['fc/bias', 'bn/gamma', 'bn/beta']
  # The decay acts on the kernel only, and through the trust ratio.
  if wd:
    no_wd = np_lamb(w0, grads, [0.2, 0.1, 0.1, 0.05], beta_1=0.8,
                    beta_2=0.95, eps=1e-4, wd=0.0,
                    adapt=[True, False, False, False])
    assert np.abs(no_wd[0] - got[0]).max() > 1e-4
    for i in (1, 2, 3):
      np.testing.assert_allclose(got[i], no_wd[i], rtol=1e-5, atol=1e-6)


def test_lamb_excluded_variables_are_plain_adam():
  rng = np.random.default_rng(1)
  model = _model()
  w0 = [v.numpy() for v in model.trainable_variables]
  grads = _random_grads(model, 3, rng)
  got = _apply(optimizers.LAMB(0.1, weight_decay=0.1,
                               exclude_from_adaptation=['.*']), model, grads)
  want = np_lamb(w0, grads, [0.1] * 3, beta_1=0.9, beta_2=0.999, eps=1e-6,
                 wd=0.1, adapt=[False] * 4)
  _assert_close(got, want)


def test_lamb_without_decay_matches_keras_lamb_on_adapted_variables():
  # Keras' Lamb shares the trust-ratio update when no decay is involved.
  rng = np.random.default_rng(2)
  model, ref = _model(), _model()
  ref.set_weights(model.get_weights())
  grads = _random_grads(model, 3, rng)
  got = _apply(optimizers.LAMB(0.05, epsilon=1e-6, exclude_from_adaptation=()),
               model, grads)
  want = _apply(keras.optimizers.Lamb(0.05, epsilon=1e-6), ref, grads)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_lamb_custom_exclusion_by_path():
  rng = np.random.default_rng(3)
  model = _model()
  w0 = [v.numpy() for v in model.trainable_variables]
  grads = _random_grads(model, 3, rng)
  opt = optimizers.LAMB(0.1, weight_decay=0.02,
                        exclude_from_adaptation=[r'^fc/kernel$'])
  got = _apply(opt, model, grads)
  want = np_lamb(w0, grads, [0.1] * 3, beta_1=0.9, beta_2=0.999, eps=1e-6,
                 wd=0.02, adapt=[False, True, True, True])
  _assert_close(got, want)


def test_lamb_zero_norms_use_ratio_one():
  rng = np.random.default_rng(4)
  # ||w|| == 0 at the first step (zero kernel, nonzero gradient).
  model = _model(kernel_init='zeros')
  w0 = [v.numpy() for v in model.trainable_variables]
  grads = _random_grads(model, 3, rng)
  got = _apply(optimizers.LAMB(0.05, weight_decay=0.01), model, grads)
  want = np_lamb(w0, grads, [0.05] * 3, beta_1=0.9, beta_2=0.999, eps=1e-6,
                 wd=0.01, adapt=[True, False, False, False])
  _assert_close(got, want)
  one = _model(kernel_init='zeros')
  _apply(optimizers.LAMB(0.05, weight_decay=0.01), one, grads[:1])
  g = grads[0][0].astype(np.float64)
  np.testing.assert_allclose(one.trainable_variables[0].numpy(),
                             -0.05 * g / (np.abs(g) + 1e-6), rtol=1e-5)

  # ||r|| == 0 (zero first gradient, no decay), and both norms zero (zero
  # kernel too): the step is 0, not NaN, and later steps follow the paper.
  for init in ('glorot_uniform', 'zeros'):
    model = _model(kernel_init=init)
    w0 = [v.numpy() for v in model.trainable_variables]
    grads = _random_grads(model, 3, rng)
    grads[0] = [np.zeros_like(x) for x in grads[0]]
    opt = optimizers.LAMB(0.05, weight_decay=0.0)
    after_one = _apply(opt, model, grads[:1])
    for a, b in zip(after_one, w0):
      np.testing.assert_array_equal(a, b)
    for gs in grads[1:]:
      opt.apply_gradients(zip([tf.constant(x) for x in gs],
                              model.trainable_variables))
    got = [v.numpy() for v in model.trainable_variables]
    want = np_lamb(w0, grads, [0.05] * 3, beta_1=0.9, beta_2=0.999,
                   eps=1e-6, wd=0.0, adapt=[True, False, False, False])
    _assert_close(got, want)


def test_lamb_mixed_bfloat16_keeps_float32_weights():
  rng = np.random.default_rng(5)
  inputs = keras.Input((5,))
  outputs = keras.layers.Dense(3, name='fc', dtype='mixed_bfloat16')(inputs)
  model = keras.Model(inputs, outputs)
  w0 = [v.numpy() for v in model.trainable_variables]
  opt = optimizers.LAMB(0.1, weight_decay=1e-2)
  opt.build(model.trainable_variables)
  x = rng.normal(size=(8, 5)).astype(np.float32)
  grads_seen = []
  for _ in range(2):
    with tf.GradientTape() as tape:
      out = model(x)
      assert out.dtype == tf.bfloat16
      loss = tf.reduce_sum(tf.square(tf.cast(out, tf.float32)))
    grads = tape.gradient(loss, model.trainable_variables)
    grads_seen.append([g.numpy() for g in grads])
    opt.apply_gradients(zip(grads, model.trainable_variables))
  assert all(v.dtype == 'float32' for v in model.trainable_variables)
  want = np_lamb(w0, grads_seen, [0.1, 0.1], beta_1=0.9, beta_2=0.999,
                 eps=1e-6, wd=1e-2, adapt=[True, False])
  _assert_close([v.numpy() for v in model.trainable_variables], want)


def test_lamb_bad_arguments_name_themselves():
  for kwargs, name in (
      (dict(exclude_from_adaptation=['(unclosed']), 'exclude_from_adaptation'),
      (dict(beta_1=1.0), 'beta_1'), (dict(beta_2=-0.1), 'beta_2'),
      (dict(epsilon=0.0), 'epsilon'), (dict(weight_decay=-1.0),
                                       'weight_decay')):
    with pytest.raises(ValueError) as e:
      optimizers.LAMB(0.1, **kwargs)
    assert not isinstance(e.value, ConfigError)
    assert str(e.value).startswith(f'{name}: '), e.value
    assert '--' not in str(e.value)


def test_lamb_get_config_round_trip_and_build_lamb():
  opt = optimizers.build_lamb(0.3, beta_1=0.85, beta_2=0.98, epsilon=1e-5,
                              weight_decay=0.02, exclude=[r'bias$'])
  assert isinstance(opt, optimizers.LAMB)
  assert (opt.beta_1, opt.beta_2, opt.epsilon, opt.lamb_weight_decay,
          opt.exclude_from_adaptation) == (0.85, 0.98, 1e-5, 0.02,
                                           (r'bias$',))
  assert optimizers.build_lamb(0.1).exclude_from_adaptation == DEFAULT_EXCLUDE
  assert opt.get_config()['weight_decay'] == 0.02
  assert_round_trip(opt, optimizers.LAMB, seed=6)


def test_lamb_adds_no_l2_loss():
  model = _model()
  cfg = OptimizerConfig(name='momentum', weight_decay=1e-3)
  assert float(optimizers.l2_loss(cfg, model.trainable_variables)) > 0
  cfg = dataclasses.replace(cfg, name='lamb')
  assert optimizers.optimizer_applies_weight_decay(cfg)
  assert float(optimizers.l2_loss(cfg, model.trainable_variables)) == 0.0


# ---- distributed equivalence -----------------------------------------------
GLOBAL_BATCH = 8
NUM_CLASSES = 3


def _conv_model():
  # Seeded: Adam-type steps scale a near-zero gradient up to ~lr, so one
  # whose sum cancels would turn summation-order rounding into a visible
  # difference; these weights and data have none.
  init = keras.initializers.GlorotUniform(seed=0)
  inputs = keras.Input((6, 6, 2))
  x = keras.layers.Conv2D(4, 3, activation='relu', name='conv',
                          kernel_initializer=init)(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dense(NUM_CLASSES, name='head', kernel_initializer=init)(x)
  return keras.Model(inputs, x)


def _train(strategy, init_weights, xs, ys):
  with strategy.scope():
    model = _conv_model()
    model.set_weights(init_weights)
    opt = optimizers.build_lamb(0.05, weight_decay=0.01)
    opt.build(model.trainable_variables)

  train_custom_loop(strategy, model, opt, xs, ys, GLOBAL_BATCH)
  return ([v.numpy() for v in model.trainable_variables],
          int(opt.iterations.numpy()))


def test_lamb_two_replicas_match_one_device_on_the_whole_batch():
  rng = np.random.default_rng(7)
  steps = 3
  xs = [rng.normal(size=(GLOBAL_BATCH, 6, 6, 2)).astype(np.float32)
        for _ in range(steps)]
  ys = [rng.integers(0, NUM_CLASSES, size=(GLOBAL_BATCH,)).astype(np.int32)
        for _ in range(steps)]
  init = _conv_model().get_weights()
  one, it1 = _train(cpu_replicas(1), init, xs, ys)
  two, it2 = _train(cpu_replicas(2), init, xs, ys)
  assert it1 == it2 == steps
  moved = max(np.abs(a - b).max() for a, b in zip(one, init))
  assert moved > 1e-3   # the comparison is not between untouched weights
  for a, b in zip(one, two):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
