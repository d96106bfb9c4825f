"""The resumable training stream: epoch orders and per-element seeds.

Every random choice of a training stream is a pure function of (seed,
pipeline, epoch or position), so a run resumed at step N rebuilds the stream
from element `pipeline_position(...)` on without replaying it, and each
element gets the same augmentation as in an uninterrupted run.
"""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf


def epoch_order(seed: int, pipeline: int, epoch: tf.Tensor,
                size: int) -> tf.Tensor:
  """The order of one pipeline's `size` items (files, indices) in an epoch:
  a stateless permutation of range(size), a pure function of its
  arguments, so the order of any epoch is rebuilt on resume."""
  # (Dataset.shuffle would take a tensor seed, but TF's seed resolution
  # fails on one when the global seed is 0.)
  key = tf.stack([tf.constant(seed * 65_537 + pipeline + (1 << 40),
                              tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_shuffle(
      tf.range(size, dtype=tf.int64), key)


def element_seed(seed: int, pipeline: int,
                 position: tf.Tensor) -> tf.Tensor:
  """Stateless-op seed [2] of the element at `position` of a pipeline's
  stream: the same random crop and flip for that element after a resume,
  whatever the map parallelism."""
  return tf.stack([tf.constant(seed * 65_537 + pipeline, tf.int64),
                   tf.cast(position, tf.int64)])


def resumable_stream(epoch_fn: Callable[[tf.Tensor], tf.data.Dataset],
                     position: int = 0,
                     epoch_length: Optional[int] = None) -> tf.data.Dataset:
  """Epochs 0, 1, 2, ... of `epoch_fn`, starting `position` elements in.

  Each epoch's order depends only on its number (`epoch_order`), so the
  stream after `position` elements is rebuilt without replaying it: whole
  epochs are skipped by number, and only the remainder of the current one
  is read and dropped (before any decoding).

  Args:
    epoch_fn: int64 epoch number -> that epoch's dataset (finite).
    position: elements of the stream already consumed.
    epoch_length: elements per epoch; needed when `position` > 0.

  Returns:
    The infinite stream from `position` on.
  """
  first, offset = 0, 0
  if position:
    if not epoch_length:
      raise ValueError('epoch_length: expected the elements per epoch to '
                       f'resume at position {position}, got {epoch_length}')
    first, offset = divmod(position, epoch_length)
  head = epoch_fn(tf.constant(first, tf.int64))
  if offset:
    head = head.skip(offset)
  return head.concatenate(
      tf.data.Dataset.range(first + 1, 1 << 62).flat_map(epoch_fn))


def pipeline_position(ctx: tf.distribute.InputContext,
                      global_batch_size: int, start_step: int) -> int:
  """Training examples one pipeline has fed after `start_step` steps."""
  replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
  return (start_step * ctx.get_per_replica_batch_size(global_batch_size)
          * replicas)
