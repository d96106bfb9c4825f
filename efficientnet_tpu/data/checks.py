"""Validation of records before decoding: payload, label, declared pixels.

Without `skip_corrupt` (and always for eval) the first bad record raises an
error naming its file (`check_payload`). With it, training drops bad records
(`skip_reason`), counts them per file (`SkippedRecords`) and stops when too
many are bad (`skip_rate_check`).

Everything here is TensorFlow ops, no Python callback: on a TPU pod each
host's input pipeline runs inside that host's TensorFlow server, where a
`tf.py_function` has no Python to call. The counts live in lookup tables
created on the pipeline's own device and are read by the host loop.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, List, Optional, Set

from absl import logging
import tensorflow as tf

# Offsets from the end of the 2-byte windows searched for the JPEG
# end-of-image marker (FF D9): encoders may append a few bytes after it.
_EOI_OFFSETS = tuple(range(2, 33))
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# The last chunk of every PNG: zero length, type IEND, its fixed CRC.
_PNG_END = b'\0\0\0\0IEND\xaeB`\x82'

# With skip_corrupt: the bad fraction is checked from this many reads on,
# and this many bad reads in a row stop training (no valid record comes).
MIN_READS_FOR_FRACTION = 1000
MAX_BAD_READS_IN_A_ROW = 1000

# Why a record was skipped (the index is what the counts record per file).
SKIP_REASONS = (
    'corrupt, truncated or non-JPEG image',
    'label out of range',
    'image over --max_image_pixels',
    'empty record, or an unreadable TFRecord frame (the rest of the file '
    'is skipped)',
    'passes the header checks but fails to parse or decode',
)
DECODE_FAILED = 4


def _is_complete_png(image_bytes: tf.Tensor) -> tf.Tensor:
  """PNG signature at the start and the IEND chunk (with its CRC) at the
  very end: the lossless re-encodings the converter writes."""
  return tf.logical_and(
      tf.equal(tf.strings.substr(image_bytes, 0, 8), _PNG_SIGNATURE),
      tf.equal(tf.strings.substr(
          image_bytes, tf.maximum(tf.strings.length(image_bytes) - 12, 0),
          12), _PNG_END))


def _looks_valid(image_bytes: tf.Tensor, allow_non_jpeg: bool) -> tf.Tensor:
  """JPEG magic at the start and an end-of-image marker near the end, or a
  complete PNG (`_is_complete_png`)."""
  is_jpeg = tf.io.is_jpeg(image_bytes)
  length = tf.strings.length(image_bytes)
  # All 31 candidate windows in one vectorized substr: a handful of ops, as
  # this runs for every image.
  windows = tf.strings.substr(
      image_bytes, tf.maximum(length - tf.constant(_EOI_OFFSETS), 0),
      tf.constant([2] * len(_EOI_OFFSETS)))
  has_eoi = tf.reduce_any(tf.equal(windows, b'\xff\xd9'))
  ok = tf.logical_or(tf.logical_and(is_jpeg, has_eoi),
                     _is_complete_png(image_bytes))
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
      tf.equal(tf.strings.substr(image_bytes, 0, 8), _PNG_SIGNATURE),
      tf.strings.length(image_bytes) >= 24)
  return tf.case([(tf.io.is_jpeg(image_bytes), jpeg), (is_png, png)],
                 default=lambda: tf.constant(0, tf.int64), exclusive=True)


def _label_ok(label, num_classes: Optional[int]) -> tf.Tensor:
  """0 <= label < num_classes (no upper bound when num_classes is None)."""
  ok = label >= 0
  if num_classes is not None:
    ok = tf.logical_and(ok, label < num_classes)
  return ok


def check_payload(image_bytes, label, source, allow_non_jpeg: bool,
                  num_classes: Optional[int], max_pixels: int):
  """Assertions failing with an error naming the file for a bad image,
  label or pixel count; run them as control dependencies."""
  ok = _looks_valid(image_bytes, allow_non_jpeg)
  checks = [
      tf.debugging.Assert(ok, [
          'Corrupt, truncated or non-JPEG image in', source,
          '(set `skip_corrupt` to skip bad records in training)']),
      tf.debugging.Assert(_label_ok(label, num_classes), [
          'Label out of range in', source, ': 0-based label', label,
          'with num_classes', -1 if num_classes is None else num_classes,
          '(TFRecord labels are 1-based, image/class/label in '
          '1..num_classes: check `num_label_classes`, or set `skip_corrupt` '
          'to skip such records in training)']),
  ]
  with tf.control_dependencies(checks[:1]):
    pixels = header_pixels(image_bytes)
  checks.append(tf.debugging.Assert(pixels <= max_pixels, [
      'max_image_pixels: the image in', source, 'declares', pixels,
      'pixels, over the limit of', max_pixels, '(raise `max_image_pixels`, '
      'or set `skip_corrupt` to skip such records in training)']))
  return checks


# The key of a pipeline's total in its count table: never a source (a file
# name, or 'tfds:' and a record id).
_TOTAL_KEY = ''


class PipelineCounts:
  """One input pipeline's skip counts, in TF lookup tables on its device.

  Created inside the input function, so under the device the strategy
  builds that pipeline on (a pod host's CPU): the pipeline's ops update
  them there, and the host loop reads them remotely. Only the pipeline's
  sequential `scan` writes them (`skip_rate_check`), so a read-then-insert
  never races.
  """

  def __init__(self):
    # source -> records skipped; _TOTAL_KEY -> all records skipped.
    self.counts = tf.lookup.experimental.MutableHashTable(
        tf.string, tf.int64, default_value=0)
    # source -> index in SKIP_REASONS of its first skipped record.
    self.first_reason = tf.lookup.experimental.MutableHashTable(
        tf.string, tf.int64, default_value=-1)

  def add(self, source: tf.Tensor, reason: tf.Tensor) -> tf.Tensor:
    """Counts one skipped record of `source` for `reason` (graph ops);
    True once counted."""
    keys = tf.stack([source, tf.constant(_TOTAL_KEY)])
    old = self.counts.lookup(keys)

    def first():
      with tf.control_dependencies([self.first_reason.insert(
          source, tf.cast(reason, tf.int64))]):
        return tf.constant(True)

    first_counted = tf.cond(tf.equal(old[0], 0), first,
                            lambda: tf.constant(True))
    with tf.control_dependencies([self.counts.insert(keys, old + 1),
                                  first_counted]):
      return tf.constant(True)

  def total(self) -> tf.Tensor:
    return self.counts.lookup(tf.constant(_TOTAL_KEY))


class SkippedRecords:
  """Counts the records one training input function skipped, per file.

  Each call of the input function (one per input pipeline) adds its own
  `PipelineCounts`; the figures here are summed over them. `report` (each
  host loop) warns once per file, not once per record.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._pipelines: List[PipelineCounts] = []
    self._warned: Set[str] = set()
    self._reported_total = 0

  def new_pipeline(self) -> PipelineCounts:
    """Counts for a pipeline being built (call on its device)."""
    counts = PipelineCounts()
    with self._lock:
      self._pipelines.append(counts)
    return counts

  @property
  def total(self) -> int:
    """Records skipped by every pipeline (one table read each)."""
    with self._lock:
      pipelines = list(self._pipelines)
    return sum(int(p.total()) for p in pipelines)

  def _by_file(self):
    with self._lock:
      pipelines = list(self._pipelines)
    per_file, reasons = {}, {}
    for p in pipelines:
      keys, values = p.counts.export()
      for key, n in zip(keys.numpy(), values.numpy()):
        if key != _TOTAL_KEY.encode():
          source = key.decode('utf-8', 'replace')
          per_file[source] = per_file.get(source, 0) + int(n)
      keys, values = p.first_reason.export()
      for key, r in zip(keys.numpy(), values.numpy()):
        reasons.setdefault(key.decode('utf-8', 'replace'), int(r))
    return per_file, reasons

  @property
  def per_file(self) -> Dict[str, int]:
    """{source: records skipped}, sources with none left out."""
    return self._by_file()[0]

  def report(self) -> int:
    """The total; warns (absl logging) about files skipped from for the
    first time, naming the reason of their first skip."""
    total = self.total
    if total > self._reported_total:  # Only then can a file be new.
      per_file, reasons = self._by_file()
      for source in sorted(set(per_file) - self._warned):
        self._warned.add(source)
        logging.warning('Skipping bad training records in %s (first: %s); '
                        'each is counted in skipped_records.', source,
                        SKIP_REASONS[reasons.get(source, 0)])
      self._reported_total = total
    return total


@contextlib.contextmanager
def report_on_error(skipped: Optional[SkippedRecords]):
  """Around reads of a skip_corrupt input: an input error (the skip-rate
  checks stop the stream) first logs the files skipped from (`report`),
  which the error message points to."""
  try:
    yield
  except tf.errors.InvalidArgumentError:
    if skipped is not None:
      skipped.report()
    raise


def skip_reason(image_bytes, label, allow_non_jpeg: bool,
                num_classes: Optional[int], max_pixels: int) -> tf.Tensor:
  """Why to skip a record: its index in SKIP_REASONS, or -1 to keep it
  (int32)."""
  looks_valid = _looks_valid(image_bytes, allow_non_jpeg)
  pixels_ok = tf.cond(looks_valid,
                      lambda: header_pixels(image_bytes) <= max_pixels,
                      lambda: tf.constant(False))
  label_ok = _label_ok(label, num_classes)
  return tf.case([
      (tf.logical_and(pixels_ok, label_ok), lambda: -1),
      (tf.equal(tf.strings.length(image_bytes), 0), lambda: 3),
      (tf.logical_not(looks_valid), lambda: 0),
      (tf.logical_not(label_ok), lambda: 1),
  ], default=lambda: 2)


def skip_rate_check(max_fraction: float, counts: PipelineCounts):
  """A `scan` function over (example, source, reason) (reason: -1 for a
  valid record, see `skip_reason`) giving (example, valid).

  It counts each bad record in `counts`, and stops a stream with too many
  (more than `max_fraction` of those read, from MIN_READS_FOR_FRACTION
  reads on) or none valid for a while; the record it stops on is not
  counted. The scan is sequential: the counts are updated one record at a
  time.
  """

  def check(state, item):
    reads, bad, bad_in_a_row = state
    example, source, reason = item
    valid = reason < 0
    invalid = tf.cast(tf.logical_not(valid), tf.int64)
    reads, bad = reads + 1, bad + invalid
    bad_in_a_row = (bad_in_a_row + 1) * invalid
    # (With none valid yet, the second check gives the clearer message.)
    too_many = tf.reduce_all([
        reads >= MIN_READS_FOR_FRACTION, bad < reads,
        tf.cast(bad, tf.float64) > max_fraction * tf.cast(reads, tf.float64)])
    checks = [
        tf.debugging.Assert(tf.logical_not(too_many), [
            'max_corrupt_fraction:', bad, 'of the', reads,
            'training records read by this input pipeline were bad, more '
            'than', max_fraction, '(the log names the files; fix them or '
            'raise `max_corrupt_fraction`)']),
        tf.debugging.Assert(bad_in_a_row < MAX_BAD_READS_IN_A_ROW, [
            'skip_corrupt: no valid training record in the last',
            bad_in_a_row, 'records read (the log names the files; check '
            '`data_dir`)']),
    ]
    # Counted once the checks pass: a failed call leaves the state as it
    # was, and the readers ahead (prefetch) may call again and fail again
    # on the records after it; none of those is counted.
    with tf.control_dependencies(checks):
      counted = tf.cond(valid, lambda: tf.constant(True),
                        lambda: counts.add(source, reason))
    with tf.control_dependencies([counted]):
      return (reads, bad, bad_in_a_row), (example, tf.identity(valid))

  zero = tf.constant(0, tf.int64)
  return (zero, zero, zero), check
