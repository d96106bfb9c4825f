"""--mode=eval and --mode=export from model_dir alone; --checkpoint_path.

A tiny train_and_eval run on 2 CPU replicas with BN groups of 2, on
TFRecords described by dataset_info.json; then the run directory is
evaluated and exported with no other flag than the directory (and where to
export), on other replica counts than the run's: the settings come from
config.json, the hardware does not (replicas, BN groups, XLA), and the
top-1 is the run's own, as eval_results.jsonl recorded it. The export names
the data set's classes in its label convention.
"""

import json
import logging
import os
import shutil

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import main as main_lib
from efficientnet_tpu import presets
from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.tools import make_tfrecords
from tests.helpers import run_main
from tests.test_input_pipeline import write_split

FLAGS = flags.FLAGS
CLASSES = 4


_run = run_main


def _jpeg(seed):
  rng = np.random.default_rng(seed)
  return tf.io.encode_jpeg(rng.integers(0, 255, (40, 40, 3), np.uint8)
                           ).numpy()


def _train_args(model_dir, data_dir):
  return [f'--model_dir={model_dir}', f'--data_dir={data_dir}',
          '--mode=train_and_eval', '--width_coefficient=0.1',
          '--depth_coefficient=0.1', '--image_size=16',
          '--train_batch_size=8', '--eval_batch_size=4', '--train_steps=4',
          '--iterations_per_loop=2', '--eval_every_steps=2',
          '--optimizer=momentum', '--lr_warmup_epochs=0',
          '--moving_average_decay=0', '--shuffle_buffer=8',
          '--num_cpu_replicas=2', '--bn_group_size=2']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished train_and_eval run: (model_dir, data_dir).

  2 replicas with BN groups of 2, as a pod slice trains: an eval or export
  on 1 replica must not inherit them as constraints.
  """
  root = tmp_path_factory.mktemp('modes')
  data_dir = str(root / 'data')
  label = lambda f, j: (f * 7 + j) % CLASSES + 1  # 1-based, as ImageNet's.
  write_split(data_dir, 'train', [12, 12], label)
  write_split(data_dir, 'validation', [6, 4], label)
  make_tfrecords.index(data_dir, num_threads=2, progress=False)
  model_dir = str(root / 'run')
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', *_train_args(model_dir, data_dir)])
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
  # What the settings came to: 24 train images in batches of 8 on two CPU
  # replicas in one BN group, a constant LR, no XLA.
  resolved = config['resolved']
  assert resolved['total_steps'] == 4 and resolved['replicas'] == 2
  assert resolved['steps_per_epoch'] == 3.0
  assert resolved['train_epochs'] == pytest.approx(4 / 3)
  assert resolved['per_replica_train_batch'] == 4
  assert resolved['per_replica_eval_batch'] == 2
  assert resolved['bn_group_size'] == 2 and resolved['xla'] == 'off'
  assert resolved['peak_learning_rate'] == pytest.approx(0.016 * 8 / 256)
  assert (resolved['num_train_images'], resolved['num_eval_images']) == (24,
                                                                         10)
  last = _eval_results(model_dir)[-1]
  # On 1 replica (the default), where the run's BN groups of 2 cannot be.
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval')
  assert rc == 0, out.err
  again = _eval_results(model_dir)[-1]
  # The same checkpoint, model (EMA off) and images as the run's own eval.
  assert again['step'] == last['step'] == 4
  assert again['checkpoint'] == last['checkpoint']
  assert again['num_examples'] == last['num_examples'] == 10
  assert again['top_1_accuracy'] == last['top_1_accuracy']
  assert again['loss'] == pytest.approx(last['loss'], abs=1e-6)


def test_eval_on_a_replica_count_that_divides_neither_batch(trained, capsys):
  """3 replicas: the run's batches (train 8, eval 4) are no multiples of 3.

  The eval keeps the run's 2 images per replica (6 on 3 replicas); an eval
  batch given explicitly is still held to the replica count.
  """
  model_dir, _ = trained
  last = _eval_results(model_dir)[-1]
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval',
                 '--num_cpu_replicas=3', '--eval_batch_size=4')
  assert rc == 2
  assert out.err == ('error: --eval_batch_size: expected a multiple of the '
                     'number of replicas (3), got 4\n'), out.err
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval',
                 '--num_cpu_replicas=3')
  assert rc == 0, out.err
  again = _eval_results(model_dir)[-1]
  assert again['step'] == last['step'] and again['num_examples'] == 10
  assert again['top_1_accuracy'] == last['top_1_accuracy']
  assert again['loss'] == pytest.approx(last['loss'], abs=1e-6)


# The hardware other runs trained on, as their config.json records it: a
# TPU v3-1024 slice (BN groups by images, XLA it cannot turn off) and two
# machines of 8 GPUs (global BN, XLA on). Each keeps the run's 2 eval images
# per device (`resolved`, as train.resolved_values writes it).
OTHER_HARDWARE = {
    'tpu_slice_1024': dict(
        distribute=dict(strategy='tpu', tpu='my-pod', tpu_zone='z',
                        num_replicas=1024),
        model=dict(bn_group_size=None, bn_group_batch_size=4),
        train=dict(train_batch_size=4096, eval_batch_size=2048,
                   jit_compile='auto'),
        resolved=dict(replicas=1024, per_replica_train_batch=4,
                      per_replica_eval_batch=2, bn_group_size=1,
                      bn_groups=1024, input_pipelines=128)),
    'multi_worker_16_gpus': dict(
        distribute=dict(strategy='multi_worker', num_gpus=8),
        model=dict(bn_group_size=0, bn_group_batch_size=None),
        train=dict(train_batch_size=64, eval_batch_size=32,
                   jit_compile='true'),
        resolved=dict(replicas=16, per_replica_train_batch=4,
                      per_replica_eval_batch=2, bn_group_size=16,
                      bn_groups=1, input_pipelines=2)),
}


@pytest.mark.parametrize('hardware,replicas', [('tpu_slice_1024', 3),
                                               ('multi_worker_16_gpus', 2)])
def test_eval_of_a_run_that_other_hardware_trained(trained, capsys, caplog,
                                                   tmp_path, hardware,
                                                   replicas):
  """The run's checkpoint, with the config.json of another cluster."""
  model_dir = _copy_with_config(trained, tmp_path, **OTHER_HARDWARE[hardware])
  last = _eval_results(model_dir)[-1]
  with caplog.at_level(logging.INFO, logger='absl'):
    rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=eval',
                   f'--num_cpu_replicas={replicas}', '--verbosity=0')
  assert rc == 0, out.err
  # A device evaluates the 2 images it did in the run's own evaluations.
  assert 'Batch: eval 2 per replica' in caplog.text
  again = _eval_results(model_dir)[-1]
  assert again['step'] == last['step'] and again['num_examples'] == 10
  assert again['top_1_accuracy'] == last['top_1_accuracy']
  assert again['loss'] == pytest.approx(last['loss'], abs=1e-6)
  export_dir = str(tmp_path / 'export')
  with caplog.at_level(logging.INFO, logger='absl'):
    rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=export',
                   f'--export_dir={export_dir}', '--verbosity=0')
  assert rc == 0, out.err
  # The run had no EMA: the line says which weights were exported.
  assert (f'Exported SavedModel to {export_dir} (the raw weights: EMA is '
          'off)') in caplog.text
  assert _export_top_1(export_dir, trained[1]) == last['top_1_accuracy']


