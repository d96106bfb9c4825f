"""Tests for efficientnet_tpu.optimizers against independent numpy code."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import distribute
from efficientnet_tpu import optimizers
from efficientnet_tpu.config import ConfigError, OptimizerConfig
from tests.gpu_path import forced_gpu_path
from tests.helpers import cpu_replicas, local_values, train_custom_loop

DEFAULT_EXCLUDE = (r'(^|/)gamma$', r'(^|/)beta$', r'(^|/)bias$')


# ---- numpy references ------------------------------------------------------
def np_lars(weights, grads_per_step, lrs, *, momentum, nesterov, eeta, wd,
            eps, adapt):
  """Reference LARS: weights/grads are lists of arrays, adapt a list of bools."""
  w = [np.array(x, np.float64) for x in weights]
  v = [np.zeros_like(x) for x in w]
  for grads, lr in zip(grads_per_step, lrs):
    for i, g in enumerate(grads):
      g = np.asarray(g, np.float64)
      if adapt[i]:
        wn, gn = np.linalg.norm(w[i]), np.linalg.norm(g)
        if wn > 0 and gn > 0:
          ratio = eeta * wn / (gn + wd * wn + eps)
        else:
          ratio = 1.0
        scaled = (g + wd * w[i]) * lr * ratio
      else:
        scaled = g * lr
      v[i] = momentum * v[i] + scaled
      if nesterov:
        w[i] = w[i] - (momentum * v[i] + scaled)
      else:
        w[i] = w[i] - v[i]
  return w


def np_rmsprop_tf1(weights, grads_per_step, lr, rho, momentum, eps):
  w = [np.array(x, np.float64) for x in weights]
  ms = [np.ones_like(x) for x in w]   # TF1 RMSPropOptimizer starts ms at 1.
  mom = [np.zeros_like(x) for x in w]
  for grads in grads_per_step:
    for i, g in enumerate(grads):
      ms[i] = rho * ms[i] + (1 - rho) * g * g
      mom[i] = momentum * mom[i] + lr * g / np.sqrt(ms[i] + eps)
      w[i] = w[i] - mom[i]
  return w


# ---- helpers ---------------------------------------------------------------
def _model(kernel_init='glorot_uniform'):
  """Dense 'fc' (kernel, bias) + BatchNormalization 'bn' (gamma, beta)."""
  inputs = keras.Input((3,))
  x = keras.layers.Dense(4, name='fc', kernel_initializer=kernel_init,
                         bias_initializer='ones')(inputs)
  x = keras.layers.BatchNormalization(name='bn')(x)
  return keras.Model(inputs, x, name='net')


def _random_grads(model, steps, rng, zero_index=None):
  out = []
  for _ in range(steps):
    gs = [rng.normal(size=v.shape).astype(np.float32)
          for v in model.trainable_variables]
    if zero_index is not None:
      gs[zero_index] = np.zeros_like(gs[zero_index])
    out.append(gs)
  return out


def _apply(opt, model, grads_per_step):
  opt.build(model.trainable_variables)
  for grads in grads_per_step:
    opt.apply_gradients(zip([tf.constant(g) for g in grads],
                            model.trainable_variables))
  return [v.numpy() for v in model.trainable_variables]


# ---- LARS ------------------------------------------------------------------
@pytest.mark.parametrize('momentum,nesterov,wd,eps', [
    (0.9, False, 1e-4, 0.0),
    (0.9, True, 5e-5, 1e-3),
    (0.0, False, 1e-3, 0.0),
])
def test_lars_matches_numpy(momentum, nesterov, wd, eps):
  rng = np.random.default_rng(0)
  model = _model()
  paths = [v.path for v in model.trainable_variables]
  assert paths == ['fc/kernel', 'fc/bias', 'bn/gamma', 'bn/beta']
  w0 = [v.numpy() for v in model.trainable_variables]
  grads = _random_grads(model, 4, rng)
  lrs = [2.0, 1.0, 1.0, 0.5]
  schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
      [0, 2], [2.0, 1.0, 0.5])   # step 0: 2.0, steps 1-2: 1.0, step 3: 0.5
  opt = optimizers.LARS(schedule, momentum=momentum, nesterov=nesterov,
                        eeta=0.002, weight_decay=wd, epsilon=eps)
  got = _apply(opt, model, grads)
  want = np_lars(w0, grads, lrs, momentum=momentum, nesterov=nesterov,
                 eeta=0.002, wd=wd, eps=eps, adapt=[True, False, False, False])
  for g, w, p in zip(got, want, paths):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=p)
  assert opt.excluded_paths() == ['fc/bias', 'bn/gamma', 'bn/beta']


def test_lars_excluded_variables_are_plain_momentum():
  # Excluded variables must get neither the trust ratio nor the decay.
  rng = np.random.default_rng(1)
  model = _model()
  w0 = [v.numpy() for v in model.trainable_variables]
  grads = _random_grads(model, 3, rng)
  opt = optimizers.LARS(0.1, momentum=0.9, weight_decay=0.1)
  got = _apply(opt, model, grads)
  for i in (1, 2, 3):
    v = np.zeros_like(w0[i], np.float64)
    w = w0[i].astype(np.float64)
    for gs in grads:
      v = 0.9 * v + 0.1 * gs[i]
      w = w - v
    np.testing.assert_allclose(got[i], w, rtol=1e-5, atol=1e-6)


def test_lars_custom_exclusion_by_path():
  rng = np.random.default_rng(2)
  model = _model()
  w0 = [v.numpy() for v in model.trainable_variables]
  grads = _random_grads(model, 2, rng)
  # Adapt everything except the kernel (the reverse of the defaults).
  opt = optimizers.LARS(0.5, momentum=0.9, weight_decay=1e-3,
                        exclude_from_adaptation=[r'^fc/kernel$'])
  got = _apply(opt, model, grads)
  want = np_lars(w0, grads, [0.5, 0.5], momentum=0.9, nesterov=False,
                 eeta=0.001, wd=1e-3, eps=0.0,
                 adapt=[False, True, True, True])
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_lars_zero_weight_and_zero_gradient_use_ratio_one():
  rng = np.random.default_rng(3)
  model = _model(kernel_init='zeros')   # ||w|| = 0 at the first step
  w0 = [v.numpy() for v in model.trainable_variables]
  assert not w0[0].any()
  grads = _random_grads(model, 3, rng)
  grads[1][0] = np.zeros_like(grads[1][0])   # ||g|| = 0 at the second step
  opt = optimizers.LARS(0.05, momentum=0.9, weight_decay=1e-2,
                        exclude_from_adaptation=[r'bias$'])
  got = _apply(opt, model, grads)
  want = np_lars(w0, grads, [0.05] * 3, momentum=0.9, nesterov=False,
                 eeta=0.001, wd=1e-2, eps=0.0, adapt=[True, False, True, True])
  for g, w in zip(got, want):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  # After one step at ratio 1 the kernel is exactly -lr * g.
  model2 = _model(kernel_init='zeros')
  opt2 = optimizers.LARS(0.05, momentum=0.9, weight_decay=1e-2)
  _apply(opt2, model2, grads[:1])
  np.testing.assert_allclose(model2.trainable_variables[0].numpy(),
                             -0.05 * grads[0][0], rtol=1e-6)


def test_lars_mixed_bfloat16_keeps_float32_weights():
  rng = np.random.default_rng(4)
  inputs = keras.Input((5,))
  outputs = keras.layers.Dense(3, name='fc', dtype='mixed_bfloat16')(inputs)
  model = keras.Model(inputs, outputs)
  w0 = [v.numpy() for v in model.trainable_variables]
  opt = optimizers.LARS(1.0, momentum=0.9, weight_decay=1e-4)
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
  want = np_lars(w0, grads_seen, [1.0, 1.0], momentum=0.9, nesterov=False,
                 eeta=0.001, wd=1e-4, eps=0.0, adapt=[True, False])
  for g, w in zip(model.trainable_variables, want):
    np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-6)


def _single_line_error(fn, error, start):
  with pytest.raises(error) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg and msg.startswith(start), msg


def test_bad_regex_and_hyperparameters_fail_clearly():
  """The Keras optimizer names its arguments (a plain ValueError, not a
  ConfigError); the config layer names the flags."""
  for kwargs, name in (
      (dict(exclude_from_adaptation=['(unclosed']), 'exclude_from_adaptation'),
      (dict(eeta=0.0), 'eeta'), (dict(momentum=1.0), 'momentum'),
      (dict(epsilon=-1.0), 'epsilon'), (dict(weight_decay=-1.0),
                                        'weight_decay')):
    with pytest.raises(ValueError) as e:
      optimizers.LARS(0.1, **kwargs)
    assert not isinstance(e.value, ConfigError)
    assert str(e.value).startswith(f'{name}: '), e.value
  for kwargs, flag in ((dict(weight_decay_exclude=('(unclosed',)),
                        'weight_decay_exclude'),
                       (dict(lars_eeta=0.0), 'lars_eeta'),
                       (dict(momentum=1.0), 'momentum'),
                       (dict(lars_epsilon=-1.0), 'lars_epsilon'),
                       (dict(optimizer='adam'), 'optimizer')):
    _single_line_error(lambda: OptimizerConfig.from_settings(**kwargs),  # pylint: disable=cell-var-from-loop
                       ConfigError,
                       f'{flag}: ')
  cfg = OptimizerConfig(name='momentum')
  # Past the config's own check (a frozen field, written as __init__ does).
  object.__setattr__(cfg, 'weight_decay_exclude', ('[bad',))
  _single_line_error(lambda: optimizers.l2_loss(cfg, []), ValueError,
                     'weight_decay_exclude: ')


def test_lars_get_config_round_trip():
  opt = optimizers.LARS(0.3, momentum=0.8, nesterov=True, eeta=0.002,
                        weight_decay=2e-4, epsilon=1e-6,
                        exclude_from_adaptation=[r'bias$'])
  cfg = opt.get_config()
  assert cfg['weight_decay'] == 2e-4
  clone = optimizers.LARS.from_config(cfg)
  assert clone.get_config() == cfg
  assert_round_trip(opt, optimizers.LARS, seed=5)


def assert_round_trip(opt, cls, seed):
  """Keras serialization gives `cls` with the same config and updates."""
  cfg = opt.get_config()
  restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
  assert isinstance(restored, cls)
  assert restored.get_config() == cfg
  # Keras' own decoupled decay must stay off: ours decay inside the update.
  assert restored.weight_decay is None
  rng = np.random.default_rng(seed)
  m1, m2 = _model(), _model()
  m2.set_weights(m1.get_weights())
  grads = _random_grads(m1, 2, rng)
  for a, b in zip(_apply(opt, m1, grads), _apply(restored, m2, grads)):
    np.testing.assert_array_equal(a, b)


# ---- build_optimizer / RMSProp / L2 -----------------------------------------
def test_rmsprop_recipe_matches_tf1_rmsprop():
  cfg = OptimizerConfig(name='rmsprop')   # TPU-EN defaults
  opt = optimizers.build_optimizer(cfg, 0.01)
  assert isinstance(opt, optimizers.RMSpropTF1)
  assert (opt.rho, opt.momentum, opt.epsilon) == (0.9, 0.9, 1e-3)
  rng = np.random.default_rng(6)
  model = _model()
  w0 = [v.numpy() for v in model.trainable_variables]
  grads = _random_grads(model, 4, rng)
  got = _apply(opt, model, grads)
  want = np_rmsprop_tf1(w0, grads, 0.01, 0.9, 0.9, 1e-3)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
  assert isinstance(restored, optimizers.RMSpropTF1)


def test_build_optimizer_kinds():
  lars = optimizers.build_optimizer(
      OptimizerConfig.from_settings(
          optimizer='lars', momentum=0.95, nesterov=True,
          lars_eeta=0.002, lars_epsilon=1e-5, weight_decay=3e-5),
      1.0)
  assert isinstance(lars, optimizers.LARS)
  assert (lars.momentum, lars.nesterov, lars.eeta, lars.epsilon,
          lars.lars_weight_decay) == (0.95, True, 0.002, 1e-5, 3e-5)
  assert lars.exclude_from_adaptation == DEFAULT_EXCLUDE
  mom = optimizers.build_optimizer(
      OptimizerConfig(name='momentum', momentum=0.8, nesterov=True), 0.1)
  assert isinstance(mom, keras.optimizers.SGD)
  assert (mom.momentum, mom.nesterov) == (0.8, True)
  sgd = optimizers.build_optimizer(OptimizerConfig(name='sgd'), 0.1)
  assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.0
  for name in ('lars', 'rmsprop', 'momentum', 'sgd'):
    opt = optimizers.build_optimizer(OptimizerConfig(name=name), 0.1)
    assert opt.weight_decay is None   # no hidden decoupled decay anywhere


def test_l2_loss_matches_numpy_and_is_zero_for_lars():
  model = _model()
  cfg = OptimizerConfig(name='momentum', weight_decay=1e-3)
  kernel = model.trainable_variables[0].numpy().astype(np.float64)
  # Only fc/kernel: bias, gamma and beta are excluded by default.
  want = 1e-3 * 0.5 * np.sum(kernel ** 2)
  got = optimizers.l2_loss(cfg, model.trainable_variables)
  assert got.dtype == tf.float32
  assert float(got) == pytest.approx(want, rel=1e-6)
  assert not optimizers.optimizer_applies_weight_decay(cfg)

  everything = dataclasses.replace(cfg, weight_decay_exclude=())
  want_all = 1e-3 * 0.5 * sum(
      np.sum(v.numpy().astype(np.float64) ** 2)
      for v in model.trainable_variables)
  assert float(optimizers.l2_loss(everything, model.trainable_variables)) == (
      pytest.approx(want_all, rel=1e-6))

  lars = dataclasses.replace(cfg, name='lars')
  assert optimizers.optimizer_applies_weight_decay(lars)
  assert float(optimizers.l2_loss(lars, model.trainable_variables)) == 0.0
  no_wd = dataclasses.replace(cfg, weight_decay=0.0)
  assert float(optimizers.l2_loss(no_wd, model.trainable_variables)) == 0.0


# ---- distributed equivalence -----------------------------------------------
GLOBAL_BATCH = 16
NUM_CLASSES = 3


def _conv_model():
  inputs = keras.Input((6, 6, 2))
  x = keras.layers.Conv2D(4, 3, activation='relu', name='conv')(inputs)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dense(NUM_CLASSES, name='head')(x)
  return keras.Model(inputs, x)


def _train(strategy, init_weights, xs, ys, opt_cfg, lr):
  """Custom loop, the convention the integrator must follow (see l2_loss)."""
  with strategy.scope():
    model = _conv_model()
    model.set_weights(init_weights)
    opt = optimizers.build_optimizer(opt_cfg, lr)
    opt.build(model.trainable_variables)
  train_custom_loop(
      strategy, model, opt, xs, ys, GLOBAL_BATCH,
      lambda m: optimizers.l2_loss(opt_cfg, m.trainable_variables))
  return [v.numpy() for v in model.trainable_variables], int(opt.iterations.numpy())


@pytest.mark.parametrize('opt_cfg', [
    OptimizerConfig.from_settings(optimizer='lars', weight_decay=1e-3,
                                  lars_eeta=0.01),
    OptimizerConfig(name='momentum', weight_decay=1e-2),
], ids=['lars', 'momentum_l2'])
def test_four_replicas_match_one_replica(opt_cfg):
  rng = np.random.default_rng(7)
  steps = 3
  xs = [rng.normal(size=(GLOBAL_BATCH, 6, 6, 2)).astype(np.float32)
        for _ in range(steps)]
  ys = [rng.integers(0, NUM_CLASSES, size=(GLOBAL_BATCH,)).astype(np.int32)
        for _ in range(steps)]
  init = _conv_model().get_weights()
  lr = 0.5 if opt_cfg.name == 'lars' else 0.1

  one, it1 = _train(cpu_replicas(1), init, xs, ys, opt_cfg, lr)
  four, it4 = _train(cpu_replicas(4), init, xs, ys, opt_cfg, lr)
  assert it1 == it4 == steps
  moved = max(np.abs(a - b).max() for a, b in zip(one, init))
  assert moved > 1e-3   # the comparison is not between untouched weights
  for a, b in zip(one, four):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---- the first device's update, copied (CPU replicas) -------------------------
def _train_copies(strategy, init_weights, xs, ys, opt):
  """`_train`'s loop with `opt`; every device's copy of the weights and the
  optimizer's variables, as numpy."""
  with strategy.scope():
    model = _conv_model()
    model.set_weights(init_weights)
    opt = opt()
    opt.build(model.trainable_variables)

  train_custom_loop(strategy, model, opt, xs, ys, GLOBAL_BATCH)
  return [local_values(strategy, v.value)
          for v in model.trainable_variables + opt.variables]


