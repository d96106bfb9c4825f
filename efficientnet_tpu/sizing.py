"""How big a run is before it starts: parameters, FLOPs, memory per replica.

The memory figure is an estimate from first principles, not a forecast:
float32 weights, their gradients, the optimizer's slots and the EMA
averages, plus the output of every convolution (depthwise included) and
dense layer for the per-replica batch, which the backward pass keeps (in the
compute dtype; the elementwise layers between them are fused by XLA). TF's
own buffers, the input pipeline and a non-XLA step's unfused intermediates
add to it. As a check: the paper's B5 at 456 px, 64 images per TPU v3 core
in bfloat16, comes to ~7.4 GiB, within the core's 16 GiB. What it is for: refusing, before any work, a run that
cannot fit anywhere (a batch of 10^9 images would otherwise pass the checks
and then eat the host's memory), and warning where it will not fit the
usual devices of its strategy.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Tuple

from efficientnet_tpu.config import ConfigError, ExperimentConfig

GIB = 1024 ** 3

# Optimizer slots per trainable weight (optimizers.build_optimizer): LARS
# and momentum keep a momentum, LAMB two moments, RMSProp with momentum its
# mean square and its momentum.
_SLOTS = {'lars': 1, 'momentum': 1, 'sgd': 0, 'lamb': 2, 'rmsprop': 2}

# Memory one replica can use, by strategy: (the usual devices, the largest).
# TPU: HBM per core (v2 8 GiB, v3 16 GiB) or per chip (v4 32, v5e 16, v5p
# 95, v6e 32 GiB), from Cloud TPU's system architecture pages. GPU: 16-80 GB
# cards are the usual ones (V100, A100, H100), 141 GB the largest (H200).
_DEVICE_GIB = {
    'tpu': (16.0, 95.0, 'a TPU v3 core (16 GiB)', 'a TPU v5p chip (95 GiB)'),
    'gpu': (80.0, 141.0, 'an 80 GB GPU (A100/H100)', 'an H200 (141 GB)'),
    'multi_worker': (80.0, 141.0, 'an 80 GB GPU (A100/H100)',
                     'an H200 (141 GB)'),
}


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """What one image costs the model."""
  parameters: int
  trainable_parameters: int
  flops_per_image: int
  activations_per_image: int  # Elements of the conv and dense outputs.


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes one replica needs for training (see the module docstring)."""
  per_replica_batch: int
  state_bytes: int
  activation_bytes: int

  @property
  def total_bytes(self) -> int:
    return self.state_bytes + self.activation_bytes

  def describe(self) -> str:
    return (f'~{self.total_bytes / GIB:.3g} GiB per replica for training at '
            f'{self.per_replica_batch} images per replica (weights, '
            f'gradients, slots, EMA {self.state_bytes / GIB:.3g} GiB + '
            f'activations {self.activation_bytes / GIB:.3g} GiB; an '
            'estimate, XLA and TF buffers aside)')


def model_size(cfg: ExperimentConfig, model=None) -> ModelSize:
  """Measures `model` (a run's), or the model of `cfg` built once on the CPU
  (float32, local BN); layer output shapes do not depend on either."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  own = model is None
  if own:
    with tf.device('/cpu:0'):
      model = model_lib.build_model(cfg.model, bn_group_size=1,
                                    dtype='float32')
  activations = 0
  for layer in model.layers:
    # Convolution outputs: what the backward pass must keep. Batch norm,
    # activations and the squeeze-excite products are elementwise and fused
    # into their neighbours by XLA (recomputed, not stored), so counting
    # every layer's output would triple the figure.
    if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
      continue
    for out in tf.nest.flatten(layer.output):
      elements = 1
      for dim in out.shape[1:]:
        elements *= int(dim)
      activations += elements
  trainable = sum(int(tf.size(v)) for v in model.trainable_weights)
  return ModelSize(parameters=model.count_params(),
                   trainable_parameters=trainable,
                   # Our own build is the float32, local-BN copy the
                   # profiler counts: no second build.
                   flops_per_image=model_lib.flops_per_image(
                       cfg.model, model if own else None),
                   activations_per_image=activations)


def training_memory(cfg: ExperimentConfig, size: ModelSize,
                    per_replica_batch: int) -> MemoryEstimate:
  """The estimate for `cfg`'s optimizer, EMA and precision."""
  copies = 2 + _SLOTS.get(cfg.optimizer.name, 2)  # Weights, gradients.
  if cfg.optimizer.moving_average_decay > 0:
    copies += 1
  state = 4 * (size.parameters + (copies - 1) * size.trainable_parameters)
  half = cfg.model.use_bfloat16 or cfg.model.use_float16
  activations = ((2 if half else 4) * size.activations_per_image *
                 per_replica_batch)
  return MemoryEstimate(per_replica_batch, state, activations)


