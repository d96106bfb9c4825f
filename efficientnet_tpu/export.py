"""SavedModel export with a serving signature that takes encoded images.

`serving_default` takes `image_bytes: string[N]`: JPEG, PNG, GIF (first
frame), BMP or still WebP. JPEGs go through exactly the eval preprocessing
(fused center-crop decode); the other formats are decoded to RGB (alpha
dropped, grayscale replicated) and given the same center crop and resize
(`preprocessing.preprocess_for_serving`). A row that does not decode (bad
or truncated bytes, an empty string, animated WebP, another format) does
not fail the batch: it comes back with `valid = False`, `classes` and
`top_5_classes` -1, `class_names` '' and all-zero `logits` and
`probabilities`. So does an image of more pixels than the training input's
`max_image_pixels`: JPEG, PNG and GIF are refused from their headers,
before any memory is spent decoding them, BMP and WebP once decoded. An
empty batch gives empty outputs.

`classes` and `top_5_classes` are in the data set's label convention (the
1-based labels of ImageNet TFRecords: model index + `label_offset`),
`class_names` the data set's names for them (dataset_info.json), and
`top_5_probabilities` the softmax of the top 5.

The exported model is rebuilt without any distribution strategy (local batch
norm: inference uses the moving statistics anyway) and given the trained
weights, the EMA averages when EMA is on. It is written to a temporary
directory and renamed into place, so a failed export never leaves a partial
SavedModel at `export_dir`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from absl import logging
import tensorflow as tf

from efficientnet_tpu import model as model_lib
from efficientnet_tpu import run_dir
from efficientnet_tpu.config import ModelConfig
from efficientnet_tpu.data import checks
from efficientnet_tpu.data import preprocessing


def declared_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
  """Height x width an image's header declares (int64; 0 when unread).

  JPEG and PNG as the training input reads them (`checks.header_pixels`);
  GIF its logical screen, the size TF decodes every frame at. Reads no
  pixels.
  """
  header = tf.cast(tf.io.decode_raw(tf.strings.substr(
      tf.strings.join([image_bytes, b'\0' * 10]), 0, 10), tf.uint8),
                   tf.int64)
  is_gif = tf.reduce_any(tf.equal(tf.strings.substr(image_bytes, 0, 6),
                                  [b'GIF87a', b'GIF89a']))
  # Little-endian 16-bit width and height at bytes 6 and 8.
  gif = (header[6] + 256 * header[7]) * (header[8] + 256 * header[9])
  return tf.where(is_gif, gif, checks.header_pixels(image_bytes))


class ServingModule(tf.Module):
  """`serve(image_bytes: string[N])`: per-row predictions and `valid`."""

  def __init__(self, model, image_size: int, resize_method: str,
               label_offset: int = 0,
               class_names: Optional[Sequence[str]] = None,
               crop_fraction: Optional[float] = None,
               max_image_pixels: Optional[int] = None):
    super().__init__(name='efficientnet_serving')
    self.model = model
    self.image_size = image_size
    self.resize_method = resize_method
    self.crop_fraction = crop_fraction
    self.max_image_pixels = max_image_pixels
    self.label_offset = int(label_offset)
    num_classes = model.output_shape[-1]
    if class_names is None:
      class_names = [str(i + self.label_offset) for i in range(num_classes)]
    if len(class_names) != num_classes:
      raise ValueError(f'class_names: expected {num_classes} names (one per '
                       f'output), got {len(class_names)}')
    self.class_names = tf.constant(list(class_names), tf.string)

  def _preprocess(self, image_bytes):
    """One row's uint8 [S, S, 3]; fails on bytes that do not decode or
    hold more than `max_image_pixels` pixels."""
    limit = self.max_image_pixels
    checked = []
    if limit is not None:
      # Before decoding, so that a small file declaring a huge image (a
      # decompression bomb) costs no memory.
      pixels = declared_pixels(image_bytes)
      checked = [tf.debugging.Assert(pixels <= limit, [
          'max_image_pixels: the image declares', pixels, 'pixels, over the '
          'limit of', limit])]
    with tf.control_dependencies(checked):
      return preprocessing.preprocess_for_serving(
          image_bytes, self.image_size, resize_method=self.resize_method,
          crop_fraction=self.crop_fraction, max_pixels=limit)

  def _decode(self, image_bytes):
    """(indices int32[M], images uint8[M, S, S, 3]) of the rows that decode.

    A decode error inside a tf.data map is dropped by `ignore_errors`
    instead of failing the call, which a plain map_fn cannot do; the
    survivors keep their row index.
    """
    num = tf.shape(image_bytes)[0]
    size = self.image_size
    dataset = tf.data.Dataset.from_tensor_slices((tf.range(num), image_bytes))
    dataset = dataset.map(lambda i, b: (i, self._preprocess(b)),
                          num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=False)
    # log_warning: the server log says why a row was dropped.
    dataset = dataset.ignore_errors(log_warning=True)
    # One batch of all survivors; reduce (unlike get_single_element) also
    # copes with zero batches (empty input or no valid row).
    dataset = dataset.batch(tf.cast(tf.maximum(num, 1), tf.int64))
    initial = (tf.zeros([0], tf.int32), tf.zeros([0, size, size, 3], tf.uint8))
    return dataset.reduce(
        initial, lambda state, batch: (tf.concat([state[0], batch[0]], 0),
                                       tf.concat([state[1], batch[1]], 0)))

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string,
                                              name='image_bytes')])
  def serve(self, image_bytes):
    num = tf.shape(image_bytes)[0]
    indices, images = self._decode(image_bytes)
    # The model never sees a zero-size batch (an empty request, or one
    # where nothing decodes): TF's oneDNN graph rewrite, on by default on
    # x86 CPUs with AVX512 BF16 / VNNI, fails on one inside the batch norm.
    # A batch without images gets one blank image, whose results the
    # slices below drop; other batches run unchanged.
    count = tf.shape(indices)[0]
    size = self.image_size
    images = tf.concat(
        [images, tf.zeros([tf.maximum(1 - count, 0), size, size, 3],
                          images.dtype)], 0)
    images = preprocessing.normalize(images, tf.float32)
    logits = tf.cast(self.model(images, training=False), tf.float32)
    num_classes = logits.shape[-1]
    probabilities = tf.nn.softmax(logits)
    top_5_probabilities, top_5 = tf.math.top_k(probabilities,
                                               k=min(5, num_classes))
    best = tf.argmax(logits, axis=-1, output_type=tf.int32)
    rows = indices[:, tf.newaxis]

    def scatter(values, fill, shape):
      return tf.tensor_scatter_nd_update(
          tf.fill(shape, tf.constant(fill, values.dtype)), rows,
          values[:count])

    return {
        'logits': scatter(logits, 0, [num, num_classes]),
        'probabilities': scatter(probabilities, 0, [num, num_classes]),
        # Ids in the data set's label convention (see label_offset).
        'classes': scatter(best + self.label_offset, -1, [num]),
        'class_names': scatter(tf.gather(self.class_names, best), '', [num]),
        'top_5_classes': scatter(top_5 + self.label_offset, -1,
                                 [num, top_5.shape[-1]]),
        'top_5_probabilities': scatter(top_5_probabilities, 0,
                                       [num, top_5.shape[-1]]),
        'valid': scatter(tf.ones_like(indices, tf.bool), False, [num]),
    }


def export_saved_model(model, ema, model_cfg: ModelConfig,
                       resize_method: str, export_dir: str,
                       label_offset: int = 0,
                       class_names: Optional[Sequence[str]] = None,
                       crop_fraction: Optional[float] = None,
                       max_image_pixels: Optional[int] = None) -> str:
  """Exports `model` (its EMA averages if `ema`) to `export_dir`.

  Args:
    model: the trained Keras model (any strategy; its weights are read).
    ema: its `ExponentialMovingAverage`, or None to export the weights.
    model_cfg: the architecture, to rebuild the model for serving.
    resize_method: the eval resize of the serving signature.
    export_dir: a new or empty directory.
    label_offset: added to the model's class index to give the data set's
      label (1 for 1-based TFRecord labels without a background class).
    class_names: one name per model output (default: the label as text).
    crop_fraction: the eval center crop (`DataConfig.eval_crop_fraction`).
    max_image_pixels: images of more pixels are served as invalid rows
      (`DataConfig.max_image_pixels`); None: no limit.

  Returns:
    `export_dir`.
  """
  # Serving runs in float32 on any device; weights are float32 either way.
  serving_model = model_lib.build_model(model_cfg, bn_group_size=1,
                                        dtype='float32')
  # Read the averages directly (no swap: only the writer exports, and the
  # state is synchronized across replicas at every checkpoint and eval).
  def value(v):
    average = ema.shadow_of(v) if ema is not None else None
    return (v if average is None else average).numpy()

  serving_model.set_weights([value(v) for v in model.weights])
  module = ServingModule(serving_model, model_cfg.image_size, resize_method,
                         label_offset, class_names, crop_fraction,
                         max_image_pixels)
  tmp_dir = export_dir.rstrip('/') + '.tmp'
  if tf.io.gfile.exists(tmp_dir):
    tf.io.gfile.rmtree(tmp_dir)
  tf.saved_model.save(module, tmp_dir,
                      signatures={'serving_default': module.serve})
  # Checked before the run too; again here, since the directory may have
  # filled up while training.
  run_dir.check_export_dir(export_dir)
  if tf.io.gfile.exists(export_dir):
    tf.io.gfile.rmtree(export_dir)
  tf.io.gfile.rename(tmp_dir, export_dir)
  logging.info('Exported SavedModel to %s (%s)', export_dir,
               f'the EMA averages, decay {ema.decay:g}' if ema is not None
               else 'the raw weights: EMA is off')
  return export_dir
