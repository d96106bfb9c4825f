"""ImageNet input pipeline: sharded TFRecord / tfds reading to batches.

Entry point: `build_input_fn(...)` returns `fn(input_context) -> Dataset`
for `strategy.distribute_datasets_from_function`. One pipeline runs per host
(`input_context.input_pipeline_id` of `num_input_pipelines`) and yields
per-replica batches:

  train: {'images': uint8 [B, S, S, 3], 'labels': int32 [B]}, repeated
         forever, drop_remainder.
  eval:  the same plus 'mask': float32 [B] (1 real, 0 padding); exactly
         `num_eval_steps(data_cfg, global_batch_size)` batches per replica.

Images are RGB 0..255, cropped, resized, flipped and augmented, but not
normalized: the train / eval step applies `preprocessing.normalize` (the
ImageNet `MEAN_RGB` / `STDDEV_RGB` and the cast to the compute dtype) on
device. uint8 batches are 4x smaller than float32 on the host and on the
host-to-device link.

Training shards files across pipelines (each host reads only its own
files). Evaluation must see every image exactly once whatever the host
count, and per-file record counts are unknown without reading the files, so
each eval pipeline reads all validation files in a fixed order, keeps every
k-th record (before any decoding) and pads with masked all-zero images.

Bad records: with `skip_corrupt` training drops non-JPEG / truncated images
and the rest of a file after a corrupt TFRecord frame (each logged);
otherwise (and always for eval) the first one raises an error naming the
file.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Callable, List, Optional

import tensorflow as tf

from efficientnet_tpu import data as data_lib
from efficientnet_tpu import preprocessing
from efficientnet_tpu.config import ConfigError, DataConfig

MEAN_RGB = preprocessing.MEAN_RGB
STDDEV_RGB = preprocessing.STDDEV_RGB

TRAIN_PATTERN = 'train-*'
EVAL_PATTERN = 'validation-*'

# TFRecord framing around each payload: length (8) + 2 CRCs (4 + 4).
_RECORD_OVERHEAD = 16
_READ_BUFFER_BYTES = 8 * 1024 * 1024
# Records byte-counted per function call. At ~110 KB per ImageNet record
# and a cycle of 64 files this buffers ~110 MB per host.
_RECORDS_PER_CALL = 16
_AUTOTUNE = tf.data.AUTOTUNE

InputFn = Callable[[Optional[tf.distribute.InputContext]], tf.data.Dataset]


def num_eval_steps(data_cfg: DataConfig, global_batch_size: int) -> int:
  """Eval batches per replica that cover every eval image once."""
  return data_lib.num_eval_steps(data_cfg.num_eval_images, global_batch_size)


def list_files(data_dir: str, is_training: bool) -> List[str]:
  """Sorted TFRecord shards of the split; one-line error if there are none."""
  pattern = TRAIN_PATTERN if is_training else EVAL_PATTERN
  try:
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, pattern)))
  except tf.errors.OpError as e:
    raise ConfigError(f'--data_dir: could not list {data_dir!r} '
                      f'({type(e).__name__}: {e.message})') from None
  if not files:
    example = 'train-00000-of-01024' if is_training else (
        'validation-00000-of-00128')
    raise ConfigError(
        f'--data_dir: expected TFRecord files matching {pattern!r} (e.g. '
        f'{example}) in {data_dir!r}, found none (make them with '
        f'efficientnet-tpu-make-tfrecords)')
  return files


# ---------------------------------------------------------------------------
# Reading: (image_bytes, label, source) triples.
# ---------------------------------------------------------------------------


def file_sizes(files: List[str], num_threads: int = 32) -> List[int]:
  """Byte sizes of `files`, stat'ed in parallel (cheap also on GCS)."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return list(pool.map(lambda f: tf.io.gfile.stat(f).length, files))


