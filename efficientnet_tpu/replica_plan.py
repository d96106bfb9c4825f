"""How a run splits over its replicas, resolved once per run.

`experiment.run_experiment` makes one `ReplicaPlan` from the config and the
strategy and hands it down: the model state gets the BN group size as an
integer, the trainer its per-replica batch, the start-up block and
config.json's "resolved" block print it. The dry run makes one for
`--num_replicas=N` before any hardware exists.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from absl import logging
import tensorflow as tf

from efficientnet_tpu.config import ConfigError, ExperimentConfig


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
  """Batches, BN groups and run length on a number of replicas.

  Attributes:
    num_replicas: replicas in sync.
    per_replica_eval_batch: eval images per replica and step.
    bn_group_size: replicas per batch-norm group, resolved (1: local BN).
    steps_per_epoch: train images / global batch.
    total_steps: the run's last step.
    per_replica_train_batch: train images per replica and step (None: the
      run does not train).
    bn_groups: number of BN groups (None: no training).
    bn_group_batch: images per BN group (None: no training).
    steps_per_loop: steps per host loop (None: no training).
    eval_every_steps: steps between evaluations (None: no training).
  """
  num_replicas: int
  per_replica_eval_batch: int
  bn_group_size: int
  steps_per_epoch: float
  total_steps: int
  per_replica_train_batch: Optional[int] = None
  bn_groups: Optional[int] = None
  bn_group_batch: Optional[int] = None
  steps_per_loop: Optional[int] = None
  eval_every_steps: Optional[int] = None

  _ORDER = ('per_replica_train_batch', 'per_replica_eval_batch',
            'bn_group_size', 'bn_groups', 'bn_group_batch', 'steps_per_epoch',
            'total_steps', 'steps_per_loop', 'eval_every_steps')

  def as_dict(self) -> dict:
    """The values that apply (not the replica count), in reading order."""
    return {k: getattr(self, k) for k in self._ORDER
            if getattr(self, k) is not None}


def make(cfg: ExperimentConfig, num_replicas: int) -> ReplicaPlan:
  """How `cfg` splits over `num_replicas`.

  Eval and export: the eval batch and local BN only (inference uses the
  moving statistics; see `ExperimentConfig.validate_for_replicas`).

  Raises:
    ConfigError: the one-line errors a run on that many replicas would
      raise (a batch the replicas do not divide, a BN group that does not
      divide them).
  """
  g = cfg.validate_for_replicas(num_replicas)
  common = dict(
      num_replicas=num_replicas,
      per_replica_eval_batch=cfg.eval_batch_size_on(num_replicas)
      // num_replicas,
      bn_group_size=g, steps_per_epoch=round(cfg.steps_per_epoch, 2),
      total_steps=cfg.total_train_steps)
  if not cfg.trains:
    return ReplicaPlan(**common)
  per_replica = cfg.train.train_batch_size // num_replicas
  target = cfg.model.bn_group_batch_size
  if target is not None and g * per_replica != target:
    logging.info('bn_group_batch_size %d: %d replica(s) of %d images per BN '
                 'group (%d images%s) on %d replicas.', target, g, per_replica,
                 g * per_replica, ', local BN' if g == 1 else '', num_replicas)
  return ReplicaPlan(
      **common, per_replica_train_batch=per_replica,
      bn_groups=num_replicas // g, bn_group_batch=g * per_replica,
      steps_per_loop=cfg.loop_steps,
      eval_every_steps=cfg.eval_interval_steps)


def for_strategy(cfg: ExperimentConfig,
                 strategy: tf.distribute.Strategy) -> ReplicaPlan:
  """The plan on `strategy`'s replicas; refuses a --num_replicas it lacks."""
  actual = strategy.num_replicas_in_sync
  expected = cfg.distribute.num_replicas
  if expected and expected != actual:
    raise ConfigError('num_replicas', f'expected {actual} (the replicas of '
                      f'this {type(strategy).__name__}), got {expected}')
  return make(cfg, actual)
