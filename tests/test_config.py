"""Tests for the typed config: defaults from the model table, validation."""

import json

import pytest

from efficientnet_tpu import config as config_lib


@pytest.mark.parametrize('name,expected', [
    ('efficientnet-b0', (1.0, 1.0, 224, 0.2)),
    ('efficientnet-b3', (1.2, 1.4, 300, 0.3)),
    ('efficientnet-b7', (2.0, 3.1, 600, 0.5)),
])
def test_model_defaults_follow_the_scaling_table(name, expected):
  m = config_lib.ModelConfig(model_name=name)
  assert (m.width_coefficient, m.depth_coefficient, m.image_size,
          m.dropout_rate) == expected


def test_overrides_win_over_the_table():
  m = config_lib.ModelConfig(width_coefficient=0.25, image_size=32)
  assert m.width_coefficient == 0.25 and m.image_size == 32
  assert m.depth_coefficient == 1.0


def _cfg(**settings):
  return config_lib.ExperimentConfig.from_settings(
      **dict(dict(model_dir='/tmp/unused'), **settings))


@pytest.mark.parametrize('settings,name', [
    (dict(model_name='efficientnet-b9'), 'model_name'),
    (dict(bn_group_size=-1), 'bn_group_size'),
    (dict(bn_group_size=2, bn_group_batch_size=64), 'bn_group_batch_size'),
    (dict(base_learning_rate=0.0), 'base_learning_rate'),
    (dict(base_learning_rate=-1.0), 'base_learning_rate'),
    (dict(optimizer='adam'), 'optimizer'),
    (dict(weight_decay_exclude=('gamma', '(unclosed')),
     'weight_decay_exclude'),
    (dict(lars_eeta=0.0), 'lars_eeta'),
    (dict(rmsprop_decay=1.0), 'rmsprop_decay'),
    (dict(data='tfrecord'), 'data_dir'),
    (dict(data='parquet', data_dir='/x'), 'data'),
    (dict(data='synthetic', data_dir='/x'), 'data_dir'),
    (dict(mode='predict'), 'mode'),
    (dict(train_batch_size=0), 'train_batch_size'),
    (dict(model_dir=None), 'model_dir'),
    (dict(strategy='tpu'), 'tpu'),
    (dict(tpu='x', strategy='gpu'), 'tpu'),
    (dict(jit_compile='yes'), 'jit_compile'),
    # Rules across sections: the schedule against the run's length ...
    (dict(lr_warmup_epochs=5.0, train_epochs=4.0), 'lr_warmup_epochs'),
    (dict(lr_warmup_epochs=1.0, train_steps=10, num_train_images=1000,
          train_batch_size=100), 'lr_warmup_epochs'),
    (dict(lr_schedule='poly', lr_scaling='none', base_learning_rate=1.0,
          end_learning_rate=2.0), 'end_learning_rate'),
    # ... and batches and BN groups on a replica count known up front.
    (dict(num_cpu_replicas=3, train_batch_size=64), 'train_batch_size'),
    (dict(num_replicas=8, strategy='gpu', eval_batch_size=12),
     'eval_batch_size'),
    (dict(num_cpu_replicas=4, bn_group_size=3, train_batch_size=64,
          eval_batch_size=64), 'bn_group_size'),
])
def test_bad_values_give_one_line_errors_naming_the_setting(settings, name):
  from efficientnet_tpu import main as main_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_lib.ConfigError) as e:
    _cfg(**settings)
  assert e.value.setting == name
  assert str(e.value).startswith(name + ': ')
  assert '\n' not in str(e.value) and '--' not in str(e.value)
  # The command line names the flag, also for settings inside the message.
  line = main_lib.flag_error_line(e.value)
  assert line.startswith(f'--{name}: ') and '`' not in line, line


