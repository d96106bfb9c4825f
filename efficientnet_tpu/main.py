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
from typing import Optional

from absl import app
from absl import flags
from absl import logging

from efficientnet_tpu import config as config_lib
from efficientnet_tpu import presets as presets_lib
from efficientnet_tpu import stack

FLAGS = flags.FLAGS

# One flag per setting of config.py (name, type, default, help, choices),
# plus the flags of the command line itself.
CLI_FLAGS = (
    config_lib.Setting(
        name='preset', type=str, optional=True, default=None,
        help='A preset shipped with the package, by name (command line '
        'only): its flags apply before all others, so explicit flags win; '
        "the data's dataset_info.json replaces its image and class counts, "
        "and eval / export take the run's config.json over it. list: print "
        'the presets.', choices=None, title='Run', path=(),
        flag=True),
)


def all_flags() -> tuple:
  """The settings' flags, then the CLI's own, in documentation order."""
  return tuple(config_lib.flag_settings()) + CLI_FLAGS


def define_flags(flag_values=FLAGS) -> None:
  """Defines one absl flag per setting (see config.setting)."""
  for s in all_flags():
    kw = dict(flag_values=flag_values)
    if s.choices:
      flags.DEFINE_enum(s.name, s.default, list(s.choices), s.help, **kw)
    elif s.type is bool:
      flags.DEFINE_bool(s.name, s.default, s.help, **kw)
    elif s.type is int:
      flags.DEFINE_integer(s.name, s.default, s.help, **kw)
    elif s.type is float:
      flags.DEFINE_float(s.name, s.default, s.help, **kw)
    elif s.type is tuple:
      flags.DEFINE_list(s.name, list(s.default), s.help, **kw)
    elif s.type is str:
      flags.DEFINE_string(s.name, s.default, s.help, **kw)
    else:
      raise TypeError(f'setting {s.name}: no flag type for {s.type}')


define_flags()


def explicit_settings(f=FLAGS) -> frozenset:
  """The settings given on the command line or in the user's flagfiles.

  A preset's values are defaults, not given: the run's config.json (eval,
  export) and the data set's description (counts) take their place. The
  preset's flagfile is the first thing `presets.expand_argv` puts on the
  command line, so a flag it sets counts as given when it is set again.
  """
  preset = f['preset'].value
  from_preset = presets_lib.flag_names(preset) if preset else frozenset()
  return frozenset(s.name for s in all_flags()
                   if f[s.name].present > (s.name in from_preset))


# Settings that name files or directories: taken literally (never as glob
# patterns), and they must be UTF-8 for TensorFlow's file layer.
PATH_SETTINGS = ('model_dir', 'data_dir', 'export_dir', 'checkpoint_path',
                 'init_checkpoint')


def config_from_flags(f=FLAGS) -> config_lib.ExperimentConfig:
  """Turns parsed flags into a validated ExperimentConfig."""
  from efficientnet_tpu import fileio  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu.data import dataset_info  # pylint: disable=g-import-not-at-top
  values = {s.name: f[s.name].value for s in config_lib.flag_settings()}
  for s in config_lib.flag_settings():
    if s.type is tuple:  # absl lists -> the config's tuples.
      values[s.name] = tuple(values[s.name])
  for name in PATH_SETTINGS:
    if values.get(name):
      try:
        fileio.check_path_encoding(values[name])
      except ValueError as e:
        raise config_lib.ConfigError(name, str(e)) from None
  given = explicit_settings(f)
  kept = frozenset()
  if values['mode'] in ('eval', 'export') and values['model_dir']:
    values, inherited = inherit_run_settings(values, given)
    # The run's counts describe the data it evaluated: they stay, unless
    # other data is given.
    if not {'data', 'data_dir'} & given:
      kept = inherited & frozenset(config_lib.IMAGENET_COUNTS)
  values = dataset_info.resolve_counts(values, given, kept)
  return config_lib.ExperimentConfig.from_settings(**values)


# What --mode=eval / export do not take from the run's config.json: the
# hardware they run on (config.TOPOLOGY_SETTINGS), what to do and where to
# write.
NOT_INHERITED = frozenset(
    config_lib.TOPOLOGY_SETTINGS |
    {'mode', 'model_dir', 'export_dir', 'checkpoint_path', 'eval_timeout',
     'dry_run', 'eval_batch_per_replica'} |
    config_lib.InitConfig.setting_names())