def _read_tfrecord_file(filename: tf.Tensor, file_size: Optional[tf.Tensor]
                       ) -> tf.data.Dataset:
  """(record, filename) pairs of one file.

  A corrupt TFRecord frame raises a DataLossError that does not name the
  file. So reading stops at the first bad frame (`ignore_errors`); without
  `file_size` (skip_corrupt) the rest of the file is skipped, otherwise the
  bytes consumed must add up to the file size, or an error names the file.
  The bytes are counted per batch of records (one scan call per batch,
  `unbatch` restores the order) rather than by a scan and a filter call per
  record. Parsing stays per record, in the main map: a malformed Example
  then fails (or, with skip_corrupt, is dropped) alone.
  """
  records = tf.data.TFRecordDataset(filename, buffer_size=_READ_BUFFER_BYTES)
  if file_size is None:
    return tf.data.Dataset.zip((records.ignore_errors(log_warning=True),
                                tf.data.Dataset.from_tensors(filename).repeat()))

  items = tf.data.Dataset.zip(
      (records.ignore_errors().batch(_RECORDS_PER_CALL),
       tf.data.Dataset.from_tensors(False).repeat()))
  # An empty end marker checks the byte count and yields no record.
  items = items.concatenate(
      tf.data.Dataset.from_tensors((tf.constant([], tf.string), True)))

  def count_bytes(consumed, item):
    batch, is_end = item
    size = tf.reduce_sum(
        tf.cast(tf.strings.length(batch), tf.int64) + _RECORD_OVERHEAD)
    ok = tf.logical_or(tf.logical_not(is_end), tf.equal(consumed, file_size))
    check = tf.debugging.Assert(ok, [
        'Corrupt or truncated TFRecord in', filename, 'unreadable after byte',
        consumed, 'of', file_size, '(set skip_corrupt to skip bad records in '
        'training)'])
    with tf.control_dependencies([check]):
      return consumed + size, (tf.identity(batch),
                               tf.fill(tf.shape(batch), filename))

  return items.scan(tf.constant(0, tf.int64), count_bytes).unbatch()


def _parse_record(record: tf.Tensor, filename: tf.Tensor,
                  include_background_label: bool):
  """(image_bytes, label, filename) of one serialized Example."""
  features = tf.io.parse_single_example(record, {
      'image/encoded': tf.io.FixedLenFeature((), tf.string, ''),
      'image/class/label': tf.io.FixedLenFeature((), tf.int64, -1),
  })
  label = tf.cast(features['image/class/label'], tf.int32)
  # Records hold 1-based labels: 0 stays free for a background class.
  if not include_background_label:
    label -= 1
  return features['image/encoded'], label, filename


def _tfrecord_records(data_cfg: DataConfig, files: List[str],
                      is_training: bool,
                      ctx: tf.distribute.InputContext) -> tf.data.Dataset:
  """(record, filename) pairs of this pipeline's share."""
  num, index = ctx.num_input_pipelines, ctx.input_pipeline_id
  strict = not (is_training and data_cfg.skip_corrupt)
  if is_training:
    if len(files) < num:
      raise ConfigError(
          f'--data_dir: expected at least as many {TRAIN_PATTERN!r} files as '
          f'input pipelines ({num}) in {data_cfg.data_dir!r}, found '
          f'{len(files)} (write more shards)')
    # Each host reads only its own files.
    files = files[index::num]
  if strict:
    ds = tf.data.Dataset.from_tensor_slices(
        (files, tf.constant(file_sizes(files), tf.int64)))
    reader = _read_tfrecord_file
  else:
    ds = tf.data.Dataset.from_tensor_slices(files)
    reader = lambda f: _read_tfrecord_file(f, None)
  if is_training:
    ds = ds.shuffle(len(files), seed=data_cfg.seed + index,
                    reshuffle_each_iteration=True).repeat()
    ds = ds.interleave(reader, cycle_length=min(64, len(files)),
                       num_parallel_calls=_AUTOTUNE, deterministic=False)
    ds = ds.shuffle(data_cfg.shuffle_buffer, seed=data_cfg.seed + index)
  else:
    # Same order on every host, so sharding by example is exact.
    ds = ds.interleave(reader, cycle_length=min(16, len(files)),
                       num_parallel_calls=_AUTOTUNE, deterministic=True)
    ds = ds.take(data_cfg.num_eval_images)
    if num > 1:
      ds = ds.shard(num, index)
  return ds


