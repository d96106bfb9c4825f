"""Tests for data/dataset_info.py (dataset_info.json) and the counts that
tfrecord.record_counts takes from it."""

import json
import os

import pytest
import tensorflow as tf

from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.data import tfrecord
from tests.test_input_pipeline import write_split


def _info():
  return dataset_info.DatasetInfo(
      splits={
          'train': dataset_info.SplitInfo(
              files={'train-00000-of-00002': dataset_info.FileInfo(5, 500),
                     'train-00001-of-00002': dataset_info.FileInfo(4, 410)},
              num_classes=3),
          'validation': dataset_info.SplitInfo(
              files={'validation-00000-of-00001':
                     dataset_info.FileInfo(2, 200)}, num_classes=2)},
      classes=[dataset_info.ClassInfo(1, 'n01', 'tench'),
               dataset_info.ClassInfo(2, 'n02'),
               dataset_info.ClassInfo(3)],
      label_base=1)


@pytest.mark.parametrize('scheme', ['', 'file://', 'ram://'])
def test_round_trip(tmp_path, scheme):
  """Local paths, and two other tf.io.gfile filesystems (as gs:// is)."""
  data_dir = (scheme + str(tmp_path) if scheme != 'ram://' else
              f'ram://{tmp_path.name}/data')
  tf.io.gfile.makedirs(data_dir)
  assert dataset_info.read(data_dir) is None
  written = dataset_info.write(data_dir, _info())
  assert tf.io.gfile.listdir(data_dir) == [dataset_info.FILENAME]  # No temp.
  info = dataset_info.read(data_dir)
  assert info == _info()
  assert info.num_records('train') == 9 and info.num_records('test') == 0
  assert info.num_classes == 3 and info.label_base == 1
  assert info.class_names() == ['tench', 'n02', '3']
  with tf.io.gfile.GFile(written) as f:
    data = json.loads(f.read())
  # The JSON states the totals a reader without this package wants.
  assert data['splits']['train']['num_records'] == 9
  assert data['num_classes'] == 3
  assert data['splits']['validation']['files'] == {
      'validation-00000-of-00001': {'records': 2, 'bytes': 200}}


def _good():
  return json.loads(dataset_info.to_json(_info()))


@pytest.mark.parametrize('edit,problem', [
    (lambda d: '{"format": 1, ', 'malformed'),
    (lambda d: '[1, 2]', 'expected a JSON object'),
    (lambda d: dict(d, format=2), 'expected "format": 1, got 2'),
    (lambda d: {k: v for k, v in d.items() if k != 'splits'},
     "missing field 'splits'"),
    (lambda d: dict(d, label_base=2), 'label_base must be 0 or 1, got 2'),
    (lambda d: dict(d, num_classes=4), 'num_classes 4 but 3 classes'),
    (lambda d: dict(d, classes=d['classes'][1:], num_classes=2),
     'labels 1..2 in order'),
    (lambda d: {**d, 'splits': {**d['splits'], 'train': {
        **d['splits']['train'], 'num_records': 10}}},
     "split 'train' has num_records 10 but its files hold 9"),
    (lambda d: {**d, 'splits': {'validation': {'files': {
        'v': {'records': -1, 'bytes': 3}}}}},
     'expected a non-negative integer for validation v records, got -1'),
    (lambda d: {**d, 'splits': {'validation': {'files': {
        'v': {'records': '3', 'bytes': 3}}}}}, "got '3'"),
])
def test_malformed_is_one_line_naming_the_file(tmp_path, edit, problem):
  content = edit(_good())
  path = tmp_path / dataset_info.FILENAME
  path.write_text(content if isinstance(content, str) else
                  json.dumps(content))
  with pytest.raises(ValueError) as e:
    dataset_info.read(str(tmp_path))
  message = str(e.value)
  assert message.startswith(f'{path}: ') and '\n' not in message, message
  assert problem in message, message


def test_write_refuses_what_read_would_refuse(tmp_path):
  info = _info()
  info.label_base = 0  # Classes are labelled from 1.
  with pytest.raises(ValueError, match='labels 0..2'):
    dataset_info.write(str(tmp_path), info)
  assert not os.listdir(tmp_path)


