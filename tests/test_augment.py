"""Tests for data/augment.py against PIL (ImageOps/ImageEnhance) and numpy."""

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from efficientnet_tpu.data import augment


def _image(seed=0, h=37, w=45, low=0, high=256):
  """A smooth-ish random image so ops like equalize see real histograms."""
  rng = np.random.RandomState(seed)
  base = rng.randint(low, high, size=(h, w, 3))
  yy, xx = np.mgrid[0:h, 0:w]
  grad = (yy * 3 + xx * 2)[..., None] % (high - low)
  return np.clip((base + grad) // 2 + low // 2, 0, 255).astype(np.uint8)


def _pil(img):
  return Image.fromarray(img)


def _run(fn, img, *args):
  return fn(tf.constant(img), *args).numpy()


def _assert_close(got, want, atol=0, max_frac=0.0):
  diff = np.abs(got.astype(int) - want.astype(int))
  frac = np.mean(diff > atol)
  assert frac <= max_frac, (f'{frac:.4f} of pixels differ by > {atol} '
                            f'(max diff {diff.max()})')


IMAGES = [_image(0), _image(1, 20, 31, 40, 200), _image(2, 16, 16, 0, 64)]


@pytest.mark.parametrize('idx', range(len(IMAGES)))
def test_autocontrast_matches_pil(idx):
  img = IMAGES[idx]
  _assert_close(_run(augment.autocontrast, img),
                np.asarray(ImageOps.autocontrast(_pil(img))))


def test_autocontrast_constant_channel_is_identity():
  img = np.full((8, 9, 3), 77, np.uint8)
  img[..., 1] = np.arange(9, dtype=np.uint8)[None] * 3
  np.testing.assert_array_equal(_run(augment.autocontrast, img),
                                np.asarray(ImageOps.autocontrast(_pil(img))))


@pytest.mark.parametrize('idx', range(len(IMAGES)))
def test_equalize_matches_pil(idx):
  img = IMAGES[idx]
  _assert_close(_run(augment.equalize, img),
                np.asarray(ImageOps.equalize(_pil(img))))


def test_invert_posterize_solarize_match_pil():
  img = IMAGES[0]
  np.testing.assert_array_equal(_run(augment.invert, img),
                                np.asarray(ImageOps.invert(_pil(img))))
  for bits in (1, 2, 4, 6, 8):
    np.testing.assert_array_equal(
        _run(augment.posterize, img, bits),
        np.asarray(ImageOps.posterize(_pil(img), bits)))
  for threshold in (0, 77, 128, 256):
    np.testing.assert_array_equal(
        _run(augment.solarize, img, threshold),
        np.asarray(ImageOps.solarize(_pil(img), threshold)))


def test_solarize_add_matches_numpy():
  img = IMAGES[0]
  for addition, threshold in ((30, 128), (110, 200), (-20, 64)):
    want = np.where(img < threshold,
                    np.clip(img.astype(int) + addition, 0, 255), img)
    np.testing.assert_array_equal(
        _run(augment.solarize_add, img, addition, threshold), want)


@pytest.mark.parametrize('factor', [0.1, 0.5, 1.0, 1.9])
@pytest.mark.parametrize('name,pil_cls', [
    ('color', ImageEnhance.Color),
    ('contrast', ImageEnhance.Contrast),
    ('brightness', ImageEnhance.Brightness),
    ('sharpness', ImageEnhance.Sharpness),
])
def test_enhance_ops_match_pil(name, pil_cls, factor):
  img = IMAGES[0]
  got = _run(getattr(augment, name), img, factor)
  want = np.asarray(pil_cls(_pil(img)).enhance(factor))
  # Float rounding at .5 boundaries may move a handful of pixels by one.
  _assert_close(got, want, atol=1)
  _assert_close(got, want, atol=0, max_frac=0.02)


def _nearest_affine_reference(img, matrix, fill=128):
  """out[y, x] = img[round(y'), round(x')] with (x', y') = matrix @ (x, y, 1)."""
  h, w, _ = img.shape
  out = np.full_like(img, fill)
  for y in range(h):
    for x in range(w):
      sx = matrix[0] * x + matrix[1] * y + matrix[2]
      sy = matrix[3] * x + matrix[4] * y + matrix[5]
      ix, iy = int(np.floor(sx + 0.5)), int(np.floor(sy + 0.5))
      if 0 <= ix < w and 0 <= iy < h:
        out[y, x] = img[iy, ix]
  return out


@pytest.mark.parametrize('degrees', [0.0, 17.0, -30.0, 90.0])
def test_rotate_matches_pil_and_numpy(degrees):
  img = IMAGES[0]
  got = _run(augment.rotate, img, degrees)
  pil = np.asarray(_pil(img).rotate(degrees, resample=Image.NEAREST,
                                    fillcolor=(128, 128, 128)))
  h, w, _ = img.shape
  t = np.deg2rad(degrees)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  # Inverse map about the center: input = R(t) (output - c) + c.
  matrix = [np.cos(t), -np.sin(t), cx - np.cos(t) * cx + np.sin(t) * cy,
            np.sin(t), np.cos(t), cy - np.sin(t) * cx - np.cos(t) * cy]
  _assert_close(got, _nearest_affine_reference(img, matrix), max_frac=0.01)
  # PIL samples at pixel centers: ties round differently on a few pixels.
  _assert_close(got, pil, max_frac=0.03)


@pytest.mark.parametrize('level', [0.0, 0.3, -0.25])
def test_shear_matches_pil(level):
  img = IMAGES[0]
  size = (img.shape[1], img.shape[0])
  # PIL samples at pixel centers (x + 0.5, y + 0.5); our transforms act on
  # pixel indices. The -level / 2 offset converts between the two, so the
  # same shear must then pick the same pixels (up to rounding ties).
  want_x = np.asarray(_pil(img).transform(size, Image.AFFINE,
                                          (1, level, -level / 2, 0, 1, 0),
                                          fillcolor=(128, 128, 128)))
  want_y = np.asarray(_pil(img).transform(size, Image.AFFINE,
                                          (1, 0, 0, level, 1, -level / 2),
                                          fillcolor=(128, 128, 128)))
  _assert_close(_run(augment.shear_x, img, level),
                _nearest_affine_reference(img, [1, level, 0, 0, 1, 0]),
                max_frac=0.01)
  _assert_close(_run(augment.shear_y, img, level),
                _nearest_affine_reference(img, [1, 0, 0, level, 1, 0]),
                max_frac=0.01)
  _assert_close(_run(augment.shear_x, img, level), want_x, max_frac=0.02)
  _assert_close(_run(augment.shear_y, img, level), want_y, max_frac=0.02)


@pytest.mark.parametrize('pixels', [0, 7, -12, 100])
def test_translate_is_exact_shift(pixels):
  img = IMAGES[0]
  size = (img.shape[1], img.shape[0])
  want_x = np.asarray(_pil(img).transform(size, Image.AFFINE,
                                          (1, 0, pixels, 0, 1, 0),
                                          fillcolor=(128, 128, 128)))
  want_y = np.asarray(_pil(img).transform(size, Image.AFFINE,
                                          (1, 0, 0, 0, 1, pixels),
                                          fillcolor=(128, 128, 128)))
  np.testing.assert_array_equal(_run(augment.translate_x, img, pixels), want_x)
  np.testing.assert_array_equal(_run(augment.translate_y, img, pixels), want_y)
  # Independent numpy shift: content moves left/up by `pixels`.
  shifted = np.full_like(img, 128)
  w = img.shape[1]
  if pixels >= 0:
    shifted[:, :max(w - pixels, 0)] = img[:, pixels:]
  else:
    shifted[:, -pixels:] = img[:, :w + pixels]
  np.testing.assert_array_equal(_run(augment.translate_x, img, pixels),
                                shifted)


def test_cutout_matches_numpy():
  img = IMAGES[0]
  for (cy, cx), pad in (((10, 12), 5), ((0, 0), 8), ((36, 44), 3),
                        ((20, 20), 0)):
    got = augment.cutout(tf.constant(img), pad, 128, center=(cy, cx)).numpy()
    want = img.copy()
    want[max(cy - pad, 0):cy + pad, max(cx - pad, 0):cx + pad] = 128
    np.testing.assert_array_equal(got, want)


def test_random_cutout_grey_square_within_image():
  img = np.zeros((30, 40, 3), np.uint8)
  for _ in range(10):
    got = augment.cutout(tf.constant(img), 6).numpy()
    ys, xs = np.nonzero(got[..., 0] == 128)
    assert ys.size > 0
    assert ys.max() - ys.min() < 12 and xs.max() - xs.min() < 12


def test_level_args_follow_reference_scale():
  img = IMAGES[0]
  # Posterize at level 10 keeps 4 bits; Solarize at level 5 thresholds at 128.
  np.testing.assert_array_equal(
      augment._level_to_op('Posterize', 10, 40, 100)(tf.constant(img)).numpy(),
      np.asarray(ImageOps.posterize(_pil(img), 4)))
  np.testing.assert_array_equal(
      augment._level_to_op('Solarize', 5, 40, 100)(tf.constant(img)).numpy(),
      np.asarray(ImageOps.solarize(_pil(img), 128)))
  # Magnitudes beyond 10 (B7 uses 28) must not break posterize.
  out = augment._level_to_op('Posterize', 28, 40, 100)(tf.constant(img))
  np.testing.assert_array_equal(out.numpy(), img)


def test_rejects_non_uint8():
  with pytest.raises(ValueError, match='uint8'):
    augment.distort_image_with_randaugment(tf.zeros([8, 8, 3]), 2, 10)


@pytest.mark.parametrize('kind', ['randaugment', 'autoaugment'])
def test_policies_keep_shape_dtype_in_tf_data(kind):
  tf.random.set_seed(1)
  images = np.stack([_image(i, 24, 24) for i in range(12)])

  def fn(image):
    if kind == 'randaugment':
      return augment.distort_image_with_randaugment(image, 2, 15)
    return augment.distort_image_with_autoaugment(image, 'v0')

  ds = tf.data.Dataset.from_tensor_slices(images).map(fn).batch(4)
  assert ds.element_spec.shape.as_list() == [None, 24, 24, 3]
  assert ds.element_spec.dtype == tf.uint8
  out = np.concatenate([b.numpy() for b in ds])
  assert out.shape == images.shape and out.dtype == np.uint8
  # Over 12 images and several layers, at least one must have changed.
  assert np.any(out != images)


def test_randaugment_zero_layers_is_identity():
  img = IMAGES[0]
  np.testing.assert_array_equal(
      augment.distort_image_with_randaugment(tf.constant(img), 0, 10).numpy(),
      img)


def test_every_randaugment_op_runs_at_extreme_magnitudes():
  img = tf.constant(IMAGES[1])
  for name in augment.RANDAUGMENT_OPS:
    for level in (0, 10, 30):
      out = augment._level_to_op(name, level, 40, 100)(img)
      assert out.dtype == tf.uint8 and out.shape == img.shape, name
