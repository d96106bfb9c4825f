"""`dataset_info.json`: a TFRecord data set's description of itself.

Written beside the shards by efficientnet-tpu-make-tfrecords (at the end of
a conversion, or with `--index DIR` for shards that already exist). It
holds, per split, the record count and each file's record count and byte
size (keyed by basename), the classes (label -> synset -> human text where
known) and the label base: 1 when labels in the records start at 1 (the
standard ImageNet TFRecords, where 0 is background), else 0.

The per-file byte sizes let a reader trust a count only for the file it
was taken from: a shard rewritten since has another size and is counted
again (`tfrecord.record_counts`).

  {"format": 1, "label_base": 1,
   "classes": [{"label": 1, "synset": "n01440764", "text": "tench"}, ...],
   "splits": {"validation": {"num_records": 50000, "num_classes": 1000,
                             "files": {"validation-00000-of-00128":
                                       {"records": 391, "bytes": 52428800},
                                       ...}},
              "train": {...}}}

Local paths and any tf.io.gfile filesystem (gs://...) work alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Dict, List, Optional

from absl import logging
import tensorflow as tf

from efficientnet_tpu import fileio
from efficientnet_tpu.config import IMAGENET_COUNTS, ConfigError

FILENAME = 'dataset_info.json'
FORMAT = 1
# Split name -> the TFRecord file prefix (`train-*`, `validation-*`).
SPLITS = ('train', 'validation')


@dataclasses.dataclass(frozen=True)
class FileInfo:
  """One TFRecord shard: its records and its size in bytes."""
  records: int
  bytes: int


@dataclasses.dataclass(frozen=True)
class ClassInfo:
  """One class: its label in the records, synset and text ('' if unknown)."""
  label: int
  synset: str = ''
  text: str = ''


@dataclasses.dataclass
class SplitInfo:
  """One split: its shards by basename and the distinct labels it holds."""
  files: Dict[str, FileInfo]
  num_classes: int = 0

  @property
  def num_records(self) -> int:
    return sum(f.records for f in self.files.values())


@dataclasses.dataclass
class DatasetInfo:
  """What `dataset_info.json` holds.

  Attributes:
    splits: 'train' / 'validation' -> `SplitInfo`.
    classes: one per label, label_base, label_base + 1, ... in order.
    label_base: the smallest label a record may hold: 1 (0 is background)
      or 0.
  """
  splits: Dict[str, SplitInfo]
  classes: List[ClassInfo]
  label_base: int = 1

  @property
  def num_classes(self) -> int:
    """Classes in the records (background, if label_base is 1, not counted)."""
    return len(self.classes)

  def num_records(self, split: str) -> int:
    """Records of `split`; 0 for a split not described."""
    info = self.splits.get(split)
    return info.num_records if info else 0

  def class_names(self) -> List[str]:
    """Text (else synset, else the label) of class i = label - label_base."""
    return [c.text or c.synset or str(c.label) for c in self.classes]

  def file_counts(self, split: str) -> Dict[str, FileInfo]:
    """basename -> `FileInfo` of `split`'s shards (empty if not described)."""
    info = self.splits.get(split)
    return dict(info.files) if info else {}


def path(data_dir: str) -> str:
  return os.path.join(data_dir, FILENAME)


def to_json(info: DatasetInfo) -> str:
  """The file's text: keys sorted, so equal infos give equal files."""
  return json.dumps({
      'format': FORMAT,
      'label_base': info.label_base,
      'num_classes': info.num_classes,
      'classes': [dataclasses.asdict(c) for c in info.classes],
      'splits': {
          name: {'num_records': s.num_records, 'num_classes': s.num_classes,
                 'files': {f: dataclasses.asdict(fi)
                           for f, fi in sorted(s.files.items())}}
          for name, s in sorted(info.splits.items())},
  }, indent=1, sort_keys=True) + '\n'


def write(data_dir: str, info: DatasetInfo) -> str:
  """Writes `data_dir/dataset_info.json` atomically; returns its path."""
  _validate(info, path(data_dir))
  target = path(data_dir)
  fileio.write_atomically(target, to_json(info))
  return target


