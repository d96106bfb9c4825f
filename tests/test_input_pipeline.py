"""Tests for data/pipeline.py (and the TFRecord and tfds sources it reads)
on TFRecords written here with PIL."""

import io
import math
import os
import struct

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tensorflow.python.data.ops import multi_device_iterator_ops

from efficientnet_tpu import replicated
from efficientnet_tpu.data import contract
from efficientnet_tpu.data import pipeline as data_pipeline
from efficientnet_tpu.data import preprocessing
from efficientnet_tpu.config import ConfigError, DataConfig
from tests.helpers import cpu_replicas, input_context

SIZE = 16
MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


def _jpeg(color, h=20, w=26):
  out = io.BytesIO()
  Image.fromarray(np.full((h, w, 3), color, np.uint8)).save(out, 'JPEG',
                                                            quality=95)
  return out.getvalue()


def _example(image_bytes, label):
  feature = {
      'image/encoded': tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[image_bytes])),
      'image/format': tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[b'JPEG'])),
      'image/class/label': tf.train.Feature(
          int64_list=tf.train.Int64List(value=[label])),
      'image/class/synset': tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[b'n%08d' % label])),
  }
  return tf.train.Example(features=tf.train.Features(
      feature=feature)).SerializeToString()


def write_split(data_dir, prefix, sizes, label_fn=None, color_fn=None):
  """Writes len(sizes) shards; record j of file f gets label_fn(f, j)."""
  os.makedirs(data_dir, exist_ok=True)
  label_fn = label_fn or (lambda f, j: f * 100 + j + 1)
  color_fn = color_fn or (lambda label: (label * 7 % 256, 90, 200))
  labels = []
  for f, n in enumerate(sizes):
    path = os.path.join(data_dir, f'{prefix}-{f:05d}-of-{len(sizes):05d}')
    with tf.io.TFRecordWriter(path) as w:
      for j in range(n):
        label = label_fn(f, j)
        labels.append(label)
        w.write(_example(_jpeg(color_fn(label)), label))
  return labels


def _cfg(data_dir, **kw):
  kw.setdefault('num_eval_images', 37)
  kw.setdefault('shuffle_buffer', 32)
  return DataConfig(source='tfrecord', data_dir=str(data_dir), **kw)




@pytest.fixture(scope='module')
def eval_dir(tmp_path_factory):
  """37 validation images over 10 uneven files; labels 1..37 are ids."""
  d = tmp_path_factory.mktemp('eval')
  sizes = [1, 7, 3, 0, 6, 2, 5, 4, 8, 1]
  assert sum(sizes) == 37
  ids = iter(range(1, 38))
  write_split(str(d), 'validation', sizes, lambda f, j: next(ids))
  return d


@pytest.fixture(scope='module')
def train_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('train')
  write_split(str(d), 'train', [4] * 10)
  return d


def test_num_eval_steps():
  cfg = DataConfig(num_eval_images=37)
  assert contract.num_eval_steps(cfg.num_eval_images, 8) == 5
  assert contract.num_eval_steps(50000, 1024) == 49
  assert contract.num_eval_steps(16, 8) == 2


def test_normalization_constants():
  np.testing.assert_allclose(preprocessing.MEAN_RGB, MEAN)
  np.testing.assert_allclose(preprocessing.STDDEV_RGB, STD)


@pytest.mark.parametrize('background', [False, True])
def test_eval_labels_round_trip(eval_dir, background):
  cfg = _cfg(eval_dir, include_background_label=background)
  ds = data_pipeline.build_input(cfg, SIZE, False, 8).fn(None)
  labels, masks = [], []
  for b in ds:
    labels.append(b['labels'].numpy())
    masks.append(b['mask'].numpy())
  labels, masks = np.concatenate(labels), np.concatenate(masks)
  offset = 0 if background else 1
  assert sorted(labels[masks == 1]) == [i - offset for i in range(1, 38)]


