r"""Trains and evaluates EfficientNets on TPU pods, GPUs and CPUs.

Flags keep the TPUEstimator-era names of tensorflow/tpu where they exist, and
`--preset=NAME` loads a preset shipped with the package (`--preset=list`
shows them; `--flagfile=FILE` reads your own). Flags are read here only:
they become an `ExperimentConfig`, validated before any work starts.

Local smoke run (4 simulated replicas, tiny model, synthetic data):

  efficientnet-tpu-train --preset=cpu_smoke --model_dir=/tmp/effnet_smoke
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

from efficientnet_tpu import config as config_lib
from efficientnet_tpu import presets as presets_lib

FLAGS = flags.FLAGS

# ---- cluster -----------------------------------------------------------------
flags.DEFINE_enum('strategy', 'cpu', config_lib.STRATEGIES,
                  'tf.distribute strategy: tpu (TPUStrategy), gpu '
                  '(MirroredStrategy), multi_worker (MultiWorkerMirrored'
                  'Strategy from TF_CONFIG), cpu (N logical CPU replicas).')
flags.DEFINE_string('tpu', None, "TPU name, 'local' on a TPU VM, or a "
                    'grpc:// address (legacy TPU Node). Implies '
                    '--strategy=tpu.')
flags.DEFINE_string('tpu_zone', None, 'GCE zone of the TPU named by --tpu '
                    '(pod slices driven from worker 0, TPU Nodes).')
flags.DEFINE_string('gcp_project', None, 'GCP project of the TPU named by '
                    '--tpu (pod slices, TPU Nodes).')
flags.DEFINE_integer('num_cpu_replicas', 1, 'Logical CPU devices (replicas) '
                     'for --strategy=cpu: simulates a pod slice locally.')
flags.DEFINE_integer('num_gpus', 0, 'GPUs to use with --strategy=gpu; 0 = all.')
flags.DEFINE_integer('num_replicas', None, 'Replicas of the slice (TPU cores, '
                     'GPUs): --dry_run resolves the per-replica batch and BN '
                     'groups for it without hardware; a real run checks that '
                     'the strategy has this many.')

# ---- data --------------------------------------------------------------------
flags.DEFINE_string('data_dir', None, 'Directory (local or gs://) of ImageNet '
                    'TFRecords train-*-of-* / validation-*-of-*, or a '
                    'prepared tensorflow-datasets data_dir with --data=tfds:.')
flags.DEFINE_string('data', None, "Data source: 'synthetic', 'tfrecord' or "
                    "'tfds:NAME'. Default: tfrecord when --data_dir is set, "
                    'else synthetic.')
flags.DEFINE_integer('num_train_images', 1281167, 'Images in the train split.')
flags.DEFINE_integer('num_eval_images', 50000, 'Images in the eval split.')
flags.DEFINE_integer('num_label_classes', 1000, 'Classes; 1001 keeps label 0 '
                     'as background (labels in the records are 1-based).')
flags.DEFINE_enum('augment_name', 'none', config_lib.AUGMENTATIONS,
                  'Training augmentation after the random crop.')
flags.DEFINE_integer('randaug_num_layers', 2, 'RandAugment ops per image.')
flags.DEFINE_float('randaug_magnitude', 10.0, 'RandAugment magnitude [0, 30].')
flags.DEFINE_enum('resize_method', 'bicubic', config_lib.RESIZE_METHODS,
                  'Image resize method.')
flags.DEFINE_integer('shuffle_buffer', 1024, 'Examples in the shuffle buffer.')
flags.DEFINE_bool('skip_corrupt', False, 'Skip (and count) corrupt training '
                  'records instead of failing.')
flags.DEFINE_float('max_corrupt_fraction', 0.01, 'With --skip_corrupt: stop '
                   'with an error when more than this fraction of the '
                   'training records read was bad (checked after 1000 '
                   'reads), or when 1000 reads in a row were bad.')
flags.DEFINE_integer('max_image_pixels', 1 << 26, 'Refuse images whose '
                     'header declares more pixels (checked before '
                     'decoding): an error naming the file, or skipped and '
                     'counted with --skip_corrupt.')
flags.DEFINE_bool('deterministic', False, 'Deterministic input order and TF '
                  'ops (slower): a run resumed after a kill ends with '
                  'bitwise the weights of an uninterrupted run with the '
                  'same --seed. tfrecord and synthetic data, no '
                  '--augment_name.')
flags.DEFINE_integer('seed', 0, 'Seed for weight initialization, synthetic '
                     'data and shuffling.')

# ---- model -------------------------------------------------------------------
flags.DEFINE_enum('model_name', 'efficientnet-b0',
                  list(config_lib.MODEL_TABLE), 'EfficientNet variant.')
flags.DEFINE_integer('image_size', None, 'Input resolution; default: the '
                     "model's (224 for B0 ... 600 for B7).")
flags.DEFINE_float('width_coefficient', None, "Override the model's width "
                   'multiplier (scaled-down test models).')
flags.DEFINE_float('depth_coefficient', None, "Override the model's depth "
                   'multiplier (scaled-down test models).')
flags.DEFINE_float('dropout_rate', None, "Dropout before the classifier; "
                   "default: the model's.")
flags.DEFINE_float('stochastic_depth_rate', 0.2, 'Drop rate of the last '
                   'block (grows linearly from 0 at the first block).')
flags.DEFINE_float('batch_norm_momentum', 0.99, 'Batch-norm moving-average '
                   'momentum.')
flags.DEFINE_float('batch_norm_epsilon', 1e-3, 'Batch-norm epsilon.')
flags.DEFINE_integer('bn_group_size', None, 'Replicas per batch-norm group: '
                     '1 = local BN, 0 = all replicas (global sync BN).')
flags.DEFINE_integer('bn_group_batch_size', None, 'Target images per '
                     'batch-norm group; the group size is derived from the '
                     'actual replica count and per-replica batch.')
flags.DEFINE_bool('use_bfloat16', False, 'bfloat16 activations (mixed '
                  'precision) with float32 weights and logits.')

# ---- optimization ------------------------------------------------------------
flags.DEFINE_enum('optimizer', 'rmsprop', config_lib.OPTIMIZERS, 'Optimizer.')
flags.DEFINE_float('base_learning_rate', 0.016, 'Learning rate per 256 '
                   'images with --lr_scaling=linear, or the absolute peak '
                   'with --lr_scaling=none.')
flags.DEFINE_enum('lr_scaling', 'linear', config_lib.LR_SCALINGS,
                  'linear: peak = base * batch / 256; none: peak = base.')
flags.DEFINE_enum('lr_schedule', 'exponential', config_lib.LR_SCHEDULES,
                  'Decay after warmup.')
flags.DEFINE_float('lr_warmup_epochs', 5.0, 'Linear warmup epochs.')
flags.DEFINE_float('lr_decay_epochs', 2.4, 'Epochs per exponential decay.')
flags.DEFINE_float('lr_decay_factor', 0.97, 'Exponential decay factor.')
flags.DEFINE_float('poly_power', 2.0, 'Polynomial decay power.')
flags.DEFINE_float('end_learning_rate', 0.0, 'Final LR of poly decay.')
flags.DEFINE_float('momentum', 0.9, 'Momentum (LARS, RMSProp, SGD).')
flags.DEFINE_bool('nesterov', False, 'Nesterov momentum (LARS, momentum).')
flags.DEFINE_float('rmsprop_decay', 0.9, 'RMSProp decay (rho).')
flags.DEFINE_float('rmsprop_epsilon', 1e-3, 'RMSProp epsilon.')
flags.DEFINE_float('lars_eeta', 0.001, 'LARS trust coefficient.')
flags.DEFINE_float('lars_epsilon', 0.0, 'LARS epsilon in the trust ratio.')
flags.DEFINE_float('weight_decay', 1e-5, 'Weight decay, applied once: by LARS '
                   'itself, or as an L2 loss term for the other optimizers.')
flags.DEFINE_list('weight_decay_exclude',
                  list(config_lib.DEFAULT_WEIGHT_DECAY_EXCLUDE),
                  'Regexes on variable paths excluded from weight decay and '
                  'LARS adaptation.')
flags.DEFINE_float('label_smoothing', 0.1, 'Label smoothing.')
flags.DEFINE_float('moving_average_decay', 0.9999, 'EMA decay of the weights '
                   'used for evaluation and export; 0 disables EMA.')

# ---- loop --------------------------------------------------------------------
flags.DEFINE_string('model_dir', None, 'Directory (local or gs://) for '
                    'checkpoints, summaries and the resolved config. An '
                    'existing run there is resumed, never overwritten.')
flags.DEFINE_enum('mode', 'train', config_lib.MODES, 'What to run.')
flags.DEFINE_integer('train_batch_size', 2048, 'Global training batch.')
flags.DEFINE_integer('eval_batch_size', 1024, 'Global eval batch.')
flags.DEFINE_integer('train_steps', None, 'Training steps (wins over '
                     '--train_epochs).')
flags.DEFINE_float('train_epochs', 350.0, 'Training epochs.')
flags.DEFINE_integer('iterations_per_loop', 1251, 'Steps per host call (and '
                     'per checkpoint).')
flags.DEFINE_float('eval_every_epochs', 0.0, 'train_and_eval: epochs between '
                   'evaluations; 0 = only at the end.')
flags.DEFINE_integer('eval_every_steps', None, 'train_and_eval: steps between '
                     'evaluations (wins over --eval_every_epochs).')
flags.DEFINE_integer('eval_steps', None, 'Limit evaluation to this many '
                     'batches (default: the whole eval set, exactly once).')
flags.DEFINE_integer('eval_timeout', 0, '--mode=eval: seconds to wait for a '
                     'new checkpoint; 0 = evaluate the latest and exit.')
flags.DEFINE_integer('keep_checkpoint_max', 5, 'Checkpoints kept.')
flags.DEFINE_string('export_dir', None, 'Write a SavedModel serving JPEG '
                    'bytes here after training / evaluation.')
flags.DEFINE_enum('jit_compile', 'auto', ['auto', 'true', 'false'],
                  'XLA. auto: TPU compiles every step (always); GPU and CPU '
                  'off. true (GPU, or one CPU replica): the forward and '
                  'backward pass compiled, the optimizer update outside.')
flags.DEFINE_bool('dry_run', False, 'Print the resolved config, the '
                  'replica plan (with --num_replicas off CPU) and LR '
                  'schedule, plot it to model_dir/lr_schedule.png, and exit.')
flags.DEFINE_string('preset', None, 'A preset shipped with the package, by '
                    'name (command line only): its flags apply before all '
                    'others, so explicit flags win. list: print the presets.')


def config_from_flags(f=FLAGS) -> config_lib.ExperimentConfig:
  """Turns parsed flags into a validated ExperimentConfig."""
  if f.model_dir is None:
    raise config_lib.ConfigError('--model_dir: expected a directory for '
                                 'checkpoints and summaries, got None')
  source = f.data or ('tfrecord' if f.data_dir else 'synthetic')
  if source == 'synthetic' and f.data_dir:
    raise config_lib.ConfigError(
        f'--data_dir: {f.data_dir} is given but --data=synthetic (set by a '
        'preset or flag) reads no files; add --data=tfrecord (or tfds:NAME) '
        'after the preset, or drop --data_dir')
  strategy = 'tpu' if (f.tpu and f['strategy'].using_default_value) else (
      f.strategy)
  if f.tpu and strategy != 'tpu':
    raise config_lib.ConfigError(
        f'--tpu: {f.tpu!r} is given but --strategy={strategy} does not use '
        'a TPU; use --strategy=tpu (or leave --strategy out), or drop --tpu')
  return config_lib.ExperimentConfig(
      model=config_lib.ModelConfig(
          name=f.model_name,
          num_classes=f.num_label_classes,
          width_coefficient=f.width_coefficient,
          depth_coefficient=f.depth_coefficient,
          image_size=f.image_size,
          dropout_rate=f.dropout_rate,
          stochastic_depth_rate=f.stochastic_depth_rate,
          bn_momentum=f.batch_norm_momentum,
          bn_epsilon=f.batch_norm_epsilon,
          bn_group_size=f.bn_group_size,
          bn_group_batch_size=f.bn_group_batch_size,
          use_bfloat16=f.use_bfloat16),
      data=config_lib.DataConfig(
          source=source,
          data_dir=f.data_dir,
          num_train_images=f.num_train_images,
          num_eval_images=f.num_eval_images,
          include_background_label=f.num_label_classes == 1001,
          augment=f.augment_name,
          randaug_num_layers=f.randaug_num_layers,
          randaug_magnitude=f.randaug_magnitude,
          resize_method=f.resize_method,
          shuffle_buffer=f.shuffle_buffer,
          skip_corrupt=f.skip_corrupt,
          max_corrupt_fraction=f.max_corrupt_fraction,
          max_image_pixels=f.max_image_pixels,
          deterministic=f.deterministic,
          seed=f.seed),
      optimizer=config_lib.OptimizerConfig(
          optimizer=f.optimizer,
          base_learning_rate=f.base_learning_rate,
          lr_scaling=f.lr_scaling,
          lr_schedule=f.lr_schedule,
          lr_warmup_epochs=f.lr_warmup_epochs,
          lr_decay_epochs=f.lr_decay_epochs,
          lr_decay_factor=f.lr_decay_factor,
          poly_power=f.poly_power,
          end_learning_rate=f.end_learning_rate,
          momentum=f.momentum,
          nesterov=f.nesterov,
          rmsprop_decay=f.rmsprop_decay,
          rmsprop_epsilon=f.rmsprop_epsilon,
          lars_eeta=f.lars_eeta,
          lars_epsilon=f.lars_epsilon,
          weight_decay=f.weight_decay,
          weight_decay_exclude=tuple(f.weight_decay_exclude),
          label_smoothing=f.label_smoothing,
          moving_average_decay=f.moving_average_decay),
      distribute=config_lib.DistributeConfig(
          strategy=strategy,
          tpu=f.tpu,
          tpu_zone=f.tpu_zone,
          gcp_project=f.gcp_project,
          num_cpu_replicas=f.num_cpu_replicas,
          num_gpus=f.num_gpus,
          num_replicas=f.num_replicas),
      train=config_lib.TrainConfig(
          model_dir=f.model_dir,
          mode=f.mode,
          train_batch_size=f.train_batch_size,
          eval_batch_size=f.eval_batch_size,
          train_steps=f.train_steps,
          train_epochs=f.train_epochs,
          iterations_per_loop=f.iterations_per_loop,
          eval_every_epochs=f.eval_every_epochs,
          eval_every_steps=f.eval_every_steps,
          eval_timeout=f.eval_timeout,
          eval_steps=f.eval_steps,
          keep_checkpoint_max=f.keep_checkpoint_max,
          export_dir=f.export_dir,
          jit_compile={'auto': None, 'true': True,
                       'false': False}[f.jit_compile],
          dry_run=f.dry_run,
          seed=f.seed))


def check_before_start(cfg: config_lib.ExperimentConfig) -> None:
  """Checks that need the filesystem, before any strategy or model exists."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import run_dir  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import schedules  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import train as train_lib  # pylint: disable=g-import-not-at-top

  num_replicas = known_num_replicas(cfg)
  if num_replicas:
    # Batch divisibility and BN groups, known up front on CPU or with
    # --num_replicas; otherwise checked once the strategy reports them.
    train_lib.replica_plan(cfg, num_replicas)
  # Building the schedule validates it (warmup vs length, end LR, ...).
  schedules.build_learning_rate_schedule(cfg.optimizer,
                                         cfg.train.train_batch_size,
                                         cfg.steps_per_epoch,
                                         cfg.total_train_steps)
  run_dir.check_writable(cfg.train.model_dir)
  data_pipeline.check_data_files(cfg.data, cfg.train.mode,
                                 cfg.train.model_dir)
  run_dir.check_resumable(cfg)
  export_dir = cfg.train.export_dir
  if export_dir and tf.io.gfile.exists(export_dir) and tf.io.gfile.listdir(
      export_dir):
    raise config_lib.ConfigError(
        f'--export_dir: expected a new or empty directory, {export_dir} is '
        'not empty (exports never overwrite)')


