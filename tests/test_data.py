"""Tests for the synthetic source (data/synthetic.py through
`pipeline.make_input`), the eval padding (data/contract.py) and
`pipeline.check_data_files`."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import config as config_lib
from efficientnet_tpu.data import contract
from efficientnet_tpu.data import pipeline as data_pipeline
from tests.helpers import input_context




@pytest.mark.parametrize('num_images,global_batch,pipelines,replicas', [
    (37, 8, 1, 1), (37, 8, 2, 4), (37, 12, 3, 3), (50, 16, 4, 8),
    (5, 16, 2, 2),
])
def test_eval_padding_covers_every_example_exactly_once(
    num_images, global_batch, pipelines, replicas):
  steps = contract.num_eval_steps(num_images, global_batch)
  assert steps == -(-num_images // global_batch)
  seen = collections.Counter()
  for pid in range(pipelines):
    ctx = input_context(pipelines, pid, replicas)
    per_replica = ctx.get_per_replica_batch_size(global_batch)
    examples = (tf.data.Dataset.range(num_images)
                .shard(pipelines, pid)
                .map(lambda i: {'images': tf.zeros([2, 2, 3]),
                                'labels': tf.cast(i, tf.int32)}))
    ds = contract.batch_eval_examples(examples, per_replica,
                                      replicas // pipelines, steps)
    batches = list(ds.as_numpy_iterator())
    # Every replica of this pipeline runs exactly `steps` fixed-shape steps.
    assert len(batches) == steps * (replicas // pipelines)
    for b in batches:
      assert b['images'].shape == (per_replica, 2, 2, 3)
      for label, m in zip(b['labels'], b['mask']):
        if m == 1.0:
          seen[int(label)] += 1
        else:
          assert m == 0.0 and label == 0
  assert sorted(seen) == list(range(num_images))
  assert set(seen.values()) == {1}


def _synthetic(is_training, **kw):
  cfg = config_lib.DataConfig(num_train_images=64, num_eval_images=21, **kw)
  return data_pipeline.make_input(cfg, num_classes=5, image_size=8,
                                  is_training=is_training,
                                  global_batch_size=8).fn


def test_synthetic_element_spec():
  """uint8 images like the real pipeline (normalized on device)."""
  train = _synthetic(True)(input_context(1, 0, 2))
  assert train.element_spec == {
      'images': tf.TensorSpec([4, 8, 8, 3], tf.uint8),
      'labels': tf.TensorSpec([4], tf.int32)}
  evaluation = _synthetic(False)(input_context(1, 0, 2))
  assert evaluation.element_spec == {
      'images': tf.TensorSpec([4, 8, 8, 3], tf.uint8),
      'labels': tf.TensorSpec([4], tf.int32),
      'mask': tf.TensorSpec([4], tf.float32)}
  # 21 images at global batch 8: 3 steps x 2 replicas, 21 of them real.
  batches = list(evaluation.as_numpy_iterator())
  assert len(batches) == 6
  assert sum(b['mask'].sum() for b in batches) == 21
  # Like every `InputFn`, None means one pipeline feeding one replica.
  assert _synthetic(True)(None).element_spec['images'].shape[0] == 8


def test_synthetic_is_deterministic_and_labels_in_range():
  a = next(iter(_synthetic(False)(input_context(1, 0, 1))))
  b = next(iter(_synthetic(False)(input_context(1, 0, 1))))
  np.testing.assert_array_equal(a['images'], b['images'])
  labels = np.concatenate([x['labels'] for x in
                           _synthetic(False)(input_context(1, 0, 1))
                           .as_numpy_iterator()])
  assert labels.min() >= 0 and labels.max() < 5


@pytest.mark.parametrize('learnable', [True, False])
def test_synthetic_images_use_the_range_and_are_learnable(learnable):
  """Nearest class mean (fit on train, scored on eval) beats chance only
  in learnable mode; pixels spread over 0..255 with little clipping."""
  def arrays(is_training, batches):
    fn = _synthetic(is_training, synthetic_learnable=learnable)
    out = list(fn(input_context(1, 0, 1)).take(batches).as_numpy_iterator())
    keep = np.concatenate([b.get('mask', np.ones(len(b['labels'])))
                           for b in out]) == 1  # Drop eval padding.
    images = np.concatenate([b['images'] for b in out]).astype(np.float64)
    return (images.reshape(len(images), -1)[keep],
            np.concatenate([b['labels'] for b in out])[keep])
  x, y = arrays(True, 8)  # 64 images, one epoch.
  assert 100 < x.mean() < 156 and x.std() > 30
  assert np.mean((x == 0) | (x == 255)) < 0.1
  means = np.stack([x[y == c].mean(0) if np.any(y == c) else
                    np.full(x.shape[1], np.inf) for c in range(5)])
  xe, ye = arrays(False, 3)
  assert len(ye) == 21
  predicted = np.argmin(((xe[:, None] - means[None]) ** 2).sum(-1), 1)
  accuracy = np.mean(predicted == ye)
  if learnable:
    assert accuracy > 0.9
  else:
    assert accuracy < 0.6


def test_synthetic_pipelines_shard_the_eval_set():
  """Two pipelines together hold the one-pipeline eval set, once."""
  def images(pipelines):
    out = []
    for pid in range(pipelines):
      for b in _synthetic(False)(input_context(pipelines, pid, 2)).as_numpy_iterator():
        out += [img.tobytes() for img, m in zip(b['images'], b['mask'])
                if m == 1]
    return sorted(out)
  one, two = images(1), images(2)
  assert len(one) == 21 and one == two


def test_missing_tfrecords_fail_with_the_pattern(tmp_path):
  cfg = config_lib.DataConfig(source='tfrecord', data_dir=str(tmp_path))
  with pytest.raises(config_lib.ConfigError,
                     match=r"^data_dir: expected TFRecord files "
                     r"matching 'train-\*'"):
    data_pipeline.check_data_files(cfg, 'train')
  (tmp_path / 'train-00000-of-00001').write_bytes(b'')
  data_pipeline.check_data_files(cfg, 'train')
  with pytest.raises(config_lib.ConfigError, match='validation-'):
    data_pipeline.check_data_files(cfg, 'train_and_eval')
