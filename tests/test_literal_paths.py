"""Paths are names, never patterns.

A model_dir, data_dir, export_dir or init_checkpoint may hold any character
the filesystem allows: spaces, quotes and glob metacharacters (`[1]`, `*`).
TF's checkpoint helpers glob such paths (latest_checkpoint finds nothing,
CheckpointManager's pruning deletes what the pattern matches, also in a
sibling directory); the run must take them literally. Each hostile
directory here has a sibling whose name the glob of it matches, holding
files that must stay untouched.

One tiny train_and_eval run (2 loops, keep_checkpoint_max=1) is shared by
the module; eval, init_checkpoint, report and the converter reuse it.
"""

import json
import os

from absl import flags
import numpy as np
from PIL import Image
import pytest

from efficientnet_tpu import main as main_lib
from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.data import tfrecord
from efficientnet_tpu.tools import make_tfrecords
from efficientnet_tpu.tools import report
from tests.helpers import file_digests, run_main
from tests.test_input_pipeline import write_split

FLAGS = flags.FLAGS
CLASSES = 3
# Spaces, quotes, brackets and a star: `glob('run "a" [1] *')` matches
# 'run "a" 1 b' (the sibling below), not itself.
HOSTILE = 'run "a\' [1] *'
SIBLING = 'run "a\' 1 b'


_run = run_main


def _snapshot(directory):
  return file_digests(directory, with_mtime=True)


def _fake_checkpoint(directory, steps):
  """Files named like checkpoints ckpt-N (a glob of model_dir hits them)."""
  os.makedirs(directory, exist_ok=True)
  for n in steps:
    for suffix in ('index', 'data-00000-of-00001'):
      with open(os.path.join(directory, f'ckpt-{n}.{suffix}'), 'wb') as f:
        f.write(f'sibling {n} {suffix}'.encode())
  with open(os.path.join(directory, 'checkpoint'), 'w') as f:
    f.write(f'model_checkpoint_path: "ckpt-{steps[-1]}"\n')


def _train_flags(model_dir, data_dir):
  return [f'--model_dir={model_dir}', f'--data_dir={data_dir}',
          '--width_coefficient=0.1', '--depth_coefficient=0.1',
          '--image_size=16', '--train_batch_size=4', '--eval_batch_size=4',
          '--optimizer=momentum', '--lr_warmup_epochs=0',
          '--moving_average_decay=0', '--shuffle_buffer=4',
          '--num_cpu_replicas=1', '--bn_group_size=1']


@pytest.fixture(scope='module')
def hostile(tmp_path_factory):
  """A finished run in hostile directories, beside siblings a glob hits."""
  root = tmp_path_factory.mktemp('paths')
  label = lambda f, j: (f + j) % CLASSES + 1
  data_dir = str(root / 'da ta [1]')
  write_split(data_dir, 'train', [4, 4], label)
  write_split(data_dir, 'validation', [3, 2], label)
  make_tfrecords.index(data_dir, num_threads=2, progress=False)
  # A glob of data_dir also lists these shards (another data set).
  data_sibling = str(root / 'da ta 1')
  write_split(data_sibling, 'train', [4, 4, 4], label)
  write_split(data_sibling, 'validation', [7], label)
  model_dir = str(root / HOSTILE)
  sibling = str(root / SIBLING)
  # Pruning globs model_dir/ckpt-2.data-?????-of-?????: it would delete
  # these.
  _fake_checkpoint(sibling, [2, 4])
  export_dir = str(root / 'ex port [1] *')
  export_sibling = str(root / 'ex port 1 b')
  os.makedirs(export_sibling)
  with open(os.path.join(export_sibling, 'saved_model.pb'), 'wb') as f:
    f.write(b'sibling export')
  before = {d: _snapshot(d) for d in (sibling, data_sibling, export_sibling)}
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', *_train_flags(model_dir, data_dir),
         '--mode=train_and_eval', '--train_steps=4',
         '--iterations_per_loop=2', '--eval_every_steps=2',
         '--keep_checkpoint_max=1', f'--export_dir={export_dir}'])
  try:
    assert main_lib.main(['efficientnet-tpu-train']) == 0
  finally:
    FLAGS.unparse_flags()
  return dict(root=root, data_dir=data_dir, model_dir=model_dir,
              export_dir=export_dir, before=before)


def _unchanged(hostile):
  for directory, snapshot in hostile['before'].items():
    assert _snapshot(directory) == snapshot, directory


def test_training_prunes_its_own_checkpoints_and_nothing_else(hostile):
  model_dir = hostile['model_dir']
  names = set(os.listdir(model_dir))
  # keep_checkpoint_max=1: ckpt-2 pruned (by name), ckpt-4 kept.
  assert {'ckpt-4.index', 'ckpt-4.data-00000-of-00001', 'config.json',
          'checkpoint'} <= names, names
  assert not any(n.startswith('ckpt-2') for n in names), names
  assert open(os.path.join(model_dir, 'checkpoint')).read().startswith(
      'model_checkpoint_path: "ckpt-4"')
  # The eval archived its best in model_dir/best, pruned the same way.
  best = os.listdir(os.path.join(model_dir, 'best'))
  assert len([n for n in best if n.endswith('.index')]) == 1, best
  assert os.listdir(hostile['export_dir'])  # The SavedModel is there.
  _unchanged(hostile)


