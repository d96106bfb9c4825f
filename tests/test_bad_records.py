"""Bad training records: counted, bounded, and refused by size before decode.

References: the bad records each test writes (which files, how many, what
is wrong with them) and PIL for image sizes.
"""

import io
import logging
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from efficientnet_tpu import experiment
from efficientnet_tpu import main as main_lib
from efficientnet_tpu.config import DataConfig
from efficientnet_tpu.data import checks
from efficientnet_tpu.data import pipeline as data_pipeline
from tests.helpers import small_config, strategy_for
from tests.test_input_pipeline import _example, _jpeg, write_split

SIZE = 16


def _write(path, payloads_and_labels):
  with tf.io.TFRecordWriter(str(path)) as w:
    for payload, label in payloads_and_labels:
      w.write(_example(payload, label))


def _train(d, n_batches, batch=4, **kw):
  """Runs a skip_corrupt training pipeline for n_batches; returns it."""
  kw.setdefault('skip_corrupt', True)
  cfg = DataConfig(source='tfrecord', data_dir=str(d), shuffle_buffer=8,
                   num_train_images=100, **kw)
  train = data_pipeline.build_input(cfg, SIZE, True, batch, num_classes=5)
  for _ in train.fn(None).take(n_batches):
    pass
  return train


def test_skips_are_counted_per_file_and_warned_once(tmp_path, caplog):
  good = [(_jpeg((10 * i, 0, 0)), i % 5 + 1) for i in range(8)]
  _write(tmp_path / 'train-00000-of-00003', good)
  bad_payload = tmp_path / 'train-00001-of-00003'
  _write(bad_payload, good[:3] + [(b'GIF89a not a jpeg', 1),
                                  (_jpeg((1, 2, 3))[:-100], 2)])
  bad_label = tmp_path / 'train-00002-of-00003'
  _write(bad_label, good[:4] + [(_jpeg((4, 5, 6)), 6)])
  train = _train(tmp_path, 40)  # 160 examples: about 9 epochs of 18 good.
  with caplog.at_level(logging.WARNING):
    total = train.skipped.report()  # What the trainer does after each loop.
    assert train.skipped.report() == total  # Warned already: no new lines.
  per_file = train.skipped.per_file
  assert set(per_file) == {str(bad_payload), str(bad_label)}
  # Each epoch reads every bad record once: 2 : 1 between the files, up to
  # the epoch the pipeline is reading ahead in.
  epochs = per_file[str(bad_label)]
  assert epochs >= 8 and abs(per_file[str(bad_payload)] - 2 * epochs) <= 2
  assert total == train.skipped.total == sum(per_file.values())
  warnings = [r.getMessage() for r in caplog.records
              if 'Skipping bad training records' in r.getMessage()]
  assert len(warnings) == 2, warnings  # Once per file, not per record.
  assert any(str(bad_label) in w and 'label out of range' in w
             for w in warnings)


def test_a_stream_of_only_bad_records_stops_instead_of_hanging(tmp_path):
  """Every record is bad (non-JPEG, or files cut short by a corrupt frame):
  a one-line error after a bounded number of reads."""
  _write(tmp_path / 'train-00000-of-00002', [(b'not an image', 1)] * 3)
  data = open(_jpeg_file(tmp_path / 'train-00001-of-00002'), 'rb').read()
  open(tmp_path / 'train-00001-of-00002', 'wb').write(data[:-7])
  with pytest.raises(tf.errors.InvalidArgumentError) as e:
    _train(tmp_path, 10)
  line = main_lib.input_error_line(e.value)
  assert line.startswith('--skip_corrupt: no valid training record in the '
                         f'last {checks.MAX_BAD_READS_IN_A_ROW}')


def _bad_header_jpeg():
  """JPEG magic and end marker intact, frame header zeroed: passes the
  cheap checks, fails in the decoder."""
  data = bytearray(_jpeg((9, 9, 9)))
  sof = data.find(b'\xff\xc0')
  data[sof + 2:sof + 12] = bytes(10)
  return bytes(data)


def test_records_that_fail_to_decode_are_counted_and_bounded(tmp_path):
  """Payloads past the header checks that fail in the decoder are counted
  per file (not just dropped), and a stream of only those ends on one
  line instead of spinning."""
  _write(tmp_path / 'train-00000-of-00002',
         [(_jpeg((i, 0, 0)), 1) for i in range(6)])
  bad = tmp_path / 'train-00001-of-00002'
  _write(bad, [(_bad_header_jpeg(), 2)] * 3)
  train = _train(tmp_path, 10)
  assert train.skipped.per_file[str(bad)] >= 3
  os.remove(tmp_path / 'train-00000-of-00002')
  os.rename(bad, tmp_path / 'train-00000-of-00001')
  with pytest.raises(tf.errors.InvalidArgumentError) as e:
    _train(tmp_path, 10)
  assert main_lib.input_error_line(e.value).startswith(
      '--skip_corrupt: no valid training record in the last')


def _jpeg_file(path):
  _write(path, [(_jpeg((1, 1, 1)), 1)])
  return path