def _tfds_builder(data_cfg: DataConfig):
  name = data_cfg.source[len('tfds:'):]
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(
        f'--data={data_cfg.source}: expected tensorflow-datasets to be '
        "installed (pip install 'efficientnet_tpu[tfds]')") from None
  try:
    builder = tfds.builder(name, data_dir=data_cfg.data_dir)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConfigError(f'--data={data_cfg.source}: could not load tfds '
                      f'dataset {name!r} from {data_cfg.data_dir!r} '
                      f'({first})') from None
  if not builder.is_prepared():
    raise ConfigError(
        f'--data_dir: expected a prepared tfds dataset {name!r} under '
        f'{data_cfg.data_dir!r}, found none (prepare it with tfds first; '
        'this program never downloads)')
  return tfds, builder


def _tfds_split(builder, is_training: bool, data_cfg: DataConfig) -> str:
  splits = list(builder.info.splits.keys())
  wanted = ['train'] if is_training else ['validation', 'test']
  for split in wanted:
    if split in splits:
      return split
  raise ConfigError(f'--data={data_cfg.source}: expected a split named '
                    f'{" or ".join(wanted)}, found {", ".join(splits)}')


def _tfds_records(data_cfg: DataConfig, is_training: bool,
                  ctx: tf.distribute.InputContext) -> tf.data.Dataset:
  tfds, builder = _tfds_builder(data_cfg)
  split = _tfds_split(builder, is_training, data_cfg)
  features = builder.info.features
  image_key = 'image' if 'image' in features else None
  if image_key is None or 'label' not in features:
    raise ConfigError(f'--data={data_cfg.source}: expected image and label '
                      f'features, found {", ".join(features.keys())}')
  read_config = tfds.ReadConfig(
      input_context=ctx if is_training else None,
      shuffle_seed=data_cfg.seed + ctx.input_pipeline_id,
      add_tfds_id=True, try_autocache=False,
      interleave_cycle_length=16)
  ds = builder.as_dataset(
      split=split, shuffle_files=is_training, read_config=read_config,
      decoders={image_key: tfds.decode.SkipDecoding()})
  offset = 1 if data_cfg.include_background_label else 0

  if is_training:
    ds = ds.repeat().shuffle(data_cfg.shuffle_buffer,
                             seed=data_cfg.seed + ctx.input_pipeline_id)
  else:
    ds = ds.take(data_cfg.num_eval_images)
    if ctx.num_input_pipelines > 1:
      ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)

  def to_triple(ex):
    # tfds ClassLabel is 0-based: shift to match the TFRecord convention.
    return (ex[image_key], tf.cast(ex['label'], tf.int32) + offset,
            tf.strings.join(['tfds:', ex['tfds_id']]))

  return ds, to_triple


# ---------------------------------------------------------------------------
# Validation of payloads.
# ---------------------------------------------------------------------------


# Offsets from the end of the 2-byte windows searched for the JPEG
# end-of-image marker (FF D9): encoders may append a few bytes after it.
_EOI_OFFSETS = tuple(range(2, 33))


