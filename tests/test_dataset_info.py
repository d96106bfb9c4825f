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
