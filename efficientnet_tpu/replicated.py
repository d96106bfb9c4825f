"""Replicated loops and metric accumulators shared by training and eval."""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Sequence

import tensorflow as tf
from tensorflow.python.data.ops import multi_device_iterator_ops


def sum_variable(name: str, dtype=tf.float32) -> tf.Variable:
  """A per-replica accumulator whose cross-replica read is the sum."""
  return tf.Variable(
      tf.zeros([], dtype), name=name, trainable=False,
      synchronization=tf.VariableSynchronization.ON_READ,
      aggregation=tf.VariableAggregation.SUM)


class Accumulators:
  """Named per-replica sums (`sum_variable`s), zeroed and read with one
  compiled call each.

  Eagerly, zeroing an ON_READ variable assigns every replica's copy from
  the host, and reading one reduces over every copy: on a pod, a remote
  call per core and variable (thousands per loop on a v3-1024). Compiled,
  the host dispatches one call however many replicas there are.
  """

  def __init__(self, strategy: tf.distribute.Strategy, prefix: str,
               names: Sequence[str]):
    """Creates the variables under `strategy`'s scope, named PREFIX_NAME."""
    self.names = tuple(names)
    with strategy.scope():
      self.variables = {name: sum_variable(f'{prefix}_{name}')
                        for name in self.names}
    variables = [self.variables[name] for name in self.names]

    def zero():
      for v in variables:
        v.assign(tf.zeros_like(v))

    # In replica context each replica zeroes its own copy, locally.
    self._reset_fn = tf.function(lambda: strategy.run(zero))
    # In cross-replica context a read is the SUM over the replicas.
    self._read_fn = tf.function(
        lambda: tf.stack([v.read_value() for v in variables]))

  def __getitem__(self, name: str) -> tf.Variable:
    return self.variables[name]

  def reset(self) -> None:
    """Zeroes every replica's copy of every sum."""
    self._reset_fn()

  def read(self) -> Dict[str, float]:
    """The sums over all replicas (blocks until the steps that add to them
    have run)."""
    values = self._read_fn().numpy()
    return {name: float(v) for name, v in zip(self.names, values)}


def distribute_input(strategy: tf.distribute.Strategy, input_fn):
  """`input_fn(ctx)` distributed with one pipeline per host (see
  `data.contract`), its batches fetched to the devices ahead of use."""
  options = tf.distribute.InputOptions(
      experimental_fetch_to_device=True,
      experimental_per_replica_buffer_size=2)
  return strategy.distribute_datasets_from_function(input_fn, options)


def iterate(distributed_dataset):
  """`iter(distributed_dataset)`, its per-device stages not autotuned.

  A distributed iterator reads each host's pipeline into one
  `MultiDeviceIterator`, which builds a small pipeline per device (a
  generator and a fixed prefetch buffer) with tf.data's default options:
  autotuning on, one tuning thread per device with nothing to tune.
  Deleting the iterator waits for each of those threads in turn, and on a
  busy host each wait can last the thread's whole tuning interval (up to a
  minute): a median of 142 s for an 8-device iterator with the cores
  busy, 0.58 s with the per-device stages untuned
  (benchmarks/iterator_teardown.py; its host pipeline's own tuning thread
  still cost one 60 s wait in three rounds).
  That wait lands where the iterator dies: at the end of every run. The
  hosts' own pipelines keep their options (autotuning included).
  """
  with _untuned_device_stages():
    return iter(distributed_dataset)


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _untuned_device_stages():
  """While open, `MultiDeviceIterator`s build their per-device pipelines
  without autotuning. TF has no option for those pipelines, so this wraps
  the (private) function that builds them, for this block only; where a
  TF version lacks it, nothing changes."""
  build = getattr(multi_device_iterator_ops, '_create_device_dataset', None)
  if build is None:
    yield
    return
  options = tf.data.Options()
  options.autotune.enabled = False

  def untuned(*args, **kwargs):
    return build(*args, **kwargs).with_options(options)

  with _PATCH_LOCK:
    multi_device_iterator_ops._create_device_dataset = untuned  # pylint: disable=protected-access
    try:
      yield
    finally:
      multi_device_iterator_ops._create_device_dataset = build  # pylint: disable=protected-access


def _unconverted(replica_step):
  """`replica_step` as `strategy.run` must not autograph-convert it.

  The replica steps are plain TF ops with Python control flow on Python
  values only (tensor-dependent branches are explicit `tf.cond`s). Left to
  autograph, `strategy.run` inside the loop's tf.function transpiles the
  step and every function of this package it calls, in every replica
  thread, and routes each of their calls through `converted_call`: about a
  tenth of the trace of the smoke run's loop (benchmarks/trace_time.py).
  """
  return tf.autograph.experimental.do_not_convert(replica_step)


def replicated_loop(strategy, replica_step):
  """Returns `loop(iterator, num_steps)`: that many steps in one host call.

  The loop is one tf.function (the TPUEstimator "host loop"): the host pays
  the call and dispatch overhead once per loop, not once per step. On TPU,
  TPUStrategy compiles the whole loop with XLA; elsewhere XLA, when on,
  is applied inside `replica_step` (see `distribute.resolve_jit_compile`).
  `replica_step` is not autograph-converted (`_unconverted`).
  """
  replica_step = _unconverted(replica_step)

  @tf.function
  def loop(iterator, num_steps):
    for _ in tf.range(num_steps):
      strategy.run(replica_step, args=(next(iterator),))

  return loop


def stoppable_loop(strategy, replica_step, stop_flag: tf.Variable,
                   agree: bool = False):
  """Returns `loop(iterator, num_steps) -> stopped`: like `replicated_loop`,
  but it ends before the next step once a stop is requested.

  Args:
    strategy: the replicas.
    replica_step: one replica's step (its return value is dropped).
    stop_flag: a scalar float variable on this host's CPU; nonzero asks
      the loop to stop (see `preemption.StopRequest`).
    agree: whether several processes each run this loop
      (MultiWorkerMirroredStrategy workers). Then each step all-reduces the
      flags of all replicas and every process stops after the same step,
      the first whose all-reduce saw a nonzero flag. Otherwise the flag is
      read before each step, on the host: no device work and no collective.

  The loop returns whether it stopped on a request (a bool tensor): with
  `agree`, what the processes agreed on, so every process acts alike;
  without, whether it stopped before `num_steps` (a request that comes
  after the last step is the caller's to see, in the flag).
  """
  replica_step = _unconverted(replica_step)

  @tf.autograph.experimental.do_not_convert
  def voting_step(batch):
    # First in the step: the all-reduce runs beside the step's compute.
    votes = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.identity(stop_flag.read_value()))
    replica_step(batch)
    return votes

  @tf.function
  def loop(iterator, num_steps):

    def cond(i, agreed):
      stop = agreed if agree else tf.greater(stop_flag.read_value(), 0.0)
      return tf.logical_and(i < num_steps, tf.logical_not(stop))

    def body(i, agreed):
      if agree:
        votes = strategy.run(voting_step, args=(next(iterator),))
        agreed = tf.greater(strategy.experimental_local_results(votes)[0],
                            0.0)
      else:
        strategy.run(replica_step, args=(next(iterator),))
      return i + 1, agreed

    steps, agreed = tf.while_loop(
        cond, body, [tf.constant(0, tf.int32), tf.constant(False)])
    # (A read of the flag here could run before the loop: reads of one
    # variable are not ordered.)
    return agreed if agree else steps < num_steps

  return loop
