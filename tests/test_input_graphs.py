"""Input functions are pure TensorFlow: no Python callback in any graph.

On a TPU pod each host's input pipeline runs inside that host's TensorFlow
server, which has no Python to call back into: a `tf.py_function` there
fails with "No registered 'PyFunc' OpKernel" or a missing callback (TF
issues 38762, 39030, 30818). Reference: the op types TensorFlow registers
for Python callbacks (`script_ops.py`: PyFunc, PyFuncStateless,
EagerPyFunc), looked for in the dataset's serialized graph and every
function of its library (map, interleave, scan, filter and cond bodies).
"""

import itertools

import pytest
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from efficientnet_tpu import experiment
from efficientnet_tpu import testing
from efficientnet_tpu.data import pipeline as data_pipeline
from tests.test_input_pipeline import write_split

PYTHON_CALLBACK_OPS = {'PyFunc', 'PyFuncStateless', 'EagerPyFunc'}


def op_types(dataset: tf.data.Dataset):
  """Op types of the dataset's graph and of every function it holds."""
  graph = graph_pb2.GraphDef()
  graph.ParseFromString(dataset._as_serialized_graph().numpy())  # pylint: disable=protected-access
  ops = {n.op for n in graph.node}
  for fn in graph.library.function:
    ops.update(n.op for n in fn.node_def)
  return ops


def test_the_check_sees_a_python_callback_in_a_nested_function():
  """The walk reaches functions inside functions (a py_function in a cond
  in a map in an interleave)."""
  def inner(x):
    return tf.cond(x > 0, lambda: tf.py_function(lambda v: v, [x], tf.int64),
                   lambda: x)
  ds = tf.data.Dataset.range(3).interleave(
      lambda x: tf.data.Dataset.from_tensors(x).map(inner))
  assert 'EagerPyFunc' in op_types(ds)
  assert not PYTHON_CALLBACK_OPS & op_types(tf.data.Dataset.range(3).map(
      lambda x: tf.cond(x > 0, lambda: x + 1, lambda: x)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('records')
  write_split(str(d), 'train', [3, 2], label_fn=lambda f, j: j % 5 + 1)
  write_split(str(d), 'validation', [3, 2], label_fn=lambda f, j: j % 5 + 1)
  return str(d)


# (augment_name, deterministic): --deterministic refuses the augmentations.
_AUGMENT = [('none', False), ('none', True), ('randaugment', False),
            ('autoaugment', False)]
_MIXING = dict(mixup_alpha=0.2, cutmix_alpha=1.0)


def _configs(tmp_path, data_dir, source):
  """Every combination of the options that shape an input function:
  augmentation x determinism x skip_corrupt. Mixup / CutMix run on device,
  not in the input; half the configs set them anyway (each augmentation
  and each skip_corrupt value with and without)."""
  for i, ((augment, det), skip) in enumerate(
      itertools.product(_AUGMENT, (False, True))):
    data = dict(augment_name=augment, deterministic=det, skip_corrupt=skip,
                num_train_images=5, num_eval_images=5)
    if source == 'tfrecord':
      data.update(data='tfrecord', data_dir=data_dir)
    mixing = _MIXING if (i + i // 2) % 2 else {}
    yield testing.small_config(tmp_path, data=data, optimizer=mixing,
                               train=dict(train_batch_size=2,
                                          eval_batch_size=2))


@pytest.mark.parametrize('source', ['tfrecord', 'synthetic'])
def test_train_and_eval_input_graphs_hold_no_python_callback(
    tmp_path, data_dir, source):
  """The real input functions (as experiment.py builds them), for the
  second pipeline of two: train (also resumed), and eval."""
  checked = 0
  for cfg in _configs(tmp_path, data_dir, source):
    train_for_step = experiment.train_input(cfg)
    eval_input = data_pipeline.make_input(
        cfg.data, cfg.model.num_label_classes, cfg.model.image_size, False,
        cfg.train.eval_batch_size, count_cache_dir=str(tmp_path))
    ctx = tf.distribute.InputContext(2, 1, 2)
    datasets = {'train': train_for_step(0).fn(ctx),
                'eval': eval_input.fn(ctx)}
    if cfg.data.augment_name == 'none':  # Resuming changes only the stream.
      datasets['resumed train'] = train_for_step(3).fn(ctx)
    for name, ds in datasets.items():
      found = PYTHON_CALLBACK_OPS & op_types(ds)
      assert not found, (
          f'{name} input ({source}, {cfg.data.augment_name}, '
          f'deterministic={cfg.data.deterministic}, '
          f'skip_corrupt={cfg.data.skip_corrupt}, '
          f'mixup={cfg.optimizer.mixup_alpha}) holds {found}')
      checked += 1
  assert checked == len(_AUGMENT) * 2 * 2 + 2 * 2
