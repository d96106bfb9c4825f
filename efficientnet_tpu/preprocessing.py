"""Per-image ImageNet preprocessing: fused JPEG crop, resize, flip, normalize.

Training follows the EfficientNet TPU recipe: a crop window is sampled from
the JPEG header's shape alone (`sample_distorted_bounding_box`, area
0.08..1, aspect 3/4..4/3, 10 attempts) and only that window is decoded
(`decode_and_crop_jpeg`); when sampling fails the center crop used for eval
is taken instead. Eval takes a center crop covering `size / (size + pad)` of
the short side, `pad = round(size * (1 / 0.875 - 1))` (32 at 224).

Normalization is split out (`normalize`) so the pipeline can apply it to a
whole batch at once, which is cheaper than per image.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from efficientnet_tpu import augment as augment_lib

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


def center_crop_window(image_shape: tf.Tensor, image_size: int) -> tf.Tensor:
  """[offset_y, offset_x, h, w] of the padded center crop (int32)."""
  height, width = image_shape[0], image_shape[1]
  scale = image_size / (image_size + crop_padding(image_size))
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
                       seed: Optional[Tuple[int, int]] = None) -> tf.Tensor:
  """Samples an Inception-style crop window, center crop if sampling fails.

  Args:
    image_shape: int32 [height, width, channels] (e.g. from the JPEG header).
    image_size: output resolution, used only by the center-crop fallback.
    area_range, aspect_ratio_range, min_object_covered, max_attempts: as in
      `tf.image.sample_distorted_bounding_box`.
    seed: optional stateless seed (2 ints); None uses the stateful op.

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
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  # When every attempt fails the op returns the whole image; a plain resize
  # of the whole image would change the aspect ratio, so fall back to the
  # eval center crop (as the TPU reference does).
  failed = tf.logical_and(tf.equal(size[0], image_shape[0]),
                          tf.equal(size[1], image_shape[1]))
  return tf.where(failed, center_crop_window(image_shape, image_size), window)


def _is_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
  return tf.io.is_jpeg(image_bytes)


def decode_and_crop(image_bytes: tf.Tensor, window_fn,
                    allow_non_jpeg: bool = False) -> tf.Tensor:
  """Decodes only the window `window_fn(shape)` selects, as uint8 RGB.

  JPEGs use the fused `decode_and_crop_jpeg` (only the window's rows and
  columns are decoded). With `allow_non_jpeg` (tfds sources, which may hold
  PNG) other formats are decoded whole and sliced.
  """
  if not allow_non_jpeg:
    shape = tf.image.extract_jpeg_shape(image_bytes)
    return tf.image.decode_and_crop_jpeg(image_bytes, window_fn(shape),
                                         channels=3)

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    return tf.image.decode_and_crop_jpeg(image_bytes, window_fn(shape),
                                         channels=3)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3,
                               expand_animations=False)
    w = window_fn(tf.shape(image))
    return tf.slice(image, [w[0], w[1], 0], [w[2], w[3], 3])

  return tf.cond(_is_jpeg(image_bytes), jpeg, other)


def resize(image: tf.Tensor, image_size: int,
           method: str = 'bicubic') -> tf.Tensor:
  """Resizes to [image_size, image_size] as float32 in [0, 255]."""
  if method not in _RESIZE_METHODS:
    raise ValueError(f'resize_method: expected one of '
                     f'{", ".join(_RESIZE_METHODS)}, got {method!r}')
  image = tf.image.resize(image, [image_size, image_size],
                          method=_RESIZE_METHODS[method], antialias=False)
  # Bicubic overshoots at edges (others by float rounding): keep 0..255.
  return tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)


def _maybe_augment(image: tf.Tensor, augment: str, randaug_num_layers: int,
                   randaug_magnitude: float) -> tf.Tensor:
  """Runs RandAugment / AutoAugment on the uint8 image; float32 out."""
  if augment in (None, '', 'none'):
    return image
  image = tf.cast(tf.round(image), tf.uint8)
  if augment == 'randaugment':
    image = augment_lib.distort_image_with_randaugment(
        image, randaug_num_layers, randaug_magnitude)
  elif augment == 'autoaugment':
    image = augment_lib.distort_image_with_autoaugment(image, 'v0')
  else:
    raise ValueError(f'augment_name: expected none, randaugment or '
                     f'autoaugment, got {augment!r}')
  return tf.cast(image, tf.float32)


def preprocess_for_train(image_bytes: tf.Tensor,
                         image_size: int,
                         resize_method: str = 'bicubic',
                         augment: str = 'none',
                         randaug_num_layers: int = 2,
                         randaug_magnitude: float = 10.0,
                         allow_non_jpeg: bool = False) -> tf.Tensor:
  """Random crop + resize + flip (+ augmentation): float32 [S, S, 3], 0..255.

  Not normalized: call `normalize` (per image or per batch).
  """
  image = decode_and_crop(
      image_bytes, lambda shape: random_crop_window(shape, image_size),
      allow_non_jpeg)
  # Flipping the uint8 crop before resizing equals flipping the output (the
  # resize kernels are mirror-symmetric) and moves 4-8x fewer bytes.
  image = tf.image.random_flip_left_right(image)
  image = resize(image, image_size, resize_method)
  image = tf.ensure_shape(image, [image_size, image_size, 3])
  return _maybe_augment(image, augment, randaug_num_layers, randaug_magnitude)


def preprocess_for_eval(image_bytes: tf.Tensor,
                        image_size: int,
                        resize_method: str = 'bicubic',
                        allow_non_jpeg: bool = False) -> tf.Tensor:
  """Center crop + resize: float32 [S, S, 3] in 0..255, not normalized."""
  image = decode_and_crop(
      image_bytes, lambda shape: center_crop_window(shape, image_size),
      allow_non_jpeg)
  image = resize(image, image_size, resize_method)
  return tf.ensure_shape(image, [image_size, image_size, 3])


def _full_size(values, shape) -> tf.Tensor:
  return tf.constant(np.broadcast_to(np.asarray(values, np.float32),
                                     shape).copy())


def normalize(images: tf.Tensor, dtype: tf.DType = tf.float32) -> tf.Tensor:
  """(images - mean) / std over the last (RGB) axis, cast to `dtype`.

  Works on one image or a batch. With a static image shape the constants
  are materialized at full size: TF's elementwise kernels broadcast a
  size-3 innermost axis ~5x slower than a same-shape operand, which made
  normalization cost more than the bicubic resize.
  """
  images = tf.cast(images, tf.float32)
  inv_std = [1.0 / s for s in STDDEV_RGB]
  shape = images.shape
  if shape.rank is not None and shape.rank >= 3 and shape[-3:].is_fully_defined():
    image_shape = shape[-3:].as_list()
    out = (images - _full_size(MEAN_RGB, image_shape)) * _full_size(
        inv_std, image_shape)
  else:
    out = (images - tf.constant(MEAN_RGB)) * tf.constant(inv_std)
  return tf.cast(out, dtype)
