"""A description that disagrees with the data is found out.

config.json (a run's settings), dataset_info.json (a data set's counts) and
the records' features are checked for type and range: a wrong type is one
line naming the file and the key, exit status 2, no traceback, nothing in
model_dir changed; nothing is coerced (a bool is no int, "false" no bool).
An eval split holding more or fewer records than its description says
stops the run, in one line, before any result is reported: up front when
the files show it (a shard missing, added or rewritten), else while the
eval reads them (a count edited by hand), on --mode=eval and on the eval
of train_and_eval.
"""

import json
import math
import os
import shutil

from absl import flags
import pytest
import tensorflow as tf

from efficientnet_tpu import config as config_lib
from efficientnet_tpu import main as main_lib
from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.tools import make_tfrecords
from tests.helpers import file_digests, run_main
from tests.test_input_pipeline import _jpeg, write_split

FLAGS = flags.FLAGS
CLASSES = 3
LABEL = lambda f, j: (f + j) % CLASSES + 1  # pylint: disable=unnecessary-lambda-assignment


_run = run_main


_snapshot = file_digests


def _assert_one_line(rc, out, start):
  assert rc == 2, out.err[-3000:]
  assert 'Traceback' not in out.err
  errors = [l for l in out.err.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, out.err[-3000:]
  assert errors[0].startswith(start), errors[0]
  assert out.err.strip().splitlines()[-1] == errors[0]
  return errors[0]


TINY = ['--width_coefficient=0.1', '--depth_coefficient=0.1',
        '--image_size=16', '--train_batch_size=4', '--eval_batch_size=4',
        '--optimizer=momentum', '--lr_warmup_epochs=0',
        '--moving_average_decay=0', '--shuffle_buffer=4',
        '--num_cpu_replicas=1', '--bn_group_size=1']

# ---- config.json ----------------------------------------------------------


def _set(*path_and_value):
  *path, value = path_and_value

  def edit(config):
    node = config
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
    return config
  return edit


CONFIG_CASES = [
    ('data.skip_corrupt', _set('data', 'skip_corrupt', 'false')),
    ('model.use_bfloat16', _set('model', 'use_bfloat16', 1)),
    ('model.image_size', _set('model', 'image_size', '16')),
    ('model.image_size', _set('model', 'image_size', True)),
    ('model.image_size', _set('model', 'image_size', 16.0)),
    ('model.num_label_classes', _set('model', 'num_label_classes', [3])),
    ('optimizer.momentum', _set('optimizer', 'momentum', True)),
    ('optimizer.schedule.base_learning_rate',
     _set('optimizer', 'schedule', 'base_learning_rate', float('nan'))),
    ('optimizer.weight_decay_exclude',
     _set('optimizer', 'weight_decay_exclude', 'gamma')),
    ('data.augment_name', _set('data', 'augment_name', 'bogus')),
    ('train.jit_compile', _set('train', 'jit_compile', 5)),
    ('model', _set('model', None)),
    ('optimizer.lars', _set('optimizer', 'lars', [])),
    ('resolved', _set('resolved', [1])),
    ('resolved.per_replica_eval_batch',
     _set('resolved', {'per_replica_eval_batch': '2'})),
    ('(top level)', lambda config: [config]),
]


@pytest.fixture(scope='module')
def config_record():
  """The config.json a tiny run on synthetic data writes."""
  cfg = config_lib.ExperimentConfig.from_settings(
      model_dir='/unused', data='synthetic', width_coefficient=0.1,
      depth_coefficient=0.1, image_size=16, num_label_classes=CLASSES,
      num_train_images=8, num_eval_images=4, train_batch_size=4,
      eval_batch_size=4, train_steps=2, lr_warmup_epochs=0)
  record = cfg.to_dict()
  record['resolved'] = {'per_replica_eval_batch': 4, 'replicas': 1}
  return json.loads(json.dumps(record))


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('key,edit', CONFIG_CASES,
                         ids=[f'{k}-{i}' for i, (k, _) in
                              enumerate(CONFIG_CASES)])
def test_mistyped_config_json_is_one_line(config_record, tmp_path, capsys,
                                          key, edit, mode):
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  path = model_dir / 'config.json'
  path.write_text(json.dumps(edit(json.loads(json.dumps(config_record)))))
  before = _snapshot(model_dir)
  rc, out = _run(capsys, f'--model_dir={model_dir}', f'--mode={mode}',
                 '--data=synthetic', *TINY, '--train_steps=2')
  _assert_one_line(rc, out, f'error: --model_dir: {path}: "{key}" ')
  assert _snapshot(model_dir) == before


def test_the_unedited_config_json_is_accepted(config_record, tmp_path,
                                              capsys):
  """The cases above fail for their edit, not for the fixture."""
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  (model_dir / 'config.json').write_text(json.dumps(config_record))
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval',
                 '--data=synthetic', *TINY, '--dry_run')
  assert rc == 0, out.err[-3000:]
  assert config_lib.settings_from_dict(config_record)['image_size'] == 16


