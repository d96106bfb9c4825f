"""Eval records are counted (once, then cached) before any training."""

import json
import os
import types

from absl import flags
import pytest
import tensorflow as tf

from efficientnet_tpu import main as main_lib
from efficientnet_tpu import presets
from efficientnet_tpu.config import ConfigError, DataConfig
from efficientnet_tpu.data import pipeline as data_pipeline
from efficientnet_tpu.data import tfds as tfds_source
from efficientnet_tpu.data import tfrecord
from tests.test_input_pipeline import write_split

FLAGS = flags.FLAGS
SMOKE = presets.path('cpu_smoke')


def _write_raw(path, payload_sizes):
  with tf.io.TFRecordWriter(str(path)) as w:
    for i, n in enumerate(payload_sizes):
      w.write(bytes([i % 256]) * n)


@pytest.fixture
def raw_files(tmp_path):
  """Five files: empty, an empty payload, one above GFile's 512 KiB buffer."""
  sizes = [[], [0], [5, 700_000, 3], [100] * 40, [1]]
  files = []
  for i, s in enumerate(sizes):
    files.append(str(tmp_path / f'validation-{i:05d}-of-00005'))
    _write_raw(files[-1], s)
  return files, [len(s) for s in sizes]


@pytest.mark.parametrize('prefix', ['', 'file://'])
def test_counts_equal_the_records_written(raw_files, prefix):
  """Local paths (Python IO) and file:// (GFile, the GCS code path)."""
  files, written = raw_files
  counts = tfrecord.count_records([prefix + f for f in files])
  assert counts == written
  assert counts == [sum(1 for _ in tf.data.TFRecordDataset(f)) for f in files]


def test_counts_of_example_records(tmp_path):
  write_split(str(tmp_path), 'validation', [3, 0, 2])
  files = tfrecord.list_files(str(tmp_path), is_training=False)
  assert tfrecord.count_records(files) == [3, 0, 2]


@pytest.mark.parametrize('damage,problem', [
    ('truncate_payload', 'past the end of the file'),
    ('truncate_header', 'corrupt or truncated TFRecord frame header at byte '
     '4408 of 4413'),
    ('corrupt_length', 'corrupt or truncated TFRecord frame header at byte '
     '812 of 4640')])
def test_bad_frame_is_one_line_naming_the_file(raw_files, damage, problem):
  # Frames of files[3]: 8 length + 4 CRC + 100 payload + 4 CRC = 116 bytes.
  files, _ = raw_files
  bad = files[3]
  data = bytearray(open(bad, 'rb').read())
  if damage == 'truncate_payload':
    data = data[:-20]
  elif damage == 'truncate_header':
    data = data[:116 * 38 + 5]  # 5 bytes into the 39th frame's header.
  else:
    data[116 * 7] ^= 0x01  # Length of the 8th record: its CRC fails.
  open(bad, 'wb').write(bytes(data))
  with pytest.raises(ConfigError) as e:
    tfrecord.count_records(files)
  message = str(e.value)
  assert message.startswith(f'data_dir: {bad}: ') and '\n' not in message
  assert problem in message, message


def _spy(monkeypatch):
  """Records the files that count_records is asked to count."""
  calls, real = [], tfrecord.count_records

  def spy(files, *args, **kwargs):
    calls.append(list(files))
    return real(files, *args, **kwargs)

  monkeypatch.setattr(tfrecord, 'count_records', spy)
  return calls


def test_cache_is_used_and_a_changed_size_recounts(raw_files, tmp_path,
                                                   monkeypatch):
  files, written = raw_files
  calls = _spy(monkeypatch)
  cache_dir = str(tmp_path / 'run')
  # Not created by an eval-only check: eval needs an existing model dir.
  assert tfrecord.record_counts(files, cache_dir) == dict(
      zip(files, written))
  assert not os.path.exists(cache_dir)
  assert tfrecord.record_counts(
      files, cache_dir, create_cache_dir=True) == dict(zip(files, written))
  cache = os.path.join(cache_dir, tfrecord.COUNTS_FILE)
  assert os.listdir(cache_dir) == [tfrecord.COUNTS_FILE]  # No temp left.
  assert len(calls) == 2
  assert tfrecord.record_counts(files, cache_dir) == dict(
      zip(files, written))
  assert len(calls) == 2  # Read from the cache, nothing counted.

  _write_raw(files[1], [1, 2, 3, 4])  # Same name, new size.
  counts = tfrecord.record_counts(files, cache_dir)
  assert calls[-1] == [files[1]] and counts[files[1]] == 4
  entry = json.load(open(cache))['files'][files[1]]
  assert entry == {'bytes': os.path.getsize(files[1]), 'records': 4}

  open(cache, 'w').write('{"format": 1, "files": {')  # Malformed: recount.
  tfrecord.record_counts(files, cache_dir)
  assert calls[-1] == files and json.load(open(cache))['format'] == 1