def read(data_dir: str) -> Optional[DatasetInfo]:
  """The `DatasetInfo` of `data_dir`, or None if it has no dataset_info.json.

  Raises:
    ValueError: one line naming the file, when its content is malformed
      (not JSON, missing or mistyped fields, counts that do not add up), or
      it cannot be read (permissions, an unreachable bucket).
  """
  target = path(data_dir)
  try:
    with tf.io.gfile.GFile(target, 'r') as f:
      text = f.read()
  except tf.errors.NotFoundError:
    return None
  except tf.errors.OpError as e:
    first = (e.message.strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f'{target}: could not read it ({first})') from None
  try:
    return _parse(json.loads(text), target)
  except KeyError as e:
    raise ValueError(f'{target}: malformed (missing field {e})') from None
  except (ValueError, TypeError, AttributeError) as e:
    message = ' '.join(str(e).split()) or type(e).__name__
    if not message.startswith(target):
      message = f'{target}: malformed ({message})'
    raise ValueError(message) from None


def _parse(data, where: str) -> DatasetInfo:
  """Checks every field's type and range (nothing is coerced: a string, a
  float or a bool is no count) and builds the info. Errors name the key."""
  obj = functools.partial(_object, where=where)
  data = obj(data, '(top level)', 'a JSON object')
  fmt = data.get('format')
  if fmt != FORMAT or isinstance(fmt, bool) or not isinstance(fmt, int):
    raise ValueError(f'{where}: expected "format": {FORMAT}, got {fmt!r}')
  splits = {}
  for name, s in obj(data['splits'], 'splits').items():
    s = obj(s, f'splits.{name}')
    files = {}
    for f, e in obj(s['files'], f'splits.{name}.files').items():
      e = obj(e, f'splits.{name}.files.{f}')
      key = f'splits.{name}.files.{f}'
      files[f] = FileInfo(
          records=_int(e['records'], f'{name} {f} records', f'{key}.records'),
          bytes=_int(e['bytes'], f'{name} {f} bytes', f'{key}.bytes'))
    split = SplitInfo(files=files,
                      num_classes=_int(s.get('num_classes', 0),
                                       f'{name} num_classes',
                                       f'splits.{name}.num_classes'))
    if 'num_records' in s:
      described = _int(s['num_records'], f'{name} num_records',
                       f'splits.{name}.num_records')
      if described != split.num_records:
        raise ValueError(f'{where}: split {name!r} has num_records '
                         f'{described!r} but its files hold '
                         f'{split.num_records}')
    splits[name] = split
  classes = []
  if not isinstance(data['classes'], list):
    raise ValueError(f'{where}: expected a list for "classes", got '
                     f'{data["classes"]!r}')
  for i, c in enumerate(data['classes']):
    c = obj(c, f'classes[{i}]')
    texts = {}
    for k in ('synset', 'text'):
      texts[k] = c.get(k, '')
      if not isinstance(texts[k], str):
        raise ValueError(f'{where}: expected a string for '
                         f'"classes[{i}].{k}", got {texts[k]!r}')
    classes.append(ClassInfo(label=_int(c['label'], 'class label',
                                        f'classes[{i}].label'), **texts))
  label_base = data['label_base']
  if isinstance(label_base, bool) or not isinstance(label_base, int):
    raise ValueError(f'{where}: label_base must be 0 or 1, got '
                     f'{label_base!r}')
  info = DatasetInfo(splits=splits, classes=classes, label_base=label_base)
  if 'num_classes' in data:
    described = _int(data['num_classes'], 'num_classes', 'num_classes')
    if described != info.num_classes:
      raise ValueError(f'{where}: num_classes {described!r} but '
                       f'{info.num_classes} classes listed')
  _validate(info, where)
  return info


def _object(value, key: str, what: str = 'an object', *, where: str):
  if not isinstance(value, dict):
    raise ValueError(f'{where}: expected {what} for "{key}", got '
                     f'{value!r}' if key != '(top level)' else
                     f'{where}: expected {what}, got {type(value).__name__}')
  return value


def _int(value, what: str, key: str = '') -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    where = f' (key "{key}")' if key else ''
    raise ValueError(f'expected a non-negative integer for {what}, got '
                     f'{value!r}{where}')
  return value