def inherit_run_settings(values: dict, given: frozenset):
  """The settings of the run in model_dir, under the flags given.

  `--mode=eval` and `export` need only `--model_dir`: the model, EMA,
  image size, classes and data come from model_dir/config.json; flags given
  explicitly win (logged; architecture changes are refused later, as on
  resume). The hardware that trained the run is not inherited
  (`config.TOPOLOGY_SETTINGS`): its replicas, BN groups and XLA mode are no
  constraint here. Its eval batch carries over per replica, so each device
  evaluates as many images as it did in the run's own evaluations.
  Without config.json the flags are used as they are.

  Returns:
    (settings, the names taken from config.json).
  """
  from efficientnet_tpu import run_dir  # pylint: disable=g-import-not-at-top
  previous = run_dir.read_config(values['model_dir'])
  if previous is None:
    return values, frozenset()
  values = dict(values)
  inherited = set()
  for name, value in config_lib.settings_from_dict(previous).items():
    if name in NOT_INHERITED:
      continue
    if name in given:
      if values.get(name) != value:
        logging.info('--%s=%s overrides %r of %s/config.json.', name,
                     values.get(name), value, values['model_dir'])
      continue
    values[name] = value
    inherited.add(name)
  if 'eval_batch_size' not in given:
    _inherit_eval_batch(values, previous, inherited)
  strategy = values.get('strategy') or ('tpu' if values.get('tpu') else 'cpu')
  if (values.get('use_float16') and 'use_float16' not in given and
      strategy == 'tpu'):
    # TPUs compute in bfloat16: the nearest precision to the run's.
    logging.info('The run trained in float16, which TPUs lack: evaluating '
                 'in bfloat16 (--use_bfloat16).')
    values.update(use_float16=False, use_bfloat16=True)
  return values, frozenset(inherited)


def _inherit_eval_batch(values: dict, previous: dict, inherited: set) -> None:
  """Takes the run's eval batch per replica (and `eval_steps` as images).

  The per-replica batch is what config.json resolved on the run's replicas,
  or its eval batch over the replicas its settings name; a run whose
  replica count is unknown keeps its global eval batch.
  """
  run = config_lib.settings_from_dict(previous)
  run_batch = run.get('eval_batch_size')
  per_replica = (previous.get('resolved') or {}).get('per_replica_eval_batch')
  if per_replica is None and run_batch:
    try:
      replicas = config_lib.DistributeConfig.from_settings(**{
          k: v for k, v in run.items()
          if k in config_lib.DistributeConfig.setting_names()
      }).known_num_replicas
    except config_lib.ConfigError:
      replicas = None
    if replicas and run_batch % replicas == 0:
      per_replica = run_batch // replicas
  if not per_replica:
    return
  values['eval_batch_per_replica'] = per_replica
  if values.get('eval_steps') and 'eval_steps' in inherited and run_batch:
    # `eval_steps` counts batches of the run's global eval batch: as images,
    # the same number of images is evaluated on any replica count.
    images = values['eval_steps'] * run_batch
    if values.get('num_eval_images'):
      images = min(images, values['num_eval_images'])
    logging.info('eval_steps=%d of %d images: evaluating the first %d eval '
                 'images.', values['eval_steps'], run_batch, images)
    values.update(eval_steps=None, num_eval_images=images)
    inherited.add('num_eval_images')


def flag_error_line(e: config_lib.ConfigError) -> str:
  """A ConfigError as the command line says it: settings become flags."""
  names = {s.name for s in all_flags()}

  def as_flag(match):
    name, value = match.group(1), match.group(2) or ''
    return f'--{name}{value}' if name in names else match.group(0)

  message = re.sub(r'`(\w+)(=[^`]*)?`', as_flag, e.message)
  head = f'--{e.setting}' if e.setting in names else e.setting
  return f'{head}: {message}'


HELP_FLAGS = ('--help', '-help', '-h', '-?', '--helpshort', '-helpshort')


