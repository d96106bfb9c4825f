"""The model state that training, evaluation and export share.

`ModelState` holds the model, its optimizer, learning-rate schedule and EMA,
the checkpoint over all of them, and the all-reduce that synchronizes the
replica-local batch-norm statistics. `build_model_state` builds it once per
run under the strategy's scope; the trainer updates it, the evaluator reads
it, the exporter copies its weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from absl import logging
import keras
import tensorflow as tf

from efficientnet_tpu import collectives
from efficientnet_tpu import ema as ema_lib
from efficientnet_tpu import fileio
from efficientnet_tpu import layers
from efficientnet_tpu import loss_scale as loss_scale_lib
from efficientnet_tpu import model as model_lib
from efficientnet_tpu import optimizers
from efficientnet_tpu import schedules
from efficientnet_tpu.config import ConfigError, ExperimentConfig


class UnreadableCheckpoint(ConfigError):
  """A checkpoint whose files are missing, truncated or overwritten."""

  def __init__(self, path: str, reason: str):
    self.path = path
    self.reason = reason
    super().__init__(
        'model_dir', f'checkpoint {path} is unreadable ({reason}): restore '
        'its files, or name another one with `checkpoint_path`')


def model_rng_state(model) -> list:
  """The state variables of the model's Keras seed generators (dropout,
  stochastic depth), which its own checkpoint does not track."""
  return [v for v in model.variables
          if v.path.endswith('seed_generator_state')]


def replica_local_variables(model, ema=None) -> list:
  """Float state that replicas update locally between synchronizations:
  the batch-norm moving statistics and their EMA shadows."""
  local = [v for v in model.non_trainable_variables
           if tf.as_dtype(v.dtype).is_floating]
  if ema is not None:
    shadows = [ema.shadow_of(v) for v in local]
    local += [s for s in shadows if s is not None]
  return local


@dataclasses.dataclass
class ModelState:
  """Model, optimizer, schedule, EMA and their checkpoint."""
  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  learning_rate: schedules.WarmupSchedule
  ema: Optional[ema_lib.ExponentialMovingAverage]
  checkpoint: tf.train.Checkpoint
  sync_replica_local_state: Callable[[], None]
  # float16 only: the dynamic loss scale (checkpointed as 'loss_scale').
  loss_scale: Optional[loss_scale_lib.DynamicLossScale] = None

  @property
  def step(self) -> int:
    """Optimizer steps taken (restored with the checkpoint)."""
    return int(self.optimizer.iterations.numpy())

  def restore(self, path: Optional[str]) -> int:
    """Restores checkpoint `path` (nothing if None); returns the step.

    Raises:
      UnreadableCheckpoint: its files are missing, truncated or garbage
        (what restored before the bad part stays assigned: restore a good
        checkpoint over it).
    """
    if path:
      try:
        self.checkpoint.restore(path).expect_partial()
      except (tf.errors.OpError, IndexError) as e:
        # IndexError: TF's reader of a truncated .data file.
        raise UnreadableCheckpoint(path, fileio.error_reason(e)) from None
      logging.info('Restored %s at step %d', path, self.step)
    return self.step


def build_model_state(cfg: ExperimentConfig, strategy: tf.distribute.Strategy,
                      bn_group_size: int) -> ModelState:
  """Builds the state under `strategy`'s scope, ready for the first step.

  Args:
    cfg: the experiment (model, optimizer and schedule settings).
    strategy: the replicas the variables live on.
    bn_group_size: replicas per batch-norm group (see `replica_plan.ReplicaPlan`).
  """
  with strategy.scope():
    model = model_lib.build_model(cfg.model, bn_group_size=bn_group_size)
    learning_rate = schedules.for_experiment(cfg)
    optimizer = optimizers.build_optimizer(cfg.optimizer, learning_rate)
    # Built before tracing: a Keras 3 optimizer must not create its slot
    # variables inside the replicated tf.function.
    optimizer.build(model.trainable_variables)
    if cfg.model.batch_norm_warmup:
      # The run's own step: a fine-tune warms up from its first step, a
      # resumed run goes on where it was.
      layers.warm_up_batch_norm(model, optimizer.iterations)
    ema = None
    if cfg.optimizer.moving_average_decay > 0:
      ema = ema_lib.ExponentialMovingAverage(
          model.variables, cfg.optimizer.moving_average_decay)
    loss_scale = (loss_scale_lib.DynamicLossScale()
                  if cfg.model.use_float16 else None)
  sync = collectives.replica_mean_assigner(
      strategy, replica_local_variables(model, ema))
  items = dict(model=model, optimizer=optimizer)
  if ema is not None:
    items['ema'] = ema
  if loss_scale is not None:
    items['loss_scale'] = loss_scale
  # Dropout / stochastic-depth RNG state: Keras 3 seed generators are not
  # tracked by the model's checkpoint, and a resumed run must draw the
  # masks an uninterrupted one would.
  rng_state = model_rng_state(model)
  if rng_state:
    items['rng'] = rng_state
  return ModelState(model=model, optimizer=optimizer,
                    learning_rate=learning_rate, ema=ema,
                    checkpoint=tf.train.Checkpoint(**items),
                    sync_replica_local_state=sync, loss_scale=loss_scale)
