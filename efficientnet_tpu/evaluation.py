"""Sharded evaluation on the training replicas, exact over the eval set.

Every replica evaluates its share of padded, masked batches; the metrics are
sums of correct and valid counts reduced across replicas (never averages of
per-replica averages), so N eval images give metrics over exactly N images
whatever the batch, replica and host counts. The replica step is
`step.eval_step` (of the run's `step.StepSpec`, which also sets the input
dtype training uses); the evaluator keeps the loop, the EMA swap and the
records.

The evaluator needs no trainer: it is handed the model state (model, EMA,
checkpoint), the eval input (`contract.EvalInput`) and the run directory's
roles, so it runs the same beside training (train_and_eval), alone
(`--mode=eval`) or as a side-car evaluator task.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Optional

from absl import logging
import tensorflow as tf

from efficientnet_tpu import distribute
from efficientnet_tpu import replicated
from efficientnet_tpu import run_dir
from efficientnet_tpu import step as step_lib
from efficientnet_tpu import summaries
from efficientnet_tpu.config import ConfigError, ExperimentConfig
from efficientnet_tpu.data.contract import EvalInput
from efficientnet_tpu.state import ModelState


class Evaluator:
  """Evaluates a `ModelState`'s model (EMA weights when enabled)."""

  def __init__(self, cfg: ExperimentConfig, strategy: tf.distribute.Strategy,
               state: ModelState, eval_input: EvalInput, num_steps: int,
               role: distribute.ClusterRole = distribute.ClusterRole()):
    """Takes what evaluation needs.

    Args:
      cfg: the experiment (classes, precision, XLA, model_dir).
      strategy: the replicas `state` lives on.
      state: model, EMA and checkpoint (restored by the caller).
      eval_input: the eval input (padded, masked batches; `data` package).
      num_steps: eval batches per replica: `eval_input.steps` on the
        strategy's input pipelines (the whole eval set), or fewer.
      role: whether this process writes eval results (EVAL_WRITER).
    """
    self.cfg = cfg
    self.strategy = strategy
    self.state = state
    self.role = role
    self.eval_input = eval_input
    self.num_steps = num_steps
    # Eval summaries, eval_results.jsonl and best/ (see writer_roles).
    self.is_writer = role.is_eval_writer
    # The step's settings; the input dtype is training's (the model's).
    self.spec = step_lib.StepSpec.from_config(cfg, strategy)
    self._sums = replicated.Accumulators(strategy, 'eval', step_lib.EVAL_SUMS)
    # One logits function (XLA when on) for all replicas.
    self._logits_fn = step_lib.compile_logits(self.spec, state.model)
    self._iterator = None
    self._eval_loop_fn = None
    self._writer = None
    self._best_manager = None
    self._best = None

  def replica_step(self, batch: Dict[str, tf.Tensor]) -> None:
    """One replica's eval step on this evaluator's model and sums
    (`step.eval_step`)."""
    step_lib.eval_step(self.spec, self.state.model, self._sums, batch,
                       self._logits_fn)

  def evaluate(self) -> Dict[str, float]:
    """One full pass over the eval set; returns exact metrics."""
    compile_s = None
    if self._eval_loop_fn is None:
      steps, input_fn = self.num_steps, self.eval_input.fn

      def passes(ctx):
        # Every pass reads the same `steps` batches per replica: one
        # iterator serves them all (a new one per pass costs eager ops
        # per replica on the host).
        per_pipeline = ctx.num_replicas_in_sync // ctx.num_input_pipelines
        return input_fn(ctx).take(steps * per_pipeline).repeat()

      self._iterator = replicated.iterate(
          replicated.distribute_input(self.strategy, passes))
      self._eval_loop_fn = replicated.replicated_loop(
          self.strategy, self.replica_step)
    if self._eval_loop_fn.experimental_get_tracing_count() == 0:
      # A zero-step call traces and optimizes the loop, so that the eval's
      # time and images/s are the evaluation's, not its one-time tracing.
      start = time.time()
      self._eval_loop_fn(self._iterator, tf.constant(0, tf.int32))
      compile_s = time.time() - start
    # Host work per pass: one compiled call each for the reset, the
    # synchronization, the EMA swaps, the steps and the read, whatever the
    # number of replicas.
    self._sums.reset()
    ema = self.state.ema
    start = time.time()
    # Eval normalizes with the moving statistics: the same on every replica.
    self.state.sync_replica_local_state()
    if ema is not None:
      ema.swap()
    try:
      self._eval_loop_fn(self._iterator,
                         tf.constant(self.num_steps, tf.int32))
      sums = self._sums.read()
    finally:
      if ema is not None:
        ema.swap()
    elapsed = time.time() - start
    count = max(sums['count'], 1.0)
    metrics = {
        'top_1_accuracy': sums['top_1'] / count,
        'top_5_accuracy': sums['top_5'] / count,
        'loss': sums['loss'] / count,
        'num_examples': sums['count'],
        'eval_time_s': elapsed,
        'eval_images_per_second': sums['count'] / elapsed,
    }
    if compile_s is not None:
      metrics['eval_compile_time_s'] = compile_s
    return metrics

  @property
  def summary_writer(self):
    if self._writer is None:
      if self.is_writer:
        self._writer = tf.summary.create_file_writer(
            os.path.join(self.cfg.train.model_dir, 'eval'))
      else:
        self._writer = tf.summary.create_noop_writer()
    return self._writer

  def evaluate_and_record(self, step: int,
                          checkpoint_path: Optional[str] = None
                          ) -> Dict[str, float]:
    """Evaluates, then writes TensorBoard, JSON lines and the best archive."""
    metrics = self.evaluate()
    compiled = metrics.get('eval_compile_time_s')
    logging.info('eval at step %d: top_1=%.4g top_5=%.4g cross_entropy=%.4g '
                 '(%d images in %.1f s%s)', step, metrics['top_1_accuracy'],
                 metrics['top_5_accuracy'], metrics['loss'],
                 metrics['num_examples'], metrics['eval_time_s'],
                 f'; compiled first in {compiled:.1f} s' if compiled else '')
    summaries.write_scalars(self.summary_writer, metrics, step,
                            summaries.EVAL_TAGS)
    if self.is_writer:
      # Also the run's eval history (`history.read`).
      run_dir.append_eval_result(
          self.cfg.train.model_dir,
          dict(metrics, step=step, checkpoint=checkpoint_path,
               epoch=step / self.cfg.steps_per_epoch, wall_time=time.time()))
    self._maybe_archive_best(step, metrics)
    return metrics

  def _maybe_archive_best(self, step: int, metrics: Dict[str, float]) -> None:
    """Keeps a copy of the checkpoint with the best top-1 in model_dir/best."""
    model_dir = self.cfg.train.model_dir
    if self._best is None:
      # Read once: all workers then decide from identical metrics in memory.
      self._best = run_dir.best_top_1(model_dir)
    if metrics['top_1_accuracy'] <= self._best:
      return
    self._best = metrics['top_1_accuracy']
    if self._best_manager is None:
      directory = run_dir.worker_dir(
          self.role.task, os.path.join(model_dir, run_dir.BEST_DIRNAME),
          self.is_writer)
      self._best_manager = run_dir.CheckpointManager(
          self.state.checkpoint, directory, max_to_keep=1,
          checkpoint_name='best')
    path = self._best_manager.save(checkpoint_number=step)
    if self.is_writer:
      run_dir.write_best(model_dir, dict(metrics, step=step, checkpoint=path))
    else:
      tf.io.gfile.rmtree(os.path.dirname(path))


