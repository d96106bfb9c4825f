"""Replicated loops and metric accumulators shared by training and eval."""

from __future__ import annotations

import tensorflow as tf


def sum_variable(name: str, dtype=tf.float32) -> tf.Variable:
  """A per-replica accumulator whose cross-replica read is the sum."""
  return tf.Variable(
      tf.zeros([], dtype), name=name, trainable=False,
      synchronization=tf.VariableSynchronization.ON_READ,
      aggregation=tf.VariableAggregation.SUM)


def distribute_input(strategy: tf.distribute.Strategy, input_fn):
  """`input_fn(ctx)` distributed with one pipeline per host (see
  `data.contract`), its batches fetched to the devices ahead of use."""
  options = tf.distribute.InputOptions(
      experimental_fetch_to_device=True,
      experimental_per_replica_buffer_size=2)
  return strategy.distribute_datasets_from_function(input_fn, options)


def replicated_loop(strategy, replica_step):
  """Returns `loop(iterator, num_steps)`: that many steps in one host call.

  The loop is one tf.function (the TPUEstimator "host loop"): the host pays
  the call and dispatch overhead once per loop, not once per step. On TPU,
  TPUStrategy compiles the whole loop with XLA; elsewhere XLA, when on,
  is applied inside `replica_step` (see `distribute.resolve_jit_compile`).
  """

  @tf.function
  def loop(iterator, num_steps):
    for _ in tf.range(num_steps):
      strategy.run(replica_step, args=(next(iterator),))

  return loop