def _validate(info: DatasetInfo, where: str) -> None:
  if info.label_base not in (0, 1) or isinstance(info.label_base, bool):
    raise ValueError(f'{where}: label_base must be 0 or 1, got '
                     f'{info.label_base!r}')
  labels = [c.label for c in info.classes]
  want = list(range(info.label_base, info.label_base + len(labels)))
  if labels != want:
    raise ValueError(f'{where}: classes must have the labels '
                     f'{info.label_base}..{info.label_base + len(labels) - 1} '
                     f'in order')




def counts(info: DatasetInfo) -> Dict[str, int]:
  """The settings `info` gives (a split it does not describe: absent)."""
  out = {'num_label_classes': info.num_classes}
  for name, split in (('num_train_images', 'train'),
                      ('num_eval_images', 'validation')):
    if info.num_records(split):
      out[name] = info.num_records(split)
  return out


def resolve_counts(settings: Dict, given: frozenset,
                   kept: frozenset = frozenset()) -> Dict:
  """Fills the data set's sizes from data_dir/dataset_info.json.

  The description replaces counts that were not given (a preset's are
  defaults: `main.explicit_settings`), saying so in the log when it changes
  one; counts given must agree with it.

  Args:
    settings: flat settings (`ExperimentConfig.from_settings` keywords);
      the three counts of `IMAGENET_COUNTS` may be None (unset).
    given: names set explicitly (on the command line or in the user's
      flagfile).
    kept: names whose value stands as it is: the counts of a finished run
      that `--mode=eval` / `export` evaluate (its config.json).

  Returns:
    `settings` with the counts filled: from dataset_info.json when the
    TFRecord data set has one, else ImageNet's (logged), and `counts_from`
    saying which.

  Raises:
    ConfigError: an explicit count disagrees with the description (a
      smaller --num_eval_images is allowed: the first records are
      evaluated), the description is malformed, or its labels are 0-based.
  """
  settings = dict(settings)
  data_dir = settings.get('data_dir')
  source = settings.get('data') or ('tfrecord' if data_dir else 'synthetic')
  info = None
  if source == 'tfrecord' and data_dir:
    try:
      info = read(data_dir)
    except ValueError as e:
      raise ConfigError('data_dir', str(e)) from None
  if info is None:
    missing = [k for k in IMAGENET_COUNTS if settings.get(k) is None]
    if missing and source == 'tfrecord':
      logging.info('No %s in %s: %s default to ImageNet\'s (%s).', FILENAME,
                   data_dir, ', '.join(missing),
                   ', '.join(str(IMAGENET_COUNTS[k]) for k in missing))
    for k in missing:
      settings[k] = IMAGENET_COUNTS[k]
    settings.setdefault('counts_from', 'ImageNet defaults' if missing
                        else 'settings')
    return settings
  if info.label_base == 0:
    raise ConfigError('data_dir', f'{path(data_dir)} describes 0-based '
                      'labels; the pipeline reads 1-based labels (0 = '
                      'background), as efficientnet-tpu-make-tfrecords '
                      'writes them')
  described = counts(info)
  for name, value in described.items():
    mine = settings.get(name)
    if name in kept and mine is not None:
      continue
    if mine is None or name not in given:
      if mine is not None and mine != value:
        logging.info('%s: %s=%d (not given on the command line) replaced by '
                     'the description\'s %d.', path(data_dir), name, mine,
                     value)
      settings[name] = value
      continue
    ok = (mine <= value if name == 'num_eval_images' else
          mine in (value, value + 1) if name == 'num_label_classes' else
          mine == value)
    if not ok:
      raise ConfigError(name, f'{mine} disagrees with {path(data_dir)} '
                        f'({value}); leave it out to use the description')
  for k in IMAGENET_COUNTS:
    if settings.get(k) is None:
      settings[k] = IMAGENET_COUNTS[k]
  if not (set(described) <= kept and settings.get('counts_from')):
    settings['counts_from'] = FILENAME
  logging.info('%s: %d train / %d eval images, %d classes.', path(data_dir),
               settings['num_train_images'], settings['num_eval_images'],
               settings['num_label_classes'])
  return settings
