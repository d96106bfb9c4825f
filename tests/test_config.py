"""Tests for the typed config: defaults from the model table, validation."""

import dataclasses
import json

import pytest

from efficientnet_tpu import config as config_lib


@pytest.mark.parametrize('name,expected', [
    ('efficientnet-b0', (1.0, 1.0, 224, 0.2)),
    ('efficientnet-b3', (1.2, 1.4, 300, 0.3)),
    ('efficientnet-b7', (2.0, 3.1, 600, 0.5)),
])
def test_model_defaults_follow_the_scaling_table(name, expected):
  m = config_lib.ModelConfig(name=name)
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
  assert cfg.optimizer.lars.eeta == 0.02
  assert cfg.optimizer.schedule.lr_schedule == 'poly'
  assert cfg.model.num_label_classes == 7
  assert cfg.data.augment_name == 'randaugment'
  assert cfg.optimizer.weight_decay_exclude == ('a', 'b')
  assert cfg.train.jit_compile == 'true'
  assert cfg.distribute.strategy == 'cpu' and cfg.data.source == 'synthetic'


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
  assert cfg.with_settings(train_steps=17).total_train_steps == 17


def test_derived_defaults():
  assert _cfg(data_dir='/d').data.source == 'tfrecord'
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


def test_configs_are_frozen():
  cfg = _cfg()
  for section, field in [(cfg, 'train'), (cfg.train, 'train_steps'),
                         (cfg.data, 'source'), (cfg.train.init, 'checkpoint'),
                         (cfg.optimizer.lars, 'eeta')]:
    with pytest.raises(dataclasses.FrozenInstanceError):
      setattr(section, field, None)
  # A changed copy is a new config, checked again; the original stays.
  longer = cfg.with_settings(train_epochs=7.0, lars_eeta=0.5)
  assert (longer.train.train_epochs, longer.optimizer.lars.eeta) == (7, 0.5)
  assert (cfg.train.train_epochs, cfg.optimizer.lars.eeta) == (350, 0.001)
  with pytest.raises(config_lib.ConfigError, match='^train_epochs: '):
    cfg.with_settings(train_epochs=0.0)


def test_configs_are_built_complete():
  """Defaults that follow from other values are there once constructed."""
  data = config_lib.DataConfig(data_dir='x')
  assert data.source == 'tfrecord'
  assert (data.num_train_images, data.num_eval_images) == (1281167, 50000)
  assert data.counts_from == 'ImageNet defaults'
  assert config_lib.DataConfig().source == 'synthetic'
  partial = config_lib.DataConfig(num_train_images=10)
  assert (partial.num_eval_images, partial.counts_from) == (
      50000, 'ImageNet defaults')
  given = config_lib.DataConfig(num_train_images=10, num_eval_images=5)
  assert given.counts_from == 'settings'
  assert config_lib.DistributeConfig().strategy == 'cpu'
  assert config_lib.DistributeConfig(tpu='local').strategy == 'tpu'
  model = config_lib.ModelConfig(name='efficientnet-b1')
  assert (model.num_label_classes, model.width_coefficient,
          model.depth_coefficient, model.image_size,
          model.dropout_rate) == (1000, 1.0, 1.1, 240, 0.2)
  init = config_lib.InitConfig(exclude=['logits'])
  assert init.exclude == ('logits',)
  assert config_lib.OptimizerConfig(
      weight_decay_exclude=['a']).weight_decay_exclude == ('a',)
  # Across sections: BN warm-up follows --init_checkpoint, 1-based labels
  # follow 1001 classes.
  plain = config_lib.ExperimentConfig(
      train=config_lib.TrainConfig(model_dir='/m'))
  assert plain.model.batch_norm_warmup is False
  assert plain.data.include_background_label is False
  tuned = config_lib.ExperimentConfig(
      model=config_lib.ModelConfig(num_label_classes=1001),
      train=config_lib.TrainConfig(
          model_dir='/m', init=config_lib.InitConfig(checkpoint='/c')))
  assert tuned.model.batch_norm_warmup is True
  assert tuned.data.include_background_label is True
  resolved = {'data', 'num_train_images', 'num_eval_images', 'counts_from',
              'strategy', 'num_label_classes', 'image_size',
              'width_coefficient', 'depth_coefficient', 'dropout_rate',
              'batch_norm_warmup', 'include_background_label'}
  settings = plain.to_settings()
  assert resolved <= set(settings)
  assert all(settings[name] is not None for name in resolved)


def test_field_names_read_well_while_flags_keep_their_names():
  cfg = _cfg(data_dir='/d', optimizer='lamb', model_name='efficientnet-b1',
             init_checkpoint='/c', init_exclude=('logits',),
             init_from_ema=True, lars_eeta=0.01, lars_epsilon=0.1,
             lamb_beta_1=0.8, lamb_beta_2=0.9, lamb_epsilon=1e-3,
             rmsprop_decay=0.5, rmsprop_epsilon=0.2)
  assert cfg.data.source == 'tfrecord' and cfg.optimizer.name == 'lamb'
  assert cfg.model.name == 'efficientnet-b1'
  init = cfg.train.init
  assert (init.checkpoint, init.exclude, init.from_ema) == (
      '/c', ('logits',), True)
  lars, lamb = cfg.optimizer.lars, cfg.optimizer.lamb
  assert (lars.eeta, lars.epsilon) == (0.01, 0.1)
  assert (lamb.beta_1, lamb.beta_2, lamb.epsilon) == (0.8, 0.9, 1e-3)
  assert (cfg.optimizer.rmsprop.decay, cfg.optimizer.rmsprop.epsilon) == (
      0.5, 0.2)
  # Errors name the setting (the flag), not the field.
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.DataConfig(source='parquet', data_dir='/x')
  assert e.value.setting == 'data'
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.InitConfig(from_ema=True)
  assert e.value.setting == 'init_from_ema'