@pytest.mark.parametrize('background', [False, True])
def test_train_labels_round_trip(train_dir, background):
  cfg = _cfg(train_dir, include_background_label=background)
  ds = data_pipeline.build_input(cfg, SIZE, True, 8).fn(None)
  seen = set()
  for b in ds.take(20):
    seen.update(b['labels'].numpy().tolist())
  offset = 0 if background else 1
  want = {f * 100 + j + 1 - offset for f in range(10) for j in range(4)}
  assert seen == want


def _check_eval_coverage(batches_per_pipeline, global_batch, replicas, k):
  steps = math.ceil(37 / global_batch)
  per_replica = global_batch // replicas
  real = []
  for batches in batches_per_pipeline:
    # Every pipeline feeds replicas / k replicas for `steps` steps each.
    assert len(batches) == steps * replicas // k
    for b in batches:
      assert b['images'].shape == (per_replica, SIZE, SIZE, 3)
      mask = b['mask'].numpy()
      assert set(np.unique(mask)) <= {0.0, 1.0}
      real.extend((b['labels'].numpy() + 1)[mask == 1].tolist())
      # Padding is masked and all zeros.
      assert np.all(b['images'].numpy()[mask == 0] == 0)
  assert sorted(real) == list(range(1, 38))


@pytest.mark.parametrize('k,global_batch,replicas', [
    (1, 8, 1), (1, 8, 4), (2, 8, 2), (2, 8, 4), (3, 12, 3), (3, 12, 6),
    (4, 8, 4), (4, 8, 8)])
def test_eval_covers_each_image_once(eval_dir, k, global_batch, replicas):
  fn = data_pipeline.build_input(_cfg(eval_dir), SIZE, False,
                                 global_batch).fn
  batches = [list(fn(input_context(k, i, replicas))) for i in range(k)]
  _check_eval_coverage(batches, global_batch, replicas, k)


def test_eval_more_records_than_num_eval_images(eval_dir):
  cfg = _cfg(eval_dir, num_eval_images=30)
  fn = data_pipeline.build_input(cfg, SIZE, False, 8).fn
  real = []
  for i in range(2):
    for b in fn(input_context(2, i, 2)):
      real.extend(b['labels'].numpy()[b['mask'].numpy() == 1].tolist())
  assert len(real) == 30 and len(set(real)) == 30


def test_eval_fewer_records_than_num_eval_images_fails(eval_dir):
  cfg = _cfg(eval_dir, num_eval_images=45)
  ds = data_pipeline.build_input(cfg, SIZE, False, 8).fn(None)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='fewer records than num_eval_images=45'):
    list(ds)


def test_eval_through_mirrored_strategy(eval_dir):
  strategy = tf.distribute.MirroredStrategy(
      [f'/cpu:{i}' for i in range(4)],
      cross_device_ops=tf.distribute.ReductionToOneDevice())
  fn = data_pipeline.build_input(_cfg(eval_dir), SIZE, False, 8).fn
  dist = strategy.distribute_datasets_from_function(fn)
  steps, real = 0, []
  for batch in dist:
    steps += 1
    labels = strategy.experimental_local_results(batch['labels'])
    masks = strategy.experimental_local_results(batch['mask'])
    assert len(labels) == 4
    for lab, mask in zip(labels, masks):
      assert lab.shape == (2,)
      real.extend((lab.numpy() + 1)[mask.numpy() == 1].tolist())
  assert steps == contract.num_eval_steps(_cfg(eval_dir).num_eval_images, 8)
  assert sorted(real) == list(range(1, 38))


