"""Crop settings for data sets that are not ImageNet (DataConfig
train_crop_* and eval_crop_fraction): ImageNet defaults unchanged, custom
ranges honoured, threaded from the config through the TFRecord pipeline."""

import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from efficientnet_tpu.config import ConfigError, DataConfig
from efficientnet_tpu.data import pipeline as data_pipeline
from efficientnet_tpu.data import preprocessing
from tests.test_input_pipeline import _example  # pylint: disable=protected-access


def _jpeg_bytes(array):
  out = io.BytesIO()
  Image.fromarray(array).save(out, 'JPEG', quality=95)
  return out.getvalue()


def _pixels(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _to_uint8(x):
  """Round half up and saturate, in numpy."""
  return np.floor(np.clip(np.asarray(x, np.float64), 0, 255) + 0.5).astype(
      np.uint8)


def _decode_window(data, window):
  # The fused crop-decode differs from decode-then-slice at block edges
  # (libjpeg upsampling); the reference crops the way TF does.
  return tf.image.decode_and_crop_jpeg(data, window, channels=3)


def _resize(image, size):
  return _to_uint8(tf.image.resize(tf.cast(image, tf.float32), [size, size],
                                   method='bicubic', antialias=False))


def _tf_window(shape, seed, area, aspect):
  """TF's own sampler with TPU-EN's other arguments: [y, x, h, w]."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed, min_object_covered=0.1, aspect_ratio_range=aspect,
      area_range=area, max_attempts=10, use_image_if_no_bounding_boxes=True)
  return np.concatenate([begin[:2].numpy(), size[:2].numpy()])


def test_default_train_crop_is_bitwise_the_tpu_recipe():
  pixels = _pixels(90, 120)
  data = _jpeg_bytes(pixels)
  shape = tf.image.extract_jpeg_shape(data)
  for i in range(6):
    seed = tf.constant([i, 7], tf.int64)
    got = preprocessing.preprocess_for_train(data, 32, seed=seed).numpy()
    # Reference from TF ops: TPU-EN's area (0.08, 1) and aspect (3/4, 4/3),
    # the fused crop-decode, the flip, bicubic resize and rounding.
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    window = _tf_window(shape, crop_seed, (0.08, 1.0), (3. / 4, 4. / 3))
    assert tuple(window[2:]) != (90, 120)  # Sampling did not fall back.
    crop = _decode_window(data, window)
    crop = tf.image.stateless_random_flip_left_right(crop, flip_seed)
    np.testing.assert_array_equal(got, _resize(crop, 32))


def test_random_flip_off_keeps_the_crop_unflipped():
  # The same seeds as above: the same crop windows, never mirrored; some of
  # them are mirrored with the flip on.
  data = _jpeg_bytes(_pixels(90, 120))
  shape = tf.image.extract_jpeg_shape(data)
  flipped = 0
  for i in range(6):
    seed = tf.constant([i, 7], tf.int64)
    got = preprocessing.preprocess_for_train(data, 32, seed=seed,
                                             flip=False).numpy()
    crop_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    window = _tf_window(shape, crop_seed, (0.08, 1.0), (3. / 4, 4. / 3))
    want = _resize(_decode_window(data, window), 32)
    np.testing.assert_array_equal(got, want)
    on = preprocessing.preprocess_for_train(data, 32, seed=seed).numpy()
    flipped += not np.array_equal(on, want)
  assert flipped > 0
  assert DataConfig().random_flip  # ImageNet's recipe flips.


def test_default_eval_crop_is_bitwise_the_padded_center_crop():
  data = _jpeg_bytes(_pixels(90, 120, seed=1))
  for size in (24, 32):
    crop = int(size / (size + round(size / 7)) * 90)  # 224 / 256 at 224.
    y, x = (90 - crop + 1) // 2, (120 - crop + 1) // 2
    want = _resize(_decode_window(data, [y, x, crop, crop]), size)
    np.testing.assert_array_equal(
        preprocessing.preprocess_for_eval(data, size).numpy(), want)


@pytest.mark.parametrize('area,aspect', [((0.5, 0.6), (3. / 4, 4. / 3)),
                                         ((0.25, 1.0), (1.0, 1.0)),
                                         ((0.9, 1.0), (0.5, 2.0))])
def test_custom_ranges_are_the_samplers(area, aspect):
  shape = tf.constant([200, 300, 3], tf.int32)
  fn = tf.function(lambda seed: preprocessing.random_crop_window(
      shape, 32, area_range=area, aspect_ratio_range=aspect, seed=seed,
      crop_fraction=1.0))
  sampled = 0
  for i in range(40):
    seed = tf.constant([i, 3], tf.int64)
    y, x, h, w = fn(seed).numpy()
    want = _tf_window(shape, seed, area, aspect)
    if tuple(want[2:]) == (200, 300):  # Sampling failed: whole center square.
      assert (y, x, h, w) == (0, 50, 200, 200)
      continue
    sampled += 1
    np.testing.assert_array_equal([y, x, h, w], want)
    # Within the ranges, up to the rounding of the window to pixels.
    assert area[0] - 0.02 <= h * w / (200 * 300) <= area[1] + 1e-6
    assert aspect[0] - 0.02 <= w / h <= aspect[1] + 0.02
    assert 0 <= y and y + h <= 200 and 0 <= x and x + w <= 300
  assert sampled >= 20


def test_eval_crop_fraction_one_keeps_the_whole_center_square():
  data = _jpeg_bytes(_pixels(40, 64, seed=2))
  got = preprocessing.preprocess_for_eval(data, 16, crop_fraction=1.0)
  np.testing.assert_array_equal(
      got.numpy(), _resize(_decode_window(data, [0, 12, 40, 40]), 16))
  half = preprocessing.center_crop_window(tf.constant([40, 64, 3]), 16, 0.5)
  np.testing.assert_array_equal(half.numpy(), [10, 22, 20, 20])
  with pytest.raises(ValueError, match='crop_fraction'):
    preprocessing.center_crop_window(tf.constant([40, 64, 3]), 16, 1.5)


def test_pipeline_threads_the_crop_settings(tmp_path):
  data = _jpeg_bytes(_pixels(36, 36, seed=3))
  for prefix in ('train', 'validation'):
    with tf.io.TFRecordWriter(
        os.path.join(tmp_path, f'{prefix}-00000-of-00001')) as w:
      for label in range(1, 5):
        w.write(_example(data, label))
  # Area 1: the sampler returns the whole image, which counts as a failed
  # sample and falls back to the center crop of eval_crop_fraction 1.0:
  # the whole (square) image, whatever the seed. ImageNet defaults would
  # crop.
  cfg = DataConfig(source='tfrecord', data_dir=str(tmp_path), num_eval_images=4,
                   shuffle_buffer=4, train_crop_min_area=1.0,
                   eval_crop_fraction=1.0)
  whole = _resize(_decode_window(data, [0, 0, 36, 36]), 16)
  for is_training in (True, False):
    ds = data_pipeline.build_input(cfg, 16, is_training, 4).fn(
        tf.distribute.InputContext())
    images = next(iter(ds))['images'].numpy()
    for image in images:
      assert (np.array_equal(image, whole) or
              (is_training and np.array_equal(image, whole[:, ::-1])))


@pytest.mark.parametrize('kw,name', [
    (dict(train_crop_min_area=0.0), 'train_crop_min_area'),
    (dict(train_crop_max_area=1.5), 'train_crop_max_area'),
    (dict(train_crop_min_area=0.6, train_crop_max_area=0.5),
     'train_crop_min_area'),
    (dict(train_crop_min_aspect=-1.0), 'train_crop_min_aspect'),
    (dict(train_crop_min_aspect=2.0, train_crop_max_aspect=1.0),
     'train_crop_min_aspect'),
    (dict(eval_crop_fraction=0.0), 'eval_crop_fraction'),
    (dict(eval_crop_fraction=1.2), 'eval_crop_fraction'),
])
def test_bad_crop_settings_name_themselves(kw, name):
  with pytest.raises(ConfigError, match=f'^{name}: expected'):
    DataConfig(**kw)
