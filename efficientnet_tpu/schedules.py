"""Learning-rate schedules: linear warmup, then poly / exponential / cosine.

Every schedule is a serializable `keras.optimizers.schedules.LearningRateSchedule`
evaluated at the optimizer's `iterations` (the number of updates already
applied), so the update with 0-based index `t` uses `lr(t)`; an update loop of
`total_steps` updates uses `lr(0) .. lr(total_steps - 1)`.

Conventions (shared by all schedules):

* `warmup_steps = int(lr_warmup_epochs * steps_per_epoch)` (floor, as in
  TPU-EN's `utils.build_learning_rate`). For `step < warmup_steps` the LR rises
  linearly from `warmup_start_lr` (0 by default) to the peak:
  `lr = start + (peak - start) * step / warmup_steps`. So the first update uses
  `start` (0.0 like TPU-EN and the TPU ResNet LARS schedule).
* `poly`: `lr = end + (peak - end) * (1 - p) ** power` with
  `p = clip((step - warmup_steps) / (total_steps - warmup_steps), 0, 1)`, i.e.
  the peak at the end of warmup and exactly `end_learning_rate` at step
  `total_steps` (the TPU ResNet LARS code divides by `total - warmup + 1`
  and so never quite reaches the end value; the difference is one step).
* `cosine`: `lr = end + (peak - end) * 0.5 * (1 + cos(pi * p))`, same `p`.
  (TPU-EN's cosine counts `p` from step 0 over `total_steps` and lets warmup
  override the first steps; ours is continuous at the end of warmup.)
* `exponential`: TPU-EN's exact convention by default: the decay is counted
  from step 0, NOT from the end of warmup, and warmup merely overrides the
  first `warmup_steps` values:
  `lr = peak * decay_factor ** floor(step / decay_steps)` with
  `decay_steps = lr_decay_epochs * steps_per_epoch` (a float). With the
  original recipe (5 warmup epochs, x0.97 every 2.4 epochs) the LR therefore
  drops from ~peak to `peak * 0.97**2` right after warmup. Pass
  `decay_from_warmup_end=True` to count decay periods from the end of warmup.
* `constant`: the peak after warmup.
"""

from __future__ import annotations

import io
import math
import os
from typing import Dict, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from efficientnet_tpu import fileio
from efficientnet_tpu.config import ExperimentConfig, ScheduleConfig

