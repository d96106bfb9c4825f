"""TensorBoard: the tags written, their values and the input image grid,
read back from the event files."""

import collections
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import distribute
from efficientnet_tpu import experiment
from efficientnet_tpu import summaries
from efficientnet_tpu.data import preprocessing
from tests.helpers import small_config, strategy_for


def _events(directory):
  """{tag: [(step, value)]} of the event files in `directory`."""
  found = collections.defaultdict(list)
  for path in sorted(pathlib.Path(directory).glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        found[value.tag].append((event.step, tf.make_ndarray(value.tensor)))
  return found


def _log_softmax(logits):
  shifted = logits - logits.max(1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def test_tags_values_and_input_images_of_a_train_and_eval_run(tmp_path):
  smoothing, classes = 0.2, 5
  cfg = small_config(tmp_path, optimizer=dict(label_smoothing=smoothing,
                                               weight_decay=0.0),
                     train=dict(train_steps=1, iterations_per_loop=1))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  # Reference: the first batch and the logits of the first step (training
  # mode: batch statistics), on the initial weights, in numpy.
  batch = next(iter(experiment.train_input(cfg)(0).fn(None)))
  images, labels = batch['images'].numpy(), batch['labels'].numpy()
  initial = [v.numpy() for v in trainer.model.variables]
  logits = trainer.model(preprocessing.normalize(images),
                         training=True).numpy()
  for v, w in zip(trainer.model.variables, initial):
    v.assign(w)  # Undo the BN moving-statistics update of that call.
  log_p = _log_softmax(logits.astype(np.float64))
  rows = np.arange(len(labels))
  cross_entropy = -log_p[rows, labels].mean()
  smoothed = ((1 - smoothing) * -log_p[rows, labels]
              - smoothing / classes * log_p.sum(1)).mean()
  assert abs(smoothed - cross_entropy) > 1e-3  # The test tells them apart.

  metrics = trainer.train(evaluator=experiment.evaluator_for(trainer))

  train = _events(tmp_path / 'train')
  evals = _events(tmp_path / 'eval')
  # No images/s: the run's one step ran with the compile (test_host_work
  # checks the throughput of the steps after it).
  assert set(train) == {
      'train/total_loss', 'train/cross_entropy', 'train/top_1_accuracy',
      'train/learning_rate', 'train/input_images'}
  assert set(evals) == {'eval/cross_entropy', 'eval/top_1_accuracy',
                        'eval/top_5_accuracy'}
  scalar = lambda found, tag: float(found[tag][-1][1])
  assert scalar(train, 'train/cross_entropy') == pytest.approx(
      cross_entropy, rel=1e-5)
  assert scalar(train, 'train/total_loss') == pytest.approx(smoothed,
                                                            rel=1e-5)
  correct = (logits.argmax(1) == labels).mean()
  assert scalar(train, 'train/top_1_accuracy') == pytest.approx(correct)
  assert scalar(train, 'train/learning_rate') == pytest.approx(
      cfg.optimizer.schedule.base_learning_rate)
  # Eval's cross entropy is the eval metric 'loss' (no smoothing).
  assert scalar(evals, 'eval/cross_entropy') == pytest.approx(
      metrics['eval/loss'])
  assert scalar(evals, 'eval/top_5_accuracy') == pytest.approx(
      metrics['eval/top_5_accuracy'])

  # One grid image, at the start step: 8 images of the first batch, in
  # 2 rows of 4, exactly as the pipeline delivered them (PNG is lossless).
  [(step, value)] = train['train/input_images']
  assert step == 0
  width, height, png = value
  size = cfg.model.image_size
  assert (int(width), int(height)) == (4 * size, 2 * size)
  want = np.concatenate([np.concatenate(list(images[0:4]), axis=1),
                         np.concatenate(list(images[4:8]), axis=1)], axis=0)
  np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), want)


def test_only_the_train_writer_writes_input_images(tmp_path):
  cfg = small_config(tmp_path)
  trainer = experiment.build_trainer(
      cfg, strategy_for(cfg),
      role=distribute.ClusterRole(task=('worker', 1),
                                  writer_roles=frozenset()))
  trainer.write_input_images(0)
  assert not (tmp_path / 'train').exists()


def test_write_scalars_writes_tagged_metrics_under_their_tags(tmp_path):
  writer = tf.summary.create_file_writer(str(tmp_path))
  summaries.write_scalars(
      writer, {'loss': 2.5, 'skipped_records': 3.0, 'step_time_ms': 9.0},
      step=7, tags=summaries.TRAIN_TAGS)
  found = _events(tmp_path)
  assert set(found) == {'train/total_loss', 'train/skipped_records'}
  assert found['train/total_loss'] == [(7, np.float32(2.5))]
  assert found['train/skipped_records'] == [(7, np.float32(3.0))]


def test_image_grid_tiles_row_major_and_pads_with_black():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(6, 3, 2, 3), dtype=np.uint8)
  black = np.zeros_like(images[0])
  want = np.concatenate([
      np.concatenate([images[0], images[1], images[2], images[3]], axis=1),
      np.concatenate([images[4], images[5], black, black], axis=1)], axis=0)
  grid = summaries.image_grid(images, columns=4)
  assert grid.shape == (2 * 3, 4 * 2, 3)
  np.testing.assert_array_equal(grid, want)
  # Fewer images than columns: one row of them.
  np.testing.assert_array_equal(summaries.image_grid(images[:2], 4),
                                np.concatenate([images[0], images[1]], 1))
  with pytest.raises(ValueError, match='images'):
    summaries.image_grid(images[0], 4)
