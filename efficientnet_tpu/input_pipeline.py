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

import collections
import concurrent.futures
import functools
import os
import threading
from typing import Callable, Dict, List, Optional

from absl import logging

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


def _crc32c_table() -> List[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C; pure Python, only used on 8-byte headers."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _count_file_records(filename: str, size: int,
                        tolerate_corrupt: bool = False) -> int:
  """Walks the frame headers of one file, seeking past the payloads.

  A frame is: uint64 length, uint32 masked CRC of the length, payload,
  uint32 CRC of the payload. The length CRC catches a corrupt header, and
  every frame must end within the file, so a truncated file is caught too.
  Payload CRCs are not checked here: the eval pipeline checks them when it
  reads the records. With `tolerate_corrupt` a bad frame ends the count
  with one more record: the empty record the lenient training reader
  yields in place of the rest of the file.
  """
  # Local files through Python's unbuffered IO: a seek skips the payload
  # without reading it. GFile (GCS, ...) reads through a 512 KiB buffer.
  local = '://' not in filename
  opener = (lambda f: open(f, 'rb', buffering=0)) if local else (
      lambda f: tf.io.gfile.GFile(f, 'rb'))
  count, pos = 0, 0
  try:
    with opener(filename) as fh:
      while pos < size:
        fh.seek(pos)
        header = fh.read(12)
        length = int.from_bytes(header[:8], 'little')
        length_crc = int.from_bytes(header[8:], 'little')
        if len(header) < 12 or _masked_crc32c(header[:8]) != length_crc:
          problem = 'corrupt or truncated TFRecord frame header'
        elif pos + length + 16 > size:
          problem = (f'TFRecord frame of {length} bytes past the end of the '
                     'file (truncated?)')
        else:
          count, pos = count + 1, pos + length + 16
          continue
        if tolerate_corrupt:
          return count + 1
        raise ConfigError(
            f'--data_dir: {filename}: {problem} at byte {pos} of {size} '
            '(rewrite the file, e.g. with efficientnet-tpu-make-tfrecords)')
  except (OSError, tf.errors.OpError) as e:
    raise ConfigError(f'--data_dir: could not read {filename} '
                      f'({type(e).__name__}: {e})') from None
  return count


def count_records(files: List[str], sizes: Optional[List[int]] = None,
                  num_threads: int = 32,
                  tolerate_corrupt: bool = False) -> List[int]:
  """Records in each TFRecord file, from the frame headers alone.

  Files are walked in parallel; only the 12-byte headers are read (payloads
  are skipped with a seek), several times faster than reading the records
  with tf.data.

  Args:
    files: TFRecord file paths (local or any tf.io.gfile filesystem).
    sizes: their byte sizes if already known (`file_sizes`), else stat'ed.
    num_threads: files walked at once.
    tolerate_corrupt: count a bad frame as one record ending its file (what
      the skip_corrupt reader yields) instead of raising.

  Returns:
    The record count of each file, in the order of `files`.

  Raises:
    ConfigError: one line naming the first file with a corrupt or truncated
      frame, or one that cannot be read.
  """
  if sizes is None:
    sizes = file_sizes(files, num_threads)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return list(pool.map(
        functools.partial(_count_file_records,
                          tolerate_corrupt=tolerate_corrupt), files, sizes))