def test_train_pipelines_see_disjoint_files(train_dir):
  files_seen = []
  for i in range(3):
    fn = data_pipeline.build_input(_cfg(train_dir), SIZE, True, 12).fn
    seen = set()
    for b in fn(input_context(3, i, 3)).take(40):
      seen.update((b['labels'].numpy() + 1) // 100)
    # File f of 10 goes to pipeline f % 3 (files are sorted by name).
    assert seen == set(range(i, 10, 3))
    files_seen.append(seen)
  assert set().union(*files_seen) == set(range(10))


def test_fewer_train_files_than_pipelines(train_dir):
  fn = data_pipeline.build_input(_cfg(train_dir), SIZE, True, 11).fn
  with pytest.raises(ConfigError, match='input pipelines .11.'):
    fn(input_context(11, 0, 11))


def test_element_spec_is_uint8(train_dir, eval_dir):
  """Normalization and the cast to the compute dtype happen on device."""
  train = data_pipeline.build_input(_cfg(train_dir), SIZE, True,
                                    8).fn(input_context(1, 0, 2))
  assert set(train.element_spec) == {'images', 'labels'}
  assert train.element_spec['images'] == tf.TensorSpec([4, SIZE, SIZE, 3],
                                                       tf.uint8)
  assert train.element_spec['labels'] == tf.TensorSpec([4], tf.int32)
  b = next(iter(train))
  assert b['images'].dtype == tf.uint8
  assert b['images'].shape == (4, SIZE, SIZE, 3)
  ev = data_pipeline.build_input(_cfg(eval_dir), SIZE, False,
                                 8).fn(input_context(1, 0, 2))
  assert set(ev.element_spec) == {'images', 'labels', 'mask'}
  assert ev.element_spec['images'] == tf.TensorSpec([4, SIZE, SIZE, 3],
                                                    tf.uint8)
  assert ev.element_spec['labels'] == tf.TensorSpec([4], tf.int32)
  assert ev.element_spec['mask'] == tf.TensorSpec([4], tf.float32)


def test_the_applications_pipelines_autotune(train_dir, eval_dir):
  """tf.data tunes the parallelism of the application's pipelines (the
  tests' distributed inputs turn it off: tests/conftest.py)."""
  for data_dir, training in ((train_dir, True), (eval_dir, False)):
    ds = data_pipeline.build_input(_cfg(data_dir), SIZE, training,
                                   8).fn(input_context(1, 0, 2))
    assert ds.options().autotune.enabled is True


def _device_stages_autotune(iterator):
  """Whether each per-device stage of a distributed iterator (one host)
  autotunes: None is TF's default, which is on."""
  # pylint: disable=protected-access
  devices = iterator._iterators[0]._iterator._device_iterators
  return [d._dataset.options().autotune.enabled for d in devices]


def test_distributed_iterators_do_not_tune_the_per_device_stages():
  """replicated.iterate: the stages TF adds per device (nothing to tune;
  deleting their tuning threads waits, see its docstring) do not
  autotune, the same batches arrive, and TF's builder is itself again
  afterwards."""
  strategy = cpu_replicas(2)
  builder = multi_device_iterator_ops._create_device_dataset  # pylint: disable=protected-access
  dataset = replicated.distribute_input(
      strategy, lambda ctx: tf.data.Dataset.range(20).batch(2))
  plain, ours = iter(dataset), replicated.iterate(dataset)
  assert _device_stages_autotune(plain) == [None, None]  # TF's default.
  assert _device_stages_autotune(ours) == [False, False]
  assert multi_device_iterator_ops._create_device_dataset is builder  # pylint: disable=protected-access
  for _ in range(5):
    want, got = next(plain), next(ours)
    for a, b in zip(strategy.experimental_local_results(want),
                    strategy.experimental_local_results(got)):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
      assert a.device == b.device


@pytest.mark.parametrize('training', [False, True])
def test_images_are_raw_rgb_solid_colors(eval_dir, train_dir, training):
  """Solid-colour JPEGs: every pixel is the colour on the 0..255 scale."""
  data_dir = train_dir if training else eval_dir
  ds = data_pipeline.build_input(_cfg(data_dir), SIZE, training, 8).fn(None)
  n = 0
  for b in ds.take(5):
    masks = b['mask'].numpy() if 'mask' in b else np.ones(8)
    for image, label, mask in zip(b['images'].numpy(), b['labels'].numpy(),
                                  masks):
      if mask:
        n += 1
        color = np.array([(label + 1) * 7 % 256, 90, 200])
        # JPEG chroma quantization moves a solid colour by a few levels.
        np.testing.assert_allclose(image.astype(int),
                                   np.broadcast_to(color, image.shape),
                                   atol=6)
  assert n >= 37


def test_training_is_repeated_and_augment_runs(train_dir):
  cfg = _cfg(train_dir, augment_name='randaugment', randaug_magnitude=15)
  ds = data_pipeline.build_input(cfg, SIZE, True, 16).fn(None)
  n = 0
  for b in ds.take(6):  # 96 > 40 images: must wrap around.
    assert b['images'].dtype == tf.uint8
    assert b['images'].shape == (16, SIZE, SIZE, 3)
    n += 1
  assert n == 6


# ---- bad input --------------------------------------------------------------


def test_no_files_names_directory_and_pattern(tmp_path):
  for training, pattern in ((True, 'train-*'), (False, 'validation-*')):
    with pytest.raises(ConfigError) as e:
      data_pipeline.build_input(_cfg(tmp_path), SIZE, training, 8)
    msg = str(e.value)
    assert '\n' not in msg and str(tmp_path) in msg and pattern in msg


def _write_with_bad_payload(d, prefix):
  write_split(str(d), prefix, [5, 5])
  bad = os.path.join(d, f'{prefix}-00002-of-00003')
  with tf.io.TFRecordWriter(bad) as w:
    w.write(_example(_jpeg((1, 2, 3)), 301))
    w.write(_example(b'\x89PNG\r\n\x1a\n not a jpeg at all', 302))
    w.write(_example(_jpeg((1, 2, 3))[:-200], 303))  # truncated
    w.write(_example(_jpeg((1, 2, 3)), 304))
  return bad


def test_non_jpeg_payload_error_names_file(tmp_path):
  bad = _write_with_bad_payload(tmp_path, 'validation')
  cfg = _cfg(tmp_path, num_eval_images=14)
  ds = data_pipeline.build_input(cfg, SIZE, False, 2).fn(None)
  with pytest.raises(tf.errors.InvalidArgumentError, match=bad):
    list(ds)
  with pytest.raises(ConfigError):  # No train-* files here.
    data_pipeline.build_input(_cfg(tmp_path), SIZE, True, 2)


def _assert_strict_train_fails(d, match, batches):
  """The strict training pipeline on d fails within `batches` batches."""
  strict = data_pipeline.build_input(_cfg(d), SIZE, True, 2).fn(None)
  with pytest.raises(tf.errors.InvalidArgumentError, match=match):
    for _ in strict.take(batches):
      pass


def _skip_corrupt_labels(d, batches):
  """1-based labels of `batches` batches of skip_corrupt training on d."""
  skip = data_pipeline.build_input(_cfg(d, skip_corrupt=True),
                                   SIZE, True, 2).fn(None)
  seen = set()
  for b in skip.take(batches):
    seen.update((b['labels'].numpy() + 1).tolist())
  return seen


def test_train_strict_payload_error_and_skip_corrupt(tmp_path):
  bad = _write_with_bad_payload(tmp_path, 'train')
  _assert_strict_train_fails(tmp_path, bad, 200)
  seen = _skip_corrupt_labels(tmp_path, 60)
  good = {f * 100 + j + 1 for f in range(2) for j in range(5)} | {301, 304}
  assert seen == good


def _write_corrupt_frame(d, prefix):
  write_split(str(d), prefix, [3, 3])
  path = os.path.join(d, f'{prefix}-00001-of-00002')
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0xFF  # Breaks the CRC of the middle record.
  open(path, 'wb').write(bytes(data))
  return path


def test_corrupt_record_error_names_file(tmp_path):
  path = _write_corrupt_frame(tmp_path, 'validation')
  ds = data_pipeline.build_input(_cfg(tmp_path, num_eval_images=6), SIZE,
                                 False, 2).fn(None)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'Corrupt or truncated TFRecord in\W+' + path):
    list(ds)