_PACKAGE = 'efficientnet_tpu'


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup to `peak_learning_rate`, then `_decay` (subclasses).

  Works on scalar or vector `step` (vectors are used for plotting).
  """

  def __init__(self, peak_learning_rate: float, warmup_steps: int,
               total_steps: int, warmup_start_lr: float = 0.0,
               name: Optional[str] = None):
    super().__init__()
    self.peak_learning_rate = float(peak_learning_rate)
    self.warmup_steps = int(warmup_steps)
    self.total_steps = int(total_steps)
    self.warmup_start_lr = float(warmup_start_lr)
    self.name = name

  def _decay(self, step: tf.Tensor) -> tf.Tensor:
    raise NotImplementedError

  def _progress(self, step: tf.Tensor) -> tf.Tensor:
    """Fraction of the post-warmup phase done, clipped to [0, 1]."""
    span = float(max(1, self.total_steps - self.warmup_steps))
    return tf.clip_by_value((step - float(self.warmup_steps)) / span, 0.0, 1.0)

  def __call__(self, step):
    with tf.name_scope(self.name or type(self).__name__):
      step = tf.cast(step, tf.float32)
      decayed = self._decay(step)
      if self.warmup_steps <= 0:
        return decayed
      frac = step / float(self.warmup_steps)
      warm = self.warmup_start_lr + (
          self.peak_learning_rate - self.warmup_start_lr) * frac
      return tf.where(step < float(self.warmup_steps), warm, decayed)

  def get_config(self) -> dict:
    return {
        'peak_learning_rate': self.peak_learning_rate,
        'warmup_steps': self.warmup_steps,
        'total_steps': self.total_steps,
        'warmup_start_lr': self.warmup_start_lr,
        'name': self.name,
    }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WarmupPolynomialDecay(WarmupSchedule):
  """Warmup, then polynomial decay from the peak to `end_learning_rate`."""

  def __init__(self, peak_learning_rate, warmup_steps, total_steps,
               end_learning_rate: float = 0.0, power: float = 2.0, **kwargs):
    super().__init__(peak_learning_rate, warmup_steps, total_steps, **kwargs)
    self.end_learning_rate = float(end_learning_rate)
    self.power = float(power)

  def _decay(self, step):
    remaining = tf.pow(1.0 - self._progress(step), self.power)
    return self.end_learning_rate + (
        self.peak_learning_rate - self.end_learning_rate) * remaining

  def get_config(self):
    return dict(super().get_config(), end_learning_rate=self.end_learning_rate,
                power=self.power)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WarmupCosineDecay(WarmupSchedule):
  """Warmup, then half-cosine decay from the peak to `end_learning_rate`."""

  def __init__(self, peak_learning_rate, warmup_steps, total_steps,
               end_learning_rate: float = 0.0, **kwargs):
    super().__init__(peak_learning_rate, warmup_steps, total_steps, **kwargs)
    self.end_learning_rate = float(end_learning_rate)

  def _decay(self, step):
    cosine = 0.5 * (1.0 + tf.cos(math.pi * self._progress(step)))
    return self.end_learning_rate + (
        self.peak_learning_rate - self.end_learning_rate) * cosine

  def get_config(self):
    return dict(super().get_config(), end_learning_rate=self.end_learning_rate)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WarmupExponentialDecay(WarmupSchedule):
  """Warmup, then `peak * decay_factor ** (step / decay_steps)` (staircase).

  Decay periods are counted from step 0 (TPU-EN) unless
  `decay_from_warmup_end`; see the module docstring.
  """

  def __init__(self, peak_learning_rate, warmup_steps, total_steps,
               decay_steps: float = 1.0, decay_factor: float = 0.97,
               staircase: bool = True, decay_from_warmup_end: bool = False,
               **kwargs):
    super().__init__(peak_learning_rate, warmup_steps, total_steps, **kwargs)
    self.decay_steps = float(decay_steps)
    self.decay_factor = float(decay_factor)
    self.staircase = bool(staircase)
    self.decay_from_warmup_end = bool(decay_from_warmup_end)

  def _decay(self, step):
    if self.decay_from_warmup_end:
      step = tf.maximum(step - float(self.warmup_steps), 0.0)
    periods = step / self.decay_steps
    if self.staircase:
      periods = tf.floor(periods)
    return self.peak_learning_rate * tf.pow(self.decay_factor, periods)

  def get_config(self):
    return dict(super().get_config(), decay_steps=self.decay_steps,
                decay_factor=self.decay_factor, staircase=self.staircase,
                decay_from_warmup_end=self.decay_from_warmup_end)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WarmupConstant(WarmupSchedule):
  """Warmup, then the peak LR for the rest of training."""

  def _decay(self, step):
    return tf.fill(tf.shape(step), self.peak_learning_rate)


def build_learning_rate_schedule(
    sched: ScheduleConfig, train_batch_size: int, steps_per_epoch: float,
    total_steps: int) -> WarmupSchedule:
  """The schedule `sched.lr_schedule` asks for.

  The settings are checked by the config (`ExperimentConfig` also checks
  warmup and end LR against the run's length and peak).

  Args:
    sched: learning-rate settings of the experiment config.
    train_batch_size: global batch size (all replicas).
    steps_per_epoch: num_train_images / train_batch_size (a float).
    total_steps: number of optimizer updates in the whole run.
  """
  common = dict(peak_learning_rate=sched.peak_learning_rate(train_batch_size),
                warmup_steps=sched.warmup_steps(steps_per_epoch),
                total_steps=total_steps)
  kind = sched.lr_schedule
  if kind == 'poly':
    return WarmupPolynomialDecay(
        end_learning_rate=sched.end_learning_rate,
        power=sched.poly_power, **common)
  if kind == 'cosine':
    return WarmupCosineDecay(end_learning_rate=sched.end_learning_rate,
                             **common)
  if kind == 'exponential':
    return WarmupExponentialDecay(
        decay_steps=sched.lr_decay_epochs * steps_per_epoch,
        decay_factor=sched.lr_decay_factor, staircase=True, **common)
  if kind == 'constant':
    return WarmupConstant(**common)
  raise ValueError(f'lr_schedule: expected one of poly, exponential, '
                   f'cosine, constant, got {kind!r}')


def for_experiment(cfg: ExperimentConfig) -> WarmupSchedule:
  """The schedule of a whole run."""
  return build_learning_rate_schedule(
      cfg.optimizer.schedule, cfg.train.train_batch_size, cfg.steps_per_epoch,
      cfg.total_train_steps)


def _lr_at(schedule, steps) -> np.ndarray:
  return np.asarray(schedule(tf.constant(np.asarray(steps, np.float32))),
                    np.float64)


def describe_schedule(sched: ScheduleConfig, train_batch_size: int,
                      steps_per_epoch: float, total_steps: int) -> Dict:
  """A JSON-friendly summary of the schedule (for --dry_run and logs)."""
  schedule = build_learning_rate_schedule(sched, train_batch_size,
                                          steps_per_epoch, total_steps)
  points = {
      'start': 0,
      'warmup_end': schedule.warmup_steps,
      '25%': total_steps // 4,
      '50%': total_steps // 2,
      '75%': (3 * total_steps) // 4,
      'last_update': total_steps - 1,
  }
  values = _lr_at(schedule, list(points.values()))
  return {
      'lr_schedule': sched.lr_schedule,
      'train_batch_size': train_batch_size,
      'steps_per_epoch': float(steps_per_epoch),
      'total_steps': int(total_steps),
      'train_epochs': float(total_steps / steps_per_epoch),
      'warmup_steps': int(schedule.warmup_steps),
      'peak_lr': float(schedule.peak_learning_rate),
      # label -> [step, lr]
      'lr_at': {k: [int(s), float(v)]
                for (k, s), v in zip(points.items(), values)},
  }


def curve(schedule: WarmupSchedule, total_steps: int,
          num_points: int = 2001) -> Tuple[np.ndarray, np.ndarray]:
  """(steps, lr) at up to `num_points` steps spread over [0, total_steps]."""
  steps = np.unique(np.linspace(0, total_steps,
                                num=min(total_steps + 1, num_points))
                    .round().astype(np.int64))
  return steps, _lr_at(schedule, steps)


def plot_schedule(schedule: WarmupSchedule, total_steps: int,
                  path: str) -> str:
  """Writes a PNG of lr(step) for step in [0, total_steps]; returns `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  steps, values = curve(schedule, total_steps)
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, values)
  ax.set_xlabel('step')
  ax.set_ylabel('learning rate')
  ax.set_title(f'{type(schedule).__name__}: peak {schedule.peak_learning_rate:g}'
               f', warmup {schedule.warmup_steps} steps')
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png')
  plt.close(fig)
  fileio.write_atomically(path, png.getvalue())
  return path