def _read_tfrecord_file(filename: tf.Tensor, file_size: tf.Tensor,
                        strict: bool = True) -> tf.data.Dataset:
  """(record, filename) pairs of one file.

  A corrupt TFRecord frame raises a DataLossError that does not name the
  file. So reading stops at the first bad frame (`ignore_errors`) and the
  bytes consumed must add up to the file size: otherwise `strict` raises an
  error naming the file, and the lenient reader (skip_corrupt) yields one
  empty record in place of the unreadable rest, which the checks downstream
  count as one bad record (so a stream of broken files is bounded too).
  The bytes are counted per batch of records (one scan call per batch,
  `unbatch` restores the order) rather than by a scan and a filter call per
  record. Parsing stays per record, in the main map: a malformed Example
  then fails (or, with skip_corrupt, is dropped) alone.
  """
  records = tf.data.TFRecordDataset(filename, buffer_size=_READ_BUFFER_BYTES)
  items = tf.data.Dataset.zip(
      (records.ignore_errors().batch(_RECORDS_PER_CALL),
       tf.data.Dataset.from_tensors(False).repeat()))
  # An empty end marker checks the byte count.
  items = items.concatenate(
      tf.data.Dataset.from_tensors((tf.constant([], tf.string), True)))

  def count_bytes(consumed, item):
    batch, is_end = item
    size = tf.reduce_sum(
        tf.cast(tf.strings.length(batch), tf.int64) + _RECORD_OVERHEAD)
    short = tf.logical_and(is_end, tf.not_equal(consumed, file_size))
    if strict:
      check = tf.debugging.Assert(tf.logical_not(short), [
          'Corrupt or truncated TFRecord in', filename,
          'unreadable after byte', consumed, 'of', file_size,
          '(set skip_corrupt to skip bad records in training)'])
      with tf.control_dependencies([check]):
        batch = tf.identity(batch)
    else:
      batch = tf.cond(short, lambda: tf.constant([b'']), lambda: batch)
    return consumed + size, (batch, tf.fill(tf.shape(batch), filename))

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
                      is_training: bool, ctx: tf.distribute.InputContext,
                      start_step: int = 0,
                      global_batch_size: int = 0,
                      count_cache_dir: Optional[str] = None
                     ) -> tf.data.Dataset:
  """This pipeline's share: (record, filename) pairs for eval; for training
  (position, (record, filename)) from the resumable stream, `position`
  counting this pipeline's records since the run's first step."""
  num, index = ctx.num_input_pipelines, ctx.input_pipeline_id
  strict = not (is_training and data_cfg.skip_corrupt)
  if not is_training:
    # Same order on every host, so sharding by example is exact.
    ds = tf.data.Dataset.from_tensor_slices(
        (files, tf.constant(file_sizes(files), tf.int64)))
    ds = ds.interleave(_read_tfrecord_file,
                       cycle_length=min(16, len(files)),
                       num_parallel_calls=_AUTOTUNE, deterministic=True)
    ds = ds.take(data_cfg.num_eval_images)
    if num > 1:
      ds = ds.shard(num, index)
    return ds

  if len(files) < num:
    raise ConfigError(
        f'--data_dir: expected at least as many {TRAIN_PATTERN!r} files as '
        f'input pipelines ({num}) in {data_cfg.data_dir!r}, found '
        f'{len(files)} (write more shards)')
  # Each host reads only its own files.
  files = files[index::num]
  sizes = file_sizes(files)
  if not any(sizes):
    raise ConfigError(f'--data_dir: the {TRAIN_PATTERN!r} files of input '
                      f'pipeline {index} are all empty (e.g. {files[0]})')
  position = data_lib.pipeline_position(ctx, global_batch_size, start_step)
  epoch_length = None
  if position:
    # Resuming: the records per epoch place `position` in the stream.
    epoch_length = sum(data_lib.record_counts(
        files, count_cache_dir, tolerate_corrupt=not strict).values())
  num_files = len(files)
  files, sizes = tf.constant(files), tf.constant(sizes, tf.int64)
  reader = functools.partial(_read_tfrecord_file, strict=strict)
  seed, deterministic = data_cfg.seed, data_cfg.deterministic

  def epoch(number):
    order = data_lib.epoch_order(seed, index, number, num_files)
    records = tf.data.Dataset.from_tensor_slices(
        (tf.gather(files, order), tf.gather(sizes, order))).interleave(
            reader, cycle_length=min(64, num_files),
            num_parallel_calls=_AUTOTUNE, deterministic=deterministic)
    # The buffer's draws repeat each epoch, over a new file order.
    return records.shuffle(data_cfg.shuffle_buffer,
                           seed=seed * 7_919 + index)

  stream = data_lib.resumable_stream(epoch, position, epoch_length)
  return stream.enumerate(start=position)


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
                  ctx: tf.distribute.InputContext, start_step: int = 0,
                  global_batch_size: int = 0) -> tf.data.Dataset:
  """Like `_tfrecord_records`, from a prepared tfds dataset.

  tfds readers cannot be positioned: a resumed run reshuffles with seeds
  derived from the step, so it continues with new batches rather than the
  run's first ones, but not with the exact stream of an uninterrupted run.
  """
  tfds, builder = _tfds_builder(data_cfg)
  split = _tfds_split(builder, is_training, data_cfg)
  features = builder.info.features
  image_key = 'image' if 'image' in features else None
  if image_key is None or 'label' not in features:
    raise ConfigError(f'--data={data_cfg.source}: expected image and label '
                      f'features, found {", ".join(features.keys())}')
  position = data_lib.pipeline_position(ctx, global_batch_size, start_step)
  seed = data_cfg.seed * 7_919 + ctx.input_pipeline_id + 1_000_003 * position
  read_config = tfds.ReadConfig(
      input_context=ctx if is_training else None,
      shuffle_seed=seed % (1 << 31),
      add_tfds_id=True, try_autocache=False,
      interleave_cycle_length=16)
  ds = builder.as_dataset(
      split=split, shuffle_files=is_training, read_config=read_config,
      decoders={image_key: tfds.decode.SkipDecoding()})
  offset = 1 if data_cfg.include_background_label else 0

  if is_training:
    ds = ds.repeat().shuffle(data_cfg.shuffle_buffer, seed=seed % (1 << 31))
    ds = ds.enumerate(start=position)
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

