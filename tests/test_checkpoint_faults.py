"""Checkpoint faults: leftovers of a killed save, unreadable checkpoints,
failed writes.

References: TF's own leftovers (a save made to fail in TF's merge step
leaves its `ckpt-N_temp/`), TF's checkpoint reader (what a checkpoint
holds), and the bytes of the files before the run.
"""

import errno
import logging
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import experiment
from efficientnet_tpu import run_dir
from efficientnet_tpu.config import ConfigError
from tests.helpers import file_digests, small_config, strategy_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(model_dir, steps):
  return small_config(model_dir, train=dict(train_steps=steps,
                                            iterations_per_loop=2))


def _trainer(model_dir, steps=4):
  cfg = _config(model_dir, steps)
  return experiment.build_trainer(cfg, strategy_for(cfg))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A run trained to step 4: ckpt-2 and ckpt-4."""
  model_dir = tmp_path_factory.mktemp('faults') / 'run'
  _trainer(model_dir).train()
  assert tf.train.latest_checkpoint(str(model_dir)).endswith('ckpt-4')
  return model_dir


@pytest.fixture
def run(trained, tmp_path):
  """A copy of the trained run to damage."""
  model_dir = tmp_path / 'run'
  shutil.copytree(trained, model_dir)
  # The `checkpoint` file holds relative paths: the copy is a run of its own.
  assert tf.train.latest_checkpoint(str(model_dir)) == str(
      model_dir / 'ckpt-4')
  return model_dir


_digest = file_digests


def _tf_leftover(tmp_path, step):
  """The `ckpt-STEP_temp/` a save leaves when it dies before its merge, as
  TF itself leaves it (here: the index path is taken by a directory)."""
  scratch = tmp_path / 'scratch'
  manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(v=tf.Variable(tf.zeros([10]))), str(scratch),
      max_to_keep=None, checkpoint_name='ckpt')
  (scratch / f'ckpt-{step}.index').mkdir(parents=True)
  with pytest.raises(tf.errors.OpError):
    manager.save(checkpoint_number=step)
  leftover = scratch / f'ckpt-{step}_temp'
  assert leftover.is_dir() and list(leftover.iterdir())
  return leftover


def test_orphaned_temp_dirs_of_this_prefix_are_removed_at_start(run,
                                                                 tmp_path):
  # Step 5: the run saves ckpt-6 only (a save of ckpt-5 would delete it).
  shutil.move(str(_tf_leftover(tmp_path, 5)), str(run / 'ckpt-5_temp'))
  # Look-alikes that are not this run's leftovers.
  decoys = [run / 'ckpt-5_temp_notes', run / 'other-3_temp',
            run / 'best' / 'ckpt-3_temp', run / 'ckpt-x_temp']
  for d in decoys:
    d.mkdir(parents=True)
    (d / 'keep.txt').write_text('mine')
  (run / 'ckpt-7_temp').write_text('a file, not a checkpoint dir')

  trainer = _trainer(run, steps=6)
  trainer.train()
  assert not (run / 'ckpt-5_temp').exists()
  for d in decoys:
    assert (d / 'keep.txt').read_text() == 'mine', d
  assert (run / 'ckpt-7_temp').read_text() == 'a file, not a checkpoint dir'
  assert trainer.global_step == 6
  assert tf.train.latest_checkpoint(str(run)) == str(run / 'ckpt-6')


# ---- unreadable checkpoints -------------------------------------------------


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _garble(path):
  """Same length, other bytes (what a bad disk or a stray write leaves)."""
  data = path.read_bytes()
  path.write_bytes(bytes(b ^ 0x5A for b in data))


DAMAGE = {
    'index_truncated': lambda d: _truncate(d / 'ckpt-4.index'),
    'index_garbage': lambda d: _garble(d / 'ckpt-4.index'),
    'index_missing': lambda d: (d / 'ckpt-4.index').unlink(),
    'data_truncated': lambda d: _truncate(
        d / 'ckpt-4.data-00000-of-00001'),
    'data_garbage': lambda d: _garble(d / 'ckpt-4.data-00000-of-00001'),
    'data_missing': lambda d: (d / 'ckpt-4.data-00000-of-00001').unlink(),
}


def _state(trainer):
  """Every variable of the model state, by position."""
  return [v.numpy() for v in (trainer.model.variables +
                              trainer.optimizer.variables)]


@pytest.fixture(scope='module')
def at_step_2(trained):
  """The state a plain TF restore of the undamaged ckpt-2 gives."""
  trainer = _trainer(trained)
  trainer.state.checkpoint.restore(str(trained / 'ckpt-2')).expect_partial()
  assert trainer.global_step == 2
  return _state(trainer)


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_unreadable_latest_falls_back_to_the_one_before(run, at_step_2,
                                                        damage, caplog):
  DAMAGE[damage](run)
  damaged = {k: v for k, v in _digest(run).items() if k.startswith('ckpt-4')}
  trainer = _trainer(run)
  with caplog.at_level(logging.WARNING, logger='absl'):
    assert trainer.restore() == 2
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and
              'unreadable' in r.getMessage()]
  assert len(warnings) == 1 and '\n' not in warnings[0], warnings
  assert warnings[0].startswith('Checkpoint ckpt-4 is unreadable (')
  assert 'resuming from ckpt-2' in warnings[0]
  for got, want in zip(_state(trainer), at_step_2, strict=True):
    np.testing.assert_array_equal(got, want)
  # The damaged files stay as they were; ckpt-2 is now the latest.
  assert {k: v for k, v in _digest(run).items()
          if k.startswith('ckpt-4')} == damaged
  assert tf.train.latest_checkpoint(str(run)) == str(run / 'ckpt-2')
  # The next start resumes there without a word.
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='absl'):
    assert _trainer(run).restore() == 2
  assert not [r for r in caplog.records if 'unreadable' in r.getMessage()]


def test_no_readable_checkpoint_is_one_error_and_nothing_changes(run):
  _truncate(run / 'ckpt-4.index')
  _garble(run / 'ckpt-2.data-00000-of-00001')
  before = _digest(run)
  with pytest.raises(ConfigError) as e:
    _trainer(run).restore()
  assert e.value.setting == 'model_dir'
  message = e.value.message
  assert '\n' not in message and 'ckpt-4: ' in message and (
      'ckpt-2: ' in message) and 'nothing was deleted' in message, message
  assert _digest(run) == before


def test_unreadable_checkpoint_file_list_resumes_from_the_newest(run):
  """A garbled `checkpoint` file (TF then reports no checkpoint at all, and
  a run would start over at step 0): the newest checkpoint on disk."""
  (run / 'checkpoint').write_text('model_checkpoint_path: "ckpt-4" }{')
  assert tf.train.latest_checkpoint(str(run)) is None
  assert _trainer(run).restore() == 4


def test_cli_one_line_when_no_checkpoint_is_readable(run):
  for name in ('ckpt-2.index', 'ckpt-4.index'):
    _garble(run / name)
  before = _digest(run)
  out = subprocess.run(
      [sys.executable, '-m', 'efficientnet_tpu.main', f'--model_dir={run}',
       '--mode=eval', '--width_coefficient=0.1', '--depth_coefficient=0.1',
       '--image_size=16', '--num_label_classes=5', '--num_eval_images=16',
       '--eval_batch_size=16'],
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT),
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: --model_dir: checkpoint {run}/ckpt-4 is '
                         'unreadable ('), last
  assert _digest(run) == before


# ---- failed writes ----------------------------------------------------------


def _at_step_6(run):
  """A trainer restored at step 4 whose next save is ckpt-6 (the step is
  set by hand: what is tested is the save)."""
  trainer = _trainer(run, steps=8)
  assert trainer.restore() == 4
  trainer.optimizer.iterations.assign(6)
  return trainer


def _ckpt_digests(run):
  return {k: v for k, v in _digest(run).items()
          if k.startswith(('ckpt-4', 'ckpt-2'))}


def _assert_ckpt_4_stays_the_latest(run, before):
  assert not list(run.glob('ckpt-*_temp'))
  assert tf.train.latest_checkpoint(str(run)) == str(run / 'ckpt-4')
  assert _ckpt_digests(run) == before
  assert _trainer(run).restore() == 4


def test_failed_checkpoint_write_is_one_line_and_keeps_the_latest(run):
  """A real failure in TF's writer: the index path of ckpt-6 is taken."""
  trainer = _at_step_6(run)
  before = _ckpt_digests(run)
  (run / 'ckpt-6.index').mkdir()
  with pytest.raises(ConfigError) as e:
    trainer.save_checkpoint()
  message = e.value.message
  assert message.startswith(f'could not write {run}/ckpt-6 ('), message
  assert 'Is a directory' in message and '\n' not in message
  assert 'ckpt-4 stays the latest checkpoint' in message
  _assert_ckpt_4_stays_the_latest(run, before)