def test_corrupt_record_train_skip(tmp_path):
  path = _write_corrupt_frame(tmp_path, 'train')
  _assert_strict_train_fails(tmp_path, path, 50)
  seen = _skip_corrupt_labels(tmp_path, 30)
  # File 0 intact; file 1 keeps only records before the corrupt one.
  assert {1, 2, 3} <= seen and seen <= {1, 2, 3, 101, 102, 103}
  assert len(seen) < 6


def _frame_offsets(path):
  """Start of each TFRecord frame: 8-byte length, 4 CRC, data, 4 CRC."""
  data = open(path, 'rb').read()
  offsets, pos = [], 0
  while pos < len(data):
    offsets.append(pos)
    pos += 16 + struct.unpack('<Q', data[pos:pos + 8])[0]
  assert pos == len(data)
  return offsets


def test_long_file_corrupt_frame_keeps_exactly_the_records_before_it(
    tmp_path):
  """A file longer than one read batch, corrupt at record 25 of 40."""
  write_split(str(tmp_path), 'train', [40], lambda f, j: j + 1)
  path = os.path.join(tmp_path, 'train-00000-of-00001')
  start = _frame_offsets(path)[25]
  data = bytearray(open(path, 'rb').read())
  data[start + 100] ^= 0xFF  # Inside record 25's payload: its CRC fails.
  open(path, 'wb').write(bytes(data))
  _assert_strict_train_fails(tmp_path, path, 50)
  assert _skip_corrupt_labels(tmp_path, 40) == set(range(1, 26))