# With skip_corrupt: the bad fraction is checked from this many reads on,
# and this many bad reads in a row stop training (no valid record comes).
MIN_READS_FOR_FRACTION = 1000
MAX_BAD_READS_IN_A_ROW = 1000

# Why a record was skipped (the index is what the graph passes to Python).
SKIP_REASONS = (
    'corrupt, truncated or non-JPEG image',
    'label out of range',
    'image over --max_image_pixels',
    'empty record, or an unreadable TFRecord frame (the rest of the file '
    'is skipped)',
)


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


def _big_endian_u32(image_bytes: tf.Tensor, offset: int) -> tf.Tensor:
  parts = tf.cast(tf.io.decode_raw(
      tf.strings.substr(image_bytes, offset, 4), tf.uint8), tf.int64)
  return ((parts[0] * 256 + parts[1]) * 256 + parts[2]) * 256 + parts[3]


def header_pixels(image_bytes: tf.Tensor) -> tf.Tensor:
  """Height x width declared by a JPEG or PNG header, int64; 0 otherwise.

  Reads only the header (JPEG: the frame header via `extract_jpeg_shape`;
  PNG: the IHDR chunk), so an oversized image is refused before any
  memory is spent decoding it.
  """
  def jpeg():
    shape = tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64)
    return shape[0] * shape[1]

  def png():
    return (_big_endian_u32(image_bytes, 16) *
            _big_endian_u32(image_bytes, 20))

  is_png = tf.logical_and(
      tf.equal(tf.strings.substr(image_bytes, 0, 8), b'\x89PNG\r\n\x1a\n'),
      tf.strings.length(image_bytes) >= 24)
  return tf.case([(tf.io.is_jpeg(image_bytes), jpeg), (is_png, png)],
                 default=lambda: tf.constant(0, tf.int64), exclusive=True)


def _label_ok(label, num_classes: Optional[int]) -> tf.Tensor:
  """0 <= label < num_classes (no upper bound when num_classes is None)."""
  ok = label >= 0
  if num_classes is not None:
    ok = tf.logical_and(ok, label < num_classes)
  return ok


