"""SavedModel export with a serving signature that takes JPEG bytes.

The exported model is rebuilt without any distribution strategy (local batch
norm: inference uses the moving statistics anyway) and given the trained
weights, the EMA averages when EMA is on. It is written to a temporary
directory and renamed into place, so a failed export never leaves a partial
SavedModel at `export_dir`.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import tensorflow as tf

from efficientnet_tpu import model as model_lib
from efficientnet_tpu.config import ConfigError
from efficientnet_tpu import preprocessing


class ServingModule(tf.Module):
  """`serve(image_bytes: string[N]) -> logits, probabilities, classes`."""

  def __init__(self, model, image_size: int, resize_method: str):
    super().__init__(name='efficientnet_serving')
    self.model = model
    self.image_size = image_size
    self.resize_method = resize_method

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string,
                                              name='image_bytes')])
  def serve(self, image_bytes):
    images = tf.map_fn(
        lambda b: preprocessing.preprocess_for_eval(
            b, self.image_size, resize_method=self.resize_method),
        image_bytes, fn_output_signature=tf.uint8)
    images = preprocessing.normalize(images, tf.float32)
    logits = tf.cast(self.model(images, training=False), tf.float32)
    top_5 = tf.math.top_k(logits, k=min(5, logits.shape[-1]))
    return {
        'logits': logits,
        'probabilities': tf.nn.softmax(logits),
        'classes': tf.argmax(logits, axis=-1, output_type=tf.int32),
        'top_5_classes': top_5.indices,
    }


def export_saved_model(trainer, export_dir: str) -> str:
  """Exports `trainer`'s model (EMA weights if enabled) to `export_dir`."""
  cfg = trainer.cfg
  # Serving runs in float32 on any device; weights are float32 either way.
  model_cfg = dataclasses.replace(cfg.model, use_bfloat16=False,
                                  bn_group_size=None, bn_group_batch_size=None)
  model = model_lib.build_model(model_cfg, bn_group_size=1)
  # Read the averages directly (no swap: only the writer exports, and the
  # state is synchronized across replicas at every checkpoint and eval).
  def value(v):
    average = trainer.ema.shadow_of(v) if trainer.ema is not None else None
    return (v if average is None else average).numpy()

  model.set_weights([value(v) for v in trainer.model.weights])
  module = ServingModule(model, cfg.model.image_size, cfg.data.resize_method)
  tmp_dir = export_dir.rstrip('/') + '.tmp'
  if tf.io.gfile.exists(tmp_dir):
    tf.io.gfile.rmtree(tmp_dir)
  tf.saved_model.save(module, tmp_dir,
                      signatures={'serving_default': module.serve})
  if tf.io.gfile.exists(export_dir):
    if tf.io.gfile.listdir(export_dir):
      raise ConfigError(f'--export_dir: expected a new or empty directory, '
                        f'{export_dir} is not empty')
    tf.io.gfile.rmtree(export_dir)
  tf.io.gfile.rename(tmp_dir, export_dir)
  logging.info('Exported SavedModel to %s', export_dir)
  return export_dir