def test_disk_full_during_a_checkpoint_write(run, monkeypatch):
  """ENOSPC as TF reports it (ResourceExhaustedError), after the shards
  were partly written."""
  trainer = _at_step_6(run)
  before = _ckpt_digests(run)

  def full_disk(**kwargs):
    del kwargs
    temp = run / 'ckpt-6_temp'
    temp.mkdir()
    (temp / 'part-00000-of-00001.data-00000-of-00001').write_bytes(b'x' * 99)
    raise tf.errors.ResourceExhaustedError(
        None, None, f'{temp}/part-00000-of-00001.data-00000-of-00001; No '
        'space left on device')

  monkeypatch.setattr(trainer.checkpoint_manager, 'save', full_disk)
  with pytest.raises(ConfigError) as e:
    trainer.save_checkpoint()
  assert 'No space left on device' in e.value.message
  assert e.value.message.startswith(f'could not write {run}/ckpt-6 (')
  _assert_ckpt_4_stays_the_latest(run, before)


def test_disk_full_while_writing_config_json(tmp_path, monkeypatch):
  cfg = _config(tmp_path / 'run', 4)
  real = tf.io.gfile.GFile

  class FullDisk(real):

    def write(self, data):
      raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(tf.io.gfile, 'GFile', FullDisk)
  with pytest.raises(ConfigError) as e:
    run_dir.write_config(cfg, 0)
  monkeypatch.setattr(tf.io.gfile, 'GFile', real)
  path = tmp_path / 'run' / 'config.json'
  assert e.value.setting == 'model_dir'
  assert e.value.message.startswith(
      f'could not write {path} (No space left on device)'), e.value.message
  assert not list((tmp_path / 'run').iterdir())  # No partial file either.


