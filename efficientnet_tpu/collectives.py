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

import contextlib
import dataclasses
import functools
import itertools
import threading
from typing import Iterator, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from efficientnet_tpu import distribute


def group_assignment(num_replicas: int, group_size: int) -> List[List[int]]:
  """Contiguous replica groups: `np.arange(R).reshape(-1, group_size)`."""
  g = effective_group_size(group_size, num_replicas)
  return np.arange(num_replicas).reshape(-1, g).tolist()


@dataclasses.dataclass(frozen=True)
class TracedReplica:
  """A replica step traced once for every replica (`step.TracedOnceForwardBackward`).

  While its trace is built, the collectives here and the replica's draws
  (`replica_index`) take the replica id and count from this, not from a
  `tf.distribute` replica context: the same function body then runs on
  every device, its group sums TF's collective ops (each replica finds its
  group at run time from its id), one instance key per call site and trace.

  Attributes:
    handle: the replica's `replica_handle`, a parameter of the traced
      function: the id is read from it, and it orders the collectives of
      each device (TF's automatic control dependencies chain the ops that
      use one resource).
    devices: the replicas' devices, in replica order.
  """
  handle: tf.Tensor
  devices: Tuple[str, ...]

  @property
  def num_replicas(self) -> int:
    return len(self.devices)

  @functools.cached_property
  def replica_id(self) -> tf.Tensor:
    return tf.raw_ops.ReadVariableOp(resource=self.handle, dtype=tf.int32)


_traced = threading.local()
# Collective group keys of traced replica steps, one per set of devices (a
# key must name the same devices for the life of the process); far above
# the ones tf.distribute's CollectiveKeys hands out (from 1).
_group_keys = {}
_GROUP_KEY_BASE = 1 << 28
# Instance keys: new ones for every trace (an instance key names one call
# site with one shape and dtype for the life of the process).
_instance_keys = itertools.count(1 << 28)
# Guards the key counters and the handle registry (replica threads trace).
_lock = threading.Lock()


def _next_instance_key() -> int:
  with _lock:
    return next(_instance_keys)


_replica_handles = {}


def replica_handle(device: str, replica_id: int) -> tf.Tensor:
  """The handle of an int32 resource on `device` holding `replica_id` (one
  per device and id in the process): a replica's argument to a function
  traced for every replica (`trace_for_every_replica`).

  The function reads the replica id from it (`TracedReplica.replica_id`)
  and orders its collectives on it. A resource, not a constant: a small
  constant argument would be folded in, and TF's function optimizer then
  specializes the function per call site and optimizes every copy (seen in
  its log with the ids as constants).
  """
  key = (device, int(replica_id))
  with _lock:
    if key not in _replica_handles:
      # A bare resource, outside any strategy's scope and function.
      with tf.init_scope(), tf.device(device):
        handle = tf.raw_ops.VarHandleOp(
            dtype=tf.int32, shape=[],
            shared_name=f'efficientnet_tpu_replica_{len(_replica_handles)}')
        tf.raw_ops.AssignVariableOp(resource=handle,
                                    value=tf.constant(int(replica_id)))
      _replica_handles[key] = handle
    return _replica_handles[key]


def _group_key(devices: Tuple[str, ...]) -> int:
  with _lock:
    return _group_keys.setdefault(devices, _GROUP_KEY_BASE + len(_group_keys))


@contextlib.contextmanager
def traced_replica(replica: TracedReplica) -> Iterator[None]:
  """Within it (on this thread), this module's collectives act for
  `replica` (see `TracedReplica`)."""
  previous = getattr(_traced, 'replica', None)
  _traced.replica = replica
  try:
    yield
  finally:
    _traced.replica = previous


def _traced_replica() -> Optional[TracedReplica]:
  return getattr(_traced, 'replica', None)


def trace_for_every_replica(fn, *specs):
  """`fn` traced once (a ConcreteFunction) for every replica to call on its
  own device, with a `TracedReplica` of its own inside.

  Traced with no device scope (the caller's would pin every op to one
  replica's device): the collectives run where their replica's handle is
  (a resource input). Never inlined: TF optimizes the body once per device
  (Grappler's log), not as part of the caller's graph, which made the step
  of 4 CPU replicas faster (benchmarks/README.md section 4). Not
  autograph-converted (no tensor-dependent Python control flow).
  """
  with tf.device(None):
    return tf.function(
        fn, autograph=False,
        experimental_attributes={'_noinline': True}).get_concrete_function(
            *specs)


def in_replica_context() -> bool:
  """True inside `strategy.run` (including the default strategy's context)
  or while a replica step is traced for every replica (`traced_replica`)."""
  if _traced_replica() is not None:
    return True
  return (not tf.distribute.in_cross_replica_context() and
          tf.distribute.get_replica_context() is not None)


def replica_index() -> Tuple[tf.Tensor, int]:
  """(this replica's id, replicas in sync), in replica context or while a
  replica step is traced once for all (`traced_replica`); (0, 1) outside."""
  traced = _traced_replica()
  if traced is not None:
    return traced.replica_id, traced.num_replicas
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return tf.constant(0), 1
  return ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync


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


def _traced_group_sum(x: tf.Tensor, group_size: int,
                      traced: TracedReplica) -> tf.Tensor:
  """Sum of `x` over this replica's group with TF's collective ops."""
  groups = [tuple(traced.devices[i] for i in ids)
            for ids in group_assignment(traced.num_replicas, group_size)]
  # From `traced`, not from the thread's current replica: the gradient may
  # be taken after the `traced_replica` scope has closed.
  group_key = tf.gather(tf.constant([_group_key(d) for d in groups]),
                        traced.replica_id // group_size)

  @tf.custom_gradient
  def _sum(x):
    y = tf.raw_ops.CollectiveReduceV2(
        input=x, group_size=tf.constant(group_size), group_key=group_key,
        instance_key=tf.constant(_next_instance_key()),
        ordering_token=[traced.handle], merge_op='Add',
        final_op='Id', communication_hint='auto', timeout_seconds=0,
        max_subdivs_per_device=-1)
    return y, lambda dy: _traced_group_sum(dy, group_size, traced)

  return _sum(x)


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
  traced = _traced_replica()
  if traced is not None:
    g = effective_group_size(group_size, traced.num_replicas)
    return x if g == 1 else _traced_group_sum(x, g, traced)
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
