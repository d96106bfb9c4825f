"""EMA against a numpy reference, under a replicated step and swapping."""

import keras
import numpy as np
import tensorflow as tf

from efficientnet_tpu import ema as ema_lib
from tests.helpers import cpu_replicas


def test_ema_matches_numpy_with_decay_warmup_on_replicas():
  strategy = cpu_replicas(2)
  decay = 0.9
  with strategy.scope():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    ema = ema_lib.ExponentialMovingAverage(model.variables, decay)
    step = tf.Variable(0, dtype=tf.int64)
  rng = np.random.default_rng(0)
  new_values = [[rng.normal(size=v.shape).astype(np.float32)
                 for v in model.variables] for _ in range(15)]
  expected = [v.numpy().copy() for v in model.variables]

  for i, values in enumerate(new_values):
    # Weights change identically on all replicas (as after an all-reduce).
    for var, value in zip(model.variables, values):
      var.assign(value)
    strategy.run(lambda: ema.update(step))
    step.assign_add(1)
    d = min(decay, (1 + i) / (10 + i))
    expected = [d * e + (1 - d) * v for e, v in zip(expected, values)]
  for average, e in zip(ema.averages, expected):
    for component in strategy.experimental_local_results(average):
      np.testing.assert_allclose(component.numpy(), e, rtol=1e-5, atol=1e-6)


def test_swap_exchanges_and_restores_exactly():
  strategy = cpu_replicas(2)
  with strategy.scope():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    ema = ema_lib.ExponentialMovingAverage(model.variables, 0.5)
  weights = [v.numpy().copy() for v in model.variables]
  for v in model.variables:
    v.assign(v + 1.0)
  trained = [v.numpy().copy() for v in model.variables]
  ema.swap()
  for v, w in zip(model.variables, weights):
    for c in strategy.experimental_local_results(v.value):
      np.testing.assert_array_equal(c.numpy(), w)
  ema.swap()
  for v, t in zip(model.variables, trained):
    for c in strategy.experimental_local_results(v.value):
      np.testing.assert_array_equal(c.numpy(), t)
  for a, w in zip(ema.averages, weights):
    np.testing.assert_array_equal(a.numpy(), w)


def test_only_floating_variables_are_averaged():
  v_float = tf.Variable([1.0, 2.0])
  v_int = tf.Variable([1, 2])
  ema = ema_lib.ExponentialMovingAverage([v_float, v_int], 0.9)
  assert len(ema.averages) == 1


def test_swap_is_per_replica_and_works_without_a_strategy():
  """Replica-local state (BN moving statistics between synchronizations)
  is exchanged copy by copy, and the swap also runs with no strategy."""
  strategy = cpu_replicas(4)
  with strategy.scope():
    v = tf.Variable(tf.zeros(3), trainable=False)
    ema = ema_lib.ExponentialMovingAverage([v], 0.5)
  rng = np.random.default_rng(1)
  local_v, local_avg = rng.normal(size=(2, 4, 3)).astype(np.float32)

  @tf.function
  def set_local(a, b):
    strategy.run(lambda a, b: (v.assign(a), ema.averages[0].assign(b)),
                 args=(a, b))

  dist = lambda x: strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group]))
  set_local(dist(local_v), dist(local_avg))
  ema.swap()
  got_v = [c.numpy() for c in strategy.experimental_local_results(v)]
  got_avg = [c.numpy() for c in
             strategy.experimental_local_results(ema.averages[0])]
  for r in range(4):
    np.testing.assert_array_equal(got_v[r], local_avg[r])
    np.testing.assert_array_equal(got_avg[r], local_v[r])

  plain = tf.Variable([1.0, 2.0])
  plain_ema = ema_lib.ExponentialMovingAverage([plain], 0.5)
  plain.assign([3.0, 4.0])
  plain_ema.swap()
  np.testing.assert_array_equal(plain.numpy(), [1.0, 2.0])
  np.testing.assert_array_equal(plain_ema.averages[0].numpy(), [3.0, 4.0])
  assert plain_ema.shadow_of(plain) is plain_ema.averages[0]


def _ema_copies(strategy, weights, local_offsets, steps=3):
  """Every device's averages after `steps` replicated updates in a
  tf.function; the BN moving statistics move by a per-replica offset."""
  with strategy.scope():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                              keras.layers.BatchNormalization()])
    model.set_weights(weights)
    ema = ema_lib.ExponentialMovingAverage(model.variables, 0.9)
    step = tf.Variable(0, dtype=tf.int64)
  bn = model.layers[-1]

  def replica_fn():
    rid = tf.distribute.get_replica_context().replica_id_in_sync_group
    offset = tf.gather(local_offsets, rid)
    for var in model.trainable_variables:
      var.assign(var * 1.1 + 0.3)
    bn.moving_mean.assign(bn.moving_mean * 0.7 + offset)
    bn.moving_variance.assign(bn.moving_variance * 0.9 + offset ** 2)
    ema.update(step)

  @tf.function
  def update():
    strategy.run(replica_fn)
    step.assign_add(1)

  for _ in range(steps):
    update()
  return [[c.numpy() for c in strategy.experimental_local_results(a)]
          for a in ema.averages]


def test_copied_averages_are_bitwise_the_per_device_update(monkeypatch):
  # Reference: the previous formulation, every device averaging its own
  # copies in replica context.
  weights = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                              keras.layers.BatchNormalization()]).get_weights()
  offsets = tf.constant([[0.25, -1.5], [2.0, 0.125]])
  copied = []
  update_copies = ema_lib.ExponentialMovingAverage._update_copies

  def counting(self, *args):
    copied.append(1)
    return update_copies(self, *args)

  monkeypatch.setattr(ema_lib.ExponentialMovingAverage, '_update_copies',
                      counting)
  new = _ema_copies(cpu_replicas(2), weights, offsets)
  assert copied  # the copy path ran
  monkeypatch.setattr(ema_lib.distribute, 'on_host_cpus',
                      lambda strategy: False)
  old = _ema_copies(cpu_replicas(2), weights, offsets)
  assert len(new) == len(old) == 6
  for new_copies, old_copies in zip(new, old):
    for a, b in zip(new_copies, old_copies):
      np.testing.assert_array_equal(a, b)
  # The moving statistics' averages stayed replica-local; the weights'
  # are the same on both devices.
  for copies in new[-2:]:
    assert not np.array_equal(copies[0], copies[1])
  for copies in new[:-2]:
    np.testing.assert_array_equal(copies[0], copies[1])