def test_settings_from_dict_coerces_nothing():
  """bool is an int subclass in Python: still no int, and 1 no bool."""
  ok = {'model': {'image_size': 16, 'use_bfloat16': False},
        'optimizer': {'momentum': 1}}
  settings = config_lib.settings_from_dict(ok)
  assert settings['momentum'] == 1 and settings['use_bfloat16'] is False
  for bad in ({'model': {'image_size': False}},
              {'model': {'use_bfloat16': 0}},
              {'optimizer': {'momentum': math.inf}}):
    with pytest.raises(config_lib.ConfigError, match='x.json: "'):
      config_lib.settings_from_dict(bad, where='x.json')


# ---- dataset_info.json ------------------------------------------------------


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """train [4, 4] and validation [3, 2] records, described."""
  d = str(tmp_path_factory.mktemp('described') / 'data')
  write_split(d, 'train', [4, 4], LABEL)
  write_split(d, 'validation', [3, 2], LABEL)
  make_tfrecords.index(d, num_threads=2, progress=False)
  return d


def _copy_data(data_dir, tmp_path, edit=None):
  copy = str(tmp_path / 'data')
  shutil.copytree(data_dir, copy)
  if edit is not None:
    path = dataset_info.path(copy)
    info = json.load(open(path))
    info = edit(info)
    with open(path, 'w') as f:
      f.write(info if isinstance(info, str) else json.dumps(info))
  return copy


V0 = 'validation-00000-of-00002'
INFO_CASES = [
    ('"format"', _set('format', True)),
    ('label_base', _set('label_base', '1')),
    ('label_base', _set('label_base', True)),
    ('"num_classes"', _set('num_classes', 3.0)),
    ('"splits"', _set('splits', None)),
    ('"splits"', _set('splits', [])),
    ('"splits.validation"', _set('splits', 'validation', None)),
    ('"splits.validation.files"', _set('splits', 'validation', 'files', [])),
    (f'"splits.validation.files.{V0}.records"',
     _set('splits', 'validation', 'files', V0, 'records', 3.0)),
    (f'"splits.validation.files.{V0}.records"',
     _set('splits', 'validation', 'files', V0, 'records', True)),
    (f'"splits.validation.files.{V0}.records"',
     _set('splits', 'validation', 'files', V0, 'records', -3)),
    (f'"splits.validation.files.{V0}.bytes"',
     _set('splits', 'validation', 'files', V0, 'bytes', None)),
    ('"splits.validation.num_records"',
     _set('splits', 'validation', 'num_records', 5.0)),
    ('"classes"', _set('classes', None)),
    ('"classes[0]"', _set('classes', 0, 'n01')),
    ('"classes[0].label"', _set('classes', 0, 'label', 1.5)),
    ('"classes[1].synset"', _set('classes', 1, 'synset', 5)),
]


@pytest.mark.parametrize('key,edit', INFO_CASES,
                         ids=[f'{k}-{i}' for i, (k, _) in
                              enumerate(INFO_CASES)])
def test_mistyped_dataset_info_is_one_line(data_dir, tmp_path, capsys, key,
                                           edit):
  data = _copy_data(data_dir, tmp_path, edit)
  model_dir = tmp_path / 'run'
  rc, out = _run(capsys, f'--model_dir={model_dir}', f'--data_dir={data}',
                 '--mode=train_and_eval', *TINY, '--train_steps=2')
  line = _assert_one_line(
      rc, out, f'error: --data_dir: {dataset_info.path(data)}: ')
  assert key in line, line
  assert not model_dir.exists()


# ---- records ----------------------------------------------------------------


def _float_label_example(label):
  return tf.train.Example(features=tf.train.Features(feature={
      'image/encoded': tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[_jpeg((9, 9, 9))])),
      'image/class/label': tf.train.Feature(
          float_list=tf.train.FloatList(value=[label])),
  })).SerializeToString()


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_a_float_label_is_one_line(tmp_path, capsys, mode):
  data = str(tmp_path / 'data')
  write_split(data, 'train', [4], LABEL)
  write_split(data, 'validation', [4], LABEL)
  split = 'train' if mode == 'train' else 'validation'
  bad = os.path.join(data, f'{split}-00000-of-00001')
  with tf.io.TFRecordWriter(bad) as w:
    for i in range(4):
      w.write(_float_label_example(i % CLASSES + 1.0))
  model_dir = tmp_path / 'run'
  rc, out = _run(capsys, f'--model_dir={model_dir}', f'--data_dir={data}',
                 '--mode=train_and_eval', *TINY, '--train_steps=2',
                 '--iterations_per_loop=2', '--num_train_images=4',
                 '--num_eval_images=4', f'--num_label_classes={CLASSES}')
  line = _assert_one_line(rc, out, 'error: --data_dir: ')
  assert 'image/class/label' in line and 'float' in line, line
  assert not (model_dir / 'eval_results.jsonl').exists()