def test_eval_long_files_cover_each_image_once(tmp_path):
  """Files longer than one read batch keep every record, in order."""
  ids = iter(range(1, 38))
  write_split(str(tmp_path), 'validation', [35, 2], lambda f, j: next(ids))
  fn = data_pipeline.build_input(_cfg(tmp_path), SIZE, False, 8).fn
  batches = [list(fn(input_context(2, i, 2))) for i in range(2)]
  _check_eval_coverage(batches, 8, 2, 2)
  # One pipeline: interleaving 2 files, then file 0's remainder in order.
  labels = np.concatenate([b['labels'].numpy()[b['mask'].numpy() == 1]
                           for b in fn(None)]) + 1
  assert labels.tolist() == [1, 36, 2, 37] + list(range(3, 36))


def test_malformed_examples_fail_or_are_skipped_alone(tmp_path):
  """Frames whose payload is no tf.train.Example, inside one read batch:
  one the parser reads as empty (no JPEG: the error names the file) and
  one it rejects. skip_corrupt drops exactly those two."""
  write_split(str(tmp_path), 'train', [20])
  bad = os.path.join(tmp_path, 'train-00001-of-00002')
  payloads = {5: b'\x01\x02garbage', 12: b'hello world'}
  with tf.io.TFRecordWriter(bad) as w:
    for j in range(20):
      w.write(payloads.get(j) or _example(_jpeg((1, 2, 3)), 1000 + j))
  for payload, match in ((payloads[5], bad), (payloads[12], 'parse')):
    with tf.io.TFRecordWriter(bad) as w:
      w.write(payload)
    _assert_strict_train_fails(tmp_path, match, 100)
  with tf.io.TFRecordWriter(bad) as w:
    for j in range(20):
      w.write(payloads.get(j) or _example(_jpeg((1, 2, 3)), 1000 + j))
  assert _skip_corrupt_labels(tmp_path, 100) == (
      set(range(1, 21)) | (set(range(1000, 1020)) - {1005, 1012}))


def test_truncated_file_error_names_file(tmp_path):
  write_split(str(tmp_path), 'validation', [3, 3])
  path = os.path.join(tmp_path, 'validation-00000-of-00002')
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:-40])
  ds = data_pipeline.build_input(_cfg(tmp_path, num_eval_images=6), SIZE,
                                 False, 2).fn(None)
  with pytest.raises(tf.errors.InvalidArgumentError, match=path):
    list(ds)


def test_zero_based_labels_rejected(tmp_path):
  write_split(str(tmp_path), 'validation', [3], lambda f, j: j)
  ds = data_pipeline.build_input(_cfg(tmp_path, num_eval_images=3), SIZE,
                                 False, 3).fn(None)
  with pytest.raises(tf.errors.InvalidArgumentError, match='1-based'):
    list(ds)


# ---- tfds -------------------------------------------------------------------


def test_tfds_not_installed_or_not_prepared(tmp_path):
  cfg = DataConfig(source='tfds:imagenet2012', data_dir=str(tmp_path))
  with pytest.raises(ConfigError) as e:
    data_pipeline.build_input(cfg, SIZE, False, 8)
  assert '\n' not in str(e.value)
  assert 'imagenet2012' in str(e.value)


