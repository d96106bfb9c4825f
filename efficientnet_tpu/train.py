"""The custom training loop, handed its model state and input.

One `tf.function` runs `iterations_per_loop` replicated steps per host call
(the TPUEstimator "host loop"), so per-call overhead is paid once per loop.
The replica step itself is `step.train_step` (of the run's
`step.StepSpec`): each replica's loss is divided by the *global* batch,
because gradients are summed across replicas; weight decay is applied
exactly once, either by the optimizer (LARS) or as an L2 term there (the
others). The trainer keeps the loop, its metrics and the I/O. SIGTERM stops
the loop at the next step and ends the run with a checkpoint there
(`preemption`).

The trainer builds nothing: `experiment.build_trainer` hands it a
`state.ModelState` (model, optimizer, EMA, checkpoint) and a function that
makes the training input for a start step, so tests and benchmarks can hand
it other data.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict, Optional, Tuple

from absl import logging
import tensorflow as tf

from efficientnet_tpu import distribute
from efficientnet_tpu import history
from efficientnet_tpu import preemption
from efficientnet_tpu import replica_plan
from efficientnet_tpu import replicated
from efficientnet_tpu import run_dir
from efficientnet_tpu import step as step_lib
from efficientnet_tpu import summaries
from efficientnet_tpu.config import ConfigError, ExperimentConfig
from efficientnet_tpu.data import checks
from efficientnet_tpu.data.contract import TrainInput
from efficientnet_tpu.state import ModelState, UnreadableCheckpoint


def resolved_values(cfg: ExperimentConfig, strategy: tf.distribute.Strategy,
                    plan: replica_plan.ReplicaPlan) -> dict:
  """What the settings come to on `strategy` (config.json's "resolved")."""
  xla = ('whole step (TPU)' if distribute.is_tpu(strategy) else
         'forward and backward' if distribute.resolve_jit_compile(
             strategy, cfg.train.jit_compile) else 'off')
  return dict(
      plan.as_dict(), replicas=strategy.num_replicas_in_sync,
      input_pipelines=distribute.num_input_pipelines(strategy),
      train_epochs=cfg.total_train_steps / cfg.steps_per_epoch,
      peak_learning_rate=cfg.peak_learning_rate,
      warmup_steps=cfg.optimizer.schedule.warmup_steps(cfg.steps_per_epoch),
      xla=xla, num_train_images=cfg.data.num_train_images,
      num_eval_images=cfg.data.num_eval_images,
      num_label_classes=cfg.model.num_label_classes,
      counts_from=cfg.data.counts_from)


def _hms(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def progress_line(step: int, total_steps: int,
                  metrics: Dict[str, float]) -> str:
  """One log line per loop: where the run is, how it does, when it ends."""
  line = (f'step {step}/{total_steps} (epoch {metrics["epoch"]:.2f}): '
          f'loss={metrics["loss"]:.4g} '
          f'top_1={metrics["top_1_accuracy"]:.4g} '
          f'lr={metrics["learning_rate"]:.4g} ')
  if 'images_per_second' in metrics:
    line += (f'images/s={metrics["images_per_second"]:.4g} '
             f'({metrics["images_per_second_per_replica"]:.4g}/replica)')
  else:  # The loop's only step ran with the compile.
    line += f'compile={metrics["compile_time_s"]:.1f}s'
  if 'skipped_records' in metrics:
    line += f' skipped_records={metrics["skipped_records"]:g}'
  eta = _hms(metrics['eta_s']) if 'eta_s' in metrics else 'unknown'
  return line + f' elapsed {_hms(metrics["elapsed_s"])} ETA {eta}'


class Trainer:
  """Trains a `ModelState` with the replicated host loop; checkpoints it."""

  def __init__(self, cfg: ExperimentConfig, strategy: tf.distribute.Strategy,
               state: ModelState, train_input: Callable[[int], TrainInput],
               role: distribute.ClusterRole = distribute.ClusterRole(),
               summary_images: int = 8,
               plan: Optional[replica_plan.ReplicaPlan] = None):
    """Takes what one training run needs.

    Args:
      cfg: the experiment.
      strategy: the replicas; `state` lives on them.
      state: model, optimizer, schedule, EMA and checkpoint.
      train_input: start step -> the training input (`data.contract`); the
        stream continues there after a resume (see `data.stream`).
      role: this process's writer roles and task.
      summary_images: how many images of the first training batch `train`
        shows in TensorBoard (`summaries.INPUT_IMAGES_TAG`); 0: none.
      plan: the run's replica plan (`replica_plan.for_strategy`; made
        here if not given).
    """
    if summary_images < 0:
      raise ValueError(f'summary_images: expected an integer >= 0, got '
                       f'{summary_images}')
    self.cfg = cfg
    self.strategy = strategy
    self.state = state
    self.role = role
    self._train_input = train_input
    self.num_replicas = strategy.num_replicas_in_sync
    self.plan = plan or replica_plan.for_strategy(cfg, strategy)
    self.per_replica_batch = self.plan.per_replica_train_batch
    self.bn_group_size = self.plan.bn_group_size
    self.total_steps = cfg.total_train_steps
    self.steps_per_epoch = cfg.steps_per_epoch
    # What the replica step needs of the run (`step.train_step`).
    self.spec = step_lib.StepSpec.from_config(cfg, strategy)
    # XLA for the forward and backward pass (TPU: the whole loop, always).
    self.jit_compile = self.spec.jit_compile
    self.is_writer = role.is_train_writer
    self.summary_images = summary_images

    # Per-replica sums of the loop's metrics (zeroed and read once a loop).
    self._sums = replicated.Accumulators(strategy, 'train',
                                         step_lib.TRAIN_SUMS)
    # One forward and backward function (XLA when on) for all replicas.
    self._forward_backward_fn = step_lib.compile_forward_backward(
        self.spec, state.model)
    self.checkpoint_manager = self._new_checkpoint_manager()
    # Set on SIGTERM (in `train`), read by the loop before each step.
    self.stop = preemption.StopRequest()
    # Workers that each run the loop agree on the step to stop after.
    self._stop_by_agreement = distribute.runs_in_several_processes(strategy)
    # The step of the checkpoint restored or last saved (None: none).
    self._saved_step: Optional[int] = None
    # The last train_loop call: steps taken, and whether it stopped on a
    # request (on every worker alike).
    self.last_loop_steps = 0
    self.last_loop_stopped = False
    self._train_loop_fn = None
    self._finite_fn = None
    self._train_iterator = None
    self._skipped = None
    self._summary_writer = None

  # ---- state -----------------------------------------------------------
  @property
  def model(self):
    return self.state.model

  @property
  def optimizer(self):
    return self.state.optimizer

  @property
  def ema(self):
    return self.state.ema

  @property
  def global_step(self) -> int:
    return self.state.step

  def _new_checkpoint_manager(self) -> run_dir.CheckpointManager:
    return run_dir.CheckpointManager(
        self.state.checkpoint,
        run_dir.worker_dir(self.role.task, self.cfg.train.model_dir,
                           self.is_writer),
        max_to_keep=self.cfg.train.keep_checkpoint_max,
        step_counter=self.state.optimizer.iterations,
        checkpoint_name=run_dir.CHECKPOINT_NAME)

  def restore(self, checkpoint_path: Optional[str] = None) -> int:
    """Restores the latest (or a given) checkpoint; returns the step.

    An unreadable latest checkpoint (files truncated, overwritten or
    missing) is passed over, with a warning naming it, for the newest
    readable one before it; the train writer then records that one as the
    latest (the unreadable files stay where they are).

    Raises:
      UnreadableCheckpoint: `checkpoint_path` is unreadable.
      ConfigError: model_dir has checkpoints and none is readable (nothing
        is deleted).
    """
    if checkpoint_path:
      self._saved_step = self.state.restore(checkpoint_path)
      return self._saved_step
    model_dir = self.cfg.train.model_dir
    unreadable = []
    for path in run_dir.checkpoint_candidates(model_dir):
      try:
        step = self.state.restore(path)
      except UnreadableCheckpoint as e:
        unreadable.append(e)
        continue
      if unreadable:
        bad = unreadable[0]
        logging.warning(
            'Checkpoint %s is unreadable (%s); resuming from %s, the newest '
            'readable one before it%s.', os.path.basename(bad.path),
            bad.reason, os.path.basename(path),
            ' (unreadable files are left in place)' if self.is_writer
            else '')
        if self.is_writer:
          run_dir.record_latest_checkpoint(path)
          self.checkpoint_manager = self._new_checkpoint_manager()
      self._saved_step = step
      return step
    if unreadable:
      names = '; '.join(f'{os.path.basename(e.path)}: {e.reason}'
                        for e in unreadable)
      raise ConfigError(
          'model_dir', f'no readable checkpoint in {model_dir} ({names}); '
          'nothing was deleted: restore the files from a copy, or start '
          'over in a new `model_dir`')
    return self.global_step

  def save_checkpoint(self) -> str:
    """Saves a checkpoint on every worker (MultiWorkerMirroredStrategy needs
    them all); only the writer's lands in model_dir.

    Raises:
      ConfigError: the write failed (disk full, permissions): naming the
        checkpoint and the one that stays the latest. The partial write's
        ckpt-N_temp/ is removed.
    """
    self.state.sync_replica_local_state()
    step = self.global_step
    directory = self.checkpoint_manager.directory
    try:
      path = self.checkpoint_manager.save(
          checkpoint_number=self.state.optimizer.iterations)
    except (tf.errors.OpError, OSError) as e:
      prefix = os.path.join(directory, f'{run_dir.CHECKPOINT_NAME}-{step}')
      try:  # Frees what the partial write took (no checkpoint names it).
        run_dir.remove_orphaned_temp_dirs(directory)
      except (tf.errors.OpError, OSError):
        pass
      if self.is_writer:
        latest = run_dir.latest_checkpoint(directory)
        kept = (f'{os.path.basename(latest)} stays the latest checkpoint'
                if latest else 'no checkpoint was written')
      else:
        kept = "the chief's checkpoints are as they were"
      raise run_dir.write_error(prefix, e, kept) from None
    self._saved_step = step
    if not self.is_writer:
      tf.io.gfile.rmtree(os.path.dirname(path))
    return path

  @property
  def summary_writer(self):
    if self._summary_writer is None:
      if self.is_writer:
        self._summary_writer = tf.summary.create_file_writer(
            os.path.join(self.cfg.train.model_dir, 'train'))
      else:
        self._summary_writer = tf.summary.create_noop_writer()
    return self._summary_writer

  # ---- data --------------------------------------------------------------
  def distribute_input(self, is_training: bool = True):
    """The distributed training input, continuing at the current step."""
    if not is_training:
      raise ValueError('is_training: the trainer reads training input only; '
                       'evaluation.Evaluator reads the eval input')
    train_input = self._train_input(self.global_step)
    self._skipped = train_input.skipped
    return replicated.distribute_input(self.strategy, train_input.fn)

  def normalize(self, images: tf.Tensor) -> tf.Tensor:
    """uint8 images -> the model's normalized input (`step.normalize`)."""
    return step_lib.normalize(self.spec, images)

  # ---- the replicated train loop ----------------------------------------
  def replica_step(self, batch: Dict[str, tf.Tensor]) -> None:
    """One replica's step on this trainer's state and sums
    (`step.train_step`)."""
    step_lib.train_step(self.spec, self.state, self._sums, batch,
                        self._forward_backward_fn)

  def train_loop(self, num_steps: int) -> Dict[str, float]:
    """Runs `num_steps` steps in one host call; returns loop metrics.

    The first call compiles the loop. The compile happens at the first
    call that takes a step (TPUStrategy compiles the replicated program
    then; a zero-step call traces but compiles nothing, and XLA functions
    compile at their first run too), so that call takes one step alone
    and is reported as `compile_time_s` (one step included); the loop's
    other steps run in a second call. `images_per_second`,
    `step_time_ms` (and the ETA) come from the steps after the compile
    only: a loop of one step, the first, has none of them.

    A stop request (`self.stop`) ends the loop before its next step:
    `last_loop_steps` says how many it took, `last_loop_stopped` whether
    it stopped on a request. The metrics are those of the steps taken; {}
    if none was.
    """
    calls = [num_steps]
    compiling = self._train_loop_fn is None
    if compiling:
      self._train_loop_fn = replicated.stoppable_loop(
          self.strategy, self.replica_step, self.stop.flag,
          agree=self._stop_by_agreement)
      self._train_iterator = replicated.iterate(self.distribute_input())
      logging.info('Compiling the training step (%d replicas%s)...',
                   self.num_replicas,
                   ', XLA' if self.jit_compile or distribute.is_tpu(
                       self.strategy) else '')
      calls = [1, num_steps - 1] if num_steps > 1 else [1]
    self._sums.reset()
    first_step = self.global_step
    compile_s = None
    timed_steps, elapsed, stopped = 0, 0.0, False
    for i, steps in enumerate(calls):
      before = self.global_step
      start = time.time()
      stopped = bool(self._train_loop_fn(
          self._train_iterator, tf.constant(steps, tf.int32)).numpy())
      # Reading the sums blocks until the steps have run.
      sums = self._sums.read()
      seconds = time.time() - start
      if compiling and i == 0:
        compile_s = seconds
        logging.info('Compiled the training step in %.1f s (one step '
                     'included).', compile_s)
      else:
        timed_steps += self.global_step - before
        elapsed += seconds
      if stopped:
        break
    # One process: its own request counts, also one after the last step.
    self.last_loop_stopped = stopped or (
        not self._stop_by_agreement and self.stop.requested)
    # Skipped float16 steps advance `iterations` too: every step counts.
    num_steps = self.last_loop_steps = self.global_step - first_step
    if not num_steps:
      return {}
    examples = max(sums['examples'], 1)
    metrics = {
        'loss': sums['loss'] / num_steps,
        'cross_entropy': sums['cross_entropy'] / examples,
        'top_1_accuracy': sums['correct'] / examples,
        'learning_rate': float(self.state.learning_rate(
            self.optimizer.iterations - 1)),
    }
    if timed_steps:
      images_per_second = (timed_steps * self.cfg.train.train_batch_size /
                           elapsed)
      metrics.update(
          images_per_second=float(images_per_second),
          images_per_second_per_replica=float(images_per_second /
                                              self.num_replicas),
          step_time_ms=float(1000.0 * elapsed / timed_steps))
    if compile_s is not None:
      metrics['compile_time_s'] = float(compile_s)
      metrics['compile_steps'] = num_steps - timed_steps
    if self._skipped is not None:
      # This process's input pipelines since it started (read ahead of
      # the steps by the prefetch buffers); warns about new bad files.
      metrics['skipped_records'] = self._skipped.report()
    return metrics

  def weights_are_finite(self) -> bool:
    """Whether every model weight (and EMA average) is finite.

    One compiled call that reduces on the device and returns one bool,
    whatever the number of variables and replicas.
    """
    if self._finite_fn is None:
      variables = list(self.model.weights)
      if self.ema is not None:
        variables += list(self.ema.averages)

      def all_finite():
        return tf.reduce_all(tf.stack([
            tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))
            for v in variables if tf.as_dtype(v.dtype).is_floating]))

      self._finite_fn = tf.function(all_finite)
    return bool(self._finite_fn().numpy())

  def check_finite(self, metrics: Dict[str, float], loop_start: int,
                   step: int) -> None:
    """Stops a run whose loss or weights are no longer finite.

    Raises:
      ConfigError: naming the step range, the last finite checkpoint and
        the setting most likely to blame (the peak learning rate).
    """
    loss = metrics['loss']
    if math.isfinite(loss) and self.weights_are_finite():
      return
    what = (f'the loss became {loss}' if not math.isfinite(loss) else
            'the weights became non-finite')
    latest = run_dir.latest_checkpoint(self.cfg.train.model_dir)
    kept = (f'the last finite checkpoint, {os.path.basename(latest)}, stays '
            'the latest' if latest else 'no checkpoint was written')
    raise ConfigError(
        'base_learning_rate',
        f'training diverged: {what} in steps {loop_start + 1}-{step} '
        f'(peak learning rate {self.cfg.peak_learning_rate:.4g}); {kept}. '
        'Lower it, or lengthen `lr_warmup_epochs`, and rerun')

  def write_summaries(self, metrics: Dict[str, float], step: int) -> None:
    """One loop's metrics as TensorBoard scalars (`summaries.TRAIN_TAGS`)."""
    summaries.write_scalars(self.summary_writer, metrics, step,
                            summaries.TRAIN_TAGS)

  def write_input_images(self, step: int) -> None:
    """Shows the first `summary_images` images of this host's first batch
    at `step` in TensorBoard, augmented as the steps receive them.

    A second pipeline with the chief's input context rebuilds the batch
    (the training iterator cannot be peeked without losing it); it is
    built, read for one per-replica batch and dropped. Train writer only.
    """
    if not self.is_writer or not self.summary_images:
      return
    ctx = tf.distribute.InputContext(
        num_input_pipelines=distribute.num_input_pipelines(self.strategy),
        input_pipeline_id=0, num_replicas_in_sync=self.num_replicas)
    train_input = self._train_input(step)
    with checks.report_on_error(train_input.skipped):
      batch = next(iter(train_input.fn(ctx).take(1)))
    summaries.write_image_grid(self.summary_writer,
                               batch['images'][:self.summary_images].numpy(),
                               step)

  # ---- driver ------------------------------------------------------------
  def train(self, evaluator=None) -> Dict[str, float]:
    """Trains to `total_steps`, resuming from model_dir; optionally evaluates.

    SIGTERM (a preemption or maintenance notice) stops training after the
    step running then, on every worker alike; the run saves a checkpoint
    there and raises `preemption.Preempted`.

    Args:
      evaluator: anything with `evaluate_and_record(step) -> metrics` (an
        `evaluation.Evaluator`); called every eval interval
        (train_and_eval) and at the end of training.

    Returns:
      The last train metrics (and eval metrics under 'eval/' keys).

    Raises:
      preemption.Preempted: stopped on a signal; the checkpoint is saved.
      ConfigError: a fault that ends the run in one line (diverged, a
        write failed, no readable checkpoint).
    """
    with self.stop.watch():
      return self._train(evaluator)

  def _train(self, evaluator) -> Dict[str, float]:
    # The directory is this process's (the writer holds the run's lock).
    for path in run_dir.remove_orphaned_temp_dirs(
        self.checkpoint_manager.directory):
      logging.info('Removed %s: a checkpoint write that was interrupted.',
                   path)
    self.restore()
    if self._stop_by_agreement:
      # Workers resuming at different steps would diverge or hang.
      distribute.check_same_start(self.strategy, self.global_step,
                                  self.cfg.train.model_dir)
    if self.is_writer:
      run_dir.write_config(self.cfg, self.global_step,
                           resolved_values(self.cfg, self.strategy,
                                           self.plan))
    step = self.global_step
    # Loops end at evaluations only when there are evaluations to run.
    interval = (self.cfg.eval_interval_steps if evaluator is not None
                else self.total_steps)
    metrics: Dict[str, float] = {}
    if step >= self.total_steps:
      logging.info('Already trained to step %d (>= %d).', step,
                   self.total_steps)
    else:
      self.write_input_images(step)
    # The compile (and the step it ran) of this process, for the ETA.
    start, first_step, compiled = time.time(), step, (0.0, 0)
    while step < self.total_steps:
      next_eval = min(self.total_steps, (step // interval + 1) * interval)
      num_steps = min(self.cfg.loop_steps, next_eval - step)
      with checks.report_on_error(self._skipped):
        loop_metrics = self.train_loop(num_steps)
      loop_start, step = step, self.global_step
      checkpoint_path = None
      if step > loop_start:
        metrics = loop_metrics
        compiled = (compiled[0] + metrics.get('compile_time_s', 0.0),
                    compiled[1] + metrics.get('compile_steps', 0))
        checkpoint_path = self._finish_loop(metrics, loop_start, step, start,
                                            first_step, compiled)
      if self.last_loop_stopped:
        raise self._preempted(step, checkpoint_path)
      if evaluator is not None and (step == next_eval and
                                    step < self.total_steps):
        eval_metrics = evaluator.evaluate_and_record(step, checkpoint_path)
        metrics.update({f'eval/{k}': v for k, v in eval_metrics.items()})
    if self.stop.requested:
      logging.warning('Training had ended when the signal came: finishing '
                      'the run.')
    if evaluator is not None:
      latest = run_dir.latest_checkpoint(self.cfg.train.model_dir)
      # A rerun of a finished run reports its recorded evaluation rather
      # than adding a second point at the same step.
      eval_metrics = (history.recorded_eval(
          self.cfg.train.model_dir, step, self.cfg.data.num_eval_images,
          latest) if step == first_step else None)
      if eval_metrics is None:
        eval_metrics = evaluator.evaluate_and_record(step, latest)
      else:
        logging.info('Step %d was evaluated already (%s): top_1=%.4g; not '
                     'evaluating it again.', step, run_dir.RESULTS_FILENAME,
                     eval_metrics['top_1_accuracy'])
      metrics.update({f'eval/{k}': v for k, v in eval_metrics.items()})
    return metrics

  def _finish_loop(self, metrics: Dict[str, float], loop_start: int,
                   step: int, start: float, first_step: int,
                   compiled: Tuple[float, int]) -> str:
    """Checks, logs and records a loop's steps, then saves the checkpoint.

    `compiled`: the seconds and steps of this process's compile calls so
    far (this loop's included), which the ETA leaves out.
    """
    # Before anything of this loop is written: a diverged run keeps its
    # last finite checkpoint as the latest, and ends (on every worker:
    # the loss is all-reduced, the weights are replicated).
    self.check_finite(metrics, loop_start, step)
    metrics['epoch'] = step / self.steps_per_epoch
    # Wall time of this process, checkpoints and evaluations included;
    # the ETA extrapolates it without the one-time compile (and the step
    # timed with it). Before any step after the compile there is none.
    elapsed = time.time() - start
    metrics['elapsed_s'] = elapsed
    compile_s, compile_steps = compiled
    if step - first_step > compile_steps:
      per_step = (elapsed - compile_s) / (step - first_step - compile_steps)
      metrics['eta_s'] = per_step * (self.total_steps - step)
    logging.info(progress_line(step, self.total_steps, metrics))
    self.write_summaries(metrics, step)
    if self.is_writer:
      path = os.path.join(self.cfg.train.model_dir, history.FILENAME)
      try:
        history.append_train(
            self.cfg.train.model_dir, step, metrics['epoch'], metrics,
            start_step=loop_start, total_steps=self.total_steps,
            session_start=start)
      except (tf.errors.OpError, OSError) as e:
        latest = run_dir.latest_checkpoint(self.cfg.train.model_dir)
        raise run_dir.write_error(
            path, e, f'{os.path.basename(latest)} stays the latest '
            'checkpoint' if latest else 'no checkpoint was written') from None
    return self.save_checkpoint()

  def _preempted(self, step: int,
                 checkpoint_path: Optional[str]) -> preemption.Preempted:
    """The exception that ends a run stopped on a signal, once a checkpoint
    at `step` exists (saved now unless this loop or the restore made it)."""
    if checkpoint_path is None and self._saved_step != step:
      checkpoint_path = self.save_checkpoint()
    if checkpoint_path is None:
      checkpoint_path = os.path.join(self.checkpoint_manager.directory,
                                     f'{run_dir.CHECKPOINT_NAME}-{step}')
    self.summary_writer.flush()
    waited = (f' {time.time() - self.stop.received_at:.1f} s after the '
              'signal' if self.stop.received_at else '')
    logging.warning('Stopped at step %d%s; saved %s.', step, waited,
                    checkpoint_path)
    return preemption.Preempted(step, checkpoint_path, self.stop.signum)