# ---- records against their description ------------------------------------


def _edit_count(file_delta):
  """Changes the described count of validation-00000 (not its bytes)."""
  def edit(info):
    split = info['splits']['validation']
    split['files'][V0]['records'] += file_delta
    split['num_records'] += file_delta
    return info
  return edit


def _remove_shard(data):
  os.remove(os.path.join(data, 'validation-00001-of-00002'))


def _add_shard(data):
  write_split(os.path.join(data, 'more'), 'validation', [1, 1, 2], LABEL)
  os.rename(os.path.join(data, 'more', 'validation-00002-of-00003'),
            os.path.join(data, 'validation-00002-of-00003'))
  shutil.rmtree(os.path.join(data, 'more'))


def _rewrite_shard(data):
  write_split(os.path.join(data, 'more'), 'validation', [3, 4], LABEL)
  os.replace(os.path.join(data, 'more', 'validation-00001-of-00002'),
             os.path.join(data, 'validation-00001-of-00002'))
  shutil.rmtree(os.path.join(data, 'more'))


# Found before any work: the files show it.
UP_FRONT = [
    ('described but missing', _remove_shard),
    ('is not described', _add_shard),
    ('validation-00001-of-00002 has ', _rewrite_shard),
]
# Found while the eval reads the files: a count edited by hand (same bytes).
WHILE_READING = [
    ('has fewer records than num_eval_images=6', _edit_count(+1)),
    ('holds more records than the 2', _edit_count(-1)),
]


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A finished train_and_eval run on data_dir."""
  model_dir = str(tmp_path_factory.mktemp('trained') / 'run')
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', f'--model_dir={model_dir}',
         f'--data_dir={data_dir}', '--mode=train_and_eval', *TINY,
         '--train_steps=2', '--iterations_per_loop=2'])
  try:
    assert main_lib.main(['efficientnet-tpu-train']) == 0
  finally:
    FLAGS.unparse_flags()
  return model_dir


def _prepared(data_dir, tmp_path, change):
  if change in (_remove_shard, _add_shard, _rewrite_shard):
    data = _copy_data(data_dir, tmp_path)
    change(data)
  else:
    data = _copy_data(data_dir, tmp_path, change)
  return data


@pytest.mark.parametrize('problem,change', UP_FRONT + WHILE_READING,
                         ids=[p for p, _ in UP_FRONT + WHILE_READING])
def test_mode_eval_refuses_records_that_disagree(trained, data_dir, tmp_path,
                                                 capsys, problem, change):
  data = _prepared(data_dir, tmp_path, change)
  model_dir = str(tmp_path / 'run')
  shutil.copytree(trained, model_dir)
  before = _snapshot(model_dir)
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval',
                 f'--data_dir={data}')
  line = _assert_one_line(rc, out, 'error: --data_dir: ')
  assert problem in line, line
  if (problem, change) in UP_FRONT:
    assert dataset_info.FILENAME in line and (
        '"splits.validation.files"' in line), line
  assert _snapshot(model_dir) == before


@pytest.mark.parametrize('problem,change', UP_FRONT,
                         ids=[p for p, _ in UP_FRONT])
def test_train_and_eval_refuses_before_training(data_dir, tmp_path, capsys,
                                                problem, change):
  data = _prepared(data_dir, tmp_path, change)
  model_dir = tmp_path / 'run'
  rc, out = _run(capsys, f'--model_dir={model_dir}', f'--data_dir={data}',
                 '--mode=train_and_eval', *TINY, '--train_steps=2',
                 '--dry_run')
  line = _assert_one_line(rc, out, 'error: --data_dir: ')
  assert problem in line, line
  assert not any(n.startswith(('ckpt', 'config')) for n in (
      os.listdir(model_dir) if model_dir.exists() else []))


@pytest.mark.parametrize('problem,change', WHILE_READING,
                         ids=[p for p, _ in WHILE_READING])
def test_train_and_eval_reports_no_result_on_a_wrong_count(
    data_dir, tmp_path, capsys, problem, change):
  data = _prepared(data_dir, tmp_path, change)
  model_dir = tmp_path / 'run'
  export_dir = tmp_path / 'export'
  rc, out = _run(capsys, f'--model_dir={model_dir}', f'--data_dir={data}',
                 '--mode=train_and_eval', *TINY, '--train_steps=2',
                 '--iterations_per_loop=2', f'--export_dir={export_dir}')
  line = _assert_one_line(rc, out, 'error: --data_dir: ')
  assert problem in line, line
  assert not (model_dir / 'eval_results.jsonl').exists()
  assert not (model_dir / 'best').exists()
  assert not export_dir.exists()