def _check_payload(image_bytes, label, source, allow_non_jpeg: bool,
                   num_classes: Optional[int], max_pixels: int):
  """Raises an error naming the file for a bad image or label."""
  ok = _looks_valid(image_bytes, allow_non_jpeg)
  checks = [
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
  with tf.control_dependencies(checks[:1]):
    pixels = header_pixels(image_bytes)
  checks.append(tf.debugging.Assert(pixels <= max_pixels, [
      '--max_image_pixels: the image in', source, 'declares', pixels,
      'pixels, over the limit of', max_pixels, '(raise --max_image_pixels, '
      'or set --skip_corrupt to skip such records in training)']))
  return checks


class SkippedRecords:
  """Counts the records one training input function skipped, per file.

  Thread-safe (tf.data calls `add` from its threads); warns once per file,
  not once per record.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.per_file: Dict[str, int] = collections.Counter()

  def add(self, source: str, reason: int) -> None:
    with self._lock:
      first = source not in self.per_file
      self.per_file[source] += 1
    if first:
      logging.warning('Skipping bad training records in %s (first: %s); '
                      'each is counted in skipped_records.', source,
                      SKIP_REASONS[reason])

  @property
  def total(self) -> int:
    with self._lock:
      return sum(self.per_file.values())


def _validity(image_bytes, label, source, allow_non_jpeg: bool,
              num_classes: Optional[int], max_pixels: int,
              skipped: SkippedRecords) -> tf.Tensor:
  """Whether to keep a record; reports a skipped one to `skipped`."""
  looks_valid = _looks_valid(image_bytes, allow_non_jpeg)
  pixels_ok = tf.cond(looks_valid,
                      lambda: header_pixels(image_bytes) <= max_pixels,
                      lambda: tf.constant(False))
  label_ok = _label_ok(label, num_classes)
  valid = tf.logical_and(pixels_ok, label_ok)

  def report():
    reason = tf.case([
        (tf.equal(tf.strings.length(image_bytes), 0), lambda: 3),
        (tf.logical_not(looks_valid), lambda: 0),
        (tf.logical_not(label_ok), lambda: 1),
    ], default=lambda: 2)

    def add(source_value, reason_value):
      skipped.add(source_value.numpy().decode('utf-8', 'replace'),
                  int(reason_value))
      return False

    return tf.py_function(add, [source, reason], tf.bool)

  return tf.cond(valid, lambda: valid, report)


def _check_skip_rate(max_fraction: float):
  """A `scan` function over (example, valid) that stops a stream with too
  many bad records (more than `max_fraction` of those read, from
  MIN_READS_FOR_FRACTION reads on) or none valid for a while."""

  def check(state, item):
    reads, bad, bad_in_a_row = state
    example, valid = item
    invalid = tf.cast(tf.logical_not(valid), tf.int64)
    reads, bad = reads + 1, bad + invalid
    bad_in_a_row = (bad_in_a_row + 1) * invalid
    # (With none valid yet, the second check gives the clearer message.)
    too_many = tf.reduce_all([
        reads >= MIN_READS_FOR_FRACTION, bad < reads,
        tf.cast(bad, tf.float64) > max_fraction * tf.cast(reads, tf.float64)])
    checks = [
        tf.debugging.Assert(tf.logical_not(too_many), [
            '--max_corrupt_fraction:', bad, 'of the', reads,
            'training records read by this input pipeline were bad, more '
            'than', max_fraction, '(the log names the files; fix them or '
            'raise --max_corrupt_fraction)']),
        tf.debugging.Assert(bad_in_a_row < MAX_BAD_READS_IN_A_ROW, [
            '--skip_corrupt: no valid training record in the last',
            bad_in_a_row, 'records read (the log names the files; check '
            '--data_dir)']),
    ]
    with tf.control_dependencies(checks):
      return (reads, bad, bad_in_a_row), (example, tf.identity(valid))

  zero = tf.constant(0, tf.int64)
  return (zero, zero, zero), check


# ---------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------


def _options(is_training: bool, private_threadpool_size: int,
             deterministic: bool = False) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic or not is_training
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
                   num_classes: Optional[int] = None,
                   start_step: int = 0,
                   count_cache_dir: Optional[str] = None) -> InputFn:
  """Returns `fn(input_context) -> tf.data.Dataset` of per-replica batches.

  Args:
    data_cfg: source ('tfrecord' or 'tfds:NAME'), data_dir, label offset,
      augmentation, resize method, shuffle buffer, skip_corrupt and its
      limits, pixel limit, determinism.
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
    start_step: training resumes after this many steps: the stream
      continues where it stopped (see `data.resumable_stream`).
    count_cache_dir: where the record counts that place a resumed stream
      are cached (`data.record_counts`); None: counted on every resume.

  Returns:
    The input function. With skip_corrupt in training, its `skipped`
    attribute (`SkippedRecords`) counts the records skipped.

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
  max_pixels = data_cfg.max_image_pixels
  skip = is_training and data_cfg.skip_corrupt
  skipped = SkippedRecords() if skip else None

  def input_fn(ctx: Optional[tf.distribute.InputContext] = None):
    ctx = ctx or tf.distribute.InputContext()
    batch = ctx.get_per_replica_batch_size(global_batch_size)
    if is_tfds:
      ds, decode = _tfds_records(data_cfg, is_training, ctx, start_step,
                                 global_batch_size)
    else:
      ds = _tfrecord_records(data_cfg, files, is_training, ctx, start_step,
                             global_batch_size, count_cache_dir)
      decode = functools.partial(
          _parse_record,
          include_background_label=data_cfg.include_background_label)
    index = ctx.input_pipeline_id

    # One fused map per record (parse, check, crop-decode, flip, resize,
    # uint8): every extra tf.data function call costs per image.
    def train_map(position, item):
      image_bytes, label, source = (decode(*item) if isinstance(item, tuple)
                                    else decode(item))
      seed = data_lib.element_seed(data_cfg.seed, index, position)
      preprocess = lambda: preprocessing.preprocess_for_train(  # pylint: disable=g-long-lambda
          image_bytes, image_size, resize_method, data_cfg.augment,
          data_cfg.randaug_num_layers, data_cfg.randaug_magnitude,
          allow_non_jpeg=is_tfds, seed=seed)
      if not skip:
        with tf.control_dependencies(_check_payload(
            image_bytes, label, source, is_tfds, num_classes, max_pixels)):
          return {'images': preprocess(), 'labels': label}
      valid = _validity(image_bytes, label, source, is_tfds, num_classes,
                        max_pixels, skipped)
      image = tf.cond(valid, preprocess,
                      lambda: tf.zeros([image_size, image_size, 3], tf.uint8))
      return {'images': image, 'labels': label}, valid

    if is_training:
      ds = ds.map(train_map, num_parallel_calls=_AUTOTUNE,
                  deterministic=data_cfg.deterministic)
      if skip:
        # Payloads that pass the header checks but still fail to decode are
        # dropped with TF's warning (not counted: the error has no file).
        ds = ds.ignore_errors(log_warning=True)
        initial, check = _check_skip_rate(data_cfg.max_corrupt_fraction)
        ds = ds.scan(initial, check)
        ds = ds.filter(lambda example, valid: valid)
      ds = ds.batch(batch, drop_remainder=True)
      if skip:
        ds = ds.map(lambda example, valid: example)  # Once per batch.
    else:
      ds = _eval_tail(ds, decode, ctx, batch, steps, image_size,
                      resize_method, is_tfds, data_cfg, num_classes)
    ds = ds.prefetch(_AUTOTUNE)
    return ds.with_options(_options(is_training, private_threadpool_size,
                                    data_cfg.deterministic))

  input_fn.skipped = skipped
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
        image_bytes, label, source, is_tfds, num_classes,
        data_cfg.max_image_pixels)):
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
