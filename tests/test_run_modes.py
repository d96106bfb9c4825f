"""--mode=eval and --mode=export from model_dir alone; --checkpoint_path.

A tiny train_and_eval run on TFRecords described by dataset_info.json, then
the run directory is evaluated and exported with no other flag than the
directory (and where to export): the settings come from config.json, and
the export names the data set's classes in its label convention.
"""

import json
import os

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import main as main_lib
from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.tools import make_tfrecords
from tests.test_input_pipeline import write_split

FLAGS = flags.FLAGS
CLASSES = 4


def _run(capsys, *args):
  FLAGS.unparse_flags()
  try:
    FLAGS(['efficientnet-tpu-train', *args])
    rc = main_lib.main(['efficientnet-tpu-train'])
  finally:
    FLAGS.unparse_flags()
  return rc, capsys.readouterr()


def _jpeg(seed):
  rng = np.random.default_rng(seed)
  return tf.io.encode_jpeg(rng.integers(0, 255, (40, 40, 3), np.uint8)
                           ).numpy()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished train_and_eval run: (model_dir, data_dir)."""
  root = tmp_path_factory.mktemp('modes')
  data_dir = str(root / 'data')
  label = lambda f, j: (f * 7 + j) % CLASSES + 1  # 1-based, as ImageNet's.
  write_split(data_dir, 'train', [12, 12], label)
  write_split(data_dir, 'validation', [6, 4], label)
  make_tfrecords.index(data_dir, num_threads=2, progress=False)
  model_dir = str(root / 'run')
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', f'--model_dir={model_dir}',
         f'--data_dir={data_dir}', '--mode=train_and_eval',
         '--width_coefficient=0.1', '--depth_coefficient=0.1',
         '--image_size=16', '--train_batch_size=8', '--eval_batch_size=4',
         '--train_steps=4', '--iterations_per_loop=2', '--eval_every_steps=2',
         '--optimizer=momentum', '--lr_warmup_epochs=0',
         '--moving_average_decay=0', '--shuffle_buffer=8'])
  try:
    assert main_lib.main(['efficientnet-tpu-train']) == 0
  finally:
    FLAGS.unparse_flags()
  return model_dir, data_dir


def _eval_results(model_dir):
  with open(os.path.join(model_dir, 'eval_results.jsonl')) as f:
    return [json.loads(l) for l in f]


def test_eval_needs_only_model_dir_and_matches_the_runs_own_eval(
    trained, capsys):
  model_dir, _ = trained
  config = json.load(open(os.path.join(model_dir, 'config.json')))
  assert config['data']['counts_from'] == 'dataset_info.json'
  assert config['model']['num_label_classes'] == CLASSES
  # What the settings came to: 24 train images in batches of 8 on one CPU
  # replica, a constant LR, no XLA.
  resolved = config['resolved']
  assert resolved['total_steps'] == 4 and resolved['replicas'] == 1
  assert resolved['steps_per_epoch'] == 3.0
  assert resolved['train_epochs'] == pytest.approx(4 / 3)
  assert resolved['per_replica_train_batch'] == 8
  assert resolved['bn_group_size'] == 1 and resolved['xla'] == 'off'
  assert resolved['peak_learning_rate'] == pytest.approx(0.016 * 8 / 256)
  assert (resolved['num_train_images'], resolved['num_eval_images']) == (24,
                                                                         10)
  last = _eval_results(model_dir)[-1]
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval')
  assert rc == 0, out.err
  again = _eval_results(model_dir)[-1]
  # The same checkpoint, model (EMA off) and images as the run's own eval.
  assert again['step'] == last['step'] == 4
  assert again['checkpoint'] == last['checkpoint']
  assert again['num_examples'] == last['num_examples'] == 10
  for k in ('top_1_accuracy', 'loss'):
    assert again[k] == pytest.approx(last[k], abs=1e-6), k


def test_export_from_model_dir_names_classes_in_the_label_convention(
    trained, capsys, tmp_path):
  model_dir, data_dir = trained
  best = json.load(open(os.path.join(model_dir, 'best', 'best_eval.json')))
  export_dir = str(tmp_path / 'export')
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=export',
                 f'--export_dir={export_dir}', '--checkpoint_path=best')
  assert rc == 0, out.err
  assert json.loads(out.out.splitlines()[-1])['step'] == best['step']
  images = tf.constant([_jpeg(i) for i in range(3)] + [b'not an image'])
  loaded = tf.saved_model.load(export_dir)
  got = loaded.signatures['serving_default'](image_bytes=images)
  logits = got['logits'].numpy()[:3]
  # 1-based labels as in the records; names from dataset_info.json (the
  # records' synsets, which the index read).
  np.testing.assert_array_equal(got['classes'].numpy()[:3],
                                logits.argmax(-1) + 1)
  assert got['classes'].numpy()[3] == -1
  info = dataset_info.read(data_dir)
  synsets = {c.label: c.synset for c in info.classes}
  assert sorted(synsets) == list(range(1, CLASSES + 1))
  names = [n.decode() for n in got['class_names'].numpy()]
  assert names[:3] == [synsets[c] for c in logits.argmax(-1) + 1]
  assert not names[3]
  probs = tf.nn.softmax(logits).numpy()
  order = np.argsort(-probs, axis=-1)[:, :4]
  np.testing.assert_array_equal(got['top_5_classes'].numpy()[:3], order + 1)
  np.testing.assert_allclose(got['top_5_probabilities'].numpy()[:3],
                             np.take_along_axis(probs, order, -1), rtol=1e-5)
  # The Keras 3 way (docs/quickstart.md): a TFSMLayer in a Keras model.
  layer = keras.layers.TFSMLayer(export_dir,
                                 call_endpoint='serving_default')
  again = layer(images)
  np.testing.assert_array_equal(again['classes'], got['classes'])


def test_bad_checkpoint_path_and_export_without_a_directory(trained, capsys,
                                                            tmp_path):
  model_dir, _ = trained
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval',
                 f'--checkpoint_path={model_dir}/ckpt-999')
  assert rc == 2
  assert out.err.startswith('error: --checkpoint_path: ') and (
      out.err.count('\n') == 1), out.err
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=export')
  assert rc == 2 and out.err.startswith('error: --export_dir: '), out.err
  empty = str(tmp_path / 'empty')
  rc, out = _run(capsys, f'--model_dir={empty}', '--mode=export',
                 f'--export_dir={tmp_path / "e"}')
  assert rc == 2 and out.err.startswith('error: --model_dir: no checkpoint'), (
      out.err)
  assert not os.path.exists(tmp_path / 'e')