def known_num_replicas(cfg: config_lib.ExperimentConfig):
  """The replica count before any strategy exists (None if unknown)."""
  if cfg.distribute.num_replicas:
    return cfg.distribute.num_replicas
  if cfg.distribute.strategy == 'cpu':
    return cfg.distribute.num_cpu_replicas
  return None


def dry_run(cfg: config_lib.ExperimentConfig) -> None:
  """Prints the resolved config, replica plan and schedule; plots the LR."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import schedules  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import train as train_lib  # pylint: disable=g-import-not-at-top
  schedule = schedules.build_learning_rate_schedule(
      cfg.optimizer, cfg.train.train_batch_size, cfg.steps_per_epoch,
      cfg.total_train_steps)
  summary = schedules.describe_schedule(
      cfg.optimizer, cfg.train.train_batch_size, cfg.steps_per_epoch,
      cfg.total_train_steps)
  print(cfg.to_json())
  num_replicas = known_num_replicas(cfg)
  if num_replicas:
    print(f'Replicas ({num_replicas}):')
    for k, v in train_lib.replica_plan(cfg, num_replicas).items():
      print(f'  {k}: {v}')
  else:
    print('Replicas: set --num_replicas=N to resolve the per-replica batch '
          'and BN groups of an N-replica slice')
  print('Learning-rate schedule:')
  for k, v in summary.items():
    print(f'  {k}: {v}')
  tf.io.gfile.makedirs(cfg.train.model_dir)
  path = os.path.join(cfg.train.model_dir, 'lr_schedule.png')
  schedules.plot_schedule(schedule, cfg.total_train_steps, path)
  print(f'  plot: {path}')


def input_error_line(e: BaseException):
  """One line for an error raised by the input pipeline's checks, or None.

  The pipeline's `tf.debugging.Assert`s (bad image, label out of range,
  truncated TFRecord file) and TFRecord CRC failures name the file; the
  rest of TF's message (graph node, stack) is dropped.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if isinstance(e, tf.errors.InvalidArgumentError):
    match = re.search(r'assertion failed: (.*)', e.message)
    if match is None:
      return None
    parts = re.findall(r'\[([^\]]*)\]', match.group(1))
    line = ' '.join(p.strip() for p in parts if p.strip())
    # Checks that name their own flag (--max_corrupt_fraction, ...).
    return line if line.startswith('--') else '--data_dir: ' + line
  if isinstance(e, tf.errors.DataLossError):
    return '--data_dir: ' + e.message.strip().splitlines()[0] + (
        ' (set --skip_corrupt to skip bad records in training)')
  return None


