"""A run that diverges stops at the first loop with a non-finite loss or
weights, keeps its last finite checkpoint as the latest, and says why."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import config as config_lib
from efficientnet_tpu import experiment
from efficientnet_tpu.config import ConfigError
from tests.helpers import small_config, strategy_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_diverging_loop_stops_before_writing_and_keeps_the_finite_latest(
    tmp_path):
  model_dir = tmp_path / 'run'
  cfg = small_config(model_dir, train=dict(train_steps=2))
  first = experiment.build_trainer(cfg, strategy_for(cfg))
  first.train()
  finite = {v.path: v.numpy().copy() for v in first.model.weights}
  assert tf.train.latest_checkpoint(str(model_dir)).endswith('ckpt-2')

  # The same run resumed with an absurd learning rate (optimizer settings
  # may change on resume): the first loop after step 2 blows up.
  cfg = small_config(model_dir, optimizer=dict(base_learning_rate=1e30),
                     train=dict(train_steps=8, iterations_per_loop=3))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  with pytest.raises(ConfigError) as info:
    trainer.train()
  assert info.value.setting == 'base_learning_rate'
  message = str(info.value)
  assert 'training diverged' in message and 'steps 3-5' in message, message
  assert 'ckpt-2' in message and 'peak learning rate 1e+30' in message
  # Nothing of the diverged loop was written: ckpt-2 is still the latest,
  # and it holds the finite weights of the first run.
  assert tf.train.latest_checkpoint(str(model_dir)).endswith('ckpt-2')
  restored = experiment.build_trainer(cfg, strategy_for(cfg))
  assert restored.restore() == 2
  for v in restored.model.weights:
    np.testing.assert_array_equal(v.numpy(), finite[v.path])
  history = (model_dir / 'history.jsonl').read_text().splitlines()
  assert len(history) == 1  # The first run's one loop only.


@pytest.mark.parametrize('value', [float('inf'), float('-inf'),
                                   float('nan')])
def test_every_float_setting_refuses_non_finite_values(value):
  floats = [s.name for s in config_lib.ExperimentConfig.settings()
            if s.type is float]
  assert 'base_learning_rate' in floats and len(floats) > 10
  defaults = {s.name: s.default
              for s in config_lib.ExperimentConfig.settings()}
  defaults['model_dir'] = '/tmp/unused'
  config_lib.ExperimentConfig.from_settings(**defaults)  # Valid as is.
  for name in floats:
    with pytest.raises(ConfigError) as info:
      config_lib.ExperimentConfig.from_settings(**dict(defaults,
                                                       **{name: value}))
    assert info.value.setting == name
    assert info.value.message == f'expected a finite number, got {value!r}'


def test_cli_refuses_an_infinite_learning_rate_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'efficientnet_tpu.main', '--preset=cpu_smoke',
       f'--model_dir={tmp_path / "run"}', '--base_learning_rate=inf',
       '--dry_run'],
      env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2'),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  ours = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert ours == ['error: --base_learning_rate: expected a finite number, '
                  'got inf']
