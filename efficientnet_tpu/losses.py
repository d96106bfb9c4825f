"""Losses of the train and eval steps, and their label-smoothed targets."""

from __future__ import annotations

import tensorflow as tf


def smoothed_one_hot(labels: tf.Tensor, num_classes: int,
                     smoothing: float = 0.0) -> tf.Tensor:
  """float32 one-hot targets, label-smoothed: (1 - s) * onehot + s / K."""
  onehot = tf.one_hot(labels, num_classes, dtype=tf.float32)
  if smoothing:
    onehot = onehot * (1.0 - smoothing) + smoothing / num_classes
  return onehot


def soft_cross_entropy(soft_labels: tf.Tensor,
                       logits: tf.Tensor) -> tf.Tensor:
  """Per-example cross entropy against target distributions.

  Args:
    soft_labels: [B, K] targets, each row summing to one (e.g. from
      `data.mixing.mix_batch`).
    logits: [B, K] logits, any float dtype (computed in float32).

  Returns:
    [B] float32: -sum_k soft_labels[:, k] * log_softmax(logits)[:, k].
  """
  return tf.nn.softmax_cross_entropy_with_logits(
      tf.cast(soft_labels, tf.float32), tf.cast(logits, tf.float32))


def smoothed_cross_entropy(labels: tf.Tensor, logits: tf.Tensor,
                           num_classes: int, smoothing: float) -> tf.Tensor:
  """Per-example cross entropy against label-smoothed one-hot targets."""
  return soft_cross_entropy(
      smoothed_one_hot(labels, num_classes, smoothing), logits)