@pytest.mark.parametrize('limit,fails', [(0.05, True), (0.2, False)])
def test_bad_fraction_over_the_limit_stops_training(tmp_path, limit, fails):
  """1 record in 10 is bad: over --max_corrupt_fraction=0.05 training stops
  once MIN_READS_FOR_FRACTION records were read; 0.2 lets it run."""
  records = [(_jpeg((i, 0, 0)), 1) for i in range(9)] + [(b'bad', 1)]
  _write(tmp_path / 'train-00000-of-00001', records)
  reads = checks.MIN_READS_FOR_FRACTION
  batches = int(reads * 1.2 * 0.9) // 10  # Past the first check.
  if fails:
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
      _train(tmp_path, batches, batch=10, max_corrupt_fraction=limit)
    line = main_lib.input_error_line(e.value)
    assert line.startswith('--max_corrupt_fraction: ') and '\n' not in line
  else:
    train = _train(tmp_path, batches, batch=10, max_corrupt_fraction=limit)
    assert train.skipped.total >= reads // 10


def _png(h, w):
  out = io.BytesIO()
  Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(out, 'PNG')
  return out.getvalue()


def test_header_pixels_reads_jpeg_and_png_headers():
  for h, w in ((1, 1), (20, 26), (333, 77)):
    for encoded in (_jpeg((0, 0, 0), h, w), _png(h, w)):
      assert int(checks.header_pixels(tf.constant(encoded))) == h * w
  assert int(checks.header_pixels(tf.constant(b'GIF89a'))) == 0


def test_pixel_limit_refuses_or_skips_before_decoding(tmp_path):
  write_split(str(tmp_path), 'train', [6], label_fn=lambda f, j: j % 5 + 1)
  big = tmp_path / 'train-00001-of-00002'
  os.rename(tmp_path / 'train-00000-of-00001',
            tmp_path / 'train-00000-of-00002')
  _write(big, [(_jpeg((9, 9, 9), 64, 80), 2)])  # 5120 pixels.
  with pytest.raises(tf.errors.InvalidArgumentError) as e:
    _train(tmp_path, 5, skip_corrupt=False, max_image_pixels=5000)
  line = main_lib.input_error_line(e.value)
  assert line.startswith(f'--max_image_pixels: the image in {big} declares '
                         '5120 pixels, over the limit of 5000'), line
  train = _train(tmp_path, 5, max_image_pixels=5000)
  assert train.skipped.per_file[str(big)] >= 1
  # At the limit the image is used.
  train = _train(tmp_path, 5, max_image_pixels=5120)
  assert train.skipped.total == 0


def _plant_every_reason(d):
  """Five files of 2 bad records each, one reason per file; returns
  {file: words of its reason}."""
  planted = {
      'non-JPEG': (b'GIF89a not a jpeg', 1),
      'label out of range': (_jpeg((4, 5, 6)), 9),  # 5 classes.
      'max_image_pixels': (_jpeg((9, 9, 9), 64, 80), 1),  # 5120 > 5000.
      'empty record': (b'', 1),
      'fails to parse or decode': (_bad_header_jpeg(), 1),
  }
  out = {}
  for i, (words, record) in enumerate(planted.items()):
    path = d / f'train-{i:05d}-of-{len(planted):05d}'
    _write(path, [record] * 2)
    out[str(path)] = words
  return out


def test_every_bad_record_is_counted_once_under_its_file(tmp_path, caplog):
  """Only bad records (2 per file, one reason per file): the stream stops
  on the MAX_BAD_READS_IN_A_ROW-th, the last of a whole number of epochs
  of the planted records; every bad record read before it is counted once
  under its file, whatever the readers ahead do after the stop; `report`
  (what the trainer calls) warns once per file with its reason."""
  planted = _plant_every_reason(tmp_path)
  train = data_pipeline.build_input(
      DataConfig(source='tfrecord', data_dir=str(tmp_path), shuffle_buffer=8,
                 num_train_images=100, skip_corrupt=True, deterministic=True,
                 max_image_pixels=5000), SIZE, True, 4, num_classes=5)
  with pytest.raises(tf.errors.InvalidArgumentError):
    for _ in train.fn(None):
      pass
  # The record the stream stops on is not counted: the one before it is
  # the last of epoch 99 of 100, each reading the 10 records once.
  counted = checks.MAX_BAD_READS_IN_A_ROW - 1
  epochs = checks.MAX_BAD_READS_IN_A_ROW // 10
  assert train.skipped.total == counted
  per_file = train.skipped.per_file
  assert set(per_file) == set(planted)
  assert sorted(per_file.values()) == [2 * epochs - 1] + [2 * epochs] * 4
  with caplog.at_level(logging.WARNING):
    assert train.skipped.report() == counted
  warnings = [r.getMessage() for r in caplog.records
              if 'Skipping bad training records' in r.getMessage()]
  assert len(warnings) == len(planted), warnings
  for path, words in planted.items():
    assert any(f'in {path} (first: ' in w and words in w for w in warnings), (
        path, words, warnings)


def test_training_stopped_by_bad_records_logs_the_files(tmp_path, caplog):
  """The trainer's stop on a stream of bad records: the error says the
  log names the files, and it does (the counts are read on the host)."""
  data = tmp_path / 'data'
  data.mkdir()
  bad = data / 'train-00000-of-00001'
  _write(bad, [(b'not an image', 1)] * 3)
  cfg = small_config(tmp_path / 'run', data=dict(
      data='tfrecord', data_dir=str(data), skip_corrupt=True,
      num_train_images=3))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  with caplog.at_level(logging.WARNING):
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
      trainer.train()
  assert main_lib.input_error_line(e.value).startswith(
      '--skip_corrupt: no valid training record in the last')
  assert any(f'Skipping bad training records in {bad} (first: corrupt'
             in r.getMessage() for r in caplog.records)
