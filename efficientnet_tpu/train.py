"""The custom training loop.

One `tf.function` runs `iterations_per_loop` replicated steps per host call
(the TPUEstimator "host loop"), so per-call overhead is paid once per loop.
Each replica's loss is divided by the *global* batch, because gradients are
summed across replicas; weight decay is applied exactly once, either by the
optimizer (LARS) or as an L2 term added here (the others).
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

from absl import logging
import tensorflow as tf

from efficientnet_tpu import collectives
from efficientnet_tpu import data as data_lib
from efficientnet_tpu import distribute
from efficientnet_tpu import ema as ema_lib
from efficientnet_tpu import fileio
from efficientnet_tpu import model as model_lib
from efficientnet_tpu import optimizers
from efficientnet_tpu import preprocessing
from efficientnet_tpu import schedules
from efficientnet_tpu.config import ConfigError, ExperimentConfig

CONFIG_FILENAME = 'config.json'


def smoothed_cross_entropy(labels: tf.Tensor, logits: tf.Tensor,
                           num_classes: int, smoothing: float) -> tf.Tensor:
  """Per-example cross entropy against label-smoothed one-hot targets."""
  logits = tf.cast(logits, tf.float32)
  onehot = tf.one_hot(labels, num_classes, dtype=tf.float32)
  if smoothing:
    onehot = onehot * (1.0 - smoothing) + smoothing / num_classes
  return tf.nn.softmax_cross_entropy_with_logits(onehot, logits)


def sum_variable(name: str, dtype=tf.float32) -> tf.Variable:
  """A per-replica accumulator whose cross-replica read is the sum."""
  return tf.Variable(
      tf.zeros([], dtype), name=name, trainable=False,
      synchronization=tf.VariableSynchronization.ON_READ,
      aggregation=tf.VariableAggregation.SUM)


def replicated_loop(strategy, replica_step):
  """Returns `loop(iterator, num_steps)`: that many steps in one host call.

  The loop is one tf.function (the TPUEstimator "host loop"): the host pays
  the call and dispatch overhead once per loop, not once per step. On TPU,
  TPUStrategy compiles the whole loop with XLA; elsewhere XLA, when on,
  is applied inside `replica_step` (see `distribute.resolve_jit_compile`).
  """

  @tf.function
  def loop(iterator, num_steps):
    for _ in tf.range(num_steps):
      strategy.run(replica_step, args=(next(iterator),))

  return loop


def worker_dir(task, model_dir: str, is_writer: bool) -> str:
  """The writer writes to model_dir; other workers to a private scratch dir.

  MultiWorkerMirroredStrategy needs every worker to take part in a save, but
  only the writer's copy may land in model_dir.
  """
  if is_writer:
    return model_dir
  task_type, task_id = task
  return os.path.join(model_dir, f'.{task_type or "worker"}_{task_id}_tmp')


def replica_local_variables(model, ema=None) -> list:
  """Float state that replicas update locally between synchronizations:
  the batch-norm moving statistics and their EMA shadows."""
  local = [v for v in model.non_trainable_variables
           if tf.as_dtype(v.dtype).is_floating]
  if ema is not None:
    shadows = [ema.shadow_of(v) for v in local]
    local += [s for s in shadows if s is not None]
  return local


def model_rng_state(model) -> list:
  """The state variables of the model's Keras seed generators (dropout,
  stochastic depth), which its own checkpoint does not track."""
  return [v for v in model.variables
          if v.path.endswith('seed_generator_state')]


def replica_plan(cfg: ExperimentConfig, num_replicas: int) -> dict:
  """How a run splits over `num_replicas`: batches, BN groups, steps.

  Raises the same one-line ConfigErrors a run on that many replicas would.
  """
  cfg.validate_for_replicas(num_replicas)
  per_replica = cfg.train.train_batch_size // num_replicas
  g = collectives.resolve_bn_group_size(cfg.model, num_replicas, per_replica)
  return {
      'per_replica_train_batch': per_replica,
      'per_replica_eval_batch': cfg.train.eval_batch_size // num_replicas,
      'bn_group_size': g,
      'bn_groups': num_replicas // g,
      'bn_group_batch': g * per_replica,
      'steps_per_epoch': round(cfg.steps_per_epoch, 2),
      'total_steps': cfg.total_train_steps,
  }


class Trainer:
  """Owns the model, optimizer, EMA, checkpoints and the replicated loops."""

  def __init__(self, cfg: ExperimentConfig, strategy: tf.distribute.Strategy):
    self.cfg = cfg
    self.strategy = strategy
    self.num_replicas = strategy.num_replicas_in_sync
    expected = cfg.distribute.num_replicas
    if expected and expected != self.num_replicas:
      raise ConfigError(f'--num_replicas: expected {self.num_replicas} (the '
                        f'replicas of this {type(strategy).__name__}), got '
                        f'{expected}')
    plan = replica_plan(cfg, self.num_replicas)
    self.per_replica_batch = plan['per_replica_train_batch']
    self.bn_group_size = plan['bn_group_size']
    self.total_steps = cfg.total_train_steps
    self.steps_per_epoch = cfg.steps_per_epoch
    # XLA for the forward and backward pass (TPU: the whole loop, always).
    self.jit_compile = distribute.resolve_jit_compile(strategy,
                                                      cfg.train.jit_compile)
    self.input_dtype = tf.bfloat16 if cfg.model.use_bfloat16 else tf.float32
    tf_config = (distribute.read_tf_config()
                 if cfg.distribute.strategy == 'multi_worker' else None)
    self.task = distribute.task_of(tf_config)
    self.writer_roles = distribute.writer_roles(tf_config)
    self.is_writer = distribute.TRAIN_WRITER in self.writer_roles
    # An evaluator task in the cluster evaluates; the training tasks do not.
    self.has_evaluator_task = bool(
        tf_config and tf_config['cluster'].get('evaluator'))

    with strategy.scope():
      self.model = model_lib.build_model(cfg.model,
                                         bn_group_size=self.bn_group_size)
      self.learning_rate = schedules.build_learning_rate_schedule(
          cfg.optimizer, cfg.train.train_batch_size, self.steps_per_epoch,
          self.total_steps)
      self.optimizer = optimizers.build_optimizer(cfg.optimizer,
                                                  self.learning_rate)
      # Built before tracing: a Keras 3 optimizer must not create its slot
      # variables inside the replicated tf.function.
      self.optimizer.build(self.model.trainable_variables)
      self.ema = None
      if cfg.optimizer.moving_average_decay > 0:
        self.ema = ema_lib.ExponentialMovingAverage(
            self.model.variables, cfg.optimizer.moving_average_decay)
      self._loss_sum = sum_variable('train_loss_sum')
      self._correct_sum = sum_variable('train_correct_sum')
      self._example_sum = sum_variable('train_example_sum')
    self._sync_replica_local = collectives.replica_mean_assigner(
        strategy, replica_local_variables(self.model, self.ema))
    self._forward_backward_fn = (
        tf.function(self._forward_backward, jit_compile=True)
        if self.jit_compile else self._forward_backward)

    checkpoint_items = dict(model=self.model, optimizer=self.optimizer)
    if self.ema is not None:
      checkpoint_items['ema'] = self.ema
    # Dropout / stochastic-depth RNG state: Keras 3 seed generators are not
    # tracked by the model's checkpoint, and a resumed run must draw the
    # masks an uninterrupted one would.
    rng_state = model_rng_state(self.model)
    if rng_state:
      checkpoint_items['rng'] = rng_state
    self.checkpoint = tf.train.Checkpoint(**checkpoint_items)
    self.checkpoint_manager = tf.train.CheckpointManager(
        self.checkpoint,
        worker_dir(self.task, cfg.train.model_dir, self.is_writer),
        max_to_keep=cfg.train.keep_checkpoint_max,
        step_counter=self.optimizer.iterations, checkpoint_name='ckpt')
    self._train_loop_fn = None
    self._train_iterator = None
    self._skipped = None
    self._summary_writer = None

  # ---- state -----------------------------------------------------------
  @property
  def global_step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def restore(self, checkpoint_path: Optional[str] = None) -> int:
    """Restores the latest (or a given) checkpoint; returns the step."""
    path = checkpoint_path or tf.train.latest_checkpoint(
        self.cfg.train.model_dir)
    if path:
      self.checkpoint.restore(path).expect_partial()
      logging.info('Restored %s at step %d', path, self.global_step)
    return self.global_step

  def sync_replica_local_state(self) -> None:
    """Sets the BN moving statistics (and their EMA shadows) of every
    replica to their mean over replicas: one all-reduce for the model.

    Call on every worker before anything reads them (a checkpoint, an
    evaluation, an export); see `layers.GroupSyncBatchNormalization`.
    """
    self._sync_replica_local()

  def save_checkpoint(self) -> str:
    self.sync_replica_local_state()
    path = self.checkpoint_manager.save(
        checkpoint_number=self.optimizer.iterations)
    if not self.is_writer:
      tf.io.gfile.rmtree(os.path.dirname(path))
    return path

  def write_config(self) -> None:
    """Writes the resolved config (never replacing a different one)."""
    if not self.is_writer:
      return
    tf.io.gfile.makedirs(self.cfg.train.model_dir)
    path = os.path.join(self.cfg.train.model_dir, CONFIG_FILENAME)
    text = self.cfg.to_json()
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        if f.read() == text:
          return
      # Keep the first run's config; record the resumed one beside it.
      path = os.path.join(self.cfg.train.model_dir,
                          f'config-step{self.global_step}.json')
    fileio.write_atomically(path, text)

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
  def distribute_input(self, is_training: bool):
    """The distributed train or eval dataset. Training input continues the
    stream at the current step (see `data.resumable_stream`)."""
    batch = (self.cfg.train.train_batch_size if is_training
             else self.cfg.train.eval_batch_size)
    input_fn = data_lib.make_input_fn(
        self.cfg.data, self.cfg.model.num_classes, self.cfg.model.image_size,
        is_training, batch, self.input_dtype,
        start_step=self.global_step if is_training else 0,
        count_cache_dir=self.cfg.train.model_dir)
    if is_training:
      self._skipped = getattr(input_fn, 'skipped', None)
    options = tf.distribute.InputOptions(
        experimental_fetch_to_device=True,
        experimental_per_replica_buffer_size=2)
    return self.strategy.distribute_datasets_from_function(input_fn, options)

  def normalize(self, images: tf.Tensor) -> tf.Tensor:
    """uint8 images from the host -> normalized compute dtype, on device.

    The host pipeline ships uint8 (4x fewer bytes than float32 over the
    host-to-device link, and no per-image float work on the host CPU).
    """
    return preprocessing.normalize(images, self.input_dtype)

  # ---- the replicated train loop ----------------------------------------
  def _forward_backward(self, images: tf.Tensor, labels: tf.Tensor):
    """One replica's loss, logits and gradients (XLA-compiled when on)."""
    cfg = self.cfg
    variables = self.model.trainable_variables
    with tf.GradientTape() as tape:
      logits = self.model(self.normalize(images), training=True)
      per_example = smoothed_cross_entropy(
          labels, logits, cfg.model.num_classes,
          cfg.optimizer.label_smoothing)
      loss = tf.reduce_sum(per_example) / cfg.train.train_batch_size
      # Gradients are summed over replicas: each adds 1/R of the L2 term.
      loss += optimizers.l2_loss(cfg.optimizer, variables) / self.num_replicas
    # The optimizer all-reduces these; TF's differentiable all_reduce then
    # walks the whole multi-replica graph at trace time, once per call. The
    # gradients need no gradient of their own: stopping it cuts the trace of
    # a tiny model on 8 CPU replicas from ~2 minutes to under one.
    grads = [tf.stop_gradient(g) for g in tape.gradient(loss, variables)]
    return loss, tf.cast(logits, tf.float32), grads

  def _replica_train_step(self, batch: Dict[str, tf.Tensor]) -> None:
    labels = batch['labels']
    loss, logits, grads = self._forward_backward_fn(batch['images'], labels)
    # Outside any compiled function: the optimizer's ONLY_FIRST_REPLICA
    # `iterations` update needs merge_call (see resolve_jit_compile).
    step = self.optimizer.iterations
    self.optimizer.apply_gradients(zip(grads,
                                       self.model.trainable_variables))
    if self.ema is not None:
      self.ema.update(step)
    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                               labels), tf.float32)
    self._loss_sum.assign_add(loss)
    self._correct_sum.assign_add(tf.reduce_sum(correct))
    self._example_sum.assign_add(tf.cast(tf.size(labels), tf.float32))

  def train_loop(self, num_steps: int) -> Dict[str, float]:
    """Runs `num_steps` steps in one host call; returns loop metrics."""
    if self._train_loop_fn is None:
      self._train_loop_fn = replicated_loop(self.strategy,
                                            self._replica_train_step)
      self._train_iterator = iter(self.distribute_input(is_training=True))
    for v in (self._loss_sum, self._correct_sum, self._example_sum):
      v.assign(0.0)
    start = time.time()
    self._train_loop_fn(self._train_iterator,
                        tf.constant(num_steps, tf.int32))
    loss_sum = self._loss_sum.numpy()  # Blocks until the loop finished.
    elapsed = time.time() - start
    examples = self._example_sum.numpy()
    metrics = {
        'loss': float(loss_sum / num_steps),
        'top_1_accuracy': float(self._correct_sum.numpy() / max(examples, 1)),
        'learning_rate': float(self.learning_rate(self.optimizer.iterations
                                                  - 1)),
        'images_per_second': float(num_steps *
                                   self.cfg.train.train_batch_size / elapsed),
        'step_time_ms': float(1000.0 * elapsed / num_steps),
    }
    if self._skipped is not None:
      # This host's input since the process started (read ahead of the
      # steps by the prefetch buffers).
      metrics['skipped_records'] = self._skipped.total
    return metrics

  def write_summaries(self, metrics: Dict[str, float], step: int,
                      writer=None, prefix: str = '') -> None:
    writer = writer or self.summary_writer
    with writer.as_default(step=step):
      for name, value in metrics.items():
        tf.summary.scalar(prefix + name, value)
    writer.flush()

  # ---- driver ------------------------------------------------------------
  def train(self, evaluator=None) -> Dict[str, float]:
    """Trains to `total_steps`, resuming from model_dir; optionally evaluates.

    Args:
      evaluator: an `evaluation.Evaluator`; called every eval interval
        (train_and_eval) and at the end of training.

    Returns:
      The last train metrics (and eval metrics under 'eval/' keys).
    """
    self.restore()
    self.write_config()
    step = self.global_step
    interval = self.cfg.eval_interval_steps
    metrics: Dict[str, float] = {}
    if step >= self.total_steps:
      logging.info('Already trained to step %d (>= %d).', step,
                   self.total_steps)
    while step < self.total_steps:
      next_eval = min(self.total_steps, (step // interval + 1) * interval)
      num_steps = min(self.cfg.train.iterations_per_loop, next_eval - step)
      metrics = self.train_loop(num_steps)
      step = self.global_step
      metrics['epoch'] = step / self.steps_per_epoch
      logging.info('step %d/%d: %s', step, self.total_steps,
                   ', '.join(f'{k}={v:.4g}' for k, v in metrics.items()))
      self.write_summaries(metrics, step)
      self.save_checkpoint()
      if evaluator is not None and (step == next_eval and
                                    step < self.total_steps):
        eval_metrics = evaluator.evaluate_and_record(step)
        metrics.update({f'eval/{k}': v for k, v in eval_metrics.items()})
    if evaluator is not None:
      eval_metrics = evaluator.evaluate_and_record(step)
      metrics.update({f'eval/{k}': v for k, v in eval_metrics.items()})
    return metrics


def read_config(model_dir: str) -> Optional[dict]:
  """model_dir/config.json as a dict; None if absent.

  Raises:
    ConfigError: the file is not valid JSON (e.g. truncated).
  """
  path = os.path.join(model_dir, CONFIG_FILENAME)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except ValueError as e:
    raise ConfigError(f'--model_dir: {path} is not valid JSON ({e}); '
                      'restore the file or use a new --model_dir') from None