def _limit_file_size(limit):
  """A process whose files cannot grow past `limit` bytes: a write beyond
  fails with EFBIG (Python ignores SIGXFSZ), as a full disk's with ENOSPC."""
  return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_cli_checkpoint_write_refused_by_the_os(tmp_path):
  """The OS refuses the checkpoint's data file (over 400 KB here; every
  other file of the run stays under 64 KB): one line naming the
  checkpoint, exit 2, and the previous checkpoint stays the latest."""
  model_dir = tmp_path / 'run'

  def train(steps, **kwargs):
    return subprocess.run(
        [sys.executable, '-m', 'efficientnet_tpu.main',
         f'--model_dir={model_dir}', '--strategy=cpu',
         '--num_cpu_replicas=1', '--mode=train', f'--train_steps={steps}',
         '--iterations_per_loop=2', '--width_coefficient=0.1',
         '--depth_coefficient=0.1', '--image_size=16',
         '--num_label_classes=5', '--num_train_images=64',
         '--num_eval_images=16', '--train_batch_size=8',
         '--optimizer=momentum', '--lr_scaling=none',
         '--lr_schedule=constant', '--lr_warmup_epochs=0',
         '--moving_average_decay=0.9', '--summary_images=0'],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT),
        cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)

  out = train(2)
  assert out.returncode == 0, out.stderr[-3000:]
  data = model_dir / 'ckpt-2.data-00000-of-00001'
  assert data.stat().st_size > 4 * 64 * 1024
  before = _ckpt_digests(model_dir)
  out = train(4, preexec_fn=_limit_file_size(64 * 1024))
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(
      f'error: --model_dir: could not write {model_dir}/ckpt-4 ('), last
  assert 'ckpt-2 stays the latest checkpoint' in last
  assert not list(model_dir.glob('ckpt-*_temp'))
  assert tf.train.latest_checkpoint(str(model_dir)) == str(
      model_dir / 'ckpt-2')
  assert _ckpt_digests(model_dir) == before