def test_data_dir_lists_its_own_files_only(hostile):
  data_dir = hostile['data_dir']
  files = tfrecord.list_files(data_dir, is_training=True)
  assert files == [os.path.join(data_dir, f'train-0000{i}-of-00002')
                   for i in range(2)]
  config = json.load(open(os.path.join(hostile['model_dir'],
                                       'config.json')))
  # 8 train, 5 eval images: the description of data_dir, not the sibling.
  assert config['resolved']['num_train_images'] == 8
  assert config['resolved']['num_eval_images'] == 5


@pytest.mark.parametrize('eval_timeout', [0, 30])
def test_eval_finds_the_latest_checkpoint(hostile, capsys, eval_timeout):
  """Latest (timeout 0) and continuous eval (waits on the iterator)."""
  model_dir = hostile['model_dir']
  results = os.path.join(model_dir, 'eval_results.jsonl')
  lines = len(open(results).readlines())
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval',
                 f'--eval_timeout={eval_timeout}')
  assert rc == 0, out.err[-3000:]
  records = [json.loads(l) for l in open(results)]
  assert len(records) == lines + 1
  assert records[-1]['step'] == 4 and records[-1]['num_examples'] == 5
  assert records[-1]['checkpoint'] == os.path.join(model_dir, 'ckpt-4')
  _unchanged(hostile)


def test_init_checkpoint_from_a_hostile_model_dir(hostile, capsys):
  new_dir = str(hostile['root'] / 'new [run]')
  rc, out = _run(capsys, *_train_flags(new_dir, hostile['data_dir']),
                 f'--init_checkpoint={hostile["model_dir"]}',
                 '--train_steps=2', '--dry_run')
  assert rc == 0, out.err[-3000:]


def test_report_reads_a_hostile_model_dir(hostile, capsys):
  assert report.main([hostile['model_dir'], '--no_plots']) == 0
  out = capsys.readouterr().out
  assert 'step 4' in out or '4' in out, out
  _unchanged(hostile)


@pytest.mark.parametrize('flag', ['model_dir', 'data_dir', 'export_dir',
                                  'init_checkpoint'])
def test_non_utf8_path_is_one_line(hostile, capsys, flag):
  bad = os.fsdecode(str(hostile['root']).encode() + b'/bad\xff')
  args = dict(model_dir=str(hostile['root'] / 'fresh'),
              data_dir=hostile['data_dir'])
  args[flag] = bad
  rc, out = _run(capsys, *[f'--{k}={v}' for k, v in args.items()],
                 '--train_steps=2', '--dry_run')
  assert rc == 2
  lines = out.err.strip().splitlines()
  assert lines[-1].startswith(f'error: --{flag}: ') and 'UTF-8' in lines[-1]
  assert 'Traceback' not in out.err
  assert not os.path.exists(bad)


def _image_folder(root):
  for synset in ('n01', 'n02'):
    os.makedirs(os.path.join(root, 'train', synset))
    for i in range(2):
      Image.fromarray(np.full((8, 8, 3), 40 * i + 1, np.uint8)).save(
          os.path.join(root, 'train', synset, f'{synset}_{i}.JPEG'))


def test_converter_in_and_out_dirs_are_names(tmp_path, capsys):
  in_dir = str(tmp_path / 'in [1] *')
  _image_folder(in_dir)
  # What globs of the input and output directories would also match.
  _image_folder(str(tmp_path / 'in 1 b'))
  out_dir = str(tmp_path / 'out "x" [1] *')
  out_sibling = str(tmp_path / 'out "x" 1 b')
  write_split(out_sibling, 'train', [3, 3])
  before = _snapshot(out_sibling)
  assert make_tfrecords.main(['--input_dir', in_dir, '--output_dir', out_dir,
                              '--train_shards=1', '--no_progress']) == 0
  info = dataset_info.read(out_dir)
  assert info.num_records('train') == 4
  # --index lists the directory's own shards only.
  os.remove(dataset_info.path(out_dir))
  assert make_tfrecords.main(['--index', out_dir, '--no_progress']) == 0
  assert dataset_info.read(out_dir).file_counts('train') == (
      info.file_counts('train'))
  assert _snapshot(out_sibling) == before
  capsys.readouterr()
  bad = os.fsdecode(str(tmp_path).encode() + b'/out\xff')
  assert make_tfrecords.main(['--input_dir', in_dir, '--output_dir', bad,
                              '--no_progress']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --output_dir: ') and 'UTF-8' in err
  assert len(err.strip().splitlines()) == 1
