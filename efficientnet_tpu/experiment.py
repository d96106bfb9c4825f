"""Wires one run: strategy, model state, input, trainer, evaluator, export.

  main (flags -> ExperimentConfig) -> run_experiment:
    distribute.build_strategy -> state.build_model_state
    -> data.pipeline inputs -> train.Trainer / evaluation.Evaluator
    -> export.export_saved_model

The trainer and the evaluator build nothing themselves; `build_trainer`,
`build_evaluator` and `export_model` give them what a run from the command
line gets, and tests and benchmarks call them with their own input.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

from absl import logging
import keras
import tensorflow as tf

from efficientnet_tpu import distribute
from efficientnet_tpu import evaluation
from efficientnet_tpu import export
from efficientnet_tpu import init_checkpoint
from efficientnet_tpu import replica_plan
from efficientnet_tpu import run_dir
from efficientnet_tpu import schedules
from efficientnet_tpu import sizing
from efficientnet_tpu import stack
from efficientnet_tpu import summaries
from efficientnet_tpu import train
from efficientnet_tpu.config import ConfigError, ExperimentConfig
from efficientnet_tpu.data import contract
from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.data import pipeline
from efficientnet_tpu.state import ModelState, build_model_state

# A side-car evaluator task waits this long for each new checkpoint when
# --eval_timeout is not set.
SIDECAR_EVAL_TIMEOUT_S = 3600


def train_input(cfg: ExperimentConfig
               ) -> Callable[[int], contract.TrainInput]:
  """start step -> the configured training input, continuing there."""
  return lambda start_step: pipeline.make_input(
      cfg.data, cfg.model.num_label_classes, cfg.model.image_size, True,
      cfg.train.train_batch_size, start_step=start_step,
      count_cache_dir=cfg.train.model_dir)


def build_trainer(cfg: ExperimentConfig, strategy: tf.distribute.Strategy,
                  state: Optional[ModelState] = None,
                  input_for_step: Optional[
                      Callable[[int], contract.TrainInput]] = None,
                  role: Optional[distribute.ClusterRole] = None,
                  plan: Optional[replica_plan.ReplicaPlan] = None
                  ) -> train.Trainer:
  """A Trainer on a new model state and the configured input (or yours)."""
  plan = plan or replica_plan.for_strategy(cfg, strategy)
  if state is None:
    state = build_model_state(cfg, strategy, plan.bn_group_size)
  return train.Trainer(cfg, strategy, state,
                       input_for_step or train_input(cfg),
                       role or distribute.cluster_role(cfg.distribute),
                       summary_images=cfg.train.summary_images, plan=plan)


def build_evaluator(cfg: ExperimentConfig, strategy: tf.distribute.Strategy,
                    state: ModelState,
                    eval_input: Optional[contract.EvalInput] = None,
                    role: Optional[distribute.ClusterRole] = None
                    ) -> evaluation.Evaluator:
  """An Evaluator of `state` on the configured eval set (or `eval_input`)."""
  if eval_input is None:
    # TFRecord eval counts its files (cached in the model dir, where
    # check_data_files put them) and is then sharded by file.
    eval_input = pipeline.make_input(
        cfg.data, cfg.model.num_label_classes, cfg.model.image_size, False,
        cfg.eval_batch_size_on(strategy.num_replicas_in_sync),
        count_cache_dir=cfg.train.model_dir)
  num_steps = eval_input.steps(distribute.num_input_pipelines(strategy))
  if cfg.train.eval_steps:
    num_steps = min(num_steps, cfg.train.eval_steps)
  return evaluation.Evaluator(cfg, strategy, state, eval_input, num_steps,
                              role or distribute.cluster_role(cfg.distribute))


def evaluator_for(trainer: train.Trainer,
                  eval_input: Optional[contract.EvalInput] = None
                  ) -> evaluation.Evaluator:
  """An Evaluator of `trainer`'s model state, with its role."""
  return build_evaluator(trainer.cfg, trainer.strategy, trainer.state,
                         eval_input, trainer.role)