def _looks_valid(image_bytes: tf.Tensor, allow_non_jpeg: bool) -> tf.Tensor:
  """JPEG magic at the start and an end-of-image marker near the end."""
  is_jpeg = tf.io.is_jpeg(image_bytes)
  length = tf.strings.length(image_bytes)
  # All 31 candidate windows in one vectorized substr: a handful of ops, as
  # this runs for every image.
  windows = tf.strings.substr(
      image_bytes, tf.maximum(length - tf.constant(_EOI_OFFSETS), 0),
      tf.constant([2] * len(_EOI_OFFSETS)))
  has_eoi = tf.reduce_any(tf.equal(windows, b'\xff\xd9'))
  ok = tf.logical_and(is_jpeg, has_eoi)
  if allow_non_jpeg:
    ok = tf.logical_or(ok, tf.logical_and(tf.logical_not(is_jpeg),
                                          length > 0))
  return ok


def _label_ok(label, num_classes: Optional[int]) -> tf.Tensor:
  """0 <= label < num_classes (no upper bound when num_classes is None)."""
  ok = label >= 0
  if num_classes is not None:
    ok = tf.logical_and(ok, label < num_classes)
  return ok


def _check_payload(image_bytes, label, source, allow_non_jpeg: bool,
                   num_classes: Optional[int] = None):
  """Raises an error naming the file for a bad image or label."""
  ok = _looks_valid(image_bytes, allow_non_jpeg)
  return [
      tf.debugging.Assert(ok, [
          'Corrupt, truncated or non-JPEG image in', source,
          '(set skip_corrupt to skip bad records in training)']),
      tf.debugging.Assert(_label_ok(label, num_classes), [
          'Label out of range in', source, ': 0-based label', label,
          'with num_classes', -1 if num_classes is None else num_classes,
          '(TFRecord labels are 1-based, image/class/label in '
          '1..num_classes: check --num_label_classes, or set skip_corrupt '
          'to skip such records in training)']),
  ]


def _log_invalid(valid, source):
  def log():
    tf.print('efficientnet_tpu: skipping corrupt image or label in', source)
    return valid
  return tf.cond(valid, lambda: valid, log)


# ---------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------


def _options(is_training: bool, private_threadpool_size: int) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = not is_training
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.parallel_batch = True
  if private_threadpool_size:
    options.threading.private_threadpool_size = private_threadpool_size
  return options


