"""Validation of records before decoding: payload, label, declared pixels.

Without `skip_corrupt` (and always for eval) the first bad record raises an
error naming its file (`check_payload`). With it, training drops bad records
(`validity`), counts them per file (`SkippedRecords`) and stops when too
many are bad (`skip_rate_check`).
"""

from __future__ import annotations

import collections
import threading
from typing import Dict, Optional

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

# Why a record was skipped (the index is what the graph passes to Python).
SKIP_REASONS = (
    'corrupt, truncated or non-JPEG image',
    'label out of range',
    'image over --max_image_pixels',
    'empty record, or an unreadable TFRecord frame (the rest of the file '
    'is skipped)',
    'passes the header checks but fails to parse or decode',
)
DECODE_FAILED = 4


def report_skip(source: tf.Tensor, reason, skipped: 'SkippedRecords'
                ) -> tf.Tensor:
  """Reports one skipped record to `skipped` (a py_function); False."""

  def add(source_value, reason_value):
    skipped.add(source_value.numpy().decode('utf-8', 'replace'),
                int(reason_value))
    return False

  return tf.py_function(add, [source, reason], tf.bool)


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


def validity(image_bytes, label, source, allow_non_jpeg: bool,
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
    return report_skip(source, reason, skipped)

  return tf.cond(valid, lambda: valid, report)


def skip_rate_check(max_fraction: float):
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
            'max_corrupt_fraction:', bad, 'of the', reads,
            'training records read by this input pipeline were bad, more '
            'than', max_fraction, '(the log names the files; fix them or '
            'raise `max_corrupt_fraction`)']),
        tf.debugging.Assert(bad_in_a_row < MAX_BAD_READS_IN_A_ROW, [
            'skip_corrupt: no valid training record in the last',
            bad_in_a_row, 'records read (the log names the files; check '
            '`data_dir`)']),
    ]
    with tf.control_dependencies(checks):
      return (reads, bad, bad_in_a_row), (example, tf.identity(valid))

  zero = tf.constant(0, tf.int64)
  return (zero, zero, zero), check
