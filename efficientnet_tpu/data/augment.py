"""RandAugment and AutoAugment (policy v0) on core TensorFlow ops.

No tensorflow-addons (end of life, and it fails to import with Keras 3):
rotate/shear/translate use `tf.raw_ops.ImageProjectiveTransformV3`, the rest
`tf.image` and plain tensor ops. Every op takes and returns a uint8
[height, width, 3] image. Photometric ops follow PIL's ImageOps and
ImageEnhance (the historical reference for these policies); magnitudes map
to arguments as in the EfficientNet TPU reference (`_MAX_LEVEL` = 10).
Geometric ops and Cutout fill with grey (128).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import tensorflow as tf

_MAX_LEVEL = 10.0
FILL_VALUE = 128

# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _to_float(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(image, tf.float32)


def blend(image1: tf.Tensor, image2: tf.Tensor, factor) -> tf.Tensor:
  """image1 + factor * (image2 - image1), clipped and truncated like PIL."""
  image1 = _to_float(image1)
  image2 = _to_float(image2)
  out = image1 + tf.cast(factor, tf.float32) * (image2 - image1)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's integer ITU-R 601-2 luma ('L' mode) as int32 [H, W]."""
  rgb = tf.cast(image, tf.int32)
  luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 +
          0x8000)
  return tf.bitwise.right_shift(luma, 16)


def _apply_lut(image: tf.Tensor, lut: tf.Tensor) -> tf.Tensor:
  """Applies a per-channel lookup table lut[3, 256] (int32) to uint8."""
  index = tf.cast(image, tf.int32) + tf.range(3, dtype=tf.int32) * 256
  out = tf.gather(tf.reshape(lut, [-1]), index)
  return tf.cast(tf.clip_by_value(out, 0, 255), tf.uint8)


def _channel_histograms(image: tf.Tensor) -> tf.Tensor:
  """int32 [3, 256] histogram of each channel."""
  flat = tf.reshape(tf.cast(image, tf.int32), [-1, 3])
  index = flat + tf.range(3, dtype=tf.int32) * 256
  counts = tf.math.bincount(tf.reshape(index, [-1]), minlength=768,
                            maxlength=768, dtype=tf.int32)
  return tf.reshape(counts, [3, 256])


def _transform(image: tf.Tensor, transform: Sequence) -> tf.Tensor:
  """Projective transform (output -> input coordinates), nearest, grey fill.

  `transform` is [a0, a1, a2, b0, b1, b2, c0, c1]: output pixel (x, y) reads
  input ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k), k = c0 x + c1 y + 1.
  """
  transform = tf.cast(tf.stack(transform), tf.float32)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[tf.newaxis],
      transforms=transform[tf.newaxis],
      output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(FILL_VALUE, tf.float32),
      interpolation='NEAREST',
      fill_mode='CONSTANT')
  return tf.reshape(out[0], tf.shape(image))


