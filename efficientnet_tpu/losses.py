"""Losses of the train and eval steps."""

from __future__ import annotations

import tensorflow as tf


def smoothed_cross_entropy(labels: tf.Tensor, logits: tf.Tensor,
                           num_classes: int, smoothing: float) -> tf.Tensor:
  """Per-example cross entropy against label-smoothed one-hot targets."""
  logits = tf.cast(logits, tf.float32)
  onehot = tf.one_hot(labels, num_classes, dtype=tf.float32)
  if smoothing:
    onehot = onehot * (1.0 - smoothing) + smoothing / num_classes
  return tf.nn.softmax_cross_entropy_with_logits(onehot, logits)