@contextlib.contextmanager
def _init_checkpoint_errors():
  """init_checkpoint's ValueErrors as ConfigErrors naming the setting."""
  try:
    yield
  except ValueError as e:
    raise ConfigError('init_checkpoint', str(e).removeprefix(
        'load_initial_weights: ')) from None


def check_init_checkpoint(cfg: ExperimentConfig) -> None:
  """Fails before any work when `init_checkpoint` names no weights."""
  if cfg.train.init.checkpoint:
    with _init_checkpoint_errors():
      init_checkpoint.resolve_source(cfg.train.init.checkpoint)


def maybe_initialize(cfg: ExperimentConfig, state: ModelState):
  """Loads `init_checkpoint` into a new run's state; None when resuming.

  Every worker loads the same weights; a run resumed from its own
  checkpoint in model_dir keeps them (the trainer restores it).
  """
  init = cfg.train.init
  if not init.checkpoint:
    return None
  if run_dir.latest_checkpoint(cfg.train.model_dir):
    logging.info('Resuming from model_dir: --init_checkpoint=%s is not '
                 'loaded.', init.checkpoint)
    return None
  with _init_checkpoint_errors():
    report = init_checkpoint.load_initial_weights(
        state.model, init.checkpoint, exclude=init.exclude,
        ema=state.ema, use_ema_weights=init.from_ema)
  if report.source_format != init_checkpoint.FORMAT_CHECKPOINT:
    weights = 'its weights'
  elif init.from_ema:
    weights = 'its EMA averages (--init_from_ema)'
  else:
    weights = 'its raw weights, not its EMA averages (see --init_from_ema)'
  logging.info('Initialized %d variables from %s (%s: %s)%s.',
               len(report.loaded), report.path, report.source_format,
               weights, '; classifier re-initialized: ' + report.head_reason
               if report.head_reinitialized else '')
  if cfg.model.batch_norm_warmup:
    logging.info('Batch-norm moving statistics warm up from this run\'s '
                 'first step (momentum min(%g, (1 + step) / (10 + step))): '
                 'evaluations use the statistics of this data, not the '
                 'source\'s.', cfg.model.batch_norm_momentum)
  else:
    kept = cfg.model.batch_norm_momentum ** cfg.total_train_steps
    if kept > 0.05:
      logging.warning(
          'batch_norm_warmup is off: after %d steps at batch_norm_momentum='
          '%g the moving statistics evaluations use still hold %.0f%% of the '
          'source\'s; leave batch_norm_warmup unset (on for fine-tunes)',
          cfg.total_train_steps, cfg.model.batch_norm_momentum, 100 * kept)
  return report


def export_model(cfg: ExperimentConfig, state: ModelState,
                 export_dir: str) -> str:
  """Exports `state`'s model (EMA weights when on) as a SavedModel.

  Class ids follow the data set's labels and carry its class names
  (`serving_labels`); images over `max_image_pixels` are served as invalid
  rows.
  """
  offset, names = serving_labels(cfg)
  return export.export_saved_model(state.model, state.ema, cfg.model,
                                   cfg.data.resize_method, export_dir,
                                   offset, names, cfg.data.eval_crop_fraction,
                                   cfg.data.max_image_pixels)


def serving_labels(cfg: ExperimentConfig):
  """(label_offset, class names) of the model's outputs in the data set.

  TFRecords hold 1-based labels: output i is label i + 1, or label i with
  a background class (1001 outputs; output 0 is 'background'). tfds labels
  are 0-based: output i is label i, or i - 1 with a background class.
  Names come from dataset_info.json; without it, the label as text.
  """
  data, n = cfg.data, cfg.model.num_label_classes
  background = data.include_background_label
  if data.source == 'tfrecord':
    offset = 0 if background else 1
  elif data.source.startswith('tfds:'):
    offset = -1 if background else 0
  else:
    offset = 0
  names = [str(i + offset) for i in range(n)]
  info = (dataset_info.read(data.data_dir)
          if data.source == 'tfrecord' and data.data_dir else None)
  if info is not None:
    by_label = dict(zip((c.label for c in info.classes), info.class_names()))
    names = [by_label.get(i + offset, names[i]) for i in range(n)]
    if background:
      names[0] = 'background'
  return offset, names