# ---------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel's [min, max] to [0, 255] (PIL autocontrast)."""
  img = tf.cast(image, tf.int32)
  lo = tf.cast(tf.reduce_min(img, axis=[0, 1]), tf.float64)[:, tf.newaxis]
  hi = tf.cast(tf.reduce_max(img, axis=[0, 1]), tf.float64)[:, tf.newaxis]
  values = tf.range(256, dtype=tf.float64)[tf.newaxis]
  # float64 as in PIL (Python floats): exact at the channel maximum.
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  lut = tf.cast(tf.floor(tf.clip_by_value(values * scale - lo * scale, 0.0,
                                          255.0)), tf.int32)
  identity = tf.tile(tf.range(256, dtype=tf.int32)[tf.newaxis], [3, 1])
  lut = tf.where(hi > lo, lut, identity)
  return _apply_lut(image, lut)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Per-channel histogram equalization (PIL ImageOps.equalize)."""
  hist = _channel_histograms(image)
  # Count of the last non-zero bin per channel.
  nonzero = hist > 0
  last_index = 255 - tf.argmax(tf.reverse(tf.cast(nonzero, tf.int32), [1]),
                               axis=1, output_type=tf.int32)
  last = tf.gather(hist, last_index, batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last) // 255
  cum_before = tf.cumsum(hist, axis=1, exclusive=True)
  safe_step = tf.maximum(step, 1)[:, tf.newaxis]
  lut = (cum_before + safe_step // 2) // safe_step
  identity = tf.tile(tf.range(256, dtype=tf.int32)[tf.newaxis], [3, 1])
  lut = tf.where(step[:, tf.newaxis] > 0, lut, identity)
  return _apply_lut(image, lut)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the `bits` most significant bits of each channel."""
  shift = 8 - int(min(max(bits, 0), 8))
  if shift == 8:
    return tf.zeros_like(image)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold=128) -> tf.Tensor:
  """Inverts pixels >= threshold."""
  threshold = tf.cast(threshold, tf.int32)
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, addition=0, threshold=128) -> tf.Tensor:
  """Adds `addition` (clipped to 0..255) to pixels below threshold."""
  img = tf.cast(image, tf.int32)
  added = tf.cast(tf.clip_by_value(img + tf.cast(addition, tf.int32), 0, 255),
                  tf.uint8)
  return tf.where(img < tf.cast(threshold, tf.int32), added, image)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """Saturation: blends with the grayscale image (PIL ImageEnhance.Color)."""
  gray = tf.cast(_grayscale(image), tf.uint8)[..., tf.newaxis]
  return blend(tf.tile(gray, [1, 1, 3]), image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with the mean grey level (PIL ImageEnhance.Contrast)."""
  gray = _grayscale(image)
  mean = tf.floor(tf.reduce_mean(tf.cast(gray, tf.float64)) + 0.5)
  degenerate = tf.fill(tf.shape(image), tf.cast(mean, tf.uint8))
  return blend(degenerate, image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with black (PIL ImageEnhance.Brightness)."""
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends with PIL's SMOOTH filter output (PIL ImageEnhance.Sharpness)."""
  img = _to_float(image)[tf.newaxis]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(img, kernel, strides=[1, 1, 1, 1],
                                  padding='VALID')[0]
  smooth = tf.cast(tf.clip_by_value(tf.round(smooth), 0.0, 255.0), tf.uint8)
  # PIL leaves the one-pixel border unfiltered.
  shape = tf.shape(image)
  interior = tf.pad(tf.ones([shape[0] - 2, shape[1] - 2, 3], tf.bool),
                    [[1, 1], [1, 1], [0, 0]], constant_values=False)
  degenerate = tf.where(interior,
                        tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return blend(degenerate, image, factor)


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """Rotates counter-clockwise by `degrees` about the center."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  cos, sin = tf.cos(radians), tf.sin(radians)
  x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
  y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0., 0.])


def shear_x(image: tf.Tensor, level) -> tf.Tensor:
  """Output (x, y) reads input (x + level * y, y)."""
  return _transform(image, [1., level, 0., 0., 1., 0., 0., 0.])


def shear_y(image: tf.Tensor, level) -> tf.Tensor:
  """Output (x, y) reads input (x, y + level * x)."""
  return _transform(image, [1., 0., 0., level, 1., 0., 0., 0.])


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
  """Output (x, y) reads input (x + pixels, y): content moves left."""
  return _transform(image, [1., 0., pixels, 0., 1., 0., 0., 0.])


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
  """Output (x, y) reads input (x, y + pixels): content moves up."""
  return _transform(image, [1., 0., 0., 0., 1., pixels, 0., 0.])


def cutout(image: tf.Tensor, pad_size, replace: int = FILL_VALUE,
           center=None) -> tf.Tensor:
  """Fills the (2 pad_size)^2 square around `center` (random if None)."""
  shape = tf.shape(image)
  if center is None:
    cy = tf.random.uniform([], 0, shape[0], dtype=tf.int32)
    cx = tf.random.uniform([], 0, shape[1], dtype=tf.int32)
  else:
    cy, cx = center
  pad_size = tf.cast(pad_size, tf.int32)
  rows = tf.range(shape[0])
  cols = tf.range(shape[1])
  in_rows = tf.logical_and(rows >= cy - pad_size, rows < cy + pad_size)
  in_cols = tf.logical_and(cols >= cx - pad_size, cols < cx + pad_size)
  mask = tf.logical_and(in_rows[:, tf.newaxis], in_cols[tf.newaxis, :])
  return tf.where(mask[..., tf.newaxis],
                  tf.cast(replace, image.dtype) * tf.ones_like(image), image)


# ---------------------------------------------------------------------------
# Magnitude -> arguments.
# ---------------------------------------------------------------------------


def _randomly_negate(value) -> tf.Tensor:
  value = tf.cast(value, tf.float32)
  return tf.where(tf.random.uniform([]) < 0.5, -value, value)


def _enhance_arg(level: float):
  return (level / _MAX_LEVEL) * 1.8 + 0.1


def _level_to_op(name: str, level: float, cutout_const: float,
                 translate_const: float) -> Callable[[tf.Tensor], tf.Tensor]:
  """Returns image -> image for op `name` at magnitude `level`."""
  level = float(level)
  frac = level / _MAX_LEVEL
  if name == 'AutoContrast':
    return autocontrast
  if name == 'Equalize':
    return equalize
  if name == 'Invert':
    return invert
  if name == 'Rotate':
    return lambda im: rotate(im, _randomly_negate(frac * 30.0))
  if name == 'Posterize':
    return lambda im: posterize(im, int(frac * 4))
  if name == 'Solarize':
    return lambda im: solarize(im, int(frac * 256))
  if name == 'SolarizeAdd':
    return lambda im: solarize_add(im, int(frac * 110))
  if name == 'Color':
    return lambda im: color(im, _enhance_arg(level))
  if name == 'Contrast':
    return lambda im: contrast(im, _enhance_arg(level))
  if name == 'Brightness':
    return lambda im: brightness(im, _enhance_arg(level))
  if name == 'Sharpness':
    return lambda im: sharpness(im, _enhance_arg(level))
  if name == 'ShearX':
    return lambda im: shear_x(im, _randomly_negate(frac * 0.3))
  if name == 'ShearY':
    return lambda im: shear_y(im, _randomly_negate(frac * 0.3))
  if name == 'TranslateX':
    return lambda im: translate_x(im, _randomly_negate(frac * translate_const))
  if name == 'TranslateY':
    return lambda im: translate_y(im, _randomly_negate(frac * translate_const))
  if name == 'Cutout':
    return lambda im: cutout(im, int(frac * cutout_const))
  raise ValueError(f'augment: unknown op {name!r}')


RANDAUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize',
                   'Solarize', 'Color', 'Contrast', 'Brightness', 'Sharpness',
                   'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout',
                   'SolarizeAdd')

# (op, probability, magnitude) pairs; one sub-policy is drawn per image.
POLICY_V0: List[List[Tuple[str, float, int]]] = [
    [('Equalize', 0.8, 1), ('ShearY', 0.8, 4)],
    [('Color', 0.4, 9), ('Equalize', 0.6, 3)],
    [('Color', 0.4, 1), ('Rotate', 0.6, 8)],
    [('Solarize', 0.8, 3), ('Equalize', 0.4, 7)],
    [('Solarize', 0.4, 2), ('Solarize', 0.6, 2)],
    [('Color', 0.2, 0), ('Equalize', 0.8, 8)],
    [('Equalize', 0.4, 8), ('SolarizeAdd', 0.8, 3)],
    [('ShearX', 0.2, 9), ('Rotate', 0.6, 8)],
    [('Color', 0.6, 1), ('Equalize', 1.0, 2)],
    [('Invert', 0.4, 9), ('Rotate', 0.6, 0)],
    [('Equalize', 1.0, 9), ('ShearY', 0.6, 3)],
    [('Color', 0.4, 7), ('Equalize', 0.6, 0)],
    [('Posterize', 0.4, 6), ('AutoContrast', 0.4, 7)],
    [('Solarize', 0.6, 8), ('Color', 0.6, 9)],
    [('Solarize', 0.2, 4), ('Rotate', 0.8, 9)],
    [('Rotate', 1.0, 7), ('TranslateY', 0.8, 9)],
    [('ShearX', 0.0, 0), ('Solarize', 0.8, 4)],
    [('ShearY', 0.8, 0), ('Color', 0.6, 4)],
    [('Color', 1.0, 0), ('Rotate', 0.6, 2)],
    [('Equalize', 0.8, 4), ('Equalize', 0.0, 8)],
    [('Equalize', 1.0, 4), ('AutoContrast', 0.6, 2)],
    [('ShearY', 0.4, 7), ('SolarizeAdd', 0.6, 7)],
    [('Posterize', 0.8, 2), ('Solarize', 0.6, 10)],
    [('Solarize', 0.6, 8), ('Equalize', 0.6, 1)],
    [('Color', 0.8, 6), ('Rotate', 0.4, 5)],
]

POLICIES: Dict[str, List[List[Tuple[str, float, int]]]] = {'v0': POLICY_V0}


def _apply_with_prob(op, image: tf.Tensor, prob) -> tf.Tensor:
  return tf.cond(tf.random.uniform([]) < prob, lambda: op(image),
                 lambda: image)


def _check_image(image: tf.Tensor) -> None:
  if image.dtype != tf.uint8:
    raise ValueError(f'augment: expected a uint8 image, got {image.dtype}')


def distort_image_with_randaugment(image: tf.Tensor, num_layers: int,
                                   magnitude: float,
                                   cutout_const: float = 40.0,
                                   translate_const: float = 100.0
                                  ) -> tf.Tensor:
  """RandAugment: `num_layers` uniformly drawn ops, each applied w.p. U(.2, .8).

  Args:
    image: uint8 [H, W, 3].
    num_layers: ops applied in sequence.
    magnitude: shared magnitude on the 0..`_MAX_LEVEL` scale (may exceed it,
      e.g. 28 for B7, as in the reference).
    cutout_const, translate_const: pixel scales at magnitude 10.

  Returns:
    uint8 image of the same shape.
  """
  _check_image(image)
  static_shape = image.shape
  ops = [_level_to_op(name, magnitude, cutout_const, translate_const)
         for name in RANDAUGMENT_OPS]
  for _ in range(int(num_layers)):
    op_index = tf.random.uniform([], 0, len(ops), dtype=tf.int32)
    prob = tf.random.uniform([], 0.2, 0.8)
    branches = [
        (lambda op=op, im=image: _apply_with_prob(op, im, prob)) for op in ops
    ]
    image = tf.switch_case(op_index, branches)
    image = tf.ensure_shape(image, static_shape)
  return image


def distort_image_with_autoaugment(image: tf.Tensor, policy: str = 'v0',
                                   cutout_const: float = 100.0,
                                   translate_const: float = 250.0
                                  ) -> tf.Tensor:
  """AutoAugment: one uniformly drawn sub-policy of `policy` per image."""
  _check_image(image)
  if policy not in POLICIES:
    raise ValueError(f'augment: expected policy one of {sorted(POLICIES)}, '
                     f'got {policy!r}')
  static_shape = image.shape

  def sub_policy_fn(sub_policy):
    def fn():
      out = image
      for name, prob, level in sub_policy:
        op = _level_to_op(name, level, cutout_const, translate_const)
        out = _apply_with_prob(op, out, prob)
      return out
    return fn

  sub_policies = POLICIES[policy]
  index = tf.random.uniform([], 0, len(sub_policies), dtype=tf.int32)
  image = tf.switch_case(index, [sub_policy_fn(p) for p in sub_policies])
  return tf.ensure_shape(image, static_shape)