def help_text(width: int = 80) -> str:
  """--help: the project's flags by section (absl's own: --helpfull)."""
  import textwrap  # pylint: disable=g-import-not-at-top
  lines = [__doc__.strip().split('\n\n')[0], '',
           'usage: efficientnet-tpu-train --model_dir=DIR [--preset=NAME] '
           '[--flag=value ...]']
  title = None
  for s in all_flags():
    if s.title != title:
      title = s.title
      lines += ['', f'{title}:']
    kind = ('<' + '|'.join(s.choices) + '>' if s.choices else
            {bool: 'bool', int: 'int', float: 'float', tuple: 'list',
             str: 'string'}[s.type])
    default = ('' if s.default is None else
               ','.join(s.default) if isinstance(s.default, tuple) else
               str(s.default).lower() if isinstance(s.default, bool) else
               str(s.default))
    lines.append(f'  --{s.name}: {kind}' +
                 (f' (default: {default})' if default else ''))
    lines += textwrap.wrap(s.help, width, initial_indent=' ' * 6,
                           subsequent_indent=' ' * 6)
  lines += ['', 'Also --flagfile=FILE (flags from a file), --helpfull '
            "(absl's flags too, e.g. logging's --v)."]
  return '\n'.join(lines)


def check_before_start(cfg: config_lib.ExperimentConfig) -> None:
  """Checks that need the filesystem, before any strategy or model exists.

  The settings themselves (ranges, the schedule against the run's length,
  batches and BN groups on a known replica count) were checked when `cfg`
  was built.
  """
  from efficientnet_tpu.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import experiment  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import distribute  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import run_dir  # pylint: disable=g-import-not-at-top
  # First: a multi-worker cluster's processes from TF_CONFIG (a TPU slice's
  # hosts are known once the strategy is built, see run_experiment).
  distribute.check_shared_paths(cfg)
  run_dir.check_writable(cfg.train.model_dir)
  if cfg.train.mode != 'export':
    data_pipeline.check_data_files(cfg.data, cfg.train.mode,
                                   cfg.train.model_dir)
  if cfg.train.checkpoint_path:
    run_dir.resolve_checkpoint(cfg.train.model_dir, cfg.train.checkpoint_path)
  run_dir.check_resumable(cfg)
  if cfg.train.export_dir:
    run_dir.check_export_dir(cfg.train.export_dir)
  experiment.check_init_checkpoint(cfg)


