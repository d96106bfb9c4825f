"""Synthetic source: generated images with the real pipeline's element spec.

Needs none of the JPEG code, so `--data=synthetic` smoke runs and tests
exercise the whole training and eval path without files.
"""

from __future__ import annotations

from typing import Optional, Union

import tensorflow as tf

from efficientnet_tpu.config import ConfigError, DataConfig
from efficientnet_tpu.data import contract
from efficientnet_tpu.data import stream


def _synthetic_source(data_cfg: DataConfig, num_classes: int,
                      image_size: int, num_images: int, split_seed: int):
  """Returns (a dataset of example indices, index -> example function).

  Examples are a pure function of (seed, split, index), so any sharding of the
  indices gives the same images on every host and every run.

  Learnable mode gives each class a fixed random colour and low-frequency
  pattern plus per-image noise, so a model can fit it and loss must fall.
  Images are uint8 like the real pipeline's: 128 + 40 * (pattern + colour +
  noise), rounded and clipped to 0..255 (about 2% of values clip).
  """
  seed = data_cfg.seed * 1000 + split_seed
  g = tf.random.Generator.from_seed(data_cfg.seed)
  templates = tf.image.resize(
      g.normal([num_classes, 4, 4, 3]), [image_size, image_size])
  colours = g.normal([num_classes, 1, 1, 3])
  noise_scale = 0.8 if data_cfg.synthetic_learnable else 1.0

  def make(index):
    s = tf.stack([tf.cast(index, tf.int32), seed])
    label = tf.random.stateless_uniform([], s, maxval=num_classes,
                                        dtype=tf.int32)
    noise = tf.random.stateless_normal([image_size, image_size, 3], s + 1)
    if data_cfg.synthetic_learnable:
      image = templates[label] + colours[label] + noise_scale * noise
    else:
      image = noise
    image = tf.clip_by_value(tf.round(128.0 + 40.0 * image), 0.0, 255.0)
    return {'images': tf.cast(image, tf.uint8), 'labels': label}

  return tf.data.Dataset.range(num_images), make


def synthetic_input(data_cfg: DataConfig, num_classes: int,
                    image_size: int, is_training: bool,
                    global_batch_size: int, start_step: int = 0
                   ) -> Union[contract.TrainInput, contract.EvalInput]:
  """Synthetic data with the real pipeline's element spec, sharded per host.

  Training (a `contract.TrainInput`, which never skips) resumes at
  `start_step`: the stream continues where a run stopped at that step. Eval
  (a `contract.EvalInput`) is sharded by example.
  """
  num_images = (data_cfg.num_train_images if is_training
                else data_cfg.num_eval_images)

  def input_fn(ctx: Optional[tf.distribute.InputContext] = None
              ) -> tf.data.Dataset:
    ctx = ctx or tf.distribute.InputContext()
    batch = ctx.get_per_replica_batch_size(global_batch_size)
    indices, make = _synthetic_source(
        data_cfg, num_classes, image_size, num_images,
        split_seed=0 if is_training else 1)
    num, index = ctx.num_input_pipelines, ctx.input_pipeline_id
    if is_training:
      epoch_length = len(range(index, num_images, num))
      if not epoch_length:
        raise ConfigError('num_train_images', f'expected at least one image '
                          f'per input pipeline ({num}), got {num_images}')
      # This pipeline's indices, index, index + num, ..., fully shuffled.
      ds = stream.resumable_stream(
          lambda epoch: tf.data.Dataset.from_tensor_slices(
              index + num * stream.epoch_order(data_cfg.seed, index, epoch,
                                               epoch_length)),
          stream.pipeline_position(ctx, global_batch_size, start_step),
          epoch_length)
      ds = (ds.map(make, num_parallel_calls=tf.data.AUTOTUNE,
                   deterministic=data_cfg.deterministic or None)
            .batch(batch, drop_remainder=True))
    else:
      indices = indices.shard(num, index)
      ds = contract.batch_eval_examples(
          indices.map(make, num_parallel_calls=tf.data.AUTOTUNE), batch,
          ctx.num_replicas_in_sync // ctx.num_input_pipelines,
          contract.num_eval_steps(num_images, global_batch_size))
    return ds.prefetch(tf.data.AUTOTUNE)

  if is_training:
    return contract.TrainInput(input_fn)
  return contract.EvalInput(input_fn, num_eval_images=num_images,
                            global_batch_size=global_batch_size)