_TFDS_NAME = 'efficientnet_tpu_pipeline_test_ds'
_TFDS_TEST_LABELS = [j % 3 for j in range(7)]
_BUILDER = []


def _prepare_tfds(tfds, data_dir):
  """Prepares a tiny 3-class image dataset (train 8, test 7) offline."""
  if not _BUILDER:
    class Builder(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      name = _TFDS_NAME
      VERSION = tfds.core.Version('1.0.0')

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'label': tfds.features.ClassLabel(names=['a', 'b', 'c']),
            }))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {'train': self._generate_examples(8, 0),
                'test': self._generate_examples(7, 1)}

      def _generate_examples(self, n, seed):
        rng = np.random.RandomState(seed)
        for j in range(n):
          image = rng.randint(0, 255, (18 + j, 22, 3)).astype(np.uint8)
          yield j, {'image': image, 'label': j % 3}

    _BUILDER.append(Builder)
  builder = tfds.builder(_TFDS_NAME, data_dir=data_dir)
  builder.download_and_prepare()


def test_tfds_prepared_dataset(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  # tfds needs it to prepare a dataset defined in code (an etils extra).
  pytest.importorskip('importlib_resources')
  _prepare_tfds(tfds, str(tmp_path))
  cfg = DataConfig(source=f'tfds:{_TFDS_NAME}', data_dir=str(tmp_path),
                   num_eval_images=7)
  fn = data_pipeline.build_input(cfg, SIZE, False, 4).fn
  real = []
  for i in range(2):
    for b in fn(input_context(2, i, 2)):
      real.extend(b['labels'].numpy()[b['mask'].numpy() == 1].tolist())
  # tfds labels are 0-based class indices: kept as is without background.
  assert sorted(real) == sorted(_TFDS_TEST_LABELS)
  train = data_pipeline.build_input(cfg, SIZE, True, 4).fn(None)
  b = next(iter(train))
  assert b['images'].shape == (4, SIZE, SIZE, 3)
  assert b['images'].dtype == tf.uint8
  bg = DataConfig(source=f'tfds:{_TFDS_NAME}', data_dir=str(tmp_path),
                  num_eval_images=7, include_background_label=True)
  labels = []
  for b in data_pipeline.build_input(bg, SIZE, False, 4).fn(None):
    labels.extend(b['labels'].numpy()[b['mask'].numpy() == 1].tolist())
  assert sorted(labels) == sorted(l + 1 for l in _TFDS_TEST_LABELS)


def _write_with_bad_label(d, prefix, bad_label):
  """Labels 1..5 (5 classes), one record with `bad_label` in file 1."""
  labels = iter([1, 2, 3, 4, 5, 1, bad_label, 3])
  write_split(str(d), prefix, [4, 4], label_fn=lambda f, j: next(labels))
  return os.path.join(d, f'{prefix}-00001-of-00002')


@pytest.mark.parametrize('bad_label', [6, 5000, 0])
def test_labels_outside_the_classes_fail_or_are_skipped(tmp_path, bad_label):
  bad = _write_with_bad_label(tmp_path, 'validation', bad_label)
  _write_with_bad_label(tmp_path, 'train', bad_label)
  cfg = _cfg(tmp_path, num_eval_images=8)
  ev = data_pipeline.build_input(cfg, SIZE, False, 2,
                                 num_classes=5).fn(None)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=f'Label out of range in.*{bad}'):
    list(ev)
  train = data_pipeline.build_input(cfg, SIZE, True, 2,
                                    num_classes=5).fn(None)
  with pytest.raises(tf.errors.InvalidArgumentError, match='Label out of'):
    for _ in train.take(50):
      pass
  skip = data_pipeline.build_input(_cfg(tmp_path, skip_corrupt=True),
                                   SIZE, True, 2,
                                   num_classes=5).fn(None)
  seen = set()
  for b in skip.take(40):
    seen.update((b['labels'].numpy() + 1).tolist())
  assert seen == {1, 2, 3, 4, 5}  # The bad record never reaches training.