# What the previous version (fields named like their flags, `dataclasses.
# asdict`) wrote to config.json for `_PREVIOUS_SETTINGS`.
_PREVIOUS_SETTINGS = dict(
    model_dir='/runs/b2', data_dir='/data/imagenet',
    model_name='efficientnet-b2', num_label_classes=1001, optimizer='lars',
    lars_eeta=0.002, lamb_beta_2=0.99, rmsprop_epsilon=0.01,
    init_checkpoint='/runs/b0/ckpt-10', init_exclude=('logits',),
    init_from_ema=True, num_train_images=1000, train_batch_size=100,
    train_epochs=10.0, lr_warmup_epochs=1.0)
_PREVIOUS_CONFIG_JSON = {
    'data': {
        'augment_name': 'none', 'counts_from': 'ImageNet defaults',
        'data': 'tfrecord', 'data_dir': '/data/imagenet',
        'deterministic': False, 'eval_crop_fraction': None,
        'include_background_label': True, 'max_corrupt_fraction': 0.01,
        'max_image_pixels': 67108864, 'num_eval_images': 50000,
        'num_train_images': 1000, 'randaug_magnitude': 10.0,
        'randaug_num_layers': 2, 'random_flip': True,
        'resize_method': 'bicubic', 'seed': 0, 'shuffle_buffer': 1024,
        'skip_corrupt': False, 'synthetic_learnable': True,
        'train_crop_max_area': 1.0,
        'train_crop_max_aspect': 1.3333333333333333,
        'train_crop_min_area': 0.08, 'train_crop_min_aspect': 0.75},
    'distribute': {
        'gcp_project': None, 'num_cpu_replicas': 1, 'num_gpus': 0,
        'num_replicas': None, 'shared_filesystem': False, 'strategy': 'cpu',
        'tpu': None, 'tpu_zone': None},
    'model': {
        'batch_norm_epsilon': 0.001, 'batch_norm_momentum': 0.99,
        'batch_norm_warmup': True, 'bn_group_batch_size': None,
        'bn_group_size': None, 'depth_coefficient': 1.2, 'depth_divisor': 8,
        'dropout_rate': 0.3, 'image_size': 260,
        'model_name': 'efficientnet-b2', 'num_label_classes': 1001,
        'stochastic_depth_rate': 0.2, 'use_bfloat16': False,
        'use_float16': False, 'width_coefficient': 1.1},
    'optimizer': {
        'cutmix_alpha': 0.0, 'label_smoothing': 0.1,
        'lamb': {'lamb_beta_1': 0.9, 'lamb_beta_2': 0.99,
                 'lamb_epsilon': 1e-06},
        'lars': {'lars_eeta': 0.002, 'lars_epsilon': 0.0},
        'mixup_alpha': 0.0, 'mixup_switch_prob': 0.5, 'momentum': 0.9,
        'moving_average_decay': 0.9999, 'nesterov': False,
        'optimizer': 'lars',
        'rmsprop': {'rmsprop_decay': 0.9, 'rmsprop_epsilon': 0.01},
        'schedule': {
            'base_learning_rate': 0.016, 'end_learning_rate': 0.0,
            'lr_decay_epochs': 2.4, 'lr_decay_factor': 0.97,
            'lr_scaling': 'linear', 'lr_schedule': 'exponential',
            'lr_warmup_epochs': 1.0, 'poly_power': 2.0},
        'weight_decay': 1e-05,
        'weight_decay_exclude': ['(^|/)gamma$', '(^|/)beta$', '(^|/)bias$']},
    'train': {
        'checkpoint_path': None, 'dry_run': False,
        'eval_batch_per_replica': None, 'eval_batch_size': 1024,
        'eval_every_epochs': None, 'eval_every_steps': None,
        'eval_steps': None, 'eval_timeout': 0, 'export_dir': None,
        'init': {'init_checkpoint': '/runs/b0/ckpt-10',
                 'init_exclude': ['logits'], 'init_from_ema': True},
        'iterations_per_loop': None, 'jit_compile': 'auto',
        'keep_checkpoint_max': 5, 'mode': 'train', 'model_dir': '/runs/b2',
        'summary_images': 8, 'train_batch_size': 100, 'train_epochs': 10.0,
        'train_steps': None},
}


def test_config_json_of_the_previous_version_loads_and_is_written_alike():
  old = config_lib.ExperimentConfig.from_dict(
      json.loads(json.dumps(_PREVIOUS_CONFIG_JSON)))
  assert old == _cfg(**_PREVIOUS_SETTINGS)
  assert old.data.source == 'tfrecord' and old.optimizer.name == 'lars'
  assert old.model.name == 'efficientnet-b2'
  assert old.optimizer.lars.eeta == 0.002
  assert old.optimizer.lamb.beta_2 == 0.99
  assert old.optimizer.rmsprop.epsilon == 0.01
  assert (old.train.init.checkpoint, old.train.init.exclude,
          old.train.init.from_ema) == ('/runs/b0/ckpt-10', ('logits',), True)
  # config.json keeps the keys users know: the flags' names.
  assert json.loads(old.to_json()) == _PREVIOUS_CONFIG_JSON