def _copy_with_config(trained, tmp_path, **sections):
  """A copy of the trained run whose config.json has `sections` updated."""
  model_dir = str(tmp_path / 'run')
  shutil.copytree(trained[0], model_dir)
  path = os.path.join(model_dir, 'config.json')
  config = json.load(open(path))
  for section, values in sections.items():
    config[section].update(values)
  with open(path, 'w') as f:
    json.dump(config, f)
  return model_dir


def _dry_run_config(capsys, *args):
  rc, out = _run(capsys, *args, '--dry_run')
  assert rc == 0, out.err
  return json.loads(out.out[:out.out.index('\nModel: ')])


def test_eval_keeps_the_runs_eval_images(trained, capsys, tmp_path):
  """A run that evaluated 6 of the 10 described images, or its first batch
  (`eval_steps=1` of 4 images), is evaluated on as many."""
  model_dir = _copy_with_config(trained, tmp_path,
                                data=dict(num_eval_images=6))
  config = _dry_run_config(capsys, f'--model_dir={model_dir}', '--mode=eval')
  assert config['data']['num_eval_images'] == 6
  assert config['train']['eval_batch_per_replica'] == 2
  shutil.rmtree(model_dir)
  model_dir = _copy_with_config(trained, tmp_path, train=dict(eval_steps=1))
  config = _dry_run_config(capsys, f'--model_dir={model_dir}', '--mode=eval',
                           '--num_cpu_replicas=4')
  assert config['data']['num_eval_images'] == 4
  assert config['train']['eval_steps'] is None


def test_a_float16_run_evaluates_in_bfloat16_on_a_tpu(trained, capsys,
                                                      tmp_path):
  model_dir = _copy_with_config(trained, tmp_path,
                                model=dict(use_float16=True))
  config = _dry_run_config(capsys, f'--model_dir={model_dir}', '--mode=eval',
                           '--tpu=local')
  assert config['model']['use_bfloat16'] and not config['model'][
      'use_float16']
  assert config['distribute']['strategy'] == 'tpu'
  # Elsewhere the run's own precision.
  config = _dry_run_config(capsys, f'--model_dir={model_dir}', '--mode=eval')
  assert config['model']['use_float16']


