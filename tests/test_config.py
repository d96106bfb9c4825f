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
  m = config_lib.ModelConfig(name=name)
  assert (m.width_coefficient, m.depth_coefficient, m.image_size,
          m.dropout_rate) == expected


def test_overrides_win_over_the_table():
  m = config_lib.ModelConfig(width_coefficient=0.25, image_size=32)
  assert m.width_coefficient == 0.25 and m.image_size == 32
  assert m.depth_coefficient == 1.0


@pytest.mark.parametrize('kwargs,flag', [
    (dict(model=dict(name='efficientnet-b9')), '--model_name'),
    (dict(model=dict(bn_group_size=-1)), '--bn_group_size'),
    (dict(model=dict(bn_group_size=2, bn_group_batch_size=64)),
     '--bn_group_batch_size'),
    (dict(optimizer=dict(base_learning_rate=0.0)), '--base_learning_rate'),
    (dict(optimizer=dict(base_learning_rate=-1.0)), '--base_learning_rate'),
    (dict(optimizer=dict(optimizer='adam')), '--optimizer'),
    (dict(optimizer=dict(weight_decay_exclude=('gamma', '(unclosed'))),
     '--weight_decay_exclude'),
    (dict(data=dict(source='tfrecord')), '--data_dir'),
    (dict(data=dict(source='parquet', data_dir='/x')), '--data'),
    (dict(train=dict(mode='predict')), '--mode'),
    (dict(train=dict(train_batch_size=0)), '--train_batch_size'),
    (dict(distribute=dict(strategy='tpu')), '--tpu'),
])
def test_bad_values_give_one_line_errors_naming_the_flag(kwargs, flag):
  sections = {
      'model': config_lib.ModelConfig, 'data': config_lib.DataConfig,
      'optimizer': config_lib.OptimizerConfig,
      'train': config_lib.TrainConfig,
      'distribute': config_lib.DistributeConfig,
  }
  (section, values), = kwargs.items()
  with pytest.raises(config_lib.ConfigError) as e:
    sections[section](**values)
  message = str(e.value)
  assert message.startswith(flag + ':'), message
  assert '\n' not in message


def test_batch_must_divide_by_replicas():
  cfg = config_lib.ExperimentConfig(
      train=config_lib.TrainConfig(train_batch_size=12, eval_batch_size=8))
  cfg.validate_for_replicas(4)
  with pytest.raises(config_lib.ConfigError, match='--train_batch_size: '
                     r'expected a multiple of the number of replicas \(8\)'):
    cfg.validate_for_replicas(8)


def test_derived_steps():
  cfg = config_lib.ExperimentConfig(
      data=config_lib.DataConfig(num_train_images=1000),
      train=config_lib.TrainConfig(train_batch_size=100, train_epochs=3.0,
                                   eval_every_epochs=1.5))
  assert cfg.steps_per_epoch == 10.0
  assert cfg.total_train_steps == 30
  assert cfg.eval_interval_steps == 15
  cfg.train.train_steps = 7
  assert cfg.total_train_steps == 7


def test_json_round_trip():
  cfg = config_lib.ExperimentConfig(
      model=config_lib.ModelConfig(name='efficientnet-b2', image_size=64))
  again = config_lib.ExperimentConfig.from_dict(json.loads(cfg.to_json()))
  assert again == cfg