def test_record_counts_take_dataset_info_first(tmp_path, monkeypatch):
  """Described files are not counted nor cached; others are, as before."""
  write_split(str(tmp_path / 'd'), 'validation', [3, 0, 2])
  files = tfrecord.list_files(str(tmp_path / 'd'), is_training=False)
  # The truth, from TF's own reader.
  truth = [sum(1 for _ in tf.data.TFRecordDataset(f)) for f in files]
  size = [os.path.getsize(f) for f in files]
  names = [os.path.basename(f) for f in files]
  dataset_info.write(str(tmp_path / 'd'), dataset_info.DatasetInfo(
      splits={'validation': dataset_info.SplitInfo(files={
          names[0]: dataset_info.FileInfo(truth[0], size[0]),
          # Indexed before the file was rewritten: other size, not used.
          names[2]: dataset_info.FileInfo(99, size[2] + 1)})},
      classes=[]))
  counted, real = [], tfrecord.count_records
  monkeypatch.setattr(tfrecord, 'count_records', lambda fs, *a, **k: (
      counted.append(list(fs)) or real(fs, *a, **k)))
  cache = tmp_path / 'run'
  cache.mkdir()
  assert tfrecord.record_counts(files, str(cache)) == dict(zip(files, truth))
  assert counted == [[files[1], files[2]]]
  cached = json.loads((cache / tfrecord.COUNTS_FILE).read_text())['files']
  assert sorted(cached) == [files[1], files[2]]
  (tmp_path / 'd' / dataset_info.FILENAME).write_text('{')
  with pytest.raises(ValueError, match=r'^data_dir: .*dataset_info.json: '
                     'malformed'):
    tfrecord.record_counts(files, str(cache))


# ---- the trainer's defaults come from the description ----------------------
def _config(*args):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import main as main_lib  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  main_lib.define_flags(fv)
  fv(['prog', '--model_dir=/tmp/unused', '--lr_warmup_epochs=0', *args])
  return main_lib.config_from_flags(fv)


def test_counts_default_from_dataset_info_and_explicit_ones_must_agree(
    tmp_path):
  from efficientnet_tpu.config import ConfigError  # pylint: disable=g-import-not-at-top
  info = _info()
  dataset_info.write(str(tmp_path), info)
  want = (info.num_records('train'), info.num_records('validation'),
          len(info.classes))
  cfg = _config(f'--data_dir={tmp_path}')
  assert (cfg.data.num_train_images, cfg.data.num_eval_images,
          cfg.model.num_label_classes) == want
  assert cfg.data.counts_from == 'dataset_info.json'
  # Explicit values that agree, a background class, or fewer eval images.
  cfg = _config(f'--data_dir={tmp_path}', f'--num_train_images={want[0]}',
                f'--num_label_classes={want[2] + 1}',
                f'--num_eval_images={want[1] - 1}')
  assert cfg.model.num_label_classes == want[2] + 1
  assert cfg.data.include_background_label is (want[2] + 1 == 1001)
  assert cfg.data.num_eval_images == want[1] - 1
  for flag, value in (('num_train_images', want[0] + 1),
                      ('num_label_classes', want[2] + 2),
                      ('num_eval_images', want[1] + 1)):
    with pytest.raises(ConfigError) as e:
      _config(f'--data_dir={tmp_path}', f'--{flag}={value}')
    assert e.value.setting == flag and 'disagrees with' in str(e.value)
    assert '\n' not in str(e.value)


def test_without_dataset_info_imagenet_counts_and_a_log_line(tmp_path,
                                                              caplog):
  import logging  # pylint: disable=g-import-not-at-top
  with caplog.at_level(logging.INFO, logger='absl'):
    cfg = _config(f'--data_dir={tmp_path}')
  assert (cfg.data.num_train_images, cfg.data.num_eval_images,
          cfg.model.num_label_classes) == (1281167, 50000, 1000)
  assert cfg.data.counts_from == 'ImageNet defaults'
  assert 'No dataset_info.json' in caplog.text
  assert _config('--num_train_images=64').data.counts_from == (
      'ImageNet defaults')  # The eval count was not given.


def test_zero_based_labels_are_refused(tmp_path):
  from efficientnet_tpu.config import ConfigError  # pylint: disable=g-import-not-at-top
  import dataclasses  # pylint: disable=g-import-not-at-top
  info = _info()
  info = dataclasses.replace(info, label_base=0, classes=[
      dataclasses.replace(c, label=c.label - 1) for c in info.classes])
  dataset_info.write(str(tmp_path), info)
  with pytest.raises(ConfigError, match='^data_dir: .*0-based labels'):
    _config(f'--data_dir={tmp_path}')


def test_an_unreadable_description_is_a_one_line_error(tmp_path):
  """A bucket the machine cannot reach (here: a directory in the file's
  place) fails naming the file, not with TF's stack."""
  from efficientnet_tpu.config import ConfigError  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / dataset_info.FILENAME)
  with pytest.raises(ConfigError) as e:
    _config(f'--data_dir={tmp_path}')
  assert e.value.setting == 'data_dir' and '\n' not in str(e.value)
  assert dataset_info.FILENAME in str(e.value)
