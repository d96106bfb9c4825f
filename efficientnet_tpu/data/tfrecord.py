"""TFRecord files: listing, record counts (cached) and reading.

The standard sharded layout (`train-*`, `validation-*` files of serialized
`Example`s, written by efficientnet-tpu-make-tfrecords). Training shards
files across input pipelines (each host reads only its own files). Evaluation
must see every image exactly once whatever the host count: with the record
count of every eval file known, each eval pipeline reads only its own files
(`eval_shards.plan`); otherwise each reads all validation files in a fixed
order and keeps every k-th record (before any decoding).

A corrupt TFRecord frame stops a file: with `skip_corrupt` training reads on
from the next file (the rest of the file counts as one bad record, see
`checks`); otherwise, and always for eval, it raises an error naming the
file. Record counts come from `dataset_info.json` beside the files, else
from the frame headers alone, cached per run (`record_counts`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import time
from typing import Dict, List, Optional

from absl import logging
import tensorflow as tf

from efficientnet_tpu import fileio
from efficientnet_tpu.config import ConfigError, DataConfig
from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.data import eval_shards
from efficientnet_tpu.data import stream

TRAIN_PATTERN = 'train-*'
EVAL_PATTERN = 'validation-*'

# TFRecord framing around each payload: length (8) + 2 CRCs (4 + 4).
_RECORD_OVERHEAD = 16
_READ_BUFFER_BYTES = 8 * 1024 * 1024
# Records byte-counted per function call. At ~110 KB per ImageNet record
# and a cycle of 64 files this buffers ~110 MB per host.
_RECORDS_PER_CALL = 16


def list_files(data_dir: str, is_training: bool) -> List[str]:
  """Sorted TFRecord shards of the split; one-line error if there are none."""
  pattern = TRAIN_PATTERN if is_training else EVAL_PATTERN
  try:
    # Listed, not globbed: data_dir is a name, never a pattern.
    files = fileio.list_matching(data_dir, pattern)
  except tf.errors.OpError as e:
    raise ConfigError('data_dir', f'could not list {data_dir!r} '
                      f'({type(e).__name__}: {e.message})') from None
  if not files:
    example = 'train-00000-of-01024' if is_training else (
        'validation-00000-of-00128')
    raise ConfigError(
        'data_dir', f'expected TFRecord files matching {pattern!r} (e.g. '
        f'{example}) in {data_dir!r}, found none (make them with '
        f'efficientnet-tpu-make-tfrecords)')
  return files


# ---------------------------------------------------------------------------
# Counting records.
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
            'data_dir', f'{filename}: {problem} at byte {pos} of {size} '
            '(rewrite the file, e.g. with efficientnet-tpu-make-tfrecords)')
  except (OSError, tf.errors.OpError) as e:
    raise ConfigError('data_dir', f'could not read {filename} '
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


COUNTS_FILE = 'record_counts.json'
_COUNTS_FORMAT = 1


def described_counts(files: List[str],
                     sizes: Optional[List[int]] = None) -> Dict[str, int]:
  """{file: record count} that `dataset_info.json` beside `files` gives.

  Only files it lists (by basename, in any split) with the byte size they
  have now: a shard rewritten since the data set was indexed is left out.

  Raises:
    ConfigError: a dataset_info.json is malformed (one line naming it).
  """
  if sizes is None:
    sizes = file_sizes(files)
  infos, out = {}, {}
  for f, size in zip(files, sizes):
    directory, name = os.path.split(f)
    if directory not in infos:
      try:
        info = dataset_info.read(directory)
      except ValueError as e:
        raise ConfigError('data_dir', str(e)) from None
      infos[directory] = {} if info is None else {
          n: fi for s in info.splits.values() for n, fi in s.files.items()}
    entry = infos[directory].get(name)
    if entry is not None and entry.bytes == size:
      out[f] = entry.records
  return out


def record_counts(files: List[str], cache_dir: Optional[str] = None,
                  create_cache_dir: bool = False,
                  tolerate_corrupt: bool = False) -> Dict[str, int]:
  """{file: record count} of TFRecord files, counted once and cached.

  Files that `dataset_info.json` in their directory describes (same name
  and byte size) take its count (`described_counts`): nothing is counted
  or cached for them. Others: counting ImageNet's validation split (before
  an evaluating run) or a host's training files (to place a resumed run in
  its input stream) means walking gigabytes, maybe on GCS, so the per-file
  counts are kept in `cache_dir/record_counts.json`,
  keyed by path and byte size. A file whose size differs from the cached
  one is counted again; the cache is then rewritten (atomically, so
  concurrent hosts never see half a file). The data dir is not used for the
  cache: it may be read-only (public buckets).

  Args:
    files: TFRecord paths.
    cache_dir: directory of the cache; None: no cache.
    create_cache_dir: create `cache_dir` if missing (a training run does so
      anyway); otherwise a missing directory means no cache is written.
    tolerate_corrupt: see `count_records`.

  Returns:
    The count of every file in `files`.

  Raises:
    ConfigError: a file is corrupt, truncated or unreadable, or a
      dataset_info.json is malformed (one line naming it).
  """
  sizes = file_sizes(files)
  counts = described_counts(files, sizes)
  if len(counts) == len(files):
    return counts
  path = os.path.join(cache_dir, COUNTS_FILE) if cache_dir else None
  cached = _read_counts(path) if path else {}
  todo = []
  for f, size in zip(files, sizes):
    if f in counts:
      continue
    entry = cached.get(f)
    if entry is not None and entry['bytes'] == size:
      counts[f] = entry['records']
    else:
      todo.append((f, size))
  if not todo:
    return {f: counts[f] for f in files}
  start = time.time()
  logging.info('Counting the records of %d files (once: the counts are '
               'cached in %s)', len(todo), path)
  new = count_records([f for f, _ in todo], [s for _, s in todo],
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


# ---------------------------------------------------------------------------
# Reading: (record, filename) pairs.
# ---------------------------------------------------------------------------


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


def _read_counted_file(filename: tf.Tensor, file_size: tf.Tensor,
                       take: tf.Tensor, whole: tf.Tensor) -> tf.data.Dataset:
  """The first `take` (record, filename) pairs of one eval file.

  A file read `whole` must end with its take-th record: the bytes read by
  then must be the file's size, checked as that record is read (always:
  it is a real eval example), so more records than its description or
  cached count says stop the eval with an error naming the file. Fewer
  are found by the eval's own check (`pipeline.batch_eval`).
  """
  def track(consumed, item):
    record, name = item
    consumed += tf.cast(tf.strings.length(record), tf.int64) + (
        _RECORD_OVERHEAD)
    return consumed, (record, name, consumed)

  def check(position, item):
    record, name, consumed = item
    more = tf.logical_and(
        tf.logical_and(whole, tf.equal(position, take - 1)),
        consumed < file_size)
    with tf.control_dependencies([tf.debugging.Assert(
        tf.logical_not(more),
        ['Eval file', name, 'holds more records than the', take,
         f'that {dataset_info.FILENAME} or the cached {COUNTS_FILE} gives '
         'it: describe the files again (efficientnet-tpu-make-tfrecords '
         '--index=DIR) or delete the cache from model_dir'])]):
      return tf.identity(record), name

  return (_read_tfrecord_file(filename, file_size).take(take)
          .scan(tf.constant(0, tf.int64), track).enumerate().map(check))


def parse_record(record: tf.Tensor, filename: tf.Tensor,
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


def read_records(data_cfg: DataConfig, files: List[str], is_training: bool,
                 ctx: tf.distribute.InputContext, start_step: int = 0,
                 global_batch_size: int = 0,
                 count_cache_dir: Optional[str] = None,
                 eval_plan: Optional[eval_shards.EvalShardPlan] = None,
                 eval_counts: Optional[List[int]] = None
                ) -> tf.data.Dataset:
  """This pipeline's share of `files`: (record, filename) pairs for eval;
  for training (position, (record, filename)) from the resumable stream,
  `position` counting this pipeline's records since the run's first step.
  Parse the records with `parse_record`. Eval with an `eval_plan` reads
  only this pipeline's files (sharded by file), else every file, keeping
  every k-th record (sharded by record). `eval_counts`: the record count
  the plan took for each file (its description or cached count): a file
  read whole must end after that many records, or the eval stops with an
  error naming it (a result over the wrong images is never reported)."""
  num, index = ctx.num_input_pipelines, ctx.input_pipeline_id
  strict = not (is_training and data_cfg.skip_corrupt)
  if not is_training and eval_plan is not None:
    mine = eval_plan.files[index]
    names = [files[i] for i, _ in mine]
    # The last file used may be taken in part (num_eval_images); the others
    # are read whole, and must hold no more records than counted.
    whole = [eval_counts is not None and n == eval_counts[i]
             for i, n in mine]
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(names, tf.string),
         tf.constant(file_sizes(names), tf.int64),
         tf.constant([n for _, n in mine], tf.int64),
         tf.constant(whole, tf.bool)))
    return ds.interleave(_read_counted_file,
                         cycle_length=max(1, min(16, len(names))),
                         num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True)
  if not is_training:
    # Same order on every host, so sharding by example is exact.
    ds = tf.data.Dataset.from_tensor_slices(
        (files, tf.constant(file_sizes(files), tf.int64)))
    ds = ds.interleave(_read_tfrecord_file,
                       cycle_length=min(16, len(files)),
                       num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)
    ds = ds.take(data_cfg.num_eval_images)
    if num > 1:
      ds = ds.shard(num, index)
    return ds

  if len(files) < num:
    raise ConfigError(
        'data_dir', f'expected at least as many {TRAIN_PATTERN!r} files as '
        f'input pipelines ({num}) in {data_cfg.data_dir!r}, found '
        f'{len(files)} (write more shards)')
  # Each host reads only its own files.
  files = files[index::num]
  sizes = file_sizes(files)
  if not any(sizes):
    raise ConfigError('data_dir', f'the {TRAIN_PATTERN!r} files of input '
                      f'pipeline {index} are all empty (e.g. {files[0]})')
  position = stream.pipeline_position(ctx, global_batch_size, start_step)
  epoch_length = None
  if position:
    # Resuming: the records per epoch place `position` in the stream.
    epoch_length = sum(record_counts(
        files, count_cache_dir, tolerate_corrupt=not strict).values())
  num_files = len(files)
  files, sizes = tf.constant(files), tf.constant(sizes, tf.int64)
  reader = functools.partial(_read_tfrecord_file, strict=strict)
  seed, deterministic = data_cfg.seed, data_cfg.deterministic

  def epoch(number):
    order = stream.epoch_order(seed, index, number, num_files)
    records = tf.data.Dataset.from_tensor_slices(
        (tf.gather(files, order), tf.gather(sizes, order))).interleave(
            reader, cycle_length=min(64, num_files),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    # The buffer's draws repeat each epoch, over a new file order.
    return records.shuffle(data_cfg.shuffle_buffer,
                           seed=seed * 7_919 + index)

  records = stream.resumable_stream(epoch, position, epoch_length)
  return records.enumerate(start=position)
