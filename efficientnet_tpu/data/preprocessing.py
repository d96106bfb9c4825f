"""Per-image ImageNet preprocessing: fused JPEG crop, flip, resize to uint8.

Training follows the EfficientNet TPU recipe: a crop window is sampled from
the JPEG header's shape alone (`sample_distorted_bounding_box`, area
0.08..1, aspect 3/4..4/3, 10 attempts) and only that window is decoded
(`decode_and_crop_jpeg`); when sampling fails the center crop used for eval
is taken instead. Eval takes a center crop covering `size / (size + pad)` of
the short side, `pad = round(size * (1 / 0.875 - 1))` (32 at 224). Data sets
that are not ImageNet set the area and aspect ranges and the eval crop
fraction (`crop_fraction`) themselves.

The host pipeline emits uint8 images (4x fewer bytes to copy, batch and
send to the accelerator than float32); `normalize` (mean/std and the cast
to the compute dtype) runs on device in the train / eval step.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from efficientnet_tpu.data import augment as augment_lib

# ImageNet channel statistics on the 0..255 scale.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

CENTER_CROP_FRACTION = 0.875

_RESIZE_METHODS = {
    'bicubic': tf.image.ResizeMethod.BICUBIC,
    'bilinear': tf.image.ResizeMethod.BILINEAR,
    'area': tf.image.ResizeMethod.AREA,
    'nearest': tf.image.ResizeMethod.NEAREST_NEIGHBOR,
}


def crop_padding(image_size: int) -> int:
  """Pixels added to `image_size` before the eval center crop (32 at 224)."""
  return int(round(image_size * (1.0 / CENTER_CROP_FRACTION - 1.0)))


def center_crop_window(image_shape: tf.Tensor, image_size: int,
                       crop_fraction: Optional[float] = None) -> tf.Tensor:
  """[offset_y, offset_x, h, w] of the center crop (int32).

  The square covers `crop_fraction` of the shorter side; None is the
  ImageNet rule `image_size / (image_size + crop_padding(image_size))`.
  """
  height, width = image_shape[0], image_shape[1]
  if crop_fraction is None:
    scale = image_size / (image_size + crop_padding(image_size))
  elif 0 < crop_fraction <= 1:
    scale = float(crop_fraction)
  else:
    raise ValueError(f'crop_fraction: expected a value in (0, 1], got '
                     f'{crop_fraction!r}')
  crop = tf.cast(scale * tf.cast(tf.minimum(height, width), tf.float32),
                 tf.int32)
  crop = tf.maximum(crop, 1)
  offset_y = ((height - crop) + 1) // 2
  offset_x = ((width - crop) + 1) // 2
  return tf.stack([offset_y, offset_x, crop, crop])


def random_crop_window(image_shape: tf.Tensor,
                       image_size: int,
                       area_range: Tuple[float, float] = (0.08, 1.0),
                       aspect_ratio_range: Tuple[float, float] = (3. / 4,
                                                                  4. / 3),
                       min_object_covered: float = 0.1,
                       max_attempts: int = 10,
                       seed: Optional[Tuple[int, int]] = None,
                       crop_fraction: Optional[float] = None) -> tf.Tensor:
  """Samples an Inception-style crop window, center crop if sampling fails.

  Args:
    image_shape: int32 [height, width, channels] (e.g. from the JPEG header).
    image_size: output resolution, used only by the center-crop fallback.
    area_range, aspect_ratio_range, min_object_covered, max_attempts: as in
      `tf.image.sample_distorted_bounding_box`.
    seed: optional stateless seed (2 ints); None uses the stateful op.
    crop_fraction: of the center-crop fallback (see `center_crop_window`).

  Returns:
    int32 [offset_y, offset_x, height, width], always inside the image.
  """
  image_shape = tf.cast(image_shape, tf.int32)
  bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
  kwargs = dict(bounding_boxes=bbox, min_object_covered=min_object_covered,
                aspect_ratio_range=aspect_ratio_range, area_range=area_range,
                max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  if seed is None:
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        image_shape, **kwargs)
  else:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape, seed=seed, **kwargs)
  # When every attempt fails the op returns the whole image; a plain resize
  # of the whole image would change the aspect ratio, so fall back to the
  # eval center crop (as the TPU reference does). A cond computes the
  # fallback only when needed (rare): ~20 us less per image than tf.where.
  failed = tf.reduce_all(tf.equal(size[:2], image_shape[:2]))
  return tf.cond(failed,
                 lambda: center_crop_window(image_shape, image_size,
                                            crop_fraction),
                 lambda: tf.concat([begin[:2], size[:2]], 0))


def _is_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
  return tf.io.is_jpeg(image_bytes)


def decode_and_crop(image_bytes: tf.Tensor, window_fn,
                    allow_non_jpeg: bool = False) -> tf.Tensor:
  """Decodes only the window `window_fn(shape)` selects, as uint8 RGB.

  JPEGs use the fused `decode_and_crop_jpeg` (only the window's rows and
  columns are decoded). Other payloads are decoded whole and sliced: PNG
  (the lossless RGB re-encodings efficientnet-tpu-make-tfrecords writes of
  non-JPEG sources) or, with `allow_non_jpeg` (tfds sources), any format
  `tf.io.decode_image` reads.
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    return tf.image.decode_and_crop_jpeg(image_bytes, window_fn(shape),
                                         channels=3)

  def other():
    if allow_non_jpeg:
      image = tf.io.decode_image(image_bytes, channels=3,
                                 expand_animations=False)
    else:
      image = tf.io.decode_png(image_bytes, channels=3)
    w = window_fn(tf.shape(image))
    return tf.slice(image, [w[0], w[1], 0], [w[2], w[3], 3])

  return tf.cond(_is_jpeg(image_bytes), jpeg, other)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds (half up) and saturates a float32 image to uint8 0..255."""
  # QuantizeV2 over [0, 255] is clamp, +0.5 and a truncating cast fused
  # into one pass: about half the CPU time of add + clip + cast.
  out = tf.raw_ops.QuantizeV2(
      input=image, min_range=0.0, max_range=255.0, T=tf.quint8,
      mode='MIN_COMBINED', round_mode='HALF_AWAY_FROM_ZERO',
      ensure_minimum_range=0.0).output
  return tf.bitcast(out, tf.uint8)


def resize(image: tf.Tensor, image_size: int,
           method: str = 'bicubic') -> tf.Tensor:
  """Resizes an [H, W, C] image to [image_size, image_size, C] uint8.

  The crop is cast to float32 first: `ResizeBicubic` / `ResizeBilinear`
  read each input pixel several times (4 taps per output, more when
  downscaling) and converting uint8 on every read costs more than one
  cast pass (ImageNet-sized crops: bicubic 0.3 ms less, see
  docs/input_pipeline.md). The float32 result is rounded and clipped back
  to 0..255 (bicubic overshoots at edges).
  """
  if method not in _RESIZE_METHODS:
    raise ValueError(f'resize_method: expected one of '
                     f'{", ".join(_RESIZE_METHODS)}, got {method!r}')
  if method == 'nearest':  # Copies pixels: stays uint8.
    return tf.image.resize(image, [image_size, image_size],
                           method=_RESIZE_METHODS[method])
  image = tf.image.resize(tf.cast(image, tf.float32),
                          [image_size, image_size],
                          method=_RESIZE_METHODS[method], antialias=False)
  return to_uint8(image)


def _maybe_augment(image: tf.Tensor, augment: str, randaug_num_layers: int,
                   randaug_magnitude: float) -> tf.Tensor:
  """Runs RandAugment / AutoAugment on the uint8 image (uint8 in and out)."""
  if augment in (None, '', 'none'):
    return image
  if augment == 'randaugment':
    return augment_lib.distort_image_with_randaugment(
        image, randaug_num_layers, randaug_magnitude)
  if augment == 'autoaugment':
    return augment_lib.distort_image_with_autoaugment(image, 'v0')
  raise ValueError(f'augment_name: expected none, randaugment or '
                   f'autoaugment, got {augment!r}')


def _static_shape(image: tf.Tensor, image_size: int) -> tf.Tensor:
  # The resize already gives [S, S, 3] (decode_and_crop_jpeg has a static
  # channel count); set_shape only asserts it at trace time, where
  # ensure_shape would add a runtime op per image.
  image.set_shape([image_size, image_size, 3])
  return image


def preprocess_for_train(image_bytes: tf.Tensor,
                         image_size: int,
                         resize_method: str = 'bicubic',
                         augment: str = 'none',
                         randaug_num_layers: int = 2,
                         randaug_magnitude: float = 10.0,
                         allow_non_jpeg: bool = False,
                         seed: Optional[tf.Tensor] = None,
                         area_range: Tuple[float, float] = (0.08, 1.0),
                         aspect_ratio_range: Tuple[float, float] = (
                             3. / 4, 4. / 3),
                         crop_fraction: Optional[float] = None,
                         flip: bool = True) -> tf.Tensor:
  """Random crop + flip + resize (+ augmentation): uint8 [S, S, 3].

  Not normalized: the train step calls `normalize` on device.

  Args:
    seed: optional stateless seed [2] for the crop and the flip: the same
      seed gives the same crop and flip whatever thread or run computes it
      (RandAugment / AutoAugment still draw from stateful ops).
    area_range, aspect_ratio_range: of the crop (fraction of the image area,
      width / height); the defaults are the ImageNet recipe's.
    crop_fraction: of the center crop taken when sampling fails (see
      `center_crop_window`).
    flip: flip left-right with probability 1/2 (False: never; the seed's
      crop is the same either way).
  """
  crop_seed = flip_seed = None
  if seed is not None:
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
  image = decode_and_crop(
      image_bytes,
      lambda shape: random_crop_window(
          shape, image_size, area_range=area_range,
          aspect_ratio_range=aspect_ratio_range, seed=crop_seed,
          crop_fraction=crop_fraction),
      allow_non_jpeg)
  # Flipping the uint8 crop before resizing equals flipping the output (the
  # resize kernels are mirror-symmetric) and moves 4x fewer bytes.
  if flip and flip_seed is None:
    image = tf.image.random_flip_left_right(image)
  elif flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = _static_shape(resize(image, image_size, resize_method), image_size)
  return _maybe_augment(image, augment, randaug_num_layers, randaug_magnitude)


def preprocess_for_eval(image_bytes: tf.Tensor,
                        image_size: int,
                        resize_method: str = 'bicubic',
                        allow_non_jpeg: bool = False,
                        crop_fraction: Optional[float] = None) -> tf.Tensor:
  """Center crop (`center_crop_window`) + resize: uint8 [S, S, 3], not
  normalized."""
  image = decode_and_crop(
      image_bytes,
      lambda shape: center_crop_window(shape, image_size, crop_fraction),
      allow_non_jpeg)
  return _static_shape(resize(image, image_size, resize_method), image_size)


# WebP and BMP headers are read from the first bytes; shorter inputs are
# zero-padded so that reading a field never fails on its own.
_HEADER_BYTES = 64
_WEBP_ANIMATION_FLAG = 0x02  # In the VP8X flags byte (offset 20).
# tf.io.decode_webp exists from TensorFlow 2.19; on 2.18 (the floor of the
# support matrix) a WebP is undecodable bytes like any other format TF
# lacks: an invalid row at serving.
WEBP_DECODER = hasattr(tf.io, 'decode_webp')


def _header_int(header: tf.Tensor, offset: int, size: int) -> tf.Tensor:
  """Little-endian unsigned field of `size` bytes at `offset` (int32)."""
  value = tf.constant(0, tf.int32)
  for i in range(size):
    value += tf.bitwise.left_shift(header[offset + i], 8 * i)
  return value


def _decode_webp_rgb(image_bytes: tf.Tensor, header: tf.Tensor,
                     header_bytes: tf.Tensor) -> tf.Tensor:
  """A still WebP as uint8 [H, W, 3]; fails on animated WebP, and on any
  WebP where TensorFlow has no WebP decoder (`WEBP_DECODER`)."""
  if not WEBP_DECODER:
    # A check that fails at run time, only for the rows that are WebP.
    check = tf.debugging.Assert(
        tf.less(tf.strings.length(image_bytes), 0),
        ['WebP needs TensorFlow 2.19 or newer'])
    with tf.control_dependencies([check]):
      return tf.zeros([1, 1, 3], tf.uint8)
  # TF 2.21's WebP decoder corrupts the heap (the process dies) on animated
  # files without the alpha flag and rejects the others, so animations are
  # refused before the decoder sees them.
  animated = tf.logical_and(
      tf.equal(tf.strings.substr(header_bytes, 12, 4), 'VP8X'),
      tf.not_equal(tf.bitwise.bitwise_and(header[20], _WEBP_ANIMATION_FLAG),
                   0))
  check = tf.debugging.Assert(tf.logical_not(animated),
                              ['animated WebP is not supported'])
  with tf.control_dependencies([check]):
    # channels=0: an RGB file gives 3 channels, one with alpha 4 (asking
    # for 3 fails on it); drop alpha as the PNG decoder does.
    image = tf.io.decode_webp(image_bytes, channels=0)
  return image[0, :, :, :3]


def _decode_bmp_rgb(image_bytes: tf.Tensor, header: tf.Tensor) -> tf.Tensor:
  """A BMP as uint8 [H, W, 3], applying the palette of 8-bit files."""
  bits_per_pixel = _header_int(header, 28, 2)

  def paletted():
    # TF returns the 8-bit palette indices as gray levels; look them up.
    # The palette (BGRX entries) follows the DIB header; 0 colors means 256.
    dib_size = _header_int(header, 14, 4)
    num_colors = _header_int(header, 46, 4)
    num_colors = tf.where(tf.equal(num_colors, 0), 256, num_colors)
    palette = tf.io.decode_raw(
        tf.strings.substr(image_bytes, 14 + dib_size, 4 * num_colors),
        tf.uint8)
    palette = tf.reverse(tf.reshape(palette, [num_colors, 4])[:, :3], [1])
    indices = tf.io.decode_bmp(image_bytes, channels=0)[:, :, 0]
    # Out-of-range indices fail (CPU gather), as a corrupt file should.
    return tf.gather(palette, tf.cast(indices, tf.int32))

  return tf.cond(tf.equal(bits_per_pixel, 8), paletted,
                 lambda: tf.io.decode_bmp(image_bytes, channels=3))


def decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG, PNG, GIF, BMP or still WebP bytes to uint8 [H, W, 3].

  Grayscale is replicated to 3 channels and alpha dropped; a GIF gives its
  first frame. Animated WebP and undecodable bytes raise InvalidArgument.
  """
  header_bytes = tf.strings.substr(
      tf.strings.join([image_bytes, b'\0' * _HEADER_BYTES]), 0,
      _HEADER_BYTES)
  header = tf.cast(tf.io.decode_raw(header_bytes, tf.uint8), tf.int32)
  is_webp = tf.logical_and(
      tf.equal(tf.strings.substr(header_bytes, 0, 4), 'RIFF'),
      tf.equal(tf.strings.substr(header_bytes, 8, 4), 'WEBP'))
  is_bmp = tf.equal(tf.strings.substr(header_bytes, 0, 2), 'BM')
  image = tf.case(
      [(is_webp, lambda: _decode_webp_rgb(image_bytes, header, header_bytes)),
       (is_bmp, lambda: _decode_bmp_rgb(image_bytes, header))],
      default=lambda: tf.io.decode_image(image_bytes, channels=3,
                                         expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def preprocess_for_serving(image_bytes: tf.Tensor, image_size: int,
                           resize_method: str = 'bicubic',
                           crop_fraction: Optional[float] = None,
                           max_pixels: Optional[int] = None) -> tf.Tensor:
  """`preprocess_for_eval` for JPEG, PNG, GIF, BMP and still WebP bytes.

  JPEGs take exactly the eval path (fused center-crop decode); the other
  formats are decoded whole by `decode_rgb` and given the same center crop
  and resize. Returns uint8 [S, S, 3], not normalized; raises
  InvalidArgument on bytes that do not decode, and with `max_pixels` on an
  image of more pixels: a JPEG's are read from its header before
  decoding, the other formats' from the decoded image (the caller may
  refuse their headers first, as `export` does).
  """
  def within_limit(shape):
    if max_pixels is None:
      return []
    pixels = tf.cast(shape[0], tf.int64) * tf.cast(shape[1], tf.int64)
    return [tf.debugging.Assert(pixels <= max_pixels, [
        'max_image_pixels: the image has', pixels, 'pixels, over the limit '
        'of', max_pixels])]

  def jpeg():
    def window(shape):
      with tf.control_dependencies(within_limit(shape)):
        return center_crop_window(shape, image_size, crop_fraction)
    return decode_and_crop(image_bytes, window)

  def other():
    image = decode_rgb(image_bytes)
    with tf.control_dependencies(within_limit(tf.shape(image))):
      image = tf.identity(image)
    w = center_crop_window(tf.shape(image), image_size, crop_fraction)
    return tf.slice(image, [w[0], w[1], 0], [w[2], w[3], 3])

  image = tf.cond(_is_jpeg(image_bytes), jpeg, other)
  return _static_shape(resize(image, image_size, resize_method), image_size)


def normalize(images: tf.Tensor, dtype: tf.DType = tf.float32,
              on_tpu: bool = False) -> tf.Tensor:
  """(images - mean) / std over the last (RGB) axis, cast to `dtype`.

  Takes uint8 (or float) 0..255 images, one [S, S, 3] or a batch
  [B, S, S, 3]; the train / eval steps call it on device right after
  receiving a batch. On CPU and GPU, when the width is static, the images
  are viewed as rows of W * 3 values and normalized against W * 3-long
  tiled constants: TF's elementwise kernels broadcast a size-3 innermost
  axis ~4x slower than a row. With `on_tpu` (XLA fuses the plain broadcast
  into one pass, and a reshape of the minor dims would force relayout
  copies) the plain broadcast is used; the caller knows its strategy
  (`distribute.is_tpu`).
  """
  images = tf.cast(images, tf.float32)
  mean = np.asarray(MEAN_RGB, np.float32)
  inv_std = 1.0 / np.asarray(STDDEV_RGB, np.float32)
  shape = images.shape
  if (shape.rank is None or shape.rank < 2 or shape[-1] != 3 or
      shape[-2] is None or on_tpu):
    return tf.cast((images - mean) * inv_std, dtype)
  row = shape[-2] * 3
  flat = tf.reshape(images, [-1, row])
  flat = (flat - np.tile(mean, shape[-2])) * np.tile(inv_std, shape[-2])
  out_shape = shape if shape.is_fully_defined() else tf.shape(images)
  return tf.reshape(tf.cast(flat, dtype), out_shape)