def startup_summary(cfg: ExperimentConfig, strategy: tf.distribute.Strategy,
                    state: ModelState, mode: str,
                    size: Optional[sizing.ModelSize] = None,
                    plan: Optional[replica_plan.ReplicaPlan] = None) -> str:
  """What this run is, before its first step (logged and in TensorBoard).

  Eval and export show only what applies to them: no optimizer, schedule,
  run length or training memory.
  """
  plan = plan or replica_plan.for_strategy(cfg, strategy)
  size = size or sizing.model_size(cfg, state.model)
  data = cfg.data
  source = data.source if data.source == 'synthetic' else (
      f'{data.source} from {data.data_dir}')
  m = cfg.model
  precision = ('bfloat16' if m.use_bfloat16 else
               'float16 (dynamic loss scale)' if m.use_float16 else 'float32')
  lines = [
      f'Run: --mode={mode}, model_dir {cfg.train.model_dir}',
      f'Strategy: {type(strategy).__name__}, '
      f'{strategy.num_replicas_in_sync} replicas, '
      f'{distribute.num_input_pipelines(strategy)} host(s) / input '
      'pipeline(s)',
  ]
  if cfg.trains:
    memory = sizing.training_memory(cfg, size,
                                    plan.per_replica_train_batch)
    schedule = schedules.describe_schedule(
        cfg.optimizer.schedule, cfg.train.train_batch_size,
        cfg.steps_per_epoch, cfg.total_train_steps)
    lr_at = ', '.join(f'{k} {lr:.4g} (step {s})'
                      for k, (s, lr) in schedule['lr_at'].items())
    lines += [
        f'Batch: {cfg.train.train_batch_size} global, '
        f'{plan.per_replica_train_batch} per replica; BN groups of '
        f'{plan.bn_group_size} replica(s) ({plan.bn_group_batch} '
        'images)',
        f'Length: {plan.steps_per_epoch} steps per epoch, '
        f'{plan.total_steps} steps ({schedule["train_epochs"]:.4g} '
        f'epochs); a progress line and checkpoint every '
        f'{plan.steps_per_loop} steps'
        + (f', an evaluation every {plan.eval_every_steps}'
           if mode == 'train_and_eval' else ''),
        f'Optimizer: {cfg.optimizer.name}, {schedule["lr_schedule"]} '
        f'schedule, peak LR {schedule["peak_lr"]:.4g} after '
        f'{schedule["warmup_steps"]} warmup steps; LR at {lr_at}',
    ]
  elif mode == 'eval':
    lines.append(f'Batch: eval {plan.per_replica_eval_batch} per '
                 'replica; batch norm with the moving statistics')
  xla = distribute.resolve_jit_compile(strategy, cfg.train.jit_compile)
  lines += [
      f'Stack: {stack.describe(stack.installed())}',
      f'Precision: {precision}; XLA: {"on" if xla else "off"}',
  ]
  if mode != 'export':
    lines.append(
        f'Data: {source}: {data.num_train_images} train / '
        f'{data.num_eval_images} eval images, {m.num_label_classes} classes '
        f'(counts: {data.counts_from})')
  lines.append(
      f'Model: {m.name} (width {m.width_coefficient:g}, depth '
      f'{m.depth_coefficient:g}, {m.image_size} px): '
      f'{", ".join(sizing.describe_size(size))}')
  if cfg.trains:
    lines.append(f'Memory: {memory.describe()}')
  return '\n'.join(lines)