def continuous_eval(state: ModelState, evaluator: Evaluator, model_dir: str,
                    total_steps: int, timeout: int,
                    checkpoint_path: Optional[str] = None
                    ) -> Dict[str, float]:
  """Evaluates each new checkpoint in model_dir until training has ended.

  Args:
    state: restored from each checkpoint (nothing is trained).
    evaluator: the evaluator to run on it.
    model_dir: where the checkpoints appear.
    total_steps: the training's last step: its checkpoint ends the wait.
    timeout: seconds to wait for a new checkpoint before giving up; 0 means
      evaluate what is there now and return.
    checkpoint_path: evaluate only this one (see
      `run_dir.resolve_checkpoint`: a prefix, or 'best').

  Returns:
    The metrics of the last checkpoint evaluated.

  Raises:
    ConfigError: no checkpoint was evaluated.
  """
  metrics: Dict[str, float] = {}
  if checkpoint_path:
    paths = [run_dir.resolve_checkpoint(model_dir, checkpoint_path)]
  elif timeout <= 0:
    paths = [run_dir.latest_checkpoint(model_dir)]
    paths = [p for p in paths if p]
  else:
    paths = run_dir.checkpoints_iterator(model_dir, timeout=timeout)
  for path in paths:
    step = state.restore(path)
    metrics = evaluator.evaluate_and_record(step, checkpoint_path=path)
    if step >= total_steps:
      break
  if not metrics:
    # Nothing was evaluated: no result, no export (a typo in --model_dir
    # must not end in exit 0 or a SavedModel of random weights).
    waited = f' within `eval_timeout={timeout}`s' if timeout > 0 else ''
    raise ConfigError('model_dir', f'no checkpoint in {model_dir} to '
                      f'evaluate{waited}; point it at a training run')
  return metrics
