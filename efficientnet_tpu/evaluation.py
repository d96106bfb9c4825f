"""Sharded evaluation on the training replicas, exact over the eval set.

Every replica evaluates its share of padded, masked batches; the metrics are
sums of correct and valid counts reduced across replicas (never averages of
per-replica averages), so N eval images give metrics over exactly N images
whatever the batch, replica and host counts.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

from absl import logging
import tensorflow as tf

from efficientnet_tpu import data as data_lib
from efficientnet_tpu import distribute
from efficientnet_tpu import fileio
from efficientnet_tpu import train as train_lib
from efficientnet_tpu.config import ConfigError

RESULTS_FILENAME = 'eval_results.jsonl'
BEST_DIRNAME = 'best'
BEST_FILENAME = 'best_eval.json'


class Evaluator:
  """Evaluates a `Trainer`'s model (EMA weights when enabled)."""

  def __init__(self, trainer: train_lib.Trainer):
    self.trainer = trainer
    cfg = trainer.cfg
    self.strategy = trainer.strategy
    # Eval summaries, eval_results.jsonl and best/ (see writer_roles).
    self.is_writer = distribute.EVAL_WRITER in trainer.writer_roles
    self.num_steps = data_lib.num_eval_steps(cfg.data.num_eval_images,
                                             cfg.train.eval_batch_size)
    if cfg.train.eval_steps:
      self.num_steps = min(self.num_steps, cfg.train.eval_steps)
    with self.strategy.scope():
      self._sums = {
          name: train_lib.sum_variable(f'eval_{name}')
          for name in ('loss', 'top_1', 'top_5', 'count')
      }
    self._logits_fn = (tf.function(self._logits, jit_compile=True)
                       if trainer.jit_compile else self._logits)
    self._dataset = None
    self._eval_loop_fn = None
    self._writer = None
    self._best_manager = None
    self._best = None

  def _logits(self, images):
    return tf.cast(self.trainer.model(self.trainer.normalize(images),
                                      training=False), tf.float32)

  def _replica_eval_step(self, batch):
    num_classes = self.trainer.cfg.model.num_classes
    logits = self._logits_fn(batch['images'])
    labels, mask = batch['labels'], batch['mask']
    loss = train_lib.smoothed_cross_entropy(labels, logits, num_classes, 0.0)
    top_1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)
    top_5 = tf.cast(tf.math.in_top_k(labels, logits, min(5, num_classes)),
                    tf.float32)
    self._sums['loss'].assign_add(tf.reduce_sum(loss * mask))
    self._sums['top_1'].assign_add(tf.reduce_sum(top_1 * mask))
    self._sums['top_5'].assign_add(tf.reduce_sum(top_5 * mask))
    self._sums['count'].assign_add(tf.reduce_sum(mask))

  def evaluate(self) -> Dict[str, float]:
    """One full pass over the eval set; returns exact metrics."""
    if self._eval_loop_fn is None:
      self._dataset = self.trainer.distribute_input(is_training=False)
      self._eval_loop_fn = train_lib.replicated_loop(self.strategy,
                                                     self._replica_eval_step)
    for v in self._sums.values():
      v.assign(0.0)
    ema = self.trainer.ema
    start = time.time()
    # Eval normalizes with the moving statistics: the same on every replica.
    self.trainer.sync_replica_local_state()
    if ema is not None:
      ema.swap()
    try:
      self._eval_loop_fn(iter(self._dataset),
                         tf.constant(self.num_steps, tf.int32))
      sums = {k: float(v.numpy()) for k, v in self._sums.items()}
    finally:
      if ema is not None:
        ema.swap()
    elapsed = time.time() - start
    count = max(sums['count'], 1.0)
    return {
        'top_1_accuracy': sums['top_1'] / count,
        'top_5_accuracy': sums['top_5'] / count,
        'loss': sums['loss'] / count,
        'num_examples': sums['count'],
        'eval_time_s': elapsed,
        'eval_images_per_second': sums['count'] / elapsed,
    }

  @property
  def summary_writer(self):
    if self._writer is None:
      if self.is_writer:
        self._writer = tf.summary.create_file_writer(
            os.path.join(self.trainer.cfg.train.model_dir, 'eval'))
      else:
        self._writer = tf.summary.create_noop_writer()
    return self._writer

  def evaluate_and_record(self, step: int,
                          checkpoint_path: Optional[str] = None
                          ) -> Dict[str, float]:
    """Evaluates, then writes TensorBoard, JSON lines and the best archive."""
    metrics = self.evaluate()
    logging.info('eval at step %d: %s', step,
                 ', '.join(f'{k}={v:.4g}' for k, v in metrics.items()))
    self.trainer.write_summaries(metrics, step, writer=self.summary_writer)
    if self.is_writer:
      model_dir = self.trainer.cfg.train.model_dir
      record = dict(metrics, step=step, checkpoint=checkpoint_path)
      path = os.path.join(model_dir, RESULTS_FILENAME)
      # Append by rewrite: gfile has no append mode on every filesystem.
      old = ''
      if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
          old = f.read()
      fileio.write_atomically(
          path, old + json.dumps(record, sort_keys=True) + '\n')
    self._maybe_archive_best(step, metrics)
    return metrics

  def _maybe_archive_best(self, step: int, metrics: Dict[str, float]) -> None:
    """Keeps a copy of the checkpoint with the best top-1 in model_dir/best."""
    model_dir = self.trainer.cfg.train.model_dir
    best_dir = os.path.join(model_dir, BEST_DIRNAME)
    best_file = os.path.join(best_dir, BEST_FILENAME)
    if self._best is None:
      # Read once: all workers then decide from identical metrics in memory.
      self._best = -1.0
      if tf.io.gfile.exists(best_file):
        with tf.io.gfile.GFile(best_file) as f:
          self._best = json.load(f)['top_1_accuracy']
    if metrics['top_1_accuracy'] <= self._best:
      return
    self._best = metrics['top_1_accuracy']
    if self._best_manager is None:
      directory = train_lib.worker_dir(self.trainer.task, best_dir,
                                       self.is_writer)
      self._best_manager = tf.train.CheckpointManager(
          self.trainer.checkpoint, directory, max_to_keep=1,
          checkpoint_name='best')
    path = self._best_manager.save(checkpoint_number=step)
    if self.is_writer:
      fileio.write_atomically(
          best_file, json.dumps(dict(metrics, step=step, checkpoint=path),
                                indent=2))
    else:
      tf.io.gfile.rmtree(os.path.dirname(path))


