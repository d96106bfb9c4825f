"""Tests for efficientnet_tpu.layers on 8 logical CPU replicas.

References are written here: a float64 batch norm on the concatenation of
each replica group's batches (single device, tf.GradientTape for gradients)
and numpy formulas for the moving statistics and stochastic depth.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks import bn_variants
from efficientnet_tpu import collectives
from efficientnet_tpu import layers
from efficientnet_tpu import model as model_lib
from efficientnet_tpu.config import ModelConfig
from tests.helpers import cpu_replicas, local_values, per_replica

R = 8
SHAPE = (4, 4, 4, 8)  # per-replica batch, H, W, C
C = SHAPE[-1]
EPS = 1e-3
MOMENTUM = 0.9


@pytest.fixture(scope='module')
def strategy():
  return cpu_replicas(R)


def _groups(g):
  return np.arange(R).reshape(-1, g)


def _reference_bn(x, w, gamma, beta):
  """float64 BN of the concatenated batch x, loss sum(y * w) and its grads."""
  x = tf.constant(x, tf.float64)
  gamma = tf.Variable(gamma.astype(np.float64))
  beta = tf.Variable(beta.astype(np.float64))
  with tf.GradientTape() as tape:
    tape.watch(x)
    mean = tf.reduce_mean(x, axis=[0, 1, 2])
    var = tf.reduce_mean(tf.square(x - mean), axis=[0, 1, 2])
    y = (x - mean) / tf.sqrt(var + EPS) * gamma + beta
    loss = tf.reduce_sum(y * w)
  gx, gg, gb = tape.gradient(loss, [x, gamma, beta])
  return (y.numpy(), gx.numpy(), gg.numpy(), gb.numpy(), mean.numpy(),
          var.numpy())


def _make_layer(strategy, g, rng, dtype='float32'):
  with strategy.scope():
    layer = layers.GroupSyncBatchNormalization(
        group_size=g, momentum=MOMENTUM, epsilon=EPS, dtype=dtype)
    layer.build((None,) + SHAPE[1:])
    layer.gamma.assign(rng.uniform(0.5, 1.5, C).astype(np.float32))
    layer.beta.assign(rng.normal(size=C).astype(np.float32))
  return layer


def _sync(strategy, layer):
  """What the trainer does before a checkpoint, eval or export."""
  collectives.replica_mean_assigner(
      strategy, [layer.moving_mean, layer.moving_variance])()


def _data(rng, steps=None):
  shape = (R,) + ((steps,) if steps else ()) + SHAPE
  # Per-channel offsets and scales so that the statistics matter.
  x = rng.normal(size=shape) * rng.uniform(0.5, 3, C) + rng.normal(size=C) * 2
  return x.astype(np.float32)


@pytest.mark.parametrize('g', [1, 2, 4, 8, 0])
def test_training_step_matches_concatenated_group_batch(strategy, g):
  rng = np.random.default_rng(g)
  layer = _make_layer(strategy, g, rng)
  gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
  x = _data(rng)
  w = rng.normal(size=(R,) + SHAPE).astype(np.float32)

  @tf.function
  def step(x, w):
    def fn(x, w):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * w)
      gx, gg, gb = tape.gradient(loss, [x, layer.gamma, layer.beta])
      return y, gx, gg, gb
    return strategy.run(fn, args=(x, w))

  y, gx, gg, gb = [local_values(strategy, t) for t in step(
      per_replica(strategy, x), per_replica(strategy, w))]

  group_means, group_vars = [], []
  for members in _groups(g or R):
    ref_y, ref_gx, ref_gg, ref_gb, mean, var = _reference_bn(
        np.concatenate(x[members]), np.concatenate(w[members]), gamma, beta)
    group_means.append(mean)
    group_vars.append(var)
    n = SHAPE[0]
    for k, r in enumerate(members):
      np.testing.assert_allclose(y[r], ref_y[k * n:(k + 1) * n], atol=1e-4)
      np.testing.assert_allclose(gx[r], ref_gx[k * n:(k + 1) * n],
                                 atol=1e-4, rtol=1e-4)
    # Each replica's gamma/beta gradient is that of its own loss term; the
    # group's sum is the gradient of the concatenated computation.
    np.testing.assert_allclose(sum(gg[r] for r in members), ref_gg,
                               atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(sum(gb[r] for r in members), ref_gb,
                               atol=1e-3, rtol=1e-4)

  # Before synchronization each replica's moving statistics took one step
  # toward its own group's statistics, with no communication.
  for r, mm in enumerate(local_values(strategy, layer.moving_mean.value)):
    np.testing.assert_allclose(mm, (1 - MOMENTUM) * group_means[r // (g or R)],
                               rtol=1e-5, atol=1e-6, err_msg=f'replica {r}')
  _sync(strategy, layer)
  # One step of EMA from (0, 1) toward the mean of the group statistics.
  want_mean = (1 - MOMENTUM) * np.mean(group_means, 0)
  want_var = MOMENTUM + (1 - MOMENTUM) * np.mean(group_vars, 0)
  for r, (mm, mv) in enumerate(zip(
      local_values(strategy, layer.moving_mean.value),
      local_values(strategy, layer.moving_variance.value))):
    np.testing.assert_allclose(mm, want_mean, rtol=1e-5, atol=1e-6,
                               err_msg=f'replica {r}')
    np.testing.assert_allclose(mv, want_var, rtol=1e-5, atol=1e-6,
                               err_msg=f'replica {r}')


@pytest.mark.parametrize('g', [1, 2, 8])
def test_several_steps_in_one_function_keep_moving_stats_identical(
    strategy, g):
  steps = 3
  rng = np.random.default_rng(10 + g)
  layer = _make_layer(strategy, g, rng)
  gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
  x = _data(rng, steps)

  @tf.function
  def run(x):
    for i in tf.range(steps):
      strategy.run(lambda x, i: layer(x[i], training=True), args=(x, i))

  run(per_replica(strategy, x))
  _sync(strategy, layer)

  want_mean, want_var = np.zeros(C), np.ones(C)
  for s in range(steps):
    stats = [_reference_bn(np.concatenate(x[m, s]), 0.0, gamma, beta)[4:]
             for m in _groups(g)]
    want_mean = MOMENTUM * want_mean + (1 - MOMENTUM) * np.mean(
        [st[0] for st in stats], 0)
    want_var = MOMENTUM * want_var + (1 - MOMENTUM) * np.mean(
        [st[1] for st in stats], 0)
  mms = local_values(strategy, layer.moving_mean.value)
  mvs = local_values(strategy, layer.moving_variance.value)
  for r in range(R):
    # Bit-identical on every replica, not merely close.
    np.testing.assert_array_equal(mms[r], mms[0])
    np.testing.assert_array_equal(mvs[r], mvs[0])
  np.testing.assert_allclose(mms[0], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mvs[0], want_var, rtol=1e-5, atol=1e-6)

  # Inference normalizes with the moving statistics, on every replica.
  y = local_values(strategy, strategy.run(
      tf.function(lambda x: layer(x[0], training=False)),
      args=(per_replica(strategy, x),)))
  for r in range(R):
    want = (x[r, 0] - want_mean) / np.sqrt(want_var + EPS) * gamma + beta
    np.testing.assert_allclose(y[r], want, atol=1e-4, rtol=1e-4)


def test_moving_stats_are_replica_local_until_synchronized(strategy):
  """Local BN: no collective per step; one all-reduce MEAN on demand."""
  rng = np.random.default_rng(3)
  x = _data(rng)
  with strategy.scope():
    ours = layers.make_batch_norm(
        layers.BatchNormSpec(momentum=MOMENTUM), 'bn2')
    ours.build((None,) + SHAPE[1:])
    # The benchmarks' variant: moving statistics all-reduced every step.
    per_step = bn_variants.group_step_sync(
        layers.BatchNormSpec(momentum=MOMENTUM), 'bn3')
    per_step.build((None,) + SHAPE[1:])
  assert isinstance(ours, layers.GroupSyncBatchNormalization)

  @tf.function
  def step(x):
    strategy.run(lambda x: (ours(x, training=True),
                            per_step(x, training=True)), args=(x,))

  step(per_replica(strategy, x))
  local = local_values(strategy, ours.moving_mean.value)
  for r in range(R):
    np.testing.assert_allclose(
        local[r], (1 - MOMENTUM) * x[r].mean(axis=(0, 1, 2)), rtol=1e-5,
        atol=1e-6)
  _sync(strategy, ours)
  mine = local_values(strategy, ours.moving_mean.value)
  theirs = local_values(strategy, per_step.moving_mean.value)
  want = (1 - MOMENTUM) * x.mean(axis=(0, 1, 2, 3))
  for r in range(R):
    np.testing.assert_array_equal(mine[r], mine[0])
    np.testing.assert_allclose(theirs[r], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mine[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('g', [2, 8])
def test_bfloat16_input(strategy, g):
  rng = np.random.default_rng(20 + g)
  layer = _make_layer(strategy, g, rng, dtype='mixed_bfloat16')
  gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
  x = tf.cast(_data(rng), tf.bfloat16).numpy()
  x32 = x.astype(np.float32)

  @tf.function
  def step(x):
    return strategy.run(lambda x: layer(x, training=True), args=(x,))

  y = local_values(strategy, step(per_replica(strategy, x)))
  assert y[0].dtype == tf.bfloat16.as_numpy_dtype
  for members in _groups(g):
    ref_y, _, _, _, _, _ = _reference_bn(
        np.concatenate(x32[members]), 0.0, gamma, beta)
    got = np.concatenate([y[r] for r in members]).astype(np.float32)
    # bfloat16 has 8 bits of mantissa: |y| up to ~5 -> ~0.03 resolution.
    np.testing.assert_allclose(got, ref_y, atol=5e-2, rtol=1e-2)
  _sync(strategy, layer)
  mms = local_values(strategy, layer.moving_mean.value)
  assert mms[0].dtype == np.float32
  for r in range(R):
    np.testing.assert_array_equal(mms[r], mms[0])
  want = (1 - MOMENTUM) * x32.mean(axis=(0, 1, 2, 3))
  np.testing.assert_allclose(mms[0], want, rtol=1e-5, atol=1e-5)


def test_outside_replica_context_is_plain_batch_norm():
  rng = np.random.default_rng(4)
  layer = layers.GroupSyncBatchNormalization(group_size=8, momentum=MOMENTUM,
                                             epsilon=EPS)
  x = _data(rng)[0]
  y = layer(x, training=True).numpy()
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + EPS), atol=1e-4)
  np.testing.assert_allclose(layer.moving_mean.numpy(),
                             (1 - MOMENTUM) * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer.moving_variance.numpy(),
                             MOMENTUM + (1 - MOMENTUM) * var, rtol=1e-5)
  y_inf = layer(x, training=False).numpy()
  np.testing.assert_allclose(
      y_inf, (x - layer.moving_mean.numpy()) /
      np.sqrt(layer.moving_variance.numpy() + EPS), atol=1e-4)


def test_group_size_must_divide_replicas(strategy):
  layer = _make_layer(strategy, 3, np.random.default_rng(0))

  @tf.function
  def step(x):
    return strategy.run(lambda x: layer(x, training=True), args=(x,))

  # Raised at trace time; autograph wraps it in a StagingError.
  with pytest.raises(Exception, match='group_size: expected a divisor'):
    step(per_replica(strategy, _data(np.random.default_rng(0))))


def test_factory_settings_and_benchmark_variants():
  cfg = ModelConfig(batch_norm_momentum=0.95, batch_norm_epsilon=1e-4,
                    use_bfloat16=True, width_coefficient=0.1,
                    depth_coefficient=0.1, image_size=16)
  # The config reaches the layers through model.build_model alone.
  built = [l for l in model_lib.build_model(cfg, bn_group_size=4).layers
           if isinstance(l, layers.GroupSyncBatchNormalization)]
  assert built and {(l.group_size, l.momentum, l.epsilon, l.compute_dtype)
                    for l in built} == {(4, 0.95, 1e-4, 'bfloat16')}
  spec = layers.BatchNormSpec(momentum=0.95, epsilon=1e-4, group_size=4,
                              dtype='mixed_bfloat16')
  bn = layers.make_batch_norm(spec, 'x')
  assert isinstance(bn, layers.GroupSyncBatchNormalization)
  assert (bn.group_size, bn.momentum, bn.epsilon) == (4, 0.95, 1e-4)
  assert bn.compute_dtype == 'bfloat16' and bn.variable_dtype == 'float32'
  sync = bn_variants.batch_norm_fn('keras_sync')(spec, 'y')
  assert sync.synchronized
  assert (sync.momentum, sync.epsilon) == (0.95, 1e-4)
  assert sync.compute_dtype == 'bfloat16'
  with pytest.raises(ValueError, match='batch_norm_fn'):
    bn_variants.batch_norm_fn('nope')


def test_build_model_takes_every_bn_layer_from_batch_norm_fn():
  cfg = ModelConfig(width_coefficient=0.25, depth_coefficient=0.1,
                    image_size=32, num_label_classes=10)

  def bn_types(model):
    return [type(l) for l in model.layers if l.name.endswith('bn')]

  ours = bn_types(model_lib.build_model(cfg, bn_group_size=2))
  theirs = bn_types(model_lib.build_model(
      cfg, batch_norm_fn=bn_variants.batch_norm_fn('keras')))
  assert ours and set(ours) == {layers.GroupSyncBatchNormalization}
  assert theirs == [keras.layers.BatchNormalization] * len(ours)


def test_stochastic_depth_statistics():
  rate = 0.3
  layer = layers.StochasticDepth(rate)
  n = 20000
  x = np.random.default_rng(5).uniform(1, 2, (n, 2, 2, 3)).astype(np.float32)
  y = layer(x, training=True).numpy()
  ratio = y / x
  # Whole examples are dropped or scaled by 1 / survival.
  per_example = ratio.reshape(n, -1)
  assert np.allclose(per_example, per_example[:, :1])
  kept = per_example[:, 0] > 0
  np.testing.assert_allclose(per_example[kept, 0], 1 / (1 - rate), rtol=1e-6)
  np.testing.assert_allclose(per_example[~kept, 0], 0)
  # Drop fraction ~ rate (binomial std ~0.0032) and mean preserved.
  assert abs((~kept).mean() - rate) < 0.02
  np.testing.assert_allclose(y.mean(), x.mean(), rtol=0.03)
  np.testing.assert_array_equal(layer(x, training=False).numpy(), x)
  xb = tf.cast(x[:8], tf.bfloat16)
  assert layers.StochasticDepth(rate, dtype='mixed_bfloat16')(
      xb, training=True).dtype == tf.bfloat16


@pytest.mark.parametrize('make, shape', [
    (lambda: layers.ReplicaDropout(0.5), (16, 32)),
    (lambda: layers.StochasticDepth(0.5), (512, 2, 2, 1)),
])
def test_masks_differ_across_replicas_and_calls(strategy, make, shape):
  """Every replica draws its own mask (keras.layers.Dropout shares one)."""
  with strategy.scope():
    layer = make()

  @tf.function
  def step():
    return strategy.run(lambda: layer(tf.ones(shape), training=True))

  calls = [np.stack(local_values(strategy, step()))
           for _ in range(2)]
  for out in calls:
    # Inverted dropout of ones: 0 or 1 / (1 - 0.5).
    assert set(np.unique(out)) <= {0.0, 2.0}
    keep = out.reshape(R, -1) > 0
    # 512 Bernoulli(0.5) draws per replica: std 0.022.
    np.testing.assert_allclose(keep.mean(1), 0.5, atol=0.1)
    for i in range(R):
      for j in range(i):
        # Independent masks agree on ~half the draws, never on all.
        assert np.mean(keep[i] == keep[j]) < 0.65, (i, j)
  first, second = (c.reshape(R, -1) > 0 for c in calls)
  assert np.all(np.mean(first == second, axis=1) < 0.65)


def test_replica_dropout_statistics_and_config():
  rate = 0.2
  layer = layers.ReplicaDropout(rate, seed=3)
  x = np.random.default_rng(7).uniform(1, 2, (400, 50)).astype(np.float32)
  y = layer(x, training=True).numpy()
  kept = y != 0
  np.testing.assert_allclose(y[kept], x[kept] / (1 - rate), rtol=1e-6)
  # 20000 draws: binomial std of the drop fraction ~0.003.
  assert abs((~kept).mean() - rate) < 0.015
  np.testing.assert_array_equal(layer(x, training=False).numpy(), x)
  clone = layers.ReplicaDropout.from_config(layer.get_config())
  assert (clone.rate, clone.seed) == (rate, 3)
  depth = layers.StochasticDepth.from_config(
      layers.StochasticDepth(0.25, seed=1).get_config())
  assert (depth.drop_rate, depth.seed) == (0.25, 1)
  with pytest.raises(ValueError, match=r'ReplicaDropout: expected a drop '
                     r'rate in \[0, 1\), got 1'):
    layers.ReplicaDropout(1.0)


def test_squeeze_excite_matches_formula():
  rng = np.random.default_rng(6)
  se = layers.SqueezeExcite(2)
  x = rng.normal(size=(3, 5, 5, 8)).astype(np.float32)
  y = se(x).numpy()
  w1, b1 = se.reduce.kernel.numpy()[0, 0], se.reduce.bias.numpy()
  w2, b2 = se.expand.kernel.numpy()[0, 0], se.expand.bias.numpy()
  s = x.mean(axis=(1, 2))
  h = s @ w1 + b1
  h = h / (1 + np.exp(-h))
  gate = 1 / (1 + np.exp(-(h @ w2 + b2)))
  np.testing.assert_allclose(y, x * gate[:, None, None, :], rtol=1e-5,
                             atol=1e-6)


def test_initializers_match_reference_scales():
  kernel = layers.conv_kernel_initializer()((3, 3, 64, 128))
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (9 * 128)),
                             rtol=0.02)
  dense = layers.dense_kernel_initializer()((640, 1000)).numpy()
  limit = 1 / np.sqrt(1000)
  assert dense.max() <= limit and dense.min() >= -limit
  assert dense.max() > 0.95 * limit


def test_momentum_warm_up_follows_the_step_and_is_not_a_weight():
  # numpy reference: m_t = min(M, (1 + t) / (10 + t)); moving <- moving * m_t
  # + batch * (1 - m_t), from the initial statistics (0, 1).
  layer = layers.GroupSyncBatchNormalization(momentum=0.99)
  layer.build((None, 3))
  step = tf.Variable(0, dtype=tf.int64)
  layer.warm_up_momentum(step)
  assert len(layer.weights) == 4  # The step is not tracked as a weight.
  rng = np.random.default_rng(0)
  mean, var = np.zeros(3), np.ones(3)
  for t in range(25):
    x = rng.normal(3.0, 2.0, size=(64, 3)).astype(np.float32)
    m = min(0.99, (1 + t) / (10 + t))
    mean = mean * m + x.mean(0) * (1 - m)
    var = var * m + x.var(0) * (1 - m)
    step.assign(t)
    layer(x, training=True)
  np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
  np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)
  # After 25 steps the initial statistics weigh prod(m_t) < 1e-5 (fixed
  # momentum: 0.99^25 = 78%).
  assert np.prod([(1 + t) / (10 + t) for t in range(25)]) < 1e-5
  np.testing.assert_allclose(layer.moving_mean.numpy(), 3.0, atol=0.3)
  layer.warm_up_momentum(None)
  before = layer.moving_mean.numpy()
  layer(np.zeros((4, 3), np.float32), training=True)
  np.testing.assert_allclose(layer.moving_mean.numpy(), before * 0.99,
                             rtol=1e-6)