def test_a_presets_values_give_way_to_the_runs_config(trained, capsys,
                                                      tmp_path):
  """`--preset=cpu_smoke --mode=eval`: the preset's model and data (B0 at
  32 px, 10 classes, synthetic) are defaults; the run's own stand."""
  FLAGS.unparse_flags()
  try:
    FLAGS(presets.expand_argv([
        'efficientnet-tpu-train', '--preset=cpu_smoke', '--mode=eval',
        f'--model_dir={trained[0]}', '--dry_run']))
    rc = main_lib.main(['efficientnet-tpu-train'])
  finally:
    FLAGS.unparse_flags()
  out = capsys.readouterr()
  assert rc == 0, out.err
  config = json.loads(out.out[:out.out.index('\nModel: ')])
  assert (config['model']['image_size'], config['model']['width_coefficient'],
          config['model']['num_label_classes']) == (16, 0.1, CLASSES)
  assert (config['data']['data'], config['data']['data_dir']) == (
      'tfrecord', trained[1])
  # The preset's hardware is this eval's own: 4 replicas, 2 images each.
  assert config['distribute']['num_cpu_replicas'] == 4
  assert 'per_replica_eval_batch: 2' in out.out


def _eval_records(data_dir):
  """(encoded image, label) of every eval record, in file order."""
  files = sorted(tf.io.gfile.glob(os.path.join(data_dir, 'validation-*')))
  spec = {'image/encoded': tf.io.FixedLenFeature([], tf.string),
          'image/class/label': tf.io.FixedLenFeature([], tf.int64)}
  records = [tf.io.parse_single_example(r, spec)
             for r in tf.data.TFRecordDataset(files)]
  return ([r['image/encoded'].numpy() for r in records],
          np.array([int(r['image/class/label']) for r in records]))


def _export_top_1(export_dir, data_dir):
  """Top-1 of a SavedModel on the eval records' own bytes and labels."""
  images, labels = _eval_records(data_dir)
  serve = tf.saved_model.load(export_dir).signatures['serving_default']
  classes = serve(image_bytes=tf.constant(images))['classes'].numpy()
  return float(np.mean(classes == labels))


def test_export_from_model_dir_names_classes_in_the_label_convention(
    trained, capsys, tmp_path):
  model_dir, data_dir = trained
  best = json.load(open(os.path.join(model_dir, 'best', 'best_eval.json')))
  export_dir = str(tmp_path / 'export')
  rc, out = _run(capsys, f'--model_dir={model_dir}', '--mode=export',
                 f'--export_dir={export_dir}', '--checkpoint_path=best')
  assert rc == 0, out.err
  assert json.loads(out.out.splitlines()[-1])['step'] == best['step']
  # Exported on 1 replica from the run of 2: the best eval's top-1 on the
  # same images (1-based labels, as the records hold them).
  assert _export_top_1(export_dir, data_dir) == best['top_1_accuracy']
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


def _event_points(directory, tag):
  """[(step, value)] of `tag` in the event files of `directory`."""
  points = []
  for name in sorted(os.listdir(directory)):
    for event in tf.compat.v1.train.summary_iterator(
        os.path.join(directory, name)):
      points += [(event.step, tf.make_ndarray(v.tensor))
                 for v in event.summary.value if v.tag == tag]
  return points


def test_rerunning_a_finished_run_adds_no_second_eval_point(
    trained, capsys, tmp_path):
  model_dir, data_dir = trained
  copy = str(tmp_path / 'run')
  shutil.copytree(model_dir, copy)
  recorded = _eval_results(copy)
  top_1_events = _event_points(os.path.join(copy, 'eval'),
                               'eval/top_1_accuracy')
  rc, out = _run(capsys, *_train_args(copy, data_dir))
  assert rc == 0, out.err
  # Nothing new in eval_results.jsonl or TensorBoard; the command prints
  # the recorded evaluation of the last step (once, on stdout).
  assert _eval_results(copy) == recorded
  assert _event_points(os.path.join(copy, 'eval'),
                       'eval/top_1_accuracy') == top_1_events
  [printed] = out.out.strip().splitlines()
  assert json.loads(printed)['eval/top_1_accuracy'] == pytest.approx(
      recorded[-1]['top_1_accuracy'], abs=1e-6)
  # Another eval set is another evaluation: it is run and recorded.
  rc, out = _run(capsys, *_train_args(copy, data_dir),
                 '--num_eval_images=6')
  assert rc == 0, out.err
  [added] = _eval_results(copy)[len(recorded):]
  assert (added['step'], added['num_examples']) == (4, 6)


def test_the_startup_block_renders_in_tensorboard_line_by_line(trained):
  """TensorBoard renders text summaries as markdown (its own renderer is
  the reference): each line of the block is an item, the model_dir as
  written (its '-' and '_' not taken for markup)."""
  import html  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  from tensorboard import plugin_util  # pylint: disable=g-import-not-at-top
  model_dir, _ = trained
  [(step, text)] = _event_points(os.path.join(model_dir, 'train'),
                                 'run/startup')
  assert step == 0
  rendered = plugin_util.markdown_to_safe_html(text.item().decode())
  items = [html.unescape(re.sub('<[^>]+>', '', item))
           for item in re.findall('<li>(.*?)</li>', rendered, re.S)]
  assert items[0] == f'Run: --mode=train_and_eval, model_dir {model_dir}'
  keys = [item.split(':')[0] for item in items]
  assert keys[:2] == ['Run', 'Strategy']
  assert {'Batch', 'Length', 'Optimizer', 'Stack', 'Data', 'Model',
          'Memory'} <= set(keys)
  assert '<em>' not in rendered and '<strong>Run</strong>' in rendered