def continuous_eval(trainer: train_lib.Trainer, evaluator: Evaluator,
                    timeout: int) -> Dict[str, float]:
  """Evaluates each new checkpoint in model_dir until training has ended.

  Args:
    trainer: provides the model and checkpoint (nothing is trained).
    evaluator: the evaluator to run.
    timeout: seconds to wait for a new checkpoint before giving up; 0 means
      evaluate what is there now and return.

  Returns:
    The metrics of the last checkpoint evaluated ({} if none was found).
  """
  model_dir = trainer.cfg.train.model_dir
  metrics: Dict[str, float] = {}
  if timeout <= 0:
    paths = [tf.train.latest_checkpoint(model_dir)]
    paths = [p for p in paths if p]
  else:
    paths = tf.train.checkpoints_iterator(model_dir, timeout=timeout)
  for path in paths:
    step = trainer.restore(path)
    metrics = evaluator.evaluate_and_record(step, checkpoint_path=path)
    if step >= trainer.total_steps:
      break
  if not metrics:
    # Nothing was evaluated: no result, no export (a typo in --model_dir
    # must not end in exit 0 or a SavedModel of random weights).
    waited = f' within --eval_timeout={timeout}s' if timeout > 0 else ''
    raise ConfigError(f'--model_dir: no checkpoint in {model_dir} to '
                      f'evaluate{waited}; point it at a training run')
  return metrics
