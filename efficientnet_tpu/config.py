"""Typed configuration for efficientnet_tpu: every setting, defined once.

Each setting is a dataclass field with its type, default, help text,
choices and name in the field's metadata (`setting(...)`). The setting's
name is its command-line flag (the TPUEstimator-era names of
tensorflow/tpu where they exist), its config.json key and the name errors
give; the field reads well in code and may differ (`cfg.data.source` is
`--data`, `cfg.train.init.checkpoint` is `--init_checkpoint`). `main.py`
generates its absl flags from these definitions and `tools/gen_flags_doc.py`
the flag reference, so a new setting is one field.

Configs are immutable (frozen dataclasses) and built complete: a section
resolves its defaults that depend on other values (`_defaults`) while it is
constructed, then checks itself (`_validate`); `ExperimentConfig` does the
same across sections. Change one by building another:
`cfg.with_settings(train_steps=6)` or `dataclasses.replace`. Every error is
a `ConfigError` that names the setting (the CLI prints it as the flag).
Settings named inside a message are written `` `name=value` ``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Tuple

# name: (width_coefficient, depth_coefficient, resolution, dropout_rate),
# from tensorflow/tpu models/official/efficientnet/efficientnet_builder.py
# (`efficientnet_params`).
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

# The data set's sizes when nothing describes it: ImageNet's (the defaults of
# TPU-EN's flags); data/dataset_info.py fills them from the data set first.
IMAGENET_COUNTS = {'num_train_images': 1281167, 'num_eval_images': 50000,
                   'num_label_classes': 1000}

MODES = ('train', 'eval', 'train_and_eval', 'export')
STRATEGIES = ('cpu', 'gpu', 'tpu', 'multi_worker')
OPTIMIZERS = ('lars', 'lamb', 'rmsprop', 'momentum', 'sgd')
LR_SCHEDULES = ('poly', 'exponential', 'cosine', 'constant')
LR_SCALINGS = ('linear', 'none')
AUGMENTATIONS = ('none', 'randaugment', 'autoaugment')
RESIZE_METHODS = ('bicubic', 'bilinear', 'area', 'nearest')
JIT_COMPILE = ('auto', 'true', 'false')

# Default LARS / L2 exclusions: batch-norm gamma/beta and biases, matched
# against the Keras 3 variable *path* (e.g. "block1a_bn/gamma").
DEFAULT_WEIGHT_DECAY_EXCLUDE = (r'(^|/)gamma$', r'(^|/)beta$', r'(^|/)bias$')


class ConfigError(ValueError):
  """A single-line, user-facing error about one setting.

  Attributes:
    setting: the setting's name (= its flag name without dashes).
    message: what was expected and what to do; other settings it names are
      written in backquotes, `` `name=value` ``.
  """

  def __init__(self, setting: str, message: str):
    self.setting = setting
    self.message = message
    super().__init__(f'{setting}: {message}')


def _check(cond: bool, setting: str, expected: str, got) -> None:
  if not cond:
    raise ConfigError(setting, f'expected {expected}, got {got!r}')


def setting(default, help: str, *, choices: Optional[Tuple] = None,  # pylint: disable=redefined-builtin
            flag: bool = True, name: Optional[str] = None):
  """A setting: a dataclass field with its help text and allowed values.

  Args:
    default: the default value (immutable: tuples, not lists).
    help: one or two sentences for `--help` and docs/flags.md.
    choices: allowed values of a str setting (an enum flag).
    flag: False for settings that only code sets (tests, derived values).
    name: the setting's name where it differs from the field's: its flag,
      its config.json key and the name its errors give (the field
      `DataConfig.source` is the setting `data`, flag `--data`).
  """
  return dataclasses.field(default=default, metadata=dict(
      help=help, choices=choices, flag=flag, name=name))


def _setting_name(f: dataclasses.Field) -> str:
  """The setting name of a field (see `setting`'s `name`)."""
  return f.metadata.get('name') or f.name


def section(cls):
  """A nested group of settings (e.g. the LARS settings of the optimizer)."""
  return dataclasses.field(default_factory=cls, metadata=dict(section=cls))


@dataclasses.dataclass(frozen=True)
class Setting:
  """One setting as the CLI and the docs see it."""
  name: str
  type: Any  # int, float, bool, str or tuple (a list of str).
  optional: bool  # None allowed (and the default is None).
  default: Any
  help: str
  choices: Optional[Tuple]
  title: str  # The group it is listed under.
  # Attribute path from ExperimentConfig; its last element is the field's
  # name, which may differ from the setting's (`setting`'s `name`).
  path: Tuple[str, ...]
  flag: bool  # False: set by code only (tests, derived values).


class Section:
  """Base of the config dataclasses: walks and builds them by setting name.

  Setting names are unique across the whole `ExperimentConfig`, so a flat
  `{name: value}` mapping (the flags) builds the nested config. Field names
  need not be (`optimizer.lars.epsilon`, `optimizer.lamb.epsilon`).

  Sections are frozen dataclasses, complete once constructed: the generated
  `__init__` ends in `__post_init__`, which fills the defaults that follow
  from other values (`_defaults`) and then checks the result (`_validate`),
  so no caller ever holds an instance with a default unresolved.
  """
  TITLE: ClassVar[str] = ''

  def __post_init__(self):
    # The only writes to a frozen config: inside its __init__, before
    # anyone else holds it.
    for name, value in self._defaults().items():
      object.__setattr__(self, name, value)
    self._validate()

  def _defaults(self) -> Dict[str, Any]:
    """{field: value} of the defaults left to resolve (e.g. None ones)."""
    return {}

  def _validate(self) -> None:
    """Raises ConfigError, naming the setting, on a value out of range."""

  @classmethod
  def settings(cls, path: Tuple[str, ...] = ()) -> Iterator[Setting]:
    """The settings of this section and its subsections, in field order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      if 'section' in f.metadata:
        yield from f.metadata['section'].settings(path + (f.name,))
        continue
      kind, optional = _unwrap(hints[f.name])
      yield Setting(name=_setting_name(f), type=kind, optional=optional,
                    default=f.default, help=f.metadata['help'],
                    choices=f.metadata['choices'], title=cls.TITLE,
                    path=path + (f.name,), flag=f.metadata['flag'])

  @classmethod
  def from_settings(cls, **values):
    """Builds this section from setting names (nested sections included).

    Raises:
      TypeError: a name is no setting of this section.
    """
    values = dict(values)
    # inf and nan parse as floats ('--base_learning_rate=inf'); no setting
    # means them, and a run on them trains to NaN for hours.
    floats = {s.name for s in cls.settings() if s.type is float}
    for name, value in values.items():
      if (name in floats and isinstance(value, (int, float)) and
          not math.isfinite(value)):
        raise ConfigError(name, f'expected a finite number, got {value!r}')
    kwargs = {}
    for f in dataclasses.fields(cls):
      if 'section' in f.metadata:
        sub = f.metadata['section']
        mine = {k: values.pop(k) for k in list(values)
                if k in sub.setting_names()}
        kwargs[f.name] = sub.from_settings(**mine)
      elif _setting_name(f) in values:
        kwargs[f.name] = values.pop(_setting_name(f))
    if values:
      raise TypeError(f'{cls.__name__}: no settings named {sorted(values)}')
    return cls(**kwargs)

  @classmethod
  def setting_names(cls) -> frozenset:
    """Every setting name of this section and its subsections."""
    names = set()
    for f in dataclasses.fields(cls):
      if 'section' in f.metadata:
        names |= f.metadata['section'].setting_names()
      else:
        names.add(_setting_name(f))
    return frozenset(names)

  def to_settings(self) -> Dict[str, Any]:
    """The flat `{name: value}` of every setting (inverse of from_settings)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if 'section' in f.metadata:
        out.update(value.to_settings())
      else:
        out[_setting_name(f)] = value
    return out

  def with_settings(self, **values):
    """A copy with these settings (by setting name, in any subsection).

    Built and checked like a new config from this one's settings, so
    defaults already resolved stay as they are: a copy with another
    `model_name` keeps this one's `image_size`.
    """
    return type(self).from_settings(**dict(self.to_settings(), **values))

  def to_dict(self) -> Dict[str, Any]:
    """The settings nested by section, keyed by setting name (config.json).

    Lists are tuples here (json writes them as lists).
    """
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if 'section' in f.metadata:
        out[f.name] = value.to_dict()
      else:
        out[_setting_name(f)] = value
    return out


def _unwrap(hint) -> Tuple[Any, bool]:
  """(base type, optional) of an annotation like Optional[int]."""
  optional = False
  if typing.get_origin(hint) is typing.Union:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional, hint = True, args[0]
  if typing.get_origin(hint) in (tuple, Tuple):
    return tuple, optional
  return hint, optional


def _check_regexes(name: str, patterns: Tuple[str, ...]) -> None:
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(name, f'expected valid regular expressions, got '
                        f'{pattern!r} ({e})') from None


def _choice(value, name: str, allowed) -> None:
  _check(value in allowed, name, 'one of ' + ', '.join(map(str, allowed)),
         value)


@dataclasses.dataclass(frozen=True)
class DistributeConfig(Section):
  """Which tf.distribute strategy to build."""
  TITLE: ClassVar[str] = 'Cluster'
  strategy: Optional[str] = setting(
      None, 'tf.distribute strategy: tpu (TPUStrategy), gpu '
      '(MirroredStrategy), multi_worker (MultiWorkerMirroredStrategy from '
      'TF_CONFIG), cpu (N logical CPU replicas). Default: tpu when --tpu is '
      'set, else cpu.', choices=STRATEGIES)
  tpu: Optional[str] = setting(
      None, "TPU name, 'local' on a TPU VM, or a grpc:// address (legacy "
      'TPU Node). Implies --strategy=tpu.')
  tpu_zone: Optional[str] = setting(
      None, 'GCE zone of the TPU named by --tpu (pod slices driven from '
      'worker 0, TPU Nodes).')
  gcp_project: Optional[str] = setting(
      None, 'GCP project of the TPU named by --tpu (pod slices, TPU Nodes).')
  num_cpu_replicas: int = setting(
      1, 'Logical CPU devices (replicas) for --strategy=cpu: simulates a pod '
      'slice locally.')
  num_gpus: int = setting(0, 'GPUs to use with --strategy=gpu; 0 = all.')
  num_replicas: Optional[int] = setting(
      None, 'Replicas of the slice (TPU cores, GPUs): --dry_run resolves the '
      'per-replica batch and BN groups for it without hardware; a real run '
      'checks that the strategy has this many.')
  shared_filesystem: bool = setting(
      False, 'Local --model_dir, --export_dir and --data_dir paths are on a '
      'file system every host mounts (NFS, Filestore, one machine). Without '
      'it a multi-host TPU slice or a multi-process TF_CONFIG cluster '
      'refuses local paths: use gs:// (or another remote scheme).')

  def _defaults(self):
    if self.strategy is None:
      return {'strategy': 'tpu' if self.tpu else 'cpu'}
    return {}

  def _validate(self):
    _choice(self.strategy, 'strategy', STRATEGIES)
    if self.tpu and self.strategy != 'tpu':
      raise ConfigError('tpu', f'{self.tpu!r} is given but '
                        f'`strategy={self.strategy}` does not use a TPU; use '
                        '`strategy=tpu` (or leave it out), or drop it')
    _check(self.num_cpu_replicas >= 1, 'num_cpu_replicas', 'an integer >= 1',
           self.num_cpu_replicas)
    _check(self.num_gpus >= 0, 'num_gpus', 'an integer >= 0', self.num_gpus)
    if self.num_replicas is not None:
      _check(self.num_replicas >= 1, 'num_replicas', 'an integer >= 1',
             self.num_replicas)
    if self.strategy == 'tpu':
      _check(bool(self.tpu), 'tpu',
             "a TPU name, 'local' (TPU VM) or grpc:// address with "
             '`strategy=tpu`', self.tpu)

  @property
  def known_num_replicas(self) -> Optional[int]:
    """The replica count before any strategy exists (None if unknown)."""
    if self.num_replicas:
      return self.num_replicas
    if self.strategy == 'cpu':
      return self.num_cpu_replicas
    return None


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
  """Where images come from and how they are preprocessed."""
  TITLE: ClassVar[str] = 'Data'
  data_dir: Optional[str] = setting(
      None, 'Directory (local or gs://) of ImageNet TFRecords '
      'train-*-of-* / validation-*-of-*, or a prepared tensorflow-datasets '
      'data_dir with --data=tfds:.')
  source: Optional[str] = setting(
      None, "Data source: 'synthetic', 'tfrecord' or 'tfds:NAME'. Default: "
      'tfrecord when --data_dir is set, else synthetic.', name='data')
  num_train_images: Optional[int] = setting(
      None, 'Images in the train split (epochs, the LR schedule). Default: '
      "from dataset_info.json beside the shards, else ImageNet's 1281167.")
  num_eval_images: Optional[int] = setting(
      None, 'Images evaluated: the first ones of the eval split. Default: '
      "the whole split, from dataset_info.json, else ImageNet's 50000.")
  augment_name: str = setting(
      'none', 'Training augmentation after the random crop.',
      choices=AUGMENTATIONS)
  randaug_num_layers: int = setting(2, 'RandAugment ops per image.')
  randaug_magnitude: float = setting(10.0, 'RandAugment magnitude [0, 30].')
  resize_method: str = setting('bicubic', 'Image resize method.',
                               choices=RESIZE_METHODS)
  shuffle_buffer: int = setting(1024, 'Examples in the shuffle buffer.')
  skip_corrupt: bool = setting(
      False, 'Skip (and count) corrupt training records instead of failing.')
  max_corrupt_fraction: float = setting(
      0.01, 'With --skip_corrupt: stop with an error when more than this '
      'fraction of the training records read was bad (checked after 1000 '
      'reads), or when 1000 reads in a row were bad.')
  max_image_pixels: int = setting(
      1 << 26, 'Refuse images whose header declares more pixels (checked '
      'before decoding): an error naming the file, or skipped and counted '
      'with --skip_corrupt. The exported model serves larger images as '
      'invalid rows.')
  deterministic: bool = setting(
      False, 'Deterministic input order and TF ops (slower): a run resumed '
      'after a kill ends with bitwise the weights of an uninterrupted run '
      'with the same --seed. tfrecord and synthetic data, no --augment_name.')
  seed: int = setting(0, 'Seed for weight initialization, synthetic data '
                      'and shuffling.')
  # Labels in the records are 1-based (label 0 = background, 1001 classes);
  # None: follows num_label_classes == 1001 (see ExperimentConfig).
  include_background_label: Optional[bool] = setting(
      None, 'Records hold 1-based labels.', flag=False)
  # Synthetic source only: labels learnable (a class-dependent pattern) or
  # pure noise.
  synthetic_learnable: bool = setting(True, 'Learnable synthetic labels.',
                                      flag=False)
  # Crops for data sets that are not ImageNet (docs/input_pipeline.md).
  train_crop_min_area: float = setting(
      0.08, 'Training crop: least fraction of the image area it covers '
      '(Inception-style crop; small images such as 32 px want more, e.g. '
      '0.25-0.35).')
  train_crop_max_area: float = setting(
      1.0, 'Training crop: largest fraction of the image area it covers.')
  train_crop_min_aspect: float = setting(
      3.0 / 4.0, 'Training crop: least width / height.')
  train_crop_max_aspect: float = setting(
      4.0 / 3.0, 'Training crop: largest width / height.')
  random_flip: bool = setting(
      True, 'Training: flip each crop left-right with probability 1/2 (off '
      'for data whose classes change when mirrored: digits, text).')
  eval_crop_fraction: Optional[float] = setting(
      None, 'Eval (and failed training-crop fallback): the center crop '
      'covers this fraction of the shorter side; 1.0 keeps the whole center '
      'square. Default: S / (S + round(S / 7)), 224 / 256 at S=224.')
  # Where the counts came from: 'dataset_info.json', 'settings' or
  # 'ImageNet defaults' (recorded in config.json).
  counts_from: Optional[str] = setting(None, 'Source of the counts.',
                                       flag=False)

  def _defaults(self):
    out = {}
    if self.source is None:
      out['source'] = 'tfrecord' if self.data_dir else 'synthetic'
    for name in ('num_train_images', 'num_eval_images'):
      if getattr(self, name) is None:
        out[name] = IMAGENET_COUNTS[name]
    if self.counts_from is None:
      out['counts_from'] = 'ImageNet defaults' if out.keys() & {
          'num_train_images', 'num_eval_images'} else 'settings'
    return out

  def _validate(self):
    ok = (self.source in ('synthetic', 'tfrecord') or
          (self.source.startswith('tfds:') and len(self.source) > 5))
    _check(ok, 'data', "'synthetic', 'tfrecord' or 'tfds:NAME'", self.source)
    if self.source == 'synthetic' and self.data_dir:
      raise ConfigError(
          'data_dir', f'{self.data_dir} is given but `data=synthetic` (set '
          'by a preset or flag) reads no files; add `data=tfrecord` (or '
          'tfds:NAME) after the preset, or drop it')
    if self.source != 'synthetic':
      _check(bool(self.data_dir), 'data_dir',
             f'a directory with `data={self.source}`', self.data_dir)
    _check(self.num_train_images >= 1, 'num_train_images', 'an integer >= 1',
           self.num_train_images)
    _check(self.num_eval_images >= 1, 'num_eval_images', 'an integer >= 1',
           self.num_eval_images)
    _choice(self.augment_name, 'augment_name', AUGMENTATIONS)
    _choice(self.resize_method, 'resize_method', RESIZE_METHODS)
    _check(self.randaug_num_layers >= 0, 'randaug_num_layers',
           'an integer >= 0', self.randaug_num_layers)
    _check(0 <= self.randaug_magnitude <= 30, 'randaug_magnitude',
           'a value in [0, 30]', self.randaug_magnitude)
    _check(self.shuffle_buffer >= 1, 'shuffle_buffer', 'an integer >= 1',
           self.shuffle_buffer)
    _check(0 <= self.max_corrupt_fraction <= 1, 'max_corrupt_fraction',
           'a value in [0, 1]', self.max_corrupt_fraction)
    _check(self.max_image_pixels >= 1, 'max_image_pixels', 'an integer >= 1',
           self.max_image_pixels)
    if self.deterministic:
      _check(not self.source.startswith('tfds:'), 'deterministic',
             '`data=tfrecord` or synthetic (tfds readers do not resume '
             'exactly)', self.source)
      _check(self.augment_name == 'none', 'deterministic',
             '`augment_name=none` (RandAugment and AutoAugment draw from '
             'stateful random ops)', self.augment_name)
    for name in ('train_crop_min_area', 'train_crop_max_area'):
      value = getattr(self, name)
      _check(0 < value <= 1, name, 'a value in (0, 1]', value)
    _check(self.train_crop_min_area <= self.train_crop_max_area,
           'train_crop_min_area',
           f'a value <= `train_crop_max_area={self.train_crop_max_area}`',
           self.train_crop_min_area)
    for name in ('train_crop_min_aspect', 'train_crop_max_aspect'):
      value = getattr(self, name)
      _check(0 < value < float('inf'), name, 'a finite value > 0', value)
    _check(self.train_crop_min_aspect <= self.train_crop_max_aspect,
           'train_crop_min_aspect',
           f'a value <= `train_crop_max_aspect={self.train_crop_max_aspect}`',
           self.train_crop_min_aspect)
    if self.eval_crop_fraction is not None:
      _check(0 < self.eval_crop_fraction <= 1, 'eval_crop_fraction',
             'a value in (0, 1] (or unset for S / (S + 32) at 224)',
             self.eval_crop_fraction)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
  """EfficientNet architecture.

  `width_coefficient`, `depth_coefficient`, `image_size` and `dropout_rate`
  default to the compound-scaling table for `name` (`model_name`); setting them
  builds a scaled-down (or custom) variant, which the tests and smoke runs
  use.
  """
  TITLE: ClassVar[str] = 'Model'
  name: str = setting('efficientnet-b0', 'EfficientNet variant.',
                      choices=tuple(MODEL_TABLE), name='model_name')
  num_label_classes: Optional[int] = setting(
      None, 'Classes; 1001 keeps label 0 as background (labels in the '
      'records are 1-based). Default: from dataset_info.json beside the '
      "shards, else ImageNet's 1000.")
  image_size: Optional[int] = setting(
      None, "Input resolution; default: the model's (224 for B0 ... 600 for "
      'B7).')
  width_coefficient: Optional[float] = setting(
      None, "Override the model's width multiplier (scaled-down test "
      'models).')
  depth_coefficient: Optional[float] = setting(
      None, "Override the model's depth multiplier (scaled-down test "
      'models).')
  dropout_rate: Optional[float] = setting(
      None, "Dropout before the classifier; default: the model's.")
  stochastic_depth_rate: float = setting(
      0.2, 'Drop rate of the last block (grows linearly from 0 at the first '
      'block).')
  batch_norm_momentum: float = setting(
      0.99, 'Batch-norm moving-average momentum.')
  batch_norm_warmup: Optional[bool] = setting(
      None, 'Batch-norm moving statistics warm up like the EMA: momentum '
      'min(M, (1 + step) / (10 + step)), so they hold the data\'s '
      'statistics after tens of steps instead of keeping their initial or '
      'loaded values for ~1 / (1 - M) steps. Default: on with '
      '--init_checkpoint (a short fine-tune would otherwise evaluate with '
      'the source\'s statistics), off otherwise.')
  batch_norm_epsilon: float = setting(1e-3, 'Batch-norm epsilon.')
  bn_group_size: Optional[int] = setting(
      None, 'Replicas per batch-norm group: 1 = local BN, 0 = all replicas '
      '(global sync BN).')
  bn_group_batch_size: Optional[int] = setting(
      None, 'Target images per batch-norm group; the group size is derived '
      'from the actual replica count and per-replica batch.')
  use_bfloat16: bool = setting(
      False, 'bfloat16 activations (mixed precision) with float32 weights '
      'and logits.')
  use_float16: bool = setting(
      False, 'float16 activations (mixed precision) with float32 weights and '
      'logits and dynamic loss scaling, for GPUs without bfloat16 (V100, '
      'T4). Not on TPU (use --use_bfloat16).')
  depth_divisor: int = setting(8, 'Channel counts round to multiples of '
                               'this.', flag=False)

  def _defaults(self):
    _choice(self.name, 'model_name', tuple(MODEL_TABLE))
    table = dict(zip(('width_coefficient', 'depth_coefficient', 'image_size',
                      'dropout_rate'), MODEL_TABLE[self.name]),
                 num_label_classes=IMAGENET_COUNTS['num_label_classes'])
    return {k: v for k, v in table.items() if getattr(self, k) is None}

  def _validate(self):
    _check(self.num_label_classes >= 2, 'num_label_classes',
           'an integer >= 2', self.num_label_classes)
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
    _check(0 < self.batch_norm_momentum < 1, 'batch_norm_momentum',
           'a value in (0, 1)', self.batch_norm_momentum)
    _check(self.batch_norm_epsilon > 0, 'batch_norm_epsilon', 'a value > 0',
           self.batch_norm_epsilon)
    if self.bn_group_size is not None:
      _check(self.bn_group_size >= 0, 'bn_group_size',
             'an integer >= 0 (0 = all replicas)', self.bn_group_size)
    if self.bn_group_batch_size is not None:
      _check(self.bn_group_batch_size >= 1, 'bn_group_batch_size',
             'an integer >= 1', self.bn_group_batch_size)
      _check(self.bn_group_size is None, 'bn_group_batch_size',
             'not to be combined with `bn_group_size`', self.bn_group_size)
    if self.use_float16:
      _check(not self.use_bfloat16, 'use_float16',
             'not to be combined with `use_bfloat16` (pick one precision)',
             self.use_float16)

  def resolve_bn_group_size(self, num_replicas: int,
                            per_replica_batch: int) -> int:
    """Replicas per batch-norm group on a real topology.

    `bn_group_size` None -> 1 (local BN), 0 -> all replicas, else that many
    replicas (it must divide the replica count). With `bn_group_batch_size`
    (target images per group, TPU-EN's `--batch_norm_batch_size`) the group
    resolves on any slice: the largest divisor of the replica count whose
    group batch does not exceed the target; a per-replica batch at or above
    the target gives local BN (TPU-EN used local BN at >= 128 per core).

    Raises:
      ConfigError: an explicit `bn_group_size` does not divide the replicas.
    """
    target = self.bn_group_batch_size
    if target is not None:
      want = max(1, target // per_replica_batch)
      return max(d for d in range(1, min(want, num_replicas) + 1)
                 if num_replicas % d == 0)
    g = self.bn_group_size
    if g is None:
      return 1
    if g == 0:
      return num_replicas
    _check(num_replicas % g == 0, 'bn_group_size',
           f'a divisor of the number of replicas ({num_replicas}) or 0', g)
    return g


@dataclasses.dataclass(frozen=True)
class ScheduleConfig(Section):
  """The learning rate: its peak, warmup and decay."""
  TITLE: ClassVar[str] = 'Learning-rate schedule'
  base_learning_rate: float = setting(
      0.016, 'Learning rate per 256 images with --lr_scaling=linear, or the '
      'absolute peak with --lr_scaling=none.')
  lr_scaling: str = setting(
      'linear', 'linear: peak = base * batch / 256; none: peak = base.',
      choices=LR_SCALINGS)
  lr_schedule: str = setting('exponential', 'Decay after warmup.',
                             choices=LR_SCHEDULES)
  lr_warmup_epochs: float = setting(5.0, 'Linear warmup epochs.')
  lr_decay_epochs: float = setting(
      2.4, 'Epochs per decay step (--lr_schedule=exponential).')
  lr_decay_factor: float = setting(
      0.97, 'Decay factor per step (--lr_schedule=exponential).')
  poly_power: float = setting(2.0, 'Power of --lr_schedule=poly.')
  end_learning_rate: float = setting(
      0.0, 'Final LR of --lr_schedule=poly and cosine.')

  def _validate(self):
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
    _check(self.end_learning_rate >= 0, 'end_learning_rate', 'a value >= 0',
           self.end_learning_rate)

  def peak_learning_rate(self, train_batch_size: int) -> float:
    """The LR reached at the end of warmup.

    `lr_scaling='linear'`: base_learning_rate * train_batch_size / 256 (the
    EfficientNet convention: 0.016 per 256 images, 0.256 at 4096).
    `lr_scaling='none'`: base_learning_rate is the absolute peak (LARS
    recipes quote the peak directly, e.g. 25.0 at batch 16384).
    """
    if self.lr_scaling == 'linear':
      return self.base_learning_rate * train_batch_size / 256.0
    return float(self.base_learning_rate)

  def warmup_steps(self, steps_per_epoch: float) -> int:
    """`int(lr_warmup_epochs * steps_per_epoch)`, TPU-EN's floor."""
    return int(self.lr_warmup_epochs * steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class LarsConfig(Section):
  """LARS (You et al. 2017, arXiv 1708.03888), used with `optimizer=lars`."""
  TITLE: ClassVar[str] = 'Optimizer: LARS'
  eeta: float = setting(0.001, 'LARS trust coefficient.', name='lars_eeta')
  epsilon: float = setting(0.0, 'LARS epsilon in the trust ratio.',
                           name='lars_epsilon')

  def _validate(self):
    _check(self.eeta > 0, 'lars_eeta', 'a value > 0', self.eeta)
    _check(self.epsilon >= 0, 'lars_epsilon', 'a value >= 0', self.epsilon)


@dataclasses.dataclass(frozen=True)
class LambConfig(Section):
  """LAMB (You et al. 2019, arXiv 1904.00962), used with `optimizer=lamb`."""
  TITLE: ClassVar[str] = 'Optimizer: LAMB'
  beta_1: float = setting(0.9, 'LAMB first-moment decay.',
                          name='lamb_beta_1')
  beta_2: float = setting(0.999, 'LAMB second-moment decay.',
                          name='lamb_beta_2')
  epsilon: float = setting(1e-6, 'LAMB epsilon added to sqrt(v_hat).',
                           name='lamb_epsilon')

  def _validate(self):
    for name, value in (('lamb_beta_1', self.beta_1),
                        ('lamb_beta_2', self.beta_2)):
      _check(0 <= value < 1, name, 'a value in [0, 1)', value)
    _check(self.epsilon > 0, 'lamb_epsilon', 'a value > 0', self.epsilon)


@dataclasses.dataclass(frozen=True)
class RMSPropConfig(Section):
  """TF1-style RMSProp of the original recipe, with `optimizer=rmsprop`."""
  TITLE: ClassVar[str] = 'Optimizer: RMSProp'
  decay: float = setting(0.9, 'RMSProp decay (rho).', name='rmsprop_decay')
  epsilon: float = setting(1e-3, 'RMSProp epsilon.', name='rmsprop_epsilon')

  def _validate(self):
    _check(0 <= self.decay < 1, 'rmsprop_decay', 'a value in [0, 1)',
           self.decay)
    _check(self.epsilon > 0, 'rmsprop_epsilon', 'a value > 0', self.epsilon)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
  """Optimizer, regularization and EMA; the schedule and per-optimizer
  settings are subsections."""
  TITLE: ClassVar[str] = 'Optimization'
  name: str = setting('rmsprop', 'Optimizer.', choices=OPTIMIZERS,
                      name='optimizer')
  momentum: float = setting(0.9, 'Momentum (LARS, RMSProp, momentum; '
                            'LAMB uses --lamb_beta_1).')
  nesterov: bool = setting(False, 'Nesterov momentum (LARS, momentum).')
  weight_decay: float = setting(
      1e-5, 'Weight decay, applied once: by LARS or LAMB itself, or as an '
      'L2 loss term for the other optimizers.')
  weight_decay_exclude: Tuple[str, ...] = setting(
      DEFAULT_WEIGHT_DECAY_EXCLUDE, 'Regexes on variable paths excluded '
      'from weight decay and LARS / LAMB adaptation.')
  label_smoothing: float = setting(0.1, 'Label smoothing.')
  mixup_alpha: float = setting(
      0.0, 'Mixup: images and labels of a replica\'s batch mixed with its '
      'reverse, lam ~ Beta(alpha, alpha); 0 = off (timm uses 0.1-0.8).')
  cutmix_alpha: float = setting(
      0.0, 'CutMix: a box of the partner image pasted in, labels weighted by '
      'its area, lam ~ Beta(alpha, alpha); 0 = off (usually 1.0).')
  mixup_switch_prob: float = setting(
      0.5, 'With both --mixup_alpha and --cutmix_alpha: probability of CutMix '
      'for a batch.')
  moving_average_decay: float = setting(
      0.9999, 'EMA decay of the weights used for evaluation and export; 0 '
      'disables EMA.')
  schedule: ScheduleConfig = section(ScheduleConfig)
  lars: LarsConfig = section(LarsConfig)
  lamb: LambConfig = section(LambConfig)
  rmsprop: RMSPropConfig = section(RMSPropConfig)

  def _defaults(self):
    # A list (from code) is kept as the tuple a flag or config.json gives.
    return {'weight_decay_exclude': tuple(self.weight_decay_exclude)}

  def _validate(self):
    _choice(self.name, 'optimizer', OPTIMIZERS)
    _check(0 <= self.momentum < 1, 'momentum', 'a value in [0, 1)',
           self.momentum)
    _check(self.weight_decay >= 0, 'weight_decay', 'a value >= 0',
           self.weight_decay)
    _check(0 <= self.label_smoothing < 1, 'label_smoothing',
           'a value in [0, 1)', self.label_smoothing)
    _check(0 <= self.moving_average_decay < 1, 'moving_average_decay',
           'a value in [0, 1) (0 disables EMA)', self.moving_average_decay)
    for name in ('mixup_alpha', 'cutmix_alpha'):
      value = getattr(self, name)
      _check(0 <= value < float('inf'), name, 'a finite value >= 0 (0 = off)',
             value)
    _check(0 <= self.mixup_switch_prob <= 1, 'mixup_switch_prob',
           'a value in [0, 1]', self.mixup_switch_prob)
    _check_regexes('weight_decay_exclude', self.weight_decay_exclude)


@dataclasses.dataclass(frozen=True)
class InitConfig(Section):
  """Initial weights of a new run (fine-tuning); see docs/fine_tuning.md."""
  TITLE: ClassVar[str] = 'Fine-tuning'
  checkpoint: Optional[str] = setting(
      None, 'Initial weights for a new run: one of our checkpoints (a '
      'prefix, or a model_dir for its latest), or a keras.applications '
      'EfficientNet weights file (.weights.h5 / .h5). A run that resumes '
      'from a checkpoint in --model_dir ignores it.', name='init_checkpoint')
  exclude: Tuple[str, ...] = setting(
      (), 'Regexes on variable paths (e.g. logits, block7.*) left as '
      'initialized instead of loaded. The classifier is re-initialized by '
      'itself when the class count differs.', name='init_exclude')
  from_ema: bool = setting(
      False, "With one of our checkpoints: load its EMA averages instead of "
      'its weights.', name='init_from_ema')

  def _defaults(self):
    return {'exclude': tuple(self.exclude)}

  def _validate(self):
    _check_regexes('init_exclude', self.exclude)
    if self.from_ema:
      _check(bool(self.checkpoint), 'init_from_ema',
             'an `init_checkpoint` to read the averages from',
             self.checkpoint)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
  """The loop: batch sizes, length, host loop, checkpoints, evaluation."""
  TITLE: ClassVar[str] = 'Loop'
  model_dir: Optional[str] = setting(
      None, 'Directory (local or gs://) for checkpoints, summaries and the '
      'resolved config. An existing run there is resumed, never '
      'overwritten.')
  mode: str = setting(
      'train', 'What to run. eval and export read the run\'s settings from '
      'model_dir/config.json, not its hardware (replicas, BN groups): flags '
      'given override them.', choices=MODES)
  train_batch_size: int = setting(2048, 'Global training batch.')
  eval_batch_size: int = setting(1024, 'Global eval batch.')
  # Eval / export of a finished run (main.inherit_run_settings): the run's
  # eval images per replica. The eval batch then follows the replicas that
  # evaluate (`ExperimentConfig.eval_batch_size_on`), so a device holds what
  # it held in the run's own evaluations on any slice.
  eval_batch_per_replica: Optional[int] = setting(
      None, 'Eval images per replica (eval / export of a finished run).',
      flag=False)
  train_steps: Optional[int] = setting(
      None, 'Training steps (wins over --train_epochs).')
  train_epochs: float = setting(350.0, 'Training epochs.')
  iterations_per_loop: Optional[int] = setting(
      None, 'Steps per host call (one progress line and checkpoint each). '
      'Default: one epoch, at most a 20th of the run.')
  eval_every_epochs: Optional[float] = setting(
      None, 'train_and_eval: epochs between evaluations; 0 = only at the '
      'end. Default: every epoch, at most 20 evaluations per run.')
  eval_every_steps: Optional[int] = setting(
      None, 'train_and_eval: steps between evaluations (wins over '
      '--eval_every_epochs).')
  eval_steps: Optional[int] = setting(
      None, 'Limit evaluation to this many batches (default: the whole eval '
      'set, exactly once).')
  eval_timeout: int = setting(
      0, '--mode=eval: seconds to wait for a new checkpoint; 0 = evaluate '
      'the latest and exit.')
  keep_checkpoint_max: int = setting(5, 'Checkpoints kept.')
  export_dir: Optional[str] = setting(
      None, 'Write a SavedModel serving encoded images here after training '
      '/ evaluation (required by --mode=export).')
  checkpoint_path: Optional[str] = setting(
      None, '--mode=eval / export: the checkpoint to use, a prefix (e.g. '
      'model_dir/ckpt-1000) or best (the best evaluated one, model_dir/best); '
      'default: the latest (eval: each new one with --eval_timeout).')
  jit_compile: str = setting(
      'auto', 'XLA. auto: TPU compiles every step (always); GPU and CPU off. '
      'true (GPU, or one CPU replica): the forward and backward pass '
      'compiled, the optimizer update outside.', choices=JIT_COMPILE)
  dry_run: bool = setting(
      False, 'Print the resolved config, the replica plan (with '
      '--num_replicas off CPU) and LR schedule, plot it to '
      'model_dir/lr_schedule.png, and exit.')
  summary_images: int = setting(
      8, 'Images of the first training batch shown in TensorBoard '
      '(train/input_images, one grid) at the start of training; 0: none.')
  init: InitConfig = section(InitConfig)

  def _validate(self):
    _choice(self.mode, 'mode', MODES)
    _check(bool(self.model_dir), 'model_dir',
           'a directory for checkpoints and summaries', self.model_dir)
    _check(self.train_batch_size >= 1, 'train_batch_size', 'an integer >= 1',
           self.train_batch_size)
    _check(self.eval_batch_size >= 1, 'eval_batch_size', 'an integer >= 1',
           self.eval_batch_size)
    if self.eval_batch_per_replica is not None:
      _check(self.eval_batch_per_replica >= 1, 'eval_batch_per_replica',
             'an integer >= 1', self.eval_batch_per_replica)
    if self.train_steps is not None:
      _check(self.train_steps >= 1, 'train_steps', 'an integer >= 1',
             self.train_steps)
    else:
      _check(self.train_epochs > 0, 'train_epochs',
             'a value > 0 (or set `train_steps`)', self.train_epochs)
    if self.iterations_per_loop is not None:
      _check(self.iterations_per_loop >= 1, 'iterations_per_loop',
             'an integer >= 1', self.iterations_per_loop)
    if self.eval_every_epochs is not None:
      _check(self.eval_every_epochs >= 0, 'eval_every_epochs',
             'a value >= 0', self.eval_every_epochs)
    if self.eval_every_steps is not None:
      _check(self.eval_every_steps >= 1, 'eval_every_steps',
             'an integer >= 1', self.eval_every_steps)
    if self.eval_steps is not None:
      _check(self.eval_steps >= 1, 'eval_steps', 'an integer >= 1',
             self.eval_steps)
    _check(self.eval_timeout >= 0, 'eval_timeout', 'an integer >= 0',
           self.eval_timeout)
    _check(self.keep_checkpoint_max >= 1, 'keep_checkpoint_max',
           'an integer >= 1', self.keep_checkpoint_max)
    _check(self.summary_images >= 0, 'summary_images', 'an integer >= 0',
           self.summary_images)
    _choice(self.jit_compile, 'jit_compile', JIT_COMPILE)
    if self.mode == 'export':
      _check(bool(self.export_dir), 'export_dir',
             'a directory with `mode=export`', self.export_dir)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(Section):
  """Everything one run needs; checks the rules across sections."""
  distribute: DistributeConfig = section(DistributeConfig)
  data: DataConfig = section(DataConfig)
  model: ModelConfig = section(ModelConfig)
  optimizer: OptimizerConfig = section(OptimizerConfig)
  train: TrainConfig = section(TrainConfig)

  @property
  def trains(self) -> bool:
    """The mode trains: the batch and BN-group rules of its replicas apply."""
    return self.train.mode in ('train', 'train_and_eval')

  @property
  def mixes(self) -> bool:
    """Mixup or CutMix is on (soft labels in the train step)."""
    return self.optimizer.mixup_alpha > 0 or self.optimizer.cutmix_alpha > 0

  def _defaults(self):
    # Settings whose defaults follow from other sections: the section is
    # rebuilt with them (and checked again).
    out = {}
    if self.model.batch_norm_warmup is None:
      out['model'] = dataclasses.replace(
          self.model, batch_norm_warmup=bool(self.train.init.checkpoint))
    if self.data.include_background_label is None:
      out['data'] = dataclasses.replace(
          self.data,
          include_background_label=self.model.num_label_classes == 1001)
    return out

  def _validate(self):
    self._check_schedule()
    if self.model.use_float16 and self.distribute.strategy == 'tpu':
      raise ConfigError('use_float16', 'TPUs compute in bfloat16, not '
                        'float16; use `use_bfloat16` instead')
    if self.distribute.known_num_replicas:
      self.validate_for_replicas(self.distribute.known_num_replicas)

  def _check_schedule(self) -> None:
    """The schedule against the run's length and batch."""
    sched = self.optimizer.schedule
    total = self.total_train_steps
    epochs = total / self.steps_per_epoch
    if (sched.lr_warmup_epochs >= epochs or
        sched.warmup_steps(self.steps_per_epoch) >= total):
      raise ConfigError(
          'lr_warmup_epochs',
          f'expected fewer than the {epochs:g} training epochs ({total} '
          f'steps of {self.steps_per_epoch:g} per epoch; see '
          f'`train_epochs`/`train_steps`), got {sched.lr_warmup_epochs!r}')
    if sched.lr_schedule in ('poly', 'cosine'):
      peak = self.peak_learning_rate
      _check(sched.end_learning_rate <= peak, 'end_learning_rate',
             f'a value in [0, {peak:g}] (the peak learning rate)',
             sched.end_learning_rate)

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
  def peak_learning_rate(self) -> float:
    return self.optimizer.schedule.peak_learning_rate(
        self.train.train_batch_size)

  # Default reporting: a host loop (one progress line and checkpoint) of at
  # most an epoch and at most a 20th of the run; an evaluation every epoch,
  # or every 20th of the run when that is longer. A short run on small data
  # then reports and evaluates every epoch, and a 350-epoch ImageNet run
  # logs every epoch and evaluates every 17.5 epochs.
  DEFAULT_REPORTS_PER_RUN: ClassVar[int] = 20

  def _epoch_and_share(self) -> Tuple[int, int]:
    total = self.total_train_steps
    return (max(1, int(round(self.steps_per_epoch))),
            max(1, -(-total // self.DEFAULT_REPORTS_PER_RUN)))

  @property
  def loop_steps(self) -> int:
    """Steps per host loop: --iterations_per_loop, or its default."""
    if self.train.iterations_per_loop is not None:
      return self.train.iterations_per_loop
    return min(*self._epoch_and_share(), self.total_train_steps)

  @property
  def eval_interval_steps(self) -> int:
    """Train steps between evaluations in train_and_eval mode."""
    if self.train.eval_every_steps:
      return self.train.eval_every_steps
    if self.train.eval_every_epochs is None:
      return min(max(*self._epoch_and_share()), self.total_train_steps)
    if self.train.eval_every_epochs > 0:
      return max(1, int(round(self.train.eval_every_epochs *
                              self.steps_per_epoch)))
    return self.total_train_steps

  def eval_batch_size_on(self, num_replicas: int) -> int:
    """The global eval batch on `num_replicas` replicas.

    `eval_batch_size`, unless a finished run is evaluated from its model_dir
    (`eval_batch_per_replica`): then each replica takes as many images as
    in the run's own evaluations, whatever the replica count here.
    """
    per_replica = self.train.eval_batch_per_replica
    return (per_replica * num_replicas if per_replica else
            self.train.eval_batch_size)

  def validate_for_replicas(self, num_replicas: int) -> int:
    """Checks that need the replica count; returns the BN group size.

    Training checks both batches and resolves the BN groups. Eval checks
    only its eval batch and export no batch: the training batch and the BN
    groups belong to the replicas that trained, and inference normalizes
    with the moving statistics, in no group (size 1).
    """
    batches = {'eval_batch_size': self.eval_batch_size_on(num_replicas)}
    if self.trains:
      batches = {'train_batch_size': self.train.train_batch_size, **batches}
    elif self.train.mode == 'export':
      batches = {}
    for name, batch in batches.items():
      _check(batch % num_replicas == 0, name,
             f'a multiple of the number of replicas ({num_replicas})', batch)
    if not self.trains:
      return 1
    return self.model.resolve_bn_group_size(
        num_replicas, self.train.train_batch_size // num_replicas)

  # ---- serialization ------------------------------------------------------
  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> 'ExperimentConfig':
    """Inverse of to_dict (config.json); see `settings_from_dict`."""
    return cls.from_settings(**settings_from_dict(d))


# Field names and values of config.json files written before every setting
# took its flag's name and type.
_RENAMED = {
    'name': 'model_name', 'num_classes': 'num_label_classes',
    'bn_momentum': 'batch_norm_momentum', 'bn_epsilon': 'batch_norm_epsilon',
    'augment': 'augment_name', 'source': 'data',
}
_OLD_JIT_COMPILE = {None: 'auto', True: 'true', False: 'false'}


def settings_from_dict(d: dict, where: Optional[str] = None
                       ) -> Dict[str, Any]:
  """The flat settings of a config.json dict, older layouts included.

  Unknown keys (settings since removed) are dropped. Every known setting's
  value is checked against its type (a bool is no int, a string no bool:
  nothing is coerced), its choices and, for floats, finiteness; a section
  must be an object.

  Args:
    d: the parsed JSON.
    where: the file it came from, named in errors.

  Raises:
    ConfigError: (setting 'model_dir') one line naming the file and the
      key, e.g. `data.skip_corrupt`.
  """
  where = where or 'config.json'
  by_name = {s.name: s for s in ExperimentConfig.settings()}
  sections = _section_paths(ExperimentConfig)

  def bad(key, expected, value):
    shown = json.dumps(value) if _jsonable(value) else repr(value)
    return ConfigError('model_dir', f'{where}: "{key}" must be {expected}, '
                       f'got {shown}; restore the file (or use a new '
                       '`model_dir`)')

  if not isinstance(d, dict):
    raise bad('(top level)', 'a JSON object of settings', d)
  flat, keys = {}, {}

  def collect(node, prefix):
    for k, v in node.items():
      key = f'{prefix}{k}'
      if k == 'resolved':  # What the settings came to (run_dir.write_config).
        if v is not None and not isinstance(v, dict):
          raise bad(key, 'an object', v)
        continue
      if isinstance(v, dict):
        collect(v, key + '.')
      elif key in sections:
        raise bad(key, 'an object (a section of settings)', v)
      else:
        name = _RENAMED.get(k, k)
        flat[name], keys[name] = v, key

  collect(d, '')
  if 'jit_compile' in flat and (flat['jit_compile'] is None or
                                isinstance(flat['jit_compile'], bool)):
    flat['jit_compile'] = _OLD_JIT_COMPILE[flat['jit_compile']]
  out = {}
  for name, value in flat.items():
    spec = by_name.get(name)
    if spec is None:
      continue
    out[name] = _checked_value(spec, value,
                               lambda e, v, k=keys[name]: bad(k, e, v))
  return out


def _section_paths(cls, prefix: str = '') -> frozenset:
  """The dotted keys of config.json's sections: data, optimizer.lars, ..."""
  paths = set()
  for f in dataclasses.fields(cls):
    if 'section' in f.metadata:
      paths.add(prefix + f.name)
      paths |= _section_paths(f.metadata['section'], f'{prefix}{f.name}.')
  return frozenset(paths)


def _jsonable(value) -> bool:
  try:
    json.dumps(value, allow_nan=False)
    return True
  except (TypeError, ValueError):
    return False


def _checked_value(spec: Setting, value, bad):
  """`value` of setting `spec` from a file, as the config takes it."""
  if value is None:
    if spec.optional:
      return None
    raise bad(f'a {_TYPE_NAMES[spec.type]}', value)
  kind = spec.type
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif kind is float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))
  elif kind is str:
    ok = isinstance(value, str)
  else:  # tuple: a list of strings.
    ok = (isinstance(value, (list, tuple)) and
          all(isinstance(v, str) for v in value))
    value = tuple(value) if ok else value
  if not ok:
    raise bad(f'a {_TYPE_NAMES[kind]}', value)
  if spec.choices and value not in spec.choices:
    raise bad('one of ' + ', '.join(spec.choices), value)
  return value


_TYPE_NAMES = {bool: 'boolean (true or false)', int: 'whole number',
               float: 'finite number', str: 'string',
               tuple: 'list of strings'}


# Settings that describe the hardware a run trained on, not its model: the
# cluster and its replicas, batch norm's groups of replicas and the XLA mode
# of its devices. Eval and export of a finished run use their own
# (main.inherit_run_settings); inference normalizes with the moving
# statistics, in no group. The run's global batches are inherited, as
# numbers, not as rules: `train_batch_size` gives its epochs, and its eval
# batch carries over per replica (`eval_batch_per_replica`).
TOPOLOGY_SETTINGS = DistributeConfig.setting_names() | frozenset(
    {'bn_group_size', 'bn_group_batch_size', 'jit_compile'})


def flag_settings() -> List[Setting]:
  """Every setting with a flag, grouped by section, in definition order."""
  return [s for s in ExperimentConfig.settings() if s.flag]