def dry_run(cfg: config_lib.ExperimentConfig) -> None:
  """Prints the resolved config, replica plan and schedule; plots the LR."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import schedules  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import sizing  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import replica_plan  # pylint: disable=g-import-not-at-top
  schedule = schedules.for_experiment(cfg)
  summary = dict(optimizer=cfg.optimizer.name,
                 **schedules.describe_schedule(
                     cfg.optimizer.schedule, cfg.train.train_batch_size,
                     cfg.steps_per_epoch, cfg.total_train_steps))
  print(cfg.to_json())
  size = sizing.model_size(cfg)
  print(f'Model: {cfg.model.name} at {cfg.model.image_size} px: '
        f'{", ".join(sizing.describe_size(size))}')
  warnings = sizing.recipe_warnings(cfg)
  num_replicas = cfg.distribute.known_num_replicas
  if num_replicas:
    plan = replica_plan.make(cfg, num_replicas)
    print(f'Replicas ({num_replicas}):')
    for k, v in plan.as_dict().items():
      print(f'  {k}: {v}')
    if cfg.trains:
      memory = sizing.training_memory(cfg, size,
                                      plan.per_replica_train_batch)
      print(f'Memory: {memory.describe()}')
      warnings = sizing.check_fits(cfg, memory, num_replicas) + warnings
  else:
    print('Replicas: set --num_replicas=N to resolve the per-replica batch, '
          'BN groups and memory of an N-replica slice')
  print('Learning-rate schedule:')
  for k, v in summary.items():
    print(f'  {k}: {_readable(v)}')
  tf.io.gfile.makedirs(cfg.train.model_dir)
  path = os.path.join(cfg.train.model_dir, 'lr_schedule.png')
  schedules.plot_schedule(schedule, cfg.total_train_steps, path)
  print(f'  plot: {path}')
  for warning in warnings:
    print(f'warning: {warning}')


def _readable(value):
  """Floats to 6 significant digits (35.6, not 35.599998474121094), also
  inside dicts, lists and tuples."""
  if isinstance(value, float):
    return float(f'{value:.6g}')
  if isinstance(value, dict):
    return {k: _readable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_readable(v) for v in value)
  return value


def input_error_line(e: BaseException, data_dir: Optional[str] = None):
  """One line for an error raised by the input pipeline's checks, or None.

  The pipeline's `tf.debugging.Assert`s (bad image, label out of range,
  truncated TFRecord file) and TFRecord CRC failures name the file; the
  rest of TF's message (graph node, stack) is dropped. A record feature of
  the wrong type (a float label) fails inside TF's Example parser, which
  names the feature but no file: the line names `data_dir`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if isinstance(e, tf.errors.InvalidArgumentError):
    mistyped = re.search(r"Key: ([\w/]+)\.\s+Data types don't match\. "
                         r'Data type: (\w+) but expected type: (\w+)',
                         e.message)
    if mistyped:
      key, got, want = mistyped.groups()
      where = f' in {data_dir}' if data_dir else ''
      return flag_error_line(config_lib.ConfigError(
          'data_dir', f'a record{where} holds feature {key} as {got}, '
          f'expected {want} (as efficientnet-tpu-make-tfrecords writes '
          'it); convert the data set again'))
    match = re.search(r'assertion failed: (.*)', e.message)
    if match is None:
      return None
    # `[part] [part] ...` on one line; a part (a file's path) may itself
    # hold brackets, so parts split at "] [" only.
    body = match.group(1).strip()
    end = body.rfind(']')
    parts = (body[1:end].split('] [') if body.startswith('[') and end > 0
             else [body])
    line = ' '.join(p.strip() for p in parts if p.strip())
    # Checks that name their own setting (max_corrupt_fraction: ...).
    setting, sep, rest = line.partition(': ')
    if not (sep and setting in {s.name for s in all_flags()}):
      setting, rest = 'data_dir', line
    return flag_error_line(config_lib.ConfigError(setting, rest))
  if isinstance(e, tf.errors.DataLossError):
    return flag_error_line(config_lib.ConfigError(
        'data_dir', e.message.strip().splitlines()[0] +
        ' (set `skip_corrupt` to skip bad records in training)'))
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
  try:
    # Before any work: an older TF or Keras fails here in one line, not
    # with an AttributeError inside the first traced step.
    found = stack.check()
  except stack.UnsupportedStack as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  logging.info('Stack: %s', stack.describe(found))
  quiet_tf_info_noise()
  cfg = None
  try:
    cfg = config_from_flags(FLAGS)
    check_before_start(cfg)
    if cfg.train.dry_run:
      dry_run(cfg)
      return 0
    from efficientnet_tpu import experiment  # pylint: disable=g-import-not-at-top
    metrics = experiment.run_experiment(cfg)
  except config_lib.ConfigError as e:
    print(f'error: {flag_error_line(e)}', file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    from efficientnet_tpu import preemption  # pylint: disable=g-import-not-at-top
    if isinstance(e, preemption.Preempted):
      # Stopped on SIGTERM with a checkpoint at the step it stopped after.
      print(f'error: {e}', file=sys.stderr)
      return e.exit_code
    line = input_error_line(e, cfg.data.data_dir if cfg else None)
    if line is None:
      raise
    # Bad records found while running: what was written before (checkpoints,
    # summaries) stays; nothing after the failing step is written.
    print(f'error: {line}', file=sys.stderr)
    return 2
  # Once, on stdout, for scripts (the log has the progress and eval lines).
  print(json.dumps({k: round(v, 6) if isinstance(v, float) else v
                    for k, v in metrics.items()}, sort_keys=True))
  return 0


def run():
  """Console-script entry point."""
  # The preset becomes a flagfile ahead of every other flag (see presets).
  if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
    print(help_text())
    sys.exit(0)
  try:
    argv = presets_lib.expand_argv(sys.argv)
  except config_lib.ConfigError as e:
    print(f'error: {flag_error_line(e)}', file=sys.stderr)
    sys.exit(2)
  if argv is None:
    print(presets_lib.listing())
    sys.exit(0)
  app.run(lambda argv: sys.exit(main(argv)), argv=argv)


if __name__ == '__main__':
  run()
