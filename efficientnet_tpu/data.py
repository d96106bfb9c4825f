"""Dataset sources behind one interface: synthetic, ImageNet TFRecords, tfds.

Every source returns `fn(tf.distribute.InputContext) -> tf.data.Dataset` for
`strategy.distribute_datasets_from_function`, with one element spec:

* training: `{'images': [b, s, s, 3] uint8, 'labels': [b] int32}`, batched
  with `drop_remainder=True` and repeated forever. Images are RGB 0..255 and
  not normalized: the train / eval step applies `preprocessing.normalize`
  (mean/std and the cast to the compute dtype) on device;
* eval: the same plus `'mask': [b] float32` (0 marks padding), exactly
  `num_eval_steps` batches per pipeline, so that across all pipelines every
  eval example is seen exactly once with mask 1.

`b` is the per-replica batch from the InputContext. The `dtype` argument of
`make_input_fn` is kept for compatibility and does not change this spec.
"""

from __future__ import annotations

import math
from typing import Callable

import tensorflow as tf

from efficientnet_tpu.config import ConfigError, DataConfig

InputFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


def num_eval_steps(num_eval_images: int, global_batch_size: int) -> int:
  """Eval batches per replica so that the global eval covers every image."""
  return math.ceil(num_eval_images / global_batch_size)


def batch_eval_examples(examples: tf.data.Dataset, per_replica_batch: int,
                        replicas_per_pipeline: int,
                        steps: int) -> tf.data.Dataset:
  """Pads one pipeline's examples to `steps` fixed-shape masked batches.

  Args:
    examples: unbatched `{'images', 'labels'}` elements, this pipeline's share
      of the eval set; at most `steps * per_replica_batch *
      replicas_per_pipeline` of them.
    per_replica_batch: batch size of each element produced.
    replicas_per_pipeline: replicas fed by this pipeline.
    steps: eval steps every replica runs.

  Returns:
    Exactly `steps * replicas_per_pipeline` batches; real examples carry mask 1
    and the zero padding after them mask 0.
  """
  capacity = steps * per_replica_batch * replicas_per_pipeline
  real = examples.map(lambda e: dict(e, mask=tf.constant(1.0)))
  spec = real.element_spec
  pad = tf.data.Dataset.from_tensors(
      {k: tf.zeros(s.shape, s.dtype) for k, s in spec.items()}).repeat()
  return (real.concatenate(pad).take(capacity)
          .batch(per_replica_batch, drop_remainder=True))


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


def synthetic_input_fn(data_cfg: DataConfig, num_classes: int,
                       image_size: int, is_training: bool,
                       global_batch_size: int,
                       dtype: tf.DType = tf.float32) -> InputFn:
  """Synthetic data with the real pipeline's element spec, sharded per host.

  `dtype` is unused (images are uint8; normalization and the cast to dtype
  happen on device) and kept for compatibility.
  """
  del dtype
  num_images = (data_cfg.num_train_images if is_training
                else data_cfg.num_eval_images)

  def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    batch = ctx.get_per_replica_batch_size(global_batch_size)
    indices, make = _synthetic_source(
        data_cfg, num_classes, image_size, num_images,
        split_seed=0 if is_training else 1)
    indices = indices.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    if is_training:
      ds = (indices.shuffle(min(num_images, 10000),
                            seed=data_cfg.seed + ctx.input_pipeline_id)
            .repeat()
            .map(make, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch, drop_remainder=True))
    else:
      ds = batch_eval_examples(
          indices.map(make, num_parallel_calls=tf.data.AUTOTUNE), batch,
          ctx.num_replicas_in_sync // ctx.num_input_pipelines,
          num_eval_steps(num_images, global_batch_size))
    return ds.prefetch(tf.data.AUTOTUNE)

  return input_fn


def make_input_fn(data_cfg: DataConfig, num_classes: int, image_size: int,
                  is_training: bool, global_batch_size: int,
                  dtype: tf.DType = tf.float32) -> InputFn:
  """Returns the input function for `data_cfg.source`.

  Every source yields uint8 images (see the module docstring); `dtype` is
  kept for compatibility: normalization and the cast to dtype happen on
  device.
  """
  if data_cfg.source == 'synthetic':
    return synthetic_input_fn(data_cfg, num_classes, image_size, is_training,
                              global_batch_size, dtype)
  # Imported lazily: the synthetic smoke path needs none of the JPEG code.
  from efficientnet_tpu import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.build_input_fn(data_cfg, image_size, is_training,
                                       global_batch_size, dtype,
                                       num_classes=num_classes)


def check_data_files(data_cfg: DataConfig, mode: str) -> None:
  """Fails before any work when the data the mode needs is not there."""
  if data_cfg.source != 'tfrecord':
    if data_cfg.source != 'synthetic' and not tf.io.gfile.isdir(
        data_cfg.data_dir):
      raise ConfigError(f'--data_dir: expected a prepared '
                        f'tensorflow-datasets directory, '
                        f'{data_cfg.data_dir!r} does not exist')
    return
  from efficientnet_tpu import input_pipeline  # pylint: disable=g-import-not-at-top
  if mode in ('train', 'train_and_eval'):
    input_pipeline.list_files(data_cfg.data_dir, is_training=True)
  if mode in ('eval', 'train_and_eval'):
    input_pipeline.list_files(data_cfg.data_dir, is_training=False)
