"""Cross-replica reductions over groups of replicas (distributed batch norm).

Replica groups are contiguous ids, as in the paper's code:
`np.arange(num_replicas).reshape(-1, group_size)`. On TPU the grouped sum is
`cross_replica_sum` with a group assignment; elsewhere (MirroredStrategy,
MultiWorkerMirroredStrategy, logical CPU replicas) no grouped collective
exists, so a group sum is one all-reduce of a [num_groups, ...] tensor in
which every replica fills only its own group's row. That costs num_groups
times the bytes of a plain all-reduce (a few KiB for per-channel statistics),
has a well-defined gradient (the gradient of an all-reduce SUM is an
all-reduce SUM), and hands every replica the sums of *all* groups for free.

Everything here except `group_assignment` and
`replica_mean_assigner` must run in replica context (inside `strategy.run`).
"""

from __future__ import annotations

from typing import List

import numpy as np
import tensorflow as tf

from efficientnet_tpu import distribute


def group_assignment(num_replicas: int, group_size: int) -> List[List[int]]:
  """Contiguous replica groups: `np.arange(R).reshape(-1, group_size)`."""
  g = effective_group_size(group_size, num_replicas)
  return np.arange(num_replicas).reshape(-1, g).tolist()


def in_replica_context() -> bool:
  """True inside `strategy.run` (including the default strategy's context)."""
  return (not tf.distribute.in_cross_replica_context() and
          tf.distribute.get_replica_context() is not None)


def _replica_context() -> tf.distribute.ReplicaContext:
  if not in_replica_context():
    raise RuntimeError('grouped collectives must run in replica context '
                       '(inside strategy.run)')
  return tf.distribute.get_replica_context()


def effective_group_size(group_size: int, num_replicas: int) -> int:
  """Maps 0 to `num_replicas` and checks that the group size divides it."""
  g = num_replicas if group_size == 0 else group_size
  if g < 1 or num_replicas % g:
    raise ValueError(f'group_size: expected a divisor of the number of '
                     f'replicas ({num_replicas}) or 0, got {group_size}')
  return g


def group_id(group_size: int) -> tf.Tensor:
  """This replica's group index (a scalar int32 tensor)."""
  ctx = _replica_context()
  rid = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
  return rid // group_size


def _group_mask(group_size: int, num_groups: int, dtype: tf.DType,
                rank: int) -> tf.Tensor:
  """One-hot [num_groups, 1, ...] of this replica's group, `dtype`.

  A constant where the replica id is known when tracing (MirroredStrategy:
  one constant instead of a one-hot computed in every BN layer of every
  replica's trace); computed from the id tensor otherwise.
  """
  rid = tf.get_static_value(_replica_context().replica_id_in_sync_group)
  if rid is not None:
    mask = np.zeros([num_groups] + [1] * rank, dtype.as_numpy_dtype)
    mask[int(rid) // group_size] = 1
    return tf.constant(mask)
  onehot = tf.one_hot(group_id(group_size), num_groups, dtype=dtype)
  return tf.reshape(onehot, [num_groups] + [1] * rank)


def all_reduce_sum(x: tf.Tensor) -> tf.Tensor:
  """Sum of `x` over all replicas, differentiable, cheap to trace.

  `ReplicaContext.all_reduce` has a gradient, but its `tf.custom_gradient`
  walks the graph backward from the result to find captured variables. The
  result depends on every replica's input, so each walk covers the whole
  multi-replica graph, and in the backward pass (where the inputs are
  gradients) that makes tracing quadratic in model size: minutes for a tiny
  EfficientNet on 4 CPU replicas (Keras' synchronized BN has the same
  problem). Reducing `stop_gradient(x)` stops the walk at the reduction;
  the gradient (itself an all-reduce SUM) is supplied here.
  """
  ctx = _replica_context()

  @tf.custom_gradient
  def _sum(x):
    y = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(x))
    return y, all_reduce_sum

  return _sum(x)


def all_group_sums(x: tf.Tensor, group_size: int) -> tf.Tensor:
  """Sums of `x` within every replica group, stacked: [num_groups, *x.shape].

  One all-reduce of a tensor in which this replica writes only its group's
  row. Identical on all replicas. Differentiable.
  """
  ctx = _replica_context()
  num_replicas = ctx.num_replicas_in_sync
  g = effective_group_size(group_size, num_replicas)
  num_groups = num_replicas // g
  if num_groups == 1:
    return all_reduce_sum(x)[None]
  return all_reduce_sum(
      _group_mask(g, num_groups, x.dtype, x.shape.rank) * x[None])


def _select_group(rows: tf.Tensor, group_size: int) -> tf.Tensor:
  """rows[this replica's group], as a masked sum: tf.gather's gradient is
  IndexedSlices, which the all-reduce in the backward pass handles slowly."""
  mask = _group_mask(group_size, rows.shape[0], rows.dtype,
                     rows.shape.rank - 1)
  return tf.reduce_sum(rows * mask, axis=0)


def grouped_sum(x: tf.Tensor, group_size: int) -> tf.Tensor:
  """Sum of `x` over the replicas of this replica's group.

  Args:
    x: a per-replica tensor (same shape on every replica).
    group_size: replicas per group; 1 returns `x` without communication,
      0 or the replica count sums over all replicas.

  Returns:
    A tensor shaped like `x`, identical within each group. Differentiable:
    the gradient is the grouped sum of the incoming gradients.
  """
  ctx = _replica_context()
  num_replicas = ctx.num_replicas_in_sync
  g = effective_group_size(group_size, num_replicas)
  if g == 1:
    return x
  if g == num_replicas:
    return all_reduce_sum(x)
  # In replica context get_strategy() is the strategy running this replica.
  if distribute.is_tpu(tf.distribute.get_strategy()):
    return tf.compat.v1.tpu.cross_replica_sum(
        x, group_assignment(num_replicas, g))
  return _select_group(all_group_sums(x, g), g)


def replica_mean_assigner(strategy: tf.distribute.Strategy, variables):
  """Returns `assign()`: sets every replica's copy of `variables` to the mean
  of the copies over all replicas.

  For replica-local state (batch-norm moving statistics and their EMA
  shadows, see `layers.GroupSyncBatchNormalization`): one compiled,
  replicated call with ONE all-reduce of all values concatenated (float32),
  then local assigns on every replica. Every worker must call it (it is a
  collective). With one replica it does nothing.

  Args:
    strategy: the strategy the variables were created under.
    variables: float variables with aggregation NONE (Keras or tf).
  """
  variables = list(variables)
  if not variables or strategy.num_replicas_in_sync == 1:
    return lambda: None
  sizes = [int(np.prod(v.shape)) for v in variables]

  def replica_fn():
    ctx = tf.distribute.get_replica_context()
    flat = tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(v), tf.float32),
                                 [-1]) for v in variables], 0)
    mean = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, flat)
    for v, part in zip(variables, tf.split(mean, sizes)):
      v.assign(tf.cast(tf.reshape(part, v.shape), v.dtype))

  @tf.function
  def assign():
    strategy.run(replica_fn)

  return assign