def test_unwritable_cache_dir_only_skips_the_cache(raw_files, tmp_path):
  files, written = raw_files
  not_a_dir = tmp_path / 'file'
  not_a_dir.write_text('')
  assert tfrecord.record_counts(
      files, str(not_a_dir / 'run'), create_cache_dir=True) == dict(
          zip(files, written))


def test_tfds_uses_the_split_info(tmp_path, monkeypatch):
  info = types.SimpleNamespace(splits={
      'train': types.SimpleNamespace(num_examples=100),
      'validation': types.SimpleNamespace(num_examples=10)})
  builder = types.SimpleNamespace(info=info)
  monkeypatch.setattr(tfds_source, 'load_builder',
                      lambda cfg: (None, builder))
  cfg = DataConfig(source='tfds:fake', data_dir=str(tmp_path),
                   num_eval_images=10)
  data_pipeline.check_data_files(cfg, 'eval')
  cfg = DataConfig(source='tfds:fake', data_dir=str(tmp_path),
                   num_eval_images=11)
  data_pipeline.check_data_files(cfg, 'train')
  with pytest.raises(ConfigError, match=r"^num_eval_images: 11 requested "
                     r"but the eval split has 10 records \(split "
                     r"'validation' of tfds:fake .*set `num_eval_images=10` "
                     r"or less$"):
    data_pipeline.check_data_files(cfg, 'train_and_eval')


def test_synthetic_has_nothing_to_count():
  data_pipeline.check_data_files(
      DataConfig(source='synthetic', num_eval_images=10**9), 'eval')


@pytest.fixture
def _reset_flags():
  yield
  FLAGS.unparse_flags()


def test_too_few_eval_records_fail_before_training(tmp_path, capsys,
                                                   monkeypatch, _reset_flags):
  data_dir = tmp_path / 'data'
  write_split(str(data_dir), 'train', [4], label_fn=lambda f, j: j % 5 + 1)
  write_split(str(data_dir), 'validation', [2, 1],
              label_fn=lambda f, j: j % 5 + 1)
  model_dir = tmp_path / 'run'
  calls = _spy(monkeypatch)

  def run():
    FLAGS.unparse_flags()
    FLAGS(['efficientnet-tpu-train', f'--flagfile={SMOKE}',
           f'--model_dir={model_dir}', '--data=tfrecord',
           f'--data_dir={data_dir}', '--num_label_classes=5',
           '--num_train_images=4', '--num_eval_images=5',
           '--train_batch_size=4', '--eval_batch_size=4', '--train_steps=2',
           '--iterations_per_loop=2', '--num_cpu_replicas=1',
           '--bn_group_size=1', '--lr_warmup_epochs=0',
           '--mode=train_and_eval', f'--export_dir={tmp_path / "export"}'])
    return main_lib.main(['efficientnet-tpu-train']), capsys.readouterr()

  for attempt in range(2):
    rc, out = run()
    assert rc == 2
    assert out.err == (
        f"error: --num_eval_images: 5 requested but the eval split has 3 "
        f"records (2 'validation-*' files in '{data_dir}'); set "
        f"--num_eval_images=3 or less\n"), out.err[-2000:]
    # Nothing that could pass for a result: only the count cache.
    assert os.listdir(model_dir) == [tfrecord.COUNTS_FILE]
    assert not (tmp_path / 'export').exists()
    # Counted on the first run only; the rerun reads the cache.
    assert len(calls) == 1, attempt
