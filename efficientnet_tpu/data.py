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

import json
import math
import os
import time
from typing import Callable, Dict, List, Optional

from absl import logging
import tensorflow as tf

from efficientnet_tpu import fileio
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


def epoch_order(seed: int, pipeline: int, epoch: tf.Tensor,
                size: int) -> tf.Tensor:
  """The order of one pipeline's `size` items (files, indices) in an epoch:
  a stateless permutation of range(size), a pure function of its
  arguments, so the order of any epoch is rebuilt on resume."""
  # (Dataset.shuffle would take a tensor seed, but TF's seed resolution
  # fails on one when the global seed is 0.)
  key = tf.stack([tf.constant(seed * 65_537 + pipeline + (1 << 40),
                              tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_shuffle(
      tf.range(size, dtype=tf.int64), key)


def element_seed(seed: int, pipeline: int,
                 position: tf.Tensor) -> tf.Tensor:
  """Stateless-op seed [2] of the element at `position` of a pipeline's
  stream: the same random crop and flip for that element after a resume,
  whatever the map parallelism."""
  return tf.stack([tf.constant(seed * 65_537 + pipeline, tf.int64),
                   tf.cast(position, tf.int64)])


def resumable_stream(epoch_fn: Callable[[tf.Tensor], tf.data.Dataset],
                     position: int = 0,
                     epoch_length: Optional[int] = None) -> tf.data.Dataset:
  """Epochs 0, 1, 2, ... of `epoch_fn`, starting `position` elements in.

  Each epoch's order depends only on its number (`epoch_order`), so the
  stream after `position` elements is rebuilt without replaying it: whole
  epochs are skipped by number, and only the remainder of the current one
  is read and dropped (before any decoding).

  Args:
    epoch_fn: int64 epoch number -> that epoch's dataset (finite).
    position: elements of the stream already consumed.
    epoch_length: elements per epoch; needed when `position` > 0.

  Returns:
    The infinite stream from `position` on.
  """
  first, offset = 0, 0
  if position:
    if not epoch_length:
      raise ValueError('epoch_length: expected the elements per epoch to '
                       f'resume at position {position}, got {epoch_length}')
    first, offset = divmod(position, epoch_length)
  head = epoch_fn(tf.constant(first, tf.int64))
  if offset:
    head = head.skip(offset)
  return head.concatenate(
      tf.data.Dataset.range(first + 1, 1 << 62).flat_map(epoch_fn))


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


def pipeline_position(ctx: tf.distribute.InputContext,
                      global_batch_size: int, start_step: int) -> int:
  """Training examples one pipeline has fed after `start_step` steps."""
  replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
  return (start_step * ctx.get_per_replica_batch_size(global_batch_size)
          * replicas)


def synthetic_input_fn(data_cfg: DataConfig, num_classes: int,
                       image_size: int, is_training: bool,
                       global_batch_size: int,
                       dtype: tf.DType = tf.float32,
                       start_step: int = 0) -> InputFn:
  """Synthetic data with the real pipeline's element spec, sharded per host.

  `dtype` is unused (images are uint8; normalization and the cast to dtype
  happen on device) and kept for compatibility. Training resumes at
  `start_step`: the stream continues where a run stopped at that step.
  """
  del dtype
  num_images = (data_cfg.num_train_images if is_training
                else data_cfg.num_eval_images)

  def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    batch = ctx.get_per_replica_batch_size(global_batch_size)
    indices, make = _synthetic_source(
        data_cfg, num_classes, image_size, num_images,
        split_seed=0 if is_training else 1)
    num, index = ctx.num_input_pipelines, ctx.input_pipeline_id
    if is_training:
      epoch_length = len(range(index, num_images, num))
      if not epoch_length:
        raise ConfigError(f'--num_train_images: expected at least one image '
                          f'per input pipeline ({num}), got {num_images}')
      # This pipeline's indices, index, index + num, ..., fully shuffled.
      ds = resumable_stream(
          lambda epoch: tf.data.Dataset.from_tensor_slices(
              index + num * epoch_order(data_cfg.seed, index, epoch,
                                        epoch_length)),
          pipeline_position(ctx, global_batch_size, start_step),
          epoch_length)
      ds = (ds.map(make, num_parallel_calls=tf.data.AUTOTUNE,
                   deterministic=data_cfg.deterministic or None)
            .batch(batch, drop_remainder=True))
    else:
      indices = indices.shard(num, index)
      ds = batch_eval_examples(
          indices.map(make, num_parallel_calls=tf.data.AUTOTUNE), batch,
          ctx.num_replicas_in_sync // ctx.num_input_pipelines,
          num_eval_steps(num_images, global_batch_size))
    return ds.prefetch(tf.data.AUTOTUNE)

  return input_fn


def make_input_fn(data_cfg: DataConfig, num_classes: int, image_size: int,
                  is_training: bool, global_batch_size: int,
                  dtype: tf.DType = tf.float32,
                  start_step: int = 0,
                  count_cache_dir: Optional[str] = None) -> InputFn:
  """Returns the input function for `data_cfg.source`.

  Every source yields uint8 images (see the module docstring); `dtype` is
  kept for compatibility: normalization and the cast to dtype happen on
  device. Training input continues the stream of a run resumed at
  `start_step` (see `resumable_stream`; TFRecord counts that place it are
  cached in `count_cache_dir`).
  """
  if data_cfg.source == 'synthetic':
    return synthetic_input_fn(data_cfg, num_classes, image_size, is_training,
                              global_batch_size, dtype, start_step)
  # Imported lazily: the synthetic smoke path needs none of the JPEG code.
  from efficientnet_tpu import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.build_input_fn(data_cfg, image_size, is_training,
                                       global_batch_size, dtype,
                                       num_classes=num_classes,
                                       start_step=start_step,
                                       count_cache_dir=count_cache_dir)


def check_data_files(data_cfg: DataConfig, mode: str,
                     cache_dir: Optional[str] = None) -> None:
  """Fails before any work when the data the mode needs is not there.

  Modes that evaluate also need at least `num_eval_images` eval records:
  found only when eval starts, that error would come after the whole
  training. TFRecord splits are counted once (see `record_counts`),
  tfds splits come with their size.

  Args:
    data_cfg: the data source, directory and `num_eval_images`.
    mode: 'train', 'eval' or 'train_and_eval'.
    cache_dir: where the per-file eval record counts are cached (the model
      dir); None counts every time.

  Raises:
    ConfigError: one line naming the flag to change.
  """
  evaluates = mode in ('eval', 'train_and_eval')
  if data_cfg.source == 'synthetic':
    return
  if data_cfg.source != 'tfrecord':
    if not tf.io.gfile.isdir(data_cfg.data_dir):
      raise ConfigError(f'--data_dir: expected a prepared '
                        f'tensorflow-datasets directory, '
                        f'{data_cfg.data_dir!r} does not exist')
    if evaluates:
      from efficientnet_tpu import input_pipeline  # pylint: disable=g-import-not-at-top
      _, builder = input_pipeline._tfds_builder(data_cfg)  # pylint: disable=protected-access
      split = input_pipeline._tfds_split(builder, False, data_cfg)  # pylint: disable=protected-access
      _check_num_eval_images(
          data_cfg, builder.info.splits[split].num_examples,
          f'split {split!r} of {data_cfg.source} in {data_cfg.data_dir!r}')
    return
  from efficientnet_tpu import input_pipeline  # pylint: disable=g-import-not-at-top
  if mode in ('train', 'train_and_eval'):
    input_pipeline.list_files(data_cfg.data_dir, is_training=True)
  if evaluates:
    files = input_pipeline.list_files(data_cfg.data_dir, is_training=False)
    counts = record_counts(files, cache_dir,
                                create_cache_dir=mode != 'eval')
    _check_num_eval_images(
        data_cfg, sum(counts.values()),
        f'{len(files)} {input_pipeline.EVAL_PATTERN!r} files in '
        f'{data_cfg.data_dir!r}')


def _check_num_eval_images(data_cfg: DataConfig, found: int,
                           where: str) -> None:
  if found >= data_cfg.num_eval_images:
    return
  fix = (f'set --num_eval_images={found} or less' if found else
         'write eval records or use --mode=train')
  raise ConfigError(
      f'--num_eval_images: {data_cfg.num_eval_images} requested but the eval '
      f'split has {found} records ({where}); {fix}')


COUNTS_FILE = 'record_counts.json'
_COUNTS_FORMAT = 1


def record_counts(files: List[str], cache_dir: Optional[str] = None,
                  create_cache_dir: bool = False,
                  tolerate_corrupt: bool = False) -> Dict[str, int]:
  """{file: record count} of TFRecord files, counted once and cached.

  Counting ImageNet's validation split (before an evaluating run) or a
  host's training files (to place a resumed run in its input stream) means
  walking gigabytes, maybe on GCS, so the per-file counts are kept in
  `cache_dir/record_counts.json`,
  keyed by path and byte size. A file whose size differs from the cached
  one is counted again; the cache is then rewritten (atomically, so
  concurrent hosts never see half a file). The data dir is not used for the
  cache: it may be read-only (public buckets).

  Args:
    files: TFRecord paths.
    cache_dir: directory of the cache; None: no cache.
    create_cache_dir: create `cache_dir` if missing (a training run does so
      anyway); otherwise a missing directory means no cache is written.
    tolerate_corrupt: see `input_pipeline.count_records`.

  Returns:
    The count of every file in `files`.

  Raises:
    ConfigError: a file is corrupt, truncated or unreadable (one line
      naming it).
  """
  from efficientnet_tpu import input_pipeline  # pylint: disable=g-import-not-at-top
  sizes = input_pipeline.file_sizes(files)
  path = os.path.join(cache_dir, COUNTS_FILE) if cache_dir else None
  cached = _read_counts(path) if path else {}
  counts, todo = {}, []
  for f, size in zip(files, sizes):
    entry = cached.get(f)
    if entry is not None and entry['bytes'] == size:
      counts[f] = entry['records']
    else:
      todo.append((f, size))
  if not todo:
    return counts
  start = time.time()
  logging.info('Counting the records of %d files (once: the counts are '
               'cached in %s)', len(todo), path)
  new = input_pipeline.count_records([f for f, _ in todo],
                                     [s for _, s in todo],
                                     tolerate_corrupt=tolerate_corrupt)
  for (f, size), n in zip(todo, new):
    counts[f] = n
    cached[f] = {'bytes': size, 'records': n}
  logging.info('Counted %d records in %.1f s', sum(new), time.time() - start)
  if path:
    _write_counts(path, cached, create_cache_dir)
  return {f: counts[f] for f in files}


def _read_counts(path: str) -> Dict[str, Dict[str, int]]:
  """Valid cache entries; a missing or malformed cache is empty."""
  try:
    with tf.io.gfile.GFile(path) as f:
      data = json.loads(f.read())
    if data.get('format') != _COUNTS_FORMAT:
      return {}
    return {f: e for f, e in data['files'].items()
            if isinstance(e.get('bytes'), int) and
            isinstance(e.get('records'), int) and e['records'] >= 0}
  except (tf.errors.OpError, ValueError, AttributeError, KeyError, TypeError):
    return {}


def _write_counts(path: str, entries: Dict[str, Dict[str, int]],
                  create_dir: bool) -> None:
  """Writes the cache atomically; an unwritable model dir only skips it."""
  directory = os.path.dirname(path)
  text = json.dumps({'format': _COUNTS_FORMAT, 'files': entries},
                    indent=1, sort_keys=True) + '\n'
  try:
    if not tf.io.gfile.isdir(directory):
      if not create_dir:
        return
      tf.io.gfile.makedirs(directory)
    fileio.write_atomically(path, text)
  except (tf.errors.OpError, OSError) as e:
    logging.warning('Not caching the record counts in %s (%s)', path, e)