def test_every_setting_is_a_flag_of_the_same_name_and_type():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import main as main_lib  # pylint: disable=g-import-not-at-top
  registered = {f.name: f for f in
                flags.FLAGS.get_flags_for_module(main_lib.__name__)}
  names = [s.name for s in config_lib.flag_settings()]
  assert len(names) == len(set(names))  # Unique across sections.
  assert set(names) | {'preset'} == set(registered)
  for s in config_lib.flag_settings():
    flag = registered[s.name]
    value = flag.default
    assert (tuple(value) if isinstance(value, list) else value) == s.default
  # Parsing flags sets the field of the same name, wherever it is nested.
  fv = flags.FlagValues()
  main_lib.define_flags(fv)
  fv(['prog', '--model_dir=/m', '--lars_eeta=0.02', '--lr_schedule=poly',
      '--num_label_classes=7', '--augment_name=randaugment',
      '--weight_decay_exclude=a,b', '--jit_compile=true'])
  cfg = main_lib.config_from_flags(fv)
  assert cfg.optimizer.lars.lars_eeta == 0.02
  assert cfg.optimizer.schedule.lr_schedule == 'poly'
  assert cfg.model.num_label_classes == 7
  assert cfg.data.augment_name == 'randaugment'
  assert cfg.optimizer.weight_decay_exclude == ('a', 'b')
  assert cfg.train.jit_compile == 'true'
  assert cfg.distribute.strategy == 'cpu' and cfg.data.data == 'synthetic'


def test_batch_must_divide_by_replicas():
  cfg = _cfg(train_batch_size=12, eval_batch_size=8)
  cfg.validate_for_replicas(4)
  with pytest.raises(config_lib.ConfigError, match='train_batch_size: '
                     r'expected a multiple of the number of replicas \(8\)'):
    cfg.validate_for_replicas(8)


def test_derived_steps():
  cfg = _cfg(num_train_images=1000, train_batch_size=100, train_epochs=3.0,
             eval_every_epochs=1.5, lr_warmup_epochs=1.0)
  assert cfg.steps_per_epoch == 10.0
  assert cfg.total_train_steps == 30
  assert cfg.eval_interval_steps == 15
  cfg.train.train_steps = 7
  assert cfg.total_train_steps == 7


def test_derived_defaults():
  assert _cfg(data_dir='/d').data.data == 'tfrecord'
  assert _cfg(tpu='local').distribute.strategy == 'tpu'
  assert _cfg(num_label_classes=1001).data.include_background_label
  assert not _cfg().data.include_background_label


def test_json_round_trip():
  cfg = _cfg(model_name='efficientnet-b2', image_size=64, lars_eeta=0.01)
  again = config_lib.ExperimentConfig.from_dict(json.loads(cfg.to_json()))
  assert again == cfg
  assert config_lib.ExperimentConfig.from_settings(**cfg.to_settings()) == cfg


def test_config_json_of_the_old_field_names_loads():
  """config.json files written before the settings took their flag names."""
  cfg = _cfg(model_name='efficientnet-b2', num_label_classes=1001,
             batch_norm_momentum=0.9, augment_name='autoaugment',
             data='tfrecord', data_dir='/d', jit_compile='false',
             lars_eeta=0.01, lr_schedule='cosine')
  old = json.loads(cfg.to_json())
  for section, new, legacy in [('model', 'model_name', 'name'),
                               ('model', 'num_label_classes', 'num_classes'),
                               ('model', 'batch_norm_momentum', 'bn_momentum'),
                               ('model', 'batch_norm_epsilon', 'bn_epsilon'),
                               ('data', 'augment_name', 'augment'),
                               ('data', 'data', 'source')]:
    old[section][legacy] = old[section].pop(new)
  # Flat optimizer section, jit_compile as a JSON bool, a removed field.
  old['optimizer'].update(old['optimizer'].pop('schedule'),
                          **old['optimizer'].pop('lars'),
                          **old['optimizer'].pop('rmsprop'))
  old['train'].update(jit_compile=False, seed=0)
  assert config_lib.ExperimentConfig.from_dict(old) == cfg
