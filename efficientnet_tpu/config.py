"""Typed configuration for efficientnet_tpu.

Flags are read only in `main.py`; everything below it receives these
dataclasses. Each section validates itself and raises `ConfigError` with a
single-line message that names the flag and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Optional, Tuple

# name: (width_coefficient, depth_coefficient, resolution, dropout_rate)
MODEL_TABLE = {
    'efficientnet-b0': (1.0, 1.0, 224, 0.2),
    'efficientnet-b1': (1.0, 1.1, 240, 0.2),
    'efficientnet-b2': (1.1, 1.2, 260, 0.3),
    'efficientnet-b3': (1.2, 1.4, 300, 0.3),
    'efficientnet-b4': (1.4, 1.8, 380, 0.4),
    'efficientnet-b5': (1.6, 2.2, 456, 0.4),
    'efficientnet-b6': (1.8, 2.6, 528, 0.5),
    'efficientnet-b7': (2.0, 3.1, 600, 0.5),
}

MODES = ('train', 'eval', 'train_and_eval')
STRATEGIES = ('cpu', 'gpu', 'tpu', 'multi_worker')
OPTIMIZERS = ('lars', 'rmsprop', 'momentum', 'sgd')
LR_SCHEDULES = ('poly', 'exponential', 'cosine', 'constant')
LR_SCALINGS = ('linear', 'none')
AUGMENTATIONS = ('none', 'randaugment', 'autoaugment')
RESIZE_METHODS = ('bicubic', 'bilinear', 'area', 'nearest')

# Default LARS / L2 exclusions: batch-norm gamma/beta and biases, matched
# against the Keras 3 variable *path* (e.g. "block1a_bn/gamma").
DEFAULT_WEIGHT_DECAY_EXCLUDE = (r'(^|/)gamma$', r'(^|/)beta$', r'(^|/)bias$')


class ConfigError(ValueError):
  """A single-line, user-facing configuration error."""


def _check(cond: bool, flag: str, expected: str, got) -> None:
  if not cond:
    raise ConfigError(f'--{flag}: expected {expected}, got {got!r}')


def _choice(value, flag: str, allowed) -> None:
  _check(value in allowed, flag, 'one of ' + ', '.join(map(str, allowed)),
         value)


@dataclasses.dataclass
class ModelConfig:
  """EfficientNet architecture.

  `width_coefficient`, `depth_coefficient`, `image_size` and `dropout_rate`
  default to the compound-scaling table for `name`; setting them builds a
  scaled-down (or custom) variant, which the tests and smoke runs use.
  """
  name: str = 'efficientnet-b0'
  num_classes: int = 1000
  width_coefficient: Optional[float] = None
  depth_coefficient: Optional[float] = None
  image_size: Optional[int] = None
  dropout_rate: Optional[float] = None
  # Drop rate of the last block; grows linearly from 0 at the first block.
  stochastic_depth_rate: float = 0.2
  depth_divisor: int = 8
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  # Replicas per batch-norm group: 1 = local BN, 0 = all replicas (global).
  # None together with bn_group_batch_size=None means local BN.
  bn_group_size: Optional[int] = None
  # Target images per BN group; the group size is derived from the actual
  # replica count and per-replica batch (see layers / distribute).
  bn_group_batch_size: Optional[int] = None
  use_bfloat16: bool = False

  def __post_init__(self):
    _choice(self.name, 'model_name', tuple(MODEL_TABLE))
    w, d, r, p = MODEL_TABLE[self.name]
    if self.width_coefficient is None:
      self.width_coefficient = w
    if self.depth_coefficient is None:
      self.depth_coefficient = d
    if self.image_size is None:
      self.image_size = r
    if self.dropout_rate is None:
      self.dropout_rate = p
    _check(self.num_classes >= 2, 'num_label_classes', 'an integer >= 2',
           self.num_classes)
    _check(self.width_coefficient > 0, 'width_coefficient', 'a value > 0',
           self.width_coefficient)
    _check(self.depth_coefficient > 0, 'depth_coefficient', 'a value > 0',
           self.depth_coefficient)
    _check(self.image_size >= 16, 'image_size', 'an integer >= 16',
           self.image_size)
    _check(0 <= self.dropout_rate < 1, 'dropout_rate', 'a value in [0, 1)',
           self.dropout_rate)
    _check(0 <= self.stochastic_depth_rate < 1, 'stochastic_depth_rate',
           'a value in [0, 1)', self.stochastic_depth_rate)
    _check(0 < self.bn_momentum < 1, 'batch_norm_momentum',
           'a value in (0, 1)', self.bn_momentum)
    if self.bn_group_size is not None:
      _check(self.bn_group_size >= 0, 'bn_group_size',
             'an integer >= 0 (0 = all replicas)', self.bn_group_size)
    if self.bn_group_batch_size is not None:
      _check(self.bn_group_batch_size >= 1, 'bn_group_batch_size',
             'an integer >= 1', self.bn_group_batch_size)
      _check(self.bn_group_size is None, 'bn_group_batch_size',
             'not to be combined with --bn_group_size', self.bn_group_size)


@dataclasses.dataclass
class DataConfig:
  """Where images come from and how they are preprocessed."""
  # 'synthetic', 'tfrecord' or 'tfds:NAME'.
  source: str = 'synthetic'
  data_dir: Optional[str] = None
  num_train_images: int = 1281167
  num_eval_images: int = 50000
  # 1-based labels in the records; 1001 classes keeps label 0 as background.
  include_background_label: bool = False
  augment: str = 'none'
  randaug_num_layers: int = 2
  randaug_magnitude: float = 10.0
  resize_method: str = 'bicubic'
  shuffle_buffer: int = 1024
  skip_corrupt: bool = False
  # With skip_corrupt: training stops when more than this fraction of the
  # records read so far was bad (checked from MIN_READS_FOR_FRACTION reads).
  max_corrupt_fraction: float = 0.01
  # Images whose header declares more pixels are refused before decoding.
  max_image_pixels: int = 1 << 26
  # Deterministic input order and TF ops: a resumed run is bitwise equal to
  # an uninterrupted one (tfrecord and synthetic sources).
  deterministic: bool = False
  # Synthetic source only: images per split and whether labels are
  # learnable (a class-dependent pattern) or pure noise.
  synthetic_learnable: bool = True
  seed: int = 0

  def __post_init__(self):
    ok = (self.source in ('synthetic', 'tfrecord') or
          (self.source.startswith('tfds:') and len(self.source) > 5))
    _check(ok, 'data', "'synthetic', 'tfrecord' or 'tfds:NAME'", self.source)
    if self.source != 'synthetic':
      _check(bool(self.data_dir), 'data_dir',
             f'a directory when --data={self.source}', self.data_dir)
    _check(self.num_train_images >= 1, 'num_train_images', 'an integer >= 1',
           self.num_train_images)
    _check(self.num_eval_images >= 1, 'num_eval_images', 'an integer >= 1',
           self.num_eval_images)
    _choice(self.augment, 'augment_name', AUGMENTATIONS)
    _choice(self.resize_method, 'resize_method', RESIZE_METHODS)
    _check(self.randaug_num_layers >= 0, 'randaug_num_layers',
           'an integer >= 0', self.randaug_num_layers)
    _check(0 <= self.randaug_magnitude <= 30, 'randaug_magnitude',
           'a value in [0, 30]', self.randaug_magnitude)
    _check(0 <= self.max_corrupt_fraction <= 1, 'max_corrupt_fraction',
           'a value in [0, 1]', self.max_corrupt_fraction)
    _check(self.max_image_pixels >= 1, 'max_image_pixels', 'an integer >= 1',
           self.max_image_pixels)
    if self.deterministic:
      _check(not self.source.startswith('tfds:'), 'deterministic',
             '--data=tfrecord or synthetic (tfds readers do not resume '
             'exactly)', self.source)
      _check(self.augment == 'none', 'deterministic',
             '--augment_name=none (RandAugment and AutoAugment draw from '
             'stateful random ops)', self.augment)


@dataclasses.dataclass
class OptimizerConfig:
  """Optimizer, learning-rate schedule, regularization and EMA."""
  optimizer: str = 'rmsprop'
  base_learning_rate: float = 0.016
  # 'linear': peak LR = base_learning_rate * train_batch_size / 256.
  # 'none': base_learning_rate is the absolute peak (LARS-style).
  lr_scaling: str = 'linear'
  lr_schedule: str = 'exponential'
  lr_warmup_epochs: float = 5.0
  lr_decay_epochs: float = 2.4
  lr_decay_factor: float = 0.97
  poly_power: float = 2.0
  end_learning_rate: float = 0.0
  momentum: float = 0.9
  nesterov: bool = False
  rmsprop_decay: float = 0.9
  rmsprop_epsilon: float = 1e-3
  lars_eeta: float = 0.001
  lars_epsilon: float = 0.0
  weight_decay: float = 1e-5
  # Regexes on variable paths excluded from LARS adaptation and weight decay.
  weight_decay_exclude: Tuple[str, ...] = DEFAULT_WEIGHT_DECAY_EXCLUDE
  label_smoothing: float = 0.1
  # 0 disables EMA.
  moving_average_decay: float = 0.9999

  def __post_init__(self):
    _choice(self.optimizer, 'optimizer', OPTIMIZERS)
    _choice(self.lr_schedule, 'lr_schedule', LR_SCHEDULES)
    _choice(self.lr_scaling, 'lr_scaling', LR_SCALINGS)
    _check(self.base_learning_rate > 0, 'base_learning_rate', 'a value > 0',
           self.base_learning_rate)
    _check(self.lr_warmup_epochs >= 0, 'lr_warmup_epochs', 'a value >= 0',
           self.lr_warmup_epochs)
    _check(self.lr_decay_epochs > 0, 'lr_decay_epochs', 'a value > 0',
           self.lr_decay_epochs)
    _check(0 < self.lr_decay_factor <= 1, 'lr_decay_factor',
           'a value in (0, 1]', self.lr_decay_factor)
    _check(self.poly_power > 0, 'poly_power', 'a value > 0', self.poly_power)
    _check(0 <= self.end_learning_rate, 'end_learning_rate', 'a value >= 0',
           self.end_learning_rate)
    _check(0 <= self.momentum < 1, 'momentum', 'a value in [0, 1)',
           self.momentum)
    _check(self.weight_decay >= 0, 'weight_decay', 'a value >= 0',
           self.weight_decay)
    _check(self.lars_eeta > 0, 'lars_eeta', 'a value > 0', self.lars_eeta)
    _check(self.lars_epsilon >= 0, 'lars_epsilon', 'a value >= 0',
           self.lars_epsilon)
    _check(0 <= self.label_smoothing < 1, 'label_smoothing',
           'a value in [0, 1)', self.label_smoothing)
    _check(0 <= self.moving_average_decay < 1, 'moving_average_decay',
           'a value in [0, 1) (0 disables EMA)', self.moving_average_decay)
    self.weight_decay_exclude = tuple(self.weight_decay_exclude)
    for pattern in self.weight_decay_exclude:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f'--weight_decay_exclude: expected valid regular '
                          f'expressions, got {pattern!r} ({e})') from None


@dataclasses.dataclass
class DistributeConfig:
  """Which tf.distribute strategy to build."""
  strategy: str = 'cpu'
  # TPU name, 'local' on a TPU VM, or a grpc:// address (legacy TPU Node).
  tpu: Optional[str] = None
  tpu_zone: Optional[str] = None
  gcp_project: Optional[str] = None
  num_cpu_replicas: int = 1
  # 0 = all visible GPUs.
  num_gpus: int = 0
  # Expected replica count (dry runs resolve the slice plan for it).
  num_replicas: Optional[int] = None

  def __post_init__(self):
    _choice(self.strategy, 'strategy', STRATEGIES)
    _check(self.num_cpu_replicas >= 1, 'num_cpu_replicas', 'an integer >= 1',
           self.num_cpu_replicas)
    _check(self.num_gpus >= 0, 'num_gpus', 'an integer >= 0', self.num_gpus)
    if self.num_replicas is not None:
      _check(self.num_replicas >= 1, 'num_replicas', 'an integer >= 1',
             self.num_replicas)
    if self.strategy == 'tpu':
      _check(bool(self.tpu), 'tpu',
             "a TPU name, 'local' (TPU VM) or grpc:// address with "
             '--strategy=tpu', self.tpu)


@dataclasses.dataclass
class TrainConfig:
  """The loop: batch sizes, length, host loop, checkpoints, evaluation."""
  model_dir: str = '/tmp/efficientnet_tpu'
  mode: str = 'train'
  train_batch_size: int = 2048
  eval_batch_size: int = 1024
  # Exactly one of train_steps / train_epochs decides the length (steps win).
  train_steps: Optional[int] = None
  train_epochs: Optional[float] = 350.0
  iterations_per_loop: int = 1251
  # 0 = evaluate only at the end of training.
  eval_every_epochs: float = 0.0
  eval_every_steps: Optional[int] = None
  eval_timeout: int = 0
  # Number of eval images to use; None = the whole eval split.
  eval_steps: Optional[int] = None
  keep_checkpoint_max: int = 5
  export_dir: Optional[str] = None
  # None = auto: TPU always compiles; GPU and CPU off (see
  # distribute.resolve_jit_compile). True: forward/backward under XLA.
  jit_compile: Optional[bool] = None
  dry_run: bool = False
  seed: int = 0

  def __post_init__(self):
    _choice(self.mode, 'mode', MODES)
    _check(bool(self.model_dir), 'model_dir', 'a directory', self.model_dir)
    _check(self.train_batch_size >= 1, 'train_batch_size', 'an integer >= 1',
           self.train_batch_size)
    _check(self.eval_batch_size >= 1, 'eval_batch_size', 'an integer >= 1',
           self.eval_batch_size)
    if self.train_steps is not None:
      _check(self.train_steps >= 1, 'train_steps', 'an integer >= 1',
             self.train_steps)
    else:
      _check(self.train_epochs is not None and self.train_epochs > 0,
             'train_epochs', 'a value > 0 (or set --train_steps)',
             self.train_epochs)
    _check(self.iterations_per_loop >= 1, 'iterations_per_loop',
           'an integer >= 1', self.iterations_per_loop)
    _check(self.eval_every_epochs >= 0, 'eval_every_epochs', 'a value >= 0',
           self.eval_every_epochs)
    if self.eval_every_steps is not None:
      _check(self.eval_every_steps >= 1, 'eval_every_steps',
             'an integer >= 1', self.eval_every_steps)
    _check(self.keep_checkpoint_max >= 1, 'keep_checkpoint_max',
           'an integer >= 1', self.keep_checkpoint_max)


@dataclasses.dataclass
class ExperimentConfig:
  """Everything one run needs."""
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(
      default_factory=OptimizerConfig)
  distribute: DistributeConfig = dataclasses.field(
      default_factory=DistributeConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

  # ---- derived quantities -------------------------------------------------
  @property
  def steps_per_epoch(self) -> float:
    return self.data.num_train_images / self.train.train_batch_size

  @property
  def total_train_steps(self) -> int:
    if self.train.train_steps is not None:
      return self.train.train_steps
    return max(1, int(round(self.train.train_epochs * self.steps_per_epoch)))

  @property
  def eval_interval_steps(self) -> int:
    """Train steps between evaluations in train_and_eval mode."""
    if self.train.eval_every_steps:
      return self.train.eval_every_steps
    if self.train.eval_every_epochs > 0:
      return max(1, int(round(self.train.eval_every_epochs *
                              self.steps_per_epoch)))
    return self.total_train_steps

  def validate_for_replicas(self, num_replicas: int) -> None:
    """Checks that need the real replica count (known after the strategy)."""
    for flag, batch in (('train_batch_size', self.train.train_batch_size),
                        ('eval_batch_size', self.train.eval_batch_size)):
      _check(batch % num_replicas == 0, flag,
             f'a multiple of the number of replicas ({num_replicas})', batch)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> 'ExperimentConfig':
    return cls(model=ModelConfig(**d['model']),
               data=DataConfig(**d['data']),
               optimizer=OptimizerConfig(**d['optimizer']),
               distribute=DistributeConfig(**d['distribute']),
               train=TrainConfig(**d['train']))