def build_input_fn(data_cfg: DataConfig,
                   image_size: int,
                   is_training: bool,
                   global_batch_size: int,
                   dtype: tf.DType = tf.float32,
                   private_threadpool_size: int = 0,
                   num_classes: Optional[int] = None) -> InputFn:
  """Returns `fn(input_context) -> tf.data.Dataset` of per-replica batches.

  Args:
    data_cfg: source ('tfrecord' or 'tfds:NAME'), data_dir, label offset,
      augmentation, resize method, shuffle buffer, skip_corrupt.
    image_size: output resolution S.
    is_training: training (random crop, shuffled, repeated) or eval (center
      crop, padded with a mask, exactly `num_eval_steps` batches).
    global_batch_size: batch over all replicas; must divide evenly.
    dtype: kept for compatibility; images are always uint8 (normalization
      and the cast to dtype happen on device).
    private_threadpool_size: 0 = TensorFlow's shared pool.
    num_classes: labels must be in [0, num_classes): an error naming the
      file, or (skip_corrupt, training) the record is skipped. None: only
      negative labels are refused.

  Raises:
    ConfigError: no matching files, tfds dataset not prepared, etc. Listing
      happens here, before any strategy call.
  """
  del dtype  # Normalization and the cast happen on device.
  if data_cfg.source == 'synthetic':
    raise ConfigError("--data: input_pipeline reads real data; use the "
                      "synthetic source for --data=synthetic")
  is_tfds = data_cfg.source.startswith('tfds:')
  files = None
  if is_tfds:
    _tfds_builder(data_cfg)  # Fail early, on the caller's thread.
  else:
    files = list_files(data_cfg.data_dir, is_training)
  steps = num_eval_steps(data_cfg, global_batch_size)
  resize_method = data_cfg.resize_method

  def input_fn(ctx: Optional[tf.distribute.InputContext] = None):
    ctx = ctx or tf.distribute.InputContext()
    batch = ctx.get_per_replica_batch_size(global_batch_size)
    if is_tfds:
      ds, decode = _tfds_records(data_cfg, is_training, ctx)
    else:
      ds = _tfrecord_records(data_cfg, files, is_training, ctx)
      decode = functools.partial(
          _parse_record,
          include_background_label=data_cfg.include_background_label)
    skip = is_training and data_cfg.skip_corrupt

    # One fused map per record (parse, check, crop-decode, flip, resize,
    # uint8): every extra tf.data function call costs per image.
    def train_map(*record):
      image_bytes, label, source = decode(*record)
      preprocess = lambda: preprocessing.preprocess_for_train(  # pylint: disable=g-long-lambda
          image_bytes, image_size, resize_method, data_cfg.augment,
          data_cfg.randaug_num_layers, data_cfg.randaug_magnitude,
          allow_non_jpeg=is_tfds)
      if not skip:
        with tf.control_dependencies(_check_payload(
            image_bytes, label, source, is_tfds, num_classes)):
          return {'images': preprocess(), 'labels': label}
      valid = tf.logical_and(_looks_valid(image_bytes, is_tfds),
                             _label_ok(label, num_classes))
      valid = _log_invalid(valid, source)
      image = tf.cond(valid, preprocess,
                      lambda: tf.zeros([image_size, image_size, 3], tf.uint8))
      return {'images': image, 'labels': label}, valid

    if is_training:
      ds = ds.map(train_map, num_parallel_calls=_AUTOTUNE,
                  deterministic=False)
      if skip:
        ds = ds.filter(lambda example, valid: valid)
        # Payloads that pass the header checks but still fail to decode.
        ds = ds.ignore_errors(log_warning=True)
      ds = ds.batch(batch, drop_remainder=True)
      if skip:
        ds = ds.map(lambda example, valid: example)
    else:
      ds = _eval_tail(ds, decode, ctx, batch, steps, image_size,
                      resize_method, is_tfds, data_cfg, num_classes)
    ds = ds.prefetch(_AUTOTUNE)
    return ds.with_options(_options(is_training, private_threadpool_size))

  return input_fn


def _eval_tail(ds: tf.data.Dataset, decode, ctx: tf.distribute.InputContext,
               batch: int, steps: int, image_size: int, resize_method: str,
               is_tfds: bool, data_cfg: DataConfig,
               num_classes: Optional[int] = None) -> tf.data.Dataset:
  """Decodes, pads with masked examples and batches exactly `steps` times."""
  num, index = ctx.num_input_pipelines, ctx.input_pipeline_id
  replicas_per_pipeline = ctx.num_replicas_in_sync // num
  # This pipeline's share of the examples when sharded by example.
  expected_real = len(range(index, data_cfg.num_eval_images, num))

  def eval_map(*record):
    image_bytes, label, source = decode(*record)
    with tf.control_dependencies(_check_payload(
        image_bytes, label, source, is_tfds, num_classes)):
      image = preprocessing.preprocess_for_eval(
          image_bytes, image_size, resize_method, allow_non_jpeg=is_tfds)
    return {'images': image, 'labels': label}

  ds = ds.map(eval_map, num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = data_lib.batch_eval_examples(ds, batch, replicas_per_pipeline, steps)

  where = data_cfg.data_dir if not is_tfds else data_cfg.source
  message = (f'Eval split in {where!r} has fewer records than '
             f'num_eval_images={data_cfg.num_eval_images}')

  def check_count(position, example):
    # Real examples come first: padding must not start before this
    # pipeline's share is exhausted.
    expected = tf.clip_by_value(expected_real - position * batch, 0, batch)
    ok = tf.reduce_sum(example['mask']) >= tf.cast(expected, tf.float32)
    with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
      return {k: tf.identity(v) for k, v in example.items()}

  return ds.enumerate().map(check_count)