def host_memory_bytes() -> Optional[int]:
  """This machine's physical memory, or None where it cannot be read."""
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None


def check_fits(cfg: ExperimentConfig, estimate: MemoryEstimate,
               num_replicas: int,
               host_bytes: Optional[int] = None) -> List[str]:
  """Refuses what cannot fit anywhere; returns warnings for the usual devices.

  CPU replicas share this machine's memory (`host_bytes`, read here when
  None); a TPU or GPU replica has its own device.

  Raises:
    ConfigError: naming train_batch_size, when even the largest device of
      the strategy (all of the host's memory for CPU replicas) is too small.
  """
  need = estimate.total_bytes
  strategy = cfg.distribute.strategy
  if strategy == 'cpu':
    host_bytes = host_memory_bytes() if host_bytes is None else host_bytes
    if host_bytes and need * num_replicas > host_bytes:
      raise ConfigError('train_batch_size', (
          f'{cfg.train.train_batch_size} images per step need about '
          f'{need / GIB:.3g} GiB on each of {num_replicas} CPU replica(s) '
          f'(an estimate: weights, slots and activations), more than this '
          f'machine\'s {host_bytes / GIB:.3g} GiB; lower it'))
    return []
  usual, largest, usual_name, largest_name = _DEVICE_GIB[strategy]
  if need > largest * GIB:
    raise ConfigError('train_batch_size', (
        f'{cfg.train.train_batch_size} images per step need about '
        f'{need / GIB:.3g} GiB per replica (an estimate: weights, slots and '
        f'activations), more than {largest_name} holds; lower it or use '
        'more replicas'))
  if need > usual * GIB:
    return [f'{estimate.describe()}: more than {usual_name}; lower '
            '`train_batch_size` or use more replicas unless your devices '
            'are larger']
  return []


def recipe_warnings(cfg: ExperimentConfig) -> List[str]:
  """Where the sources behind a recipe warn about these settings, and where
  a run would stay silent for long."""
  if not cfg.trains:
    return []
  warnings = []
  total, loop = cfg.total_train_steps, cfg.loop_steps
  if total >= 8 and loop * 4 > total:
    warnings.append(
        f'`iterations_per_loop={loop}` of {total} steps: {-(-total // loop)} '
        'progress line(s) and checkpoint(s) in the whole run; leave it out '
        '(one epoch, at most a 20th of the run) or lower it')
  if (cfg.train.mode == 'train_and_eval' and total >= 8 and
      cfg.eval_interval_steps >= total and
      total > 2 * max(1.0, cfg.steps_per_epoch)):
    warnings.append(
        f'train_and_eval evaluates only at the end of {total} steps '
        f'({total / cfg.steps_per_epoch:.3g} epochs); set '
        '`eval_every_epochs` or leave it out (every epoch, at most 20 '
        'evaluations)')
  batch = cfg.train.train_batch_size
  if cfg.optimizer.name == 'lars' and batch < 4096:
    warnings.append(
        f'LARS at a global batch of {batch}: the presets use it from 4096 '
        'images per step up, and tensorflow/tpu lars_util.py tunes it from '
        '16384; below a few thousand images the RMSProp recipe '
        '(`optimizer=rmsprop`) or momentum is the tested choice')
  return warnings


def describe_size(size: ModelSize) -> Tuple[str, str]:
  """('5.29M parameters', '0.8 GFLOPs per image') rounded for reading."""
  return (f'{size.parameters / 1e6:.3g}M parameters',
          f'{size.flops_per_image / 1e9:.3g} GFLOPs per image')
