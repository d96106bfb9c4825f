"""Tests for data/preprocessing.py: crop windows, fused decode, resize, flip,
uint8 rounding and normalization."""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from efficientnet_tpu.data import preprocessing


def _jpeg_bytes(array, quality=95):
  out = io.BytesIO()
  Image.fromarray(array).save(out, 'JPEG', quality=quality)
  return out.getvalue()


def _center_reference(h, w, size):
  pad = round(size * (1 / 0.875 - 1))
  crop = max(int(size / (size + pad) * min(h, w)), 1)
  return [((h - crop) + 1) // 2, ((w - crop) + 1) // 2, crop, crop]


def test_crop_padding_is_32_at_224():
  assert preprocessing.crop_padding(224) == 32
  assert preprocessing.crop_padding(600) == round(600 * (1 / 0.875 - 1))


@pytest.mark.parametrize('h,w,size', [(256, 320, 224), (500, 375, 224),
                                      (37, 91, 16), (600, 600, 600),
                                      (20, 26, 16)])
def test_center_crop_window_matches_formula(h, w, size):
  got = preprocessing.center_crop_window(tf.constant([h, w, 3]), size)
  assert got.numpy().tolist() == _center_reference(h, w, size)


def test_random_crop_windows_stay_inside_image():
  """Many odd shapes and seeds: the window never leaves the image and is
  either a valid Inception crop or the center-crop fallback."""
  rng = np.random.RandomState(0)
  shapes = [(int(rng.randint(1, 700)), int(rng.randint(1, 700)))
            for _ in range(60)] + [(1, 1), (1, 500), (500, 1), (2, 3)]
  fn = tf.function(lambda shape, seed: preprocessing.random_crop_window(
      shape, 224, seed=seed))
  n_random = 0
  for h, w in shapes:
    for s in range(8):
      y, x, ch, cw = fn(tf.constant([h, w, 3]),
                        tf.constant([s, h * 1000 + w])).numpy().tolist()
      assert y >= 0 and x >= 0 and ch >= 1 and cw >= 1, (h, w, s)
      assert y + ch <= h and x + cw <= w, (h, w, s, y, x, ch, cw)
      if [y, x, ch, cw] != _center_reference(h, w, 224):
        n_random += 1
        area = ch * cw / (h * w)
        # Integer rounding of the sampled box loosens the bounds slightly.
        assert 0.08 * 0.9 <= area <= 1.0, (h, w, area)
        if min(ch, cw) >= 20:
          assert 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1, (h, w, ch, cw)
        assert (ch, cw) != (h, w)
  assert n_random > len(shapes) * 8 // 2


def test_stateful_random_crop_window_inside_image():
  for h, w in [(256, 320), (33, 17), (1, 1)]:
    for _ in range(20):
      y, x, ch, cw = preprocessing.random_crop_window(
          tf.constant([h, w, 3]), 224).numpy().tolist()
      assert 0 <= y and 0 <= x and y + ch <= h and x + cw <= w


def test_fused_decode_and_crop_matches_decode_then_slice():
  rng = np.random.RandomState(1)
  image = rng.randint(0, 256, (61, 83, 3)).astype(np.uint8)
  data = tf.constant(_jpeg_bytes(image))
  full = tf.io.decode_jpeg(data, channels=3).numpy()
  window = [7, 11, 30, 40]
  got = preprocessing.decode_and_crop(data, lambda s: tf.constant(window))
  want = full[7:37, 11:51]
  assert got.shape == want.shape
  # Chroma upsampling at the window edge can differ by a few levels.
  assert np.mean(np.abs(got.numpy().astype(int) - want.astype(int))) < 3


def test_decode_non_jpeg_when_allowed():
  image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
  png = tf.io.encode_png(image)
  got = preprocessing.decode_and_crop(png, lambda s: tf.constant([2, 3, 10,
                                                                  12]),
                                      allow_non_jpeg=True)
  np.testing.assert_array_equal(got.numpy(), image[2:12, 3:15])


def test_grayscale_jpeg_decodes_to_rgb():
  gray = np.tile(np.arange(40, dtype=np.uint8)[None] * 5, (30, 1))
  data = tf.constant(_jpeg_bytes(gray))
  out = preprocessing.preprocess_for_eval(data, 16)
  assert out.shape == (16, 16, 3) and out.dtype == tf.uint8
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_to_uint8_rounds_half_up_and_saturates():
  rng = np.random.RandomState(6)
  x = np.concatenate([rng.uniform(-60, 320, 20000),
                      np.arange(-3, 259, 0.25),  # Exact halves and quarters.
                      [-1e9, 1e9, 254.5, 255.49, 255.5, 0.49, 0.5, 1.5]])
  x = x.astype(np.float32)
  want = np.floor(np.clip(x, 0, 255) + np.float32(0.5)).astype(np.uint8)
  got = preprocessing.to_uint8(tf.constant(x.reshape(-1, 2)))
  assert got.dtype == tf.uint8 and got.shape == (x.size // 2, 2)
  np.testing.assert_array_equal(got.numpy().reshape(-1), want)


@pytest.mark.parametrize('method', ['bicubic', 'bilinear', 'area', 'nearest'])
def test_resize_range_and_shape(method):
  rng = np.random.RandomState(2)
  image = rng.choice([0, 255], (37, 23, 3)).astype(np.uint8)
  out = preprocessing.resize(tf.constant(image), 29, method).numpy()
  assert out.shape == (29, 29, 3) and out.dtype == np.uint8
  # Bicubic overshoots on such edges: clipped, not wrapped around (a
  # wrapped -3 would read 253 in the middle of a black area).
  if method != 'nearest':
    ref = tf.image.resize(tf.constant(image, tf.float32), [29, 29],
                          method=method).numpy()
    np.testing.assert_allclose(out, np.clip(ref, 0, 255), atol=0.51)
  else:
    assert set(np.unique(out)) <= {0, 255}


def test_resize_bicubic_matches_reference_on_smooth_image():
  """Keys bicubic (a = -0.5) with half-pixel centers, written in numpy.

  Taps outside the image get weight 0 and the rest are renormalized (TF's
  half-pixel-centers convention, shared with scale_and_translate).
  """
  h, w, size = 24, 30, 12
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  image = (100 + 40 * np.sin(yy / 5) + 30 * np.cos(xx / 7))[..., None]
  image = np.round(np.repeat(image, 3, axis=2))

  def cubic(t):
    t = abs(t)
    a = -0.5
    if t <= 1:
      return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
      return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0

  def weights(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
      c = (o + 0.5) * n_in / n_out - 0.5
      base = int(np.floor(c))
      for k in range(base - 1, base + 3):
        if 0 <= k < n_in:
          m[o, k] += cubic(c - k)
      m[o] /= m[o].sum()
    return m

  want = np.einsum('oi,ijc,pj->opc', weights(h, size), image,
                   weights(w, size))
  # From uint8 directly, as the pipeline does; the output is rounded.
  got = preprocessing.resize(tf.constant(image, tf.uint8), size).numpy()
  assert got.dtype == np.uint8
  np.testing.assert_allclose(got, want, atol=0.6)
  assert np.mean(np.abs(got - np.round(want)) > 0) < 0.05


def test_train_output_and_random_flip():
  """A horizontal ramp: every crop is increasing left to right unless it
  was flipped; both must occur."""
  ramp = np.tile(np.linspace(0, 255, 200).astype(np.uint8)[None, :, None],
                 (120, 1, 3))
  data = tf.constant(_jpeg_bytes(ramp))
  fn = tf.function(lambda d: preprocessing.preprocess_for_train(d, 32))
  directions = set()
  for _ in range(30):
    out = fn(data).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    diff = out[:, -1, 0].astype(float).mean() - out[:, 0, 0].mean()
    directions.add(bool(diff > 0))
  assert directions == {True, False}


def test_eval_is_center_crop_resize():
  rng = np.random.RandomState(3)
  image = rng.randint(0, 256, (50, 70, 3)).astype(np.uint8)
  data = tf.constant(_jpeg_bytes(image, quality=100))
  decoded = tf.io.decode_jpeg(data, channels=3).numpy()
  y, x, h, w = _center_reference(50, 70, 16)
  want = tf.image.resize(decoded[y:y + h, x:x + w], [16, 16],
                         method='bicubic').numpy().clip(0, 255)
  got = preprocessing.preprocess_for_eval(data, 16).numpy()
  assert got.dtype == np.uint8
  # Rounding (0.5) plus chroma upsampling at the crop edge.
  np.testing.assert_allclose(got, want, atol=2.0)


@pytest.mark.parametrize('dtype', [tf.float32, tf.bfloat16])
@pytest.mark.parametrize('shape', [(5, 7, 3), (2, 5, 7, 3), (3, 2, 4, 6, 3)])
@pytest.mark.parametrize('in_dtype', [np.uint8, np.float32])
def test_normalize_matches_numpy(dtype, shape, in_dtype):
  rng = np.random.RandomState(4)
  images = rng.uniform(0, 255, shape).astype(in_dtype)
  mean = np.array([0.485, 0.456, 0.406]) * 255
  std = np.array([0.229, 0.224, 0.225]) * 255
  got = preprocessing.normalize(tf.constant(images), dtype)
  assert got.dtype == dtype and got.shape == shape
  tol = 1e-5 if dtype == tf.float32 else 2e-2
  np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(),
                             (images - mean) / std, atol=tol, rtol=tol)


def test_normalize_unknown_shapes_and_batch_equals_per_image():
  rng = np.random.RandomState(7)
  images = rng.randint(0, 256, (3, 6, 5, 3)).astype(np.uint8)
  mean = np.array([0.485, 0.456, 0.406]) * 255
  std = np.array([0.229, 0.224, 0.225]) * 255
  want = (images - mean) / std
  for spec in ([None, None, None, 3], [None, 6, 5, 3], [3, 6, None, 3]):
    fn = tf.function(lambda x: preprocessing.normalize(x, tf.float32),
                     input_signature=[tf.TensorSpec(spec, tf.uint8)])
    np.testing.assert_allclose(fn(images).numpy(), want, atol=1e-5)
  for i in range(3):
    np.testing.assert_allclose(
        preprocessing.normalize(images[i]).numpy(), want[i], atol=1e-5)


def test_train_with_augmentation_keeps_shape():
  rng = np.random.RandomState(5)
  data = tf.constant(_jpeg_bytes(rng.randint(0, 256, (40, 48, 3)).astype(
      np.uint8)))
  for aug in ('randaugment', 'autoaugment'):
    out = preprocessing.preprocess_for_train(data, 24, augment=aug)
    assert out.shape == (24, 24, 3) and out.dtype == tf.uint8
  with pytest.raises(ValueError, match='augment'):
    preprocessing.preprocess_for_train(data, 24, augment='mixup')
