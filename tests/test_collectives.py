"""Tests for efficientnet_tpu.collectives on 8 logical CPU replicas."""

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import collectives
from efficientnet_tpu.config import ConfigError, ModelConfig
from tests.helpers import cpu_replicas, local_values, per_replica

R = 8


@pytest.fixture(scope='module')
def strategy():
  return cpu_replicas(R)


def test_group_assignment_is_contiguous():
  assert collectives.group_assignment(8, 2) == [[0, 1], [2, 3], [4, 5],
                                                [6, 7]]
  assert collectives.group_assignment(8, 8) == [list(range(8))]
  assert collectives.group_assignment(4, 1) == [[0], [1], [2], [3]]
  with pytest.raises(ValueError, match='group_size'):
    collectives.group_assignment(8, 3)


@pytest.mark.parametrize('g', [1, 2, 4, 8, 0])
def test_grouped_sum_values_and_gradient(strategy, g):
  rng = np.random.default_rng(g)
  x = rng.normal(size=(R, 3, 5)).astype(np.float32)
  w = rng.normal(size=(R, 3, 5)).astype(np.float32)

  @tf.function
  def step(x, w):
    def fn(x, w):
      with tf.GradientTape() as tape:
        tape.watch(x)
        s = collectives.grouped_sum(x, g)
        loss = tf.reduce_sum(s * w)
      return s, tape.gradient(loss, x)
    return strategy.run(fn, args=(x, w))

  s, gx = [local_values(strategy, t) for t in step(per_replica(strategy, x),
                                               per_replica(strategy, w))]
  size = g or R
  for r in range(R):
    members = np.arange(r // size * size, (r // size + 1) * size)
    np.testing.assert_allclose(s[r], x[members].sum(0), rtol=1e-6,
                               atol=1e-6)
    # d/dx_r of sum_r' <w_r', group_sum_r'> = sum of the group's w.
    np.testing.assert_allclose(gx[r], w[members].sum(0), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize('g', [1, 2, 4, 0])
def test_grouped_sum_traced_once_for_every_replica(strategy, g):
  """One function, traced once with the replica id, token and devices as
  `collectives.traced_replica` hands them, run on every replica's device:
  TF's collective ops give the group sums and their gradients."""
  rng = np.random.default_rng(10 + g)
  x = rng.normal(size=(R, 3, 5)).astype(np.float32)
  w = rng.normal(size=(R, 3, 5)).astype(np.float32)
  devices = tuple(strategy.extended.worker_devices)

  def body(x, w, handle):
    replica = collectives.TracedReplica(handle, devices)
    with collectives.traced_replica(replica):
      assert collectives.replica_index() == (replica.replica_id, R)
      with tf.GradientTape() as tape:
        tape.watch(x)
        s = collectives.grouped_sum(x, g)
        loss = tf.reduce_sum(s * w)
    return s, tape.gradient(loss, x)

  spec = tf.TensorSpec([3, 5], tf.float32)
  concrete = collectives.trace_for_every_replica(
      body, spec, spec, tf.TensorSpec([], tf.resource))
  # Left with the trace: outside, the default (single) replica again.
  assert collectives.replica_index()[1] == 1

  def replica(x, w):
    rid = tf.get_static_value(
        tf.distribute.get_replica_context().replica_id_in_sync_group)
    return concrete(x, w, collectives.replica_handle(devices[rid], rid))

  step = tf.function(lambda x, w: strategy.run(replica, args=(x, w)))
  s_all, gx_all = [local_values(strategy, t) for t in step(
      per_replica(strategy, x), per_replica(strategy, w))]
  size = g or R
  for r, (s, gx) in enumerate(zip(s_all, gx_all)):
    members = np.arange(r // size * size, (r // size + 1) * size)
    np.testing.assert_allclose(s, x[members].sum(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gx, w[members].sum(0), rtol=1e-6, atol=1e-6)


def test_all_group_sums(strategy):
  x = np.random.default_rng(0).normal(size=(R, 4)).astype(np.float32)

  @tf.function
  def step(x):
    return strategy.run(lambda x: collectives.all_group_sums(x, 4),
                        args=(x,))

  rows4 = local_values(strategy, step(per_replica(strategy, x)))
  want4 = x.reshape(2, 4, 4).sum(1)
  for r in range(R):
    np.testing.assert_allclose(rows4[r], want4, rtol=1e-6, atol=1e-6)


def test_constant_group_mask_matches_the_computed_one(strategy, monkeypatch):
  # MirroredStrategy's replica ids are known when tracing: the group masks
  # are constants. The computed mask (TPU: the id is a tensor) is the
  # reference, forced by hiding the static id; sums and gradients must be
  # bitwise the same.
  rng = np.random.default_rng(5)
  x = rng.normal(size=(R, 3, 5)).astype(np.float32)
  w = rng.normal(size=(R, 3, 5)).astype(np.float32)

  def run():
    @tf.function
    def step(x, w):
      def fn(x, w):
        with tf.GradientTape() as tape:
          tape.watch(x)
          s = collectives.grouped_sum(x, 2)
          loss = tf.reduce_sum(s * w)
        return s, tape.gradient(loss, x)
      return strategy.run(fn, args=(x, w))
    graph = step.get_concrete_function(per_replica(strategy, x),
                                       per_replica(strategy, w)).graph
    one_hots = sum(op.type == 'OneHot' for op in graph.get_operations())
    return one_hots, [local_values(strategy, t) for t in step(
        per_replica(strategy, x), per_replica(strategy, w))]

  constant_one_hots, constant = run()
  monkeypatch.setattr(collectives.tf, 'get_static_value', lambda t: None)
  computed_one_hots, computed = run()
  assert constant_one_hots == 0 and computed_one_hots == 2 * R
  for a, b in zip(constant, computed):
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_replica_mean_assigner_sets_every_copy_to_the_mean(strategy):
  rng = np.random.default_rng(1)
  a = rng.normal(size=(R, 3)).astype(np.float32)
  b = rng.normal(size=(R, 2, 2)).astype(np.float32)
  with strategy.scope():
    va = tf.Variable(tf.zeros(3), trainable=False)
    vb = tf.Variable(tf.zeros((2, 2)), trainable=False)

  @tf.function
  def set_local(a, b):
    strategy.run(lambda a, b: (va.assign(a), vb.assign(b)), args=(a, b))

  set_local(per_replica(strategy, a), per_replica(strategy, b))
  assert not np.allclose(*local_values(strategy, va)[:2])  # Replica-local.
  collectives.replica_mean_assigner(strategy, [va, vb])()
  for got, want in ((va, a.mean(0)), (vb, b.mean(0))):
    copies = local_values(strategy, got)
    for r in range(R):
      np.testing.assert_array_equal(copies[r], copies[0])
    np.testing.assert_allclose(copies[0], want, rtol=1e-6, atol=1e-6)


def test_grouped_sum_needs_replica_context(strategy):
  with strategy.scope():  # cross-replica context
    with pytest.raises(RuntimeError, match='replica context'):
      collectives.grouped_sum(tf.ones(2), 2)


@pytest.mark.parametrize('kwargs,replicas,batch,want', [
    ({}, 8, 4, 1),
    ({'bn_group_size': 1}, 8, 4, 1),
    ({'bn_group_size': 0}, 8, 4, 8),
    ({'bn_group_size': 4}, 8, 4, 4),
    ({'bn_group_size': 8}, 8, 4, 8),
    ({'bn_group_batch_size': 16}, 8, 4, 4),
    ({'bn_group_batch_size': 4}, 8, 4, 1),
    # A slice smaller than one group normalizes over all replicas.
    ({'bn_group_batch_size': 128}, 4, 8, 4),
    ({'bn_group_batch_size': 128}, 1024, 64, 2),
    # Per-replica batch at or above the target: local BN.
    ({'bn_group_batch_size': 128}, 8, 512, 1),
    ({'bn_group_batch_size': 128}, 32, 256, 1),
    ({'bn_group_batch_size': 128}, 16, 128, 1),
    # Not a multiple, or not a divisor of the replicas: the largest group
    # (dividing the replicas) whose batch stays within the target.
    ({'bn_group_batch_size': 24}, 8, 16, 1),
    ({'bn_group_batch_size': 12}, 8, 4, 2),
    ({'bn_group_batch_size': 128}, 6, 16, 6),
    ({'bn_group_batch_size': 128}, 12, 16, 6),
    ({'bn_group_batch_size': 128}, 10, 32, 2),
])
def test_resolve_bn_group_size(kwargs, replicas, batch, want):
  got = ModelConfig(**kwargs).resolve_bn_group_size(replicas, batch)
  assert got == want
  target = kwargs.get('bn_group_batch_size')
  if target:  # Brute force: the largest divisor within the target batch.
    fits = [d for d in range(1, replicas + 1)
            if replicas % d == 0 and (d == 1 or d * batch <= target)]
    assert got == max(fits)


@pytest.mark.parametrize('kwargs,replicas,batch,flag', [
    ({'bn_group_size': 3}, 8, 4, 'bn_group_size'),
    ({'bn_group_size': 16}, 8, 4, 'bn_group_size'),
])
def test_resolve_bn_group_size_errors(kwargs, replicas, batch, flag):
  with pytest.raises(ConfigError, match=flag) as e:
    ModelConfig(**kwargs).resolve_bn_group_size(replicas, batch)
  assert '\n' not in str(e.value)
