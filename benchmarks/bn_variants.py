"""Normalization layers that benchmarks compare with the production batch norm.

Training and export always build `layers.make_batch_norm` (our
GroupSyncBatchNormalization). The variants here are swapped in through the
one model-building hook, `model.build_model(..., batch_norm_fn=...)`:

  group            the production layer (`layers.make_batch_norm`)
  group_step_sync  ours, with the moving statistics all-reduced (MEAN) in
                   every layer at every step, as before they became
                   replica-local (benchmarks/scaling.py's local_stepsync)
  keras            keras BatchNormalization, local; its moving statistics
                   drift apart across replicas
  keras_sync       keras BatchNormalization(synchronized=True)
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from efficientnet_tpu import collectives
from efficientnet_tpu import layers


class StepSyncBatchNormalization(layers.GroupSyncBatchNormalization):
  """Ours, plus one all-reduce MEAN of the moving-statistics targets per
  layer per step (what every BN layer cost before they became
  replica-local), so that the moving statistics never differ by replica."""

  def _moving_targets(self, mean, var):
    if not collectives.in_replica_context():
      return mean, var
    stats = tf.stop_gradient(tf.concat([mean, var], 0))
    stats = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.MEAN, stats)
    channels = mean.shape[-1]
    return stats[:channels], stats[channels:]


def _kwargs(spec: layers.BatchNormSpec, name: Optional[str]) -> dict:
  return dict(momentum=spec.momentum, epsilon=spec.epsilon, name=name,
              dtype=spec.dtype)


def group_step_sync(spec: layers.BatchNormSpec, name: Optional[str] = None
                    ) -> StepSyncBatchNormalization:
  return StepSyncBatchNormalization(group_size=spec.group_size,
                                    **_kwargs(spec, name))


def keras_local(spec: layers.BatchNormSpec, name: Optional[str] = None
                ) -> keras.layers.Layer:
  # Always per replica, whatever spec.group_size says.
  return keras.layers.BatchNormalization(**_kwargs(spec, name))


def keras_sync(spec: layers.BatchNormSpec, name: Optional[str] = None
               ) -> keras.layers.Layer:
  # Always all replicas, whatever spec.group_size says.
  return keras.layers.BatchNormalization(synchronized=True,
                                         **_kwargs(spec, name))


# Name -> factory for `model.build_model(batch_norm_fn=...)`.
BATCH_NORMS = {
    'group': layers.make_batch_norm,
    'group_step_sync': group_step_sync,
    'keras': keras_local,
    'keras_sync': keras_sync,
}


def batch_norm_fn(name: str) -> layers.BatchNormFactory:
  """The factory called `name` in BATCH_NORMS."""
  if name not in BATCH_NORMS:
    raise ValueError(f'batch_norm_fn: expected one of {tuple(BATCH_NORMS)}, '
                     f'got {name!r}')
  return BATCH_NORMS[name]