def run_experiment(cfg: ExperimentConfig) -> Dict[str, float]:
  """Builds the strategy and runs cfg.train.mode; returns final metrics.

  Training modes hold the model_dir lock (`run_lock`) throughout. Local
  paths are refused on several hosts (`distribute.check_shared_paths`).
  """
  # One training run per model_dir, taken before the strategy exists so a
  # refused run costs nothing. Only the process writing the training's
  # checkpoints locks: --mode=eval beside a training run (a side-car
  # evaluator) is supported, and the other workers write no checkpoints.
  role = distribute.cluster_role(cfg.distribute)
  distribute.check_shared_paths(cfg)  # TF_CONFIG's processes.
  if cfg.train.mode in ('train', 'train_and_eval') and role.is_train_writer:
    lock = run_dir.training_lock(cfg.train.model_dir)
  else:
    lock = contextlib.nullcontext()
  with lock:
    if cfg.data.deterministic:
      # Before any op runs: reductions, scatters and tf.data ordering then
      # give bitwise the same results on every run (slower; see --help).
      tf.config.experimental.enable_op_determinism()
    strategy = distribute.build_strategy(cfg.distribute)
    # A TPU slice's hosts, known now: refused before any model is built.
    distribute.check_shared_paths(cfg, strategy)
    # Weight initialization (Python, numpy and TF seeds): the same --seed
    # gives the same initial model, on every worker.
    keras.utils.set_random_seed(cfg.data.seed)
    # Resolved once, here: everything below is handed this plan.
    plan = replica_plan.for_strategy(cfg, strategy)
    state = build_model_state(cfg, strategy, plan.bn_group_size)
    mode, eval_timeout = cfg.train.mode, cfg.train.eval_timeout
    if role.task[0] == 'evaluator':
      # TF_CONFIG's side-car evaluator: evaluates each new checkpoint.
      mode, eval_timeout = 'eval', eval_timeout or SIDECAR_EVAL_TIMEOUT_S
      logging.info('Evaluator task: evaluating new checkpoints in %s '
                   '(waiting up to %d s for each).', cfg.train.model_dir,
                   eval_timeout)
    elif mode == 'train_and_eval' and role.has_evaluator_task:
      mode = 'train'
      logging.info('TF_CONFIG has an evaluator task: it evaluates; this '
                   'training task does not.')
    size = sizing.model_size(cfg, state.model)
    summary = startup_summary(cfg, strategy, state, mode, size, plan)
    logging.info('Starting:\n  %s', summary.replace('\n', '\n  '))
    if mode in ('train', 'train_and_eval'):
      # Before the first batch: a batch that cannot fit is one line, not a
      # process that eats the host's memory.
      for warning in sizing.check_fits(
          cfg, sizing.training_memory(cfg, size,
                                      plan.per_replica_train_batch),
          strategy.num_replicas_in_sync) + sizing.recipe_warnings(cfg):
        logging.warning('%s', warning)
    if mode == 'export':
      path = run_dir.resolve_checkpoint(cfg.train.model_dir,
                                        cfg.train.checkpoint_path)
      if path is None:
        raise ConfigError('model_dir', f'no checkpoint in '
                          f'{cfg.train.model_dir} to export; point it at a '
                          'training run')
      metrics = {'step': state.restore(path)}
    elif mode == 'eval':
      metrics = evaluation.continuous_eval(
          state, build_evaluator(cfg, strategy, state, role=role),
          cfg.train.model_dir, cfg.total_train_steps, eval_timeout,
          cfg.train.checkpoint_path)
    else:
      trainer = build_trainer(cfg, strategy, state, role=role, plan=plan)
      maybe_initialize(cfg, state)
      with trainer.summary_writer.as_default(step=state.step):
        tf.summary.text('run/startup', summaries.startup_markdown(summary))
      evaluator = (build_evaluator(cfg, strategy, state, role=role)
                   if mode == 'train_and_eval' else None)
      metrics = trainer.train(evaluator=evaluator)
    if cfg.train.export_dir and role.is_train_writer:
      export_model(cfg, state, cfg.train.export_dir)
    return metrics
