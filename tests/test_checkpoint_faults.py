"""Checkpoint faults: leftovers of a killed save, unreadable checkpoints,
failed writes.

References: TF's own leftovers (a save made to fail in TF's merge step
leaves its `ckpt-N_temp/`), TF's checkpoint reader (what a checkpoint
holds), and the bytes of the files before the run.
"""

import hashlib
import os
import shutil

import pytest
import tensorflow as tf

from efficientnet_tpu import experiment
from tests.helpers import small_config, strategy_for


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


def _digest(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


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
