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
  with pytest.raises(ConfigError, match='--bn_group_size'):
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


def test_all_group_sums_and_group_rows(strategy):
  x = np.random.default_rng(0).normal(size=(R, 4)).astype(np.float32)

  @tf.function
  def step(x):
    return strategy.run(
        lambda x: (collectives.all_group_sums(x, 4),
                   collectives.grouped_mean_and_group_rows(x, 2)),
        args=(x,))

  rows4, (mean2, rows2) = tf.nest.map_structure(
      lambda t: local_values(strategy, t), step(per_replica(strategy, x)))
  want4 = x.reshape(2, 4, 4).sum(1)
  want2 = x.reshape(4, 2, 4).mean(1)
  for r in range(R):
    np.testing.assert_allclose(rows4[r], want4, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rows2[r], want2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean2[r], want2[r // 2], rtol=1e-6,
                               atol=1e-6)


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
])
def test_resolve_bn_group_size(kwargs, replicas, batch, want):
  got = collectives.resolve_bn_group_size(ModelConfig(**kwargs), replicas,
                                          batch)
  assert got == want


@pytest.mark.parametrize('kwargs,replicas,batch,flag', [
    ({'bn_group_size': 3}, 8, 4, '--bn_group_size'),
    ({'bn_group_size': 16}, 8, 4, '--bn_group_size'),
    ({'bn_group_batch_size': 24}, 8, 16, '--bn_group_batch_size'),
    ({'bn_group_batch_size': 8}, 8, 16, '--bn_group_batch_size'),
    ({'bn_group_batch_size': 12}, 8, 4, '--bn_group_batch_size'),
])
def test_resolve_bn_group_size_errors(kwargs, replicas, batch, flag):
  with pytest.raises(ConfigError, match=flag) as e:
    collectives.resolve_bn_group_size(ModelConfig(**kwargs), replicas, batch)
  assert '\n' not in str(e.value)