# INFO lines TF's own Python code logs on every trace and checkpoint: in the
# smoke run 28 of 42 log lines. Warnings and errors from the same modules,
# and every other INFO line, still show.
_TF_INFO_NOISE = (
    'Reduce to /',  # cross_device_ops: each all-reduce placement, per trace.
    'Sharding callback duration',  # functional_saver: each checkpoint save.
)


class _DropTfInfoNoise(py_logging.Filter):
  """Drops the INFO records of `_TF_INFO_NOISE` (see quiet_tf_info_noise)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not (record.levelno <= py_logging.INFO and
                record.getMessage().startswith(_TF_INFO_NOISE))


def quiet_tf_info_noise() -> None:
  """Filters TF's per-trace / per-save INFO lines out of the run's log.

  TF logs them through its own logger (cross_device_ops) or absl's
  (functional_saver), so both get the filter.
  """
  for name in ('tensorflow', 'absl'):
    logger = py_logging.getLogger(name)
    if not any(isinstance(f, _DropTfInfoNoise) for f in logger.filters):
      logger.addFilter(_DropTfInfoNoise())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  quiet_tf_info_noise()
  try:
    cfg = config_from_flags(FLAGS)
    check_before_start(cfg)
    if cfg.train.dry_run:
      dry_run(cfg)
      return 0
    from efficientnet_tpu import experiment  # pylint: disable=g-import-not-at-top
    metrics = experiment.run_experiment(cfg)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    line = input_error_line(e)
    if line is None:
      raise
    # Bad records found while running: what was written before (checkpoints,
    # summaries) stays; nothing after the failing step is written.
    print(f'error: {line}', file=sys.stderr)
    return 2
  logging.info('Final metrics: %s', metrics)
  print(json.dumps({k: round(v, 6) if isinstance(v, float) else v
                    for k, v in metrics.items()}, sort_keys=True))
  return 0


def run():
  """Console-script entry point."""
  # The preset becomes a flagfile ahead of every other flag (see presets).
  try:
    argv = presets_lib.expand_argv(sys.argv)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if argv is None:
    print(presets_lib.listing())
    sys.exit(0)
  app.run(lambda argv: sys.exit(main(argv)), argv=argv)


if __name__ == '__main__':
  run()