@pytest.mark.parametrize('opt', [
    lambda: optimizers.LARS(0.5, momentum=0.9, eeta=0.01, weight_decay=1e-3),
    lambda: optimizers.LARS(0.5, momentum=0.0, nesterov=False, eeta=0.01),
    lambda: optimizers.LAMB(0.01, weight_decay=1e-2),
], ids=['lars', 'lars_no_momentum', 'lamb'])
def test_copied_update_is_bitwise_the_per_device_update(opt, monkeypatch):
  # The previous formulation (every device computes its own update) is the
  # reference: the copies must hold the same bits on every device.
  rng = np.random.default_rng(3)
  xs = [rng.normal(size=(GLOBAL_BATCH, 6, 6, 2)).astype(np.float32)
        for _ in range(2)]
  ys = [rng.integers(0, NUM_CLASSES, size=(GLOBAL_BATCH,)).astype(np.int32)
        for _ in range(2)]
  init = _conv_model().get_weights()
  copied = []
  first_device_copy = optimizers.first_device_copy

  def counting(container, component):
    first = first_device_copy(container, component)
    copied.append(first is not None)
    return first

  monkeypatch.setattr(optimizers, 'first_device_copy', counting)
  new = _train_copies(cpu_replicas(2), init, xs, ys, opt)
  # One device of two copied every variable's update (4 variables).
  assert copied.count(True) == copied.count(False) == 4
  monkeypatch.setattr(optimizers, 'first_device_copy', lambda *a: None)
  old = _train_copies(cpu_replicas(2), init, xs, ys, opt)
  assert len(new) == len(old) > 4
  moved = max(np.abs(copies[0] - w).max() for copies, w in zip(new, init))
  for new_copies, old_copies in zip(new, old):
    for a, b in zip(new_copies + old_copies, old_copies * 2):
      np.testing.assert_array_equal(a, b)
  assert moved > 1e-4


def test_only_logical_cpu_replicas_copy_the_first_devices_update():
  # Several logical CPU devices of one host: the copy path.
  assert distribute.on_host_cpus(cpu_replicas(2))
  # One device, the default strategy, and TF's all-GPU path (forced on CPU
  # devices as the GPU tests do): every device computes its own update.
  assert not distribute.on_host_cpus(cpu_replicas(1))
  assert not distribute.on_host_cpus(tf.distribute.get_strategy())
  with forced_gpu_path():
    assert not distribute.on_host_cpus(cpu_replicas(2))
    assert distribute.host_cpu_copies(cpu_replicas(2), tf.Variable(1.0)) is None
