"""Tests for efficientnet_tpu.schedules against hand-written formulas."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from absl import flags as absl_flags

from efficientnet_tpu import main as main_lib
from efficientnet_tpu import presets
from efficientnet_tpu import schedules
from efficientnet_tpu.config import ConfigError, ExperimentConfig
from efficientnet_tpu.config import ScheduleConfig


def _cfg(**kw):
  return ScheduleConfig(**kw)


def _lr(schedule, step):
  return float(schedule(tf.constant(step, tf.int64)))


def test_peak_learning_rate_linear_and_absolute():
  assert _cfg(base_learning_rate=0.016, lr_scaling='linear'
              ).peak_learning_rate(4096) == pytest.approx(0.256)
  assert _cfg(base_learning_rate=25.0, lr_scaling='none'
              ).peak_learning_rate(16384) == 25.0


def test_poly_warmup_and_decay_values():
  # 10.5 steps/epoch, 2 warmup epochs -> int(21.0) = 21 warmup steps.
  peak, end, power, warm, total = 8.0, 0.5, 3.0, 21, 105
  cfg = _cfg(lr_scaling='none', base_learning_rate=peak,
             lr_schedule='poly', lr_warmup_epochs=2.0, poly_power=power,
             end_learning_rate=end)
  s = schedules.build_learning_rate_schedule(cfg, 1024, 10.5, total)
  assert s.warmup_steps == warm

  def want(step):
    if step < warm:
      return peak * step / warm
    p = min(1.0, (step - warm) / (total - warm))
    return end + (peak - end) * (1 - p) ** power

  for step in (0, 1, 10, 20, 21, 22, 50, 63, 104, 105, 500):
    assert _lr(s, step) == pytest.approx(want(step), rel=1e-5, abs=1e-6), step
  assert _lr(s, 0) == 0.0
  assert _lr(s, warm) == pytest.approx(peak)
  assert _lr(s, total) == pytest.approx(end)


def test_warmup_steps_use_floor():
  cfg = _cfg(lr_schedule='constant', lr_warmup_epochs=2.0)
  s = schedules.build_learning_rate_schedule(cfg, 256, 10.3, 100)
  assert s.warmup_steps == 20  # int(20.6)


def test_exponential_follows_tpu_en_convention():
  # 10 steps/epoch, 5 warmup epochs (50 steps), x0.97 every 2.4 epochs
  # (24 steps), decay counted from step 0 with staircase.
  cfg = _cfg(base_learning_rate=0.016, lr_scaling='linear',
             lr_schedule='exponential', lr_warmup_epochs=5.0,
             lr_decay_epochs=2.4, lr_decay_factor=0.97)
  s = schedules.build_learning_rate_schedule(cfg, 4096, 10.0, 1000)
  peak = 0.016 * 4096 / 256
  assert _lr(s, 0) == 0.0
  assert _lr(s, 49) == pytest.approx(peak * 49 / 50, rel=1e-6)
  # First post-warmup step already has floor(50 / 24) = 2 decays.
  assert _lr(s, 50) == pytest.approx(peak * 0.97 ** 2, rel=1e-6)
  assert _lr(s, 71) == pytest.approx(peak * 0.97 ** 2, rel=1e-6)
  assert _lr(s, 72) == pytest.approx(peak * 0.97 ** 3, rel=1e-6)
  assert _lr(s, 95) == pytest.approx(peak * 0.97 ** 3, rel=1e-6)
  assert _lr(s, 96) == pytest.approx(peak * 0.97 ** 4, rel=1e-6)
  assert _lr(s, 999) == pytest.approx(peak * 0.97 ** 41, rel=1e-5)


def test_exponential_non_integer_decay_steps_and_from_warmup_end():
  # decay_steps = 2.4 * 10.5 = 25.2: boundaries at 25.2, 50.4, 75.6 ...
  s = schedules.WarmupExponentialDecay(
      peak_learning_rate=1.0, warmup_steps=30, total_steps=500,
      decay_steps=25.2, decay_factor=0.5, decay_from_warmup_end=True)
  assert _lr(s, 30) == 1.0
  assert _lr(s, 55) == 1.0        # 25 steps after warmup < 25.2
  assert _lr(s, 56) == 0.5        # 26 > 25.2
  assert _lr(s, 80) == 0.5        # 50 < 50.4
  assert _lr(s, 81) == 0.25       # 51 > 50.4


def test_cosine_and_constant():
  cfg = _cfg(lr_schedule='cosine', lr_warmup_epochs=1.0, lr_scaling='none',
             base_learning_rate=2.0, end_learning_rate=0.2)
  s = schedules.build_learning_rate_schedule(cfg, 512, 10.0, 110)
  for step in (0, 5, 10, 35, 60, 85, 110):
    if step < 10:
      want = 2.0 * step / 10
    else:
      want = 0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
    assert _lr(s, step) == pytest.approx(want, rel=1e-5, abs=1e-6), step
  assert _lr(s, 60) == pytest.approx(1.1, rel=1e-5)

  cfg = _cfg(lr_schedule='constant', lr_warmup_epochs=0.0, lr_scaling='none',
             base_learning_rate=0.3)
  s = schedules.build_learning_rate_schedule(cfg, 512, 10.0, 50)
  assert s.warmup_steps == 0
  assert [_lr(s, i) for i in (0, 25, 49)] == pytest.approx([0.3] * 3)


def test_warmup_start_lr():
  s = schedules.WarmupConstant(peak_learning_rate=1.0, warmup_steps=4,
                               total_steps=10, warmup_start_lr=0.2)
  assert [_lr(s, i) for i in range(6)] == pytest.approx(
      [0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_vector_steps_match_scalar_steps():
  cfg = _cfg(lr_schedule='exponential', lr_warmup_epochs=1.0)
  s = schedules.build_learning_rate_schedule(cfg, 1024, 20.0, 400)
  steps = np.arange(0, 400, 7)
  vec = np.asarray(s(tf.constant(steps)))
  assert vec.shape == steps.shape
  np.testing.assert_allclose(vec, [_lr(s, int(i)) for i in steps], rtol=1e-6)


def _single_line_error(fn, name):
  with pytest.raises(ConfigError) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg
  assert e.value.setting == name and msg.startswith(f'{name}:'), msg
  return msg


def _experiment(**settings):
  """10 steps per epoch of batch 256."""
  return ExperimentConfig.from_settings(
      model_dir='/tmp/unused', num_train_images=2560, train_batch_size=256,
      **settings)


def test_warmup_longer_than_training_fails():
  msg = _single_line_error(
      lambda: _experiment(lr_warmup_epochs=5.0, train_steps=50),
      'lr_warmup_epochs')
  assert 'expected fewer than the 5 training epochs' in msg
  _single_line_error(lambda: _experiment(lr_warmup_epochs=5.0, train_steps=30),
                     'lr_warmup_epochs')
  # Just shorter than training is fine.
  cfg = _experiment(lr_warmup_epochs=5.0, train_steps=51)
  assert schedules.for_experiment(cfg).warmup_steps == 50


def test_nonpositive_learning_rate_fails():
  _single_line_error(lambda: _cfg(base_learning_rate=0.0),
                     'base_learning_rate')
  _single_line_error(lambda: _cfg(base_learning_rate=-1.0),
                     'base_learning_rate')


def test_end_learning_rate_above_the_peak_fails():
  msg = _single_line_error(
      lambda: _experiment(lr_schedule='poly', lr_scaling='none',
                          base_learning_rate=1.0, end_learning_rate=2.0,
                          lr_warmup_epochs=0.0),
      'end_learning_rate')
  assert 'a value in [0, 1]' in msg
  # Linear scaling: the peak is 0.5 * 256 / 256; constant has no end LR.
  _single_line_error(
      lambda: _experiment(lr_schedule='cosine', base_learning_rate=0.5,
                          end_learning_rate=0.6, lr_warmup_epochs=0.0),
      'end_learning_rate')
  _experiment(lr_schedule='constant', base_learning_rate=0.5,
              end_learning_rate=0.6, lr_warmup_epochs=0.0)


@pytest.mark.parametrize('kind', ['poly', 'exponential', 'cosine', 'constant'])
def test_get_config_round_trip(kind):
  cfg = _cfg(lr_schedule=kind, lr_warmup_epochs=1.5, end_learning_rate=0.001,
             poly_power=1.5)
  s = schedules.build_learning_rate_schedule(cfg, 2048, 12.5, 300)
  clone = type(s).from_config(s.get_config())
  restored = keras.optimizers.schedules.deserialize(
      keras.optimizers.schedules.serialize(s))
  assert type(restored) is type(s)
  steps = tf.constant(np.arange(0, 301, 3))
  np.testing.assert_array_equal(np.asarray(clone(steps)), np.asarray(s(steps)))
  np.testing.assert_array_equal(np.asarray(restored(steps)),
                                np.asarray(s(steps)))


def test_describe_schedule():
  cfg = _cfg(lr_schedule='poly', lr_scaling='none',
             base_learning_rate=10.0, lr_warmup_epochs=2.0)
  spe = 1281167 / 32768
  total = int(round(40 * spe))
  d = schedules.describe_schedule(cfg, 32768, spe, total)
  warm = int(2.0 * spe)
  assert d['warmup_steps'] == warm
  assert d['peak_lr'] == 10.0
  assert d['total_steps'] == total
  assert d['steps_per_epoch'] == pytest.approx(spe)
  assert d['train_epochs'] == pytest.approx(total / spe)
  step, lr = d['lr_at']['warmup_end']
  assert (step, lr) == (warm, pytest.approx(10.0))
  step, lr = d['lr_at']['50%']
  want = 10.0 * (1 - (step - warm) / (total - warm)) ** 2
  assert lr == pytest.approx(want, rel=1e-5)
  assert d['lr_at']['start'] == [0, 0.0]


def test_plot_schedule_writes_png(tmp_path):
  cfg = _cfg(lr_schedule='exponential')
  s = schedules.build_learning_rate_schedule(cfg, 4096, 312.7, 20000)
  path = schedules.plot_schedule(s, 20000, str(tmp_path / 'sub' / 'lr.png'))
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


# ---- presets (efficientnet_tpu/presets) ---------------------------------------
PRESET_DIR = presets.DIRECTORY
PRESET_FLAGS = {
    'model_name', 'train_batch_size', 'eval_batch_size', 'train_epochs',
    'optimizer', 'base_learning_rate', 'lr_scaling', 'lr_schedule',
    'lr_warmup_epochs', 'lr_decay_epochs', 'lr_decay_factor', 'poly_power',
    'end_learning_rate', 'momentum', 'nesterov', 'lars_eeta', 'lars_epsilon',
    'weight_decay', 'label_smoothing', 'moving_average_decay', 'use_bfloat16',
    'bn_group_batch_size', 'bn_group_size', 'iterations_per_loop', 'strategy',
    'augment_name', 'randaug_num_layers', 'randaug_magnitude',
    'num_label_classes', 'eval_every_epochs', 'mode'}
# tensorflow/tpu models/official/resnet/lars_util.py, poly_rate_schedule, as
# of f59154b6 (Aug 2019) through 95647b53 (May 2020; unchanged since): peak
# LR and warmup epochs by global batch.
PAPER_TIME_LARS_TABLE = ((16384, 10.0, 5), (32768, 25.0, 5),
                         (65536, 32.0, 14), (float('inf'), 35.6, 40))


def _lars_table(batch):
  return next((lr, w) for bound, lr, w in PAPER_TIME_LARS_TABLE
              if batch < bound)


def _read_flagfile(path):
  flags = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      assert line.startswith('--') and '=' in line, (path, line)
      name, value = line[2:].split('=', 1)
      assert name not in flags, (path, name)
      flags[name] = value
  return flags


def _preset_paths():
  return sorted(os.path.join(PRESET_DIR, n) for n in os.listdir(PRESET_DIR)
                if n.startswith('efficientnet-') and n.endswith('.cfg'))


def test_paper_presets_exist():
  names = {os.path.basename(p) for p in _preset_paths()}
  for model in ('b2', 'b5'):
    for batch in (4096, 16384, 32768, 65536):
      assert f'efficientnet-{model}-lars-{batch}.cfg' in names
  assert 'efficientnet-b0-rmsprop-4096.cfg' in names
  # One preset fits a single v3-8 host (the README's --tpu=local command).
  assert 'efficientnet-b0-rmsprop-1024.cfg' in names


@pytest.mark.parametrize('path', _preset_paths(), ids=os.path.basename)
def test_preset_is_consistent(path):
  flags = _read_flagfile(path)
  assert set(flags) <= PRESET_FLAGS, set(flags) - PRESET_FLAGS
  name = os.path.basename(path)[:-len('.cfg')]
  model, optimizer, batch = name.rsplit('-', 2)
  assert flags['model_name'] == model
  assert flags['optimizer'] == optimizer
  assert int(flags['train_batch_size']) == int(batch)
  assert flags['mode'] == 'train_and_eval'
  # Parsed by the CLI's own flags, as a run would.
  fv = absl_flags.FlagValues()
  main_lib.define_flags(fv)
  fv(['prog', f'--flagfile={path}', '--model_dir=/tmp/unused', '--tpu=local'])
  experiment = main_lib.config_from_flags(fv)
  cfg = experiment.optimizer.schedule
  batch = int(batch)
  spe = 1281167 / batch
  assert experiment.steps_per_epoch == spe
  s = schedules.for_experiment(experiment)
  if optimizer == 'lars':
    assert cfg.lr_scaling == 'none' and cfg.lr_schedule == 'poly'
    assert (s.peak_learning_rate, cfg.lr_warmup_epochs) == _lars_table(batch)
    # EMA horizon ~32 epochs at every batch size (docs/recipes.md).
    horizon_epochs = 1 / (
        1 - experiment.optimizer.moving_average_decay) / spe
    assert 30 < horizon_epochs < 34, horizon_epochs
  else:
    assert s.peak_learning_rate == pytest.approx(0.016 * batch / 256)
  assert int(flags['eval_batch_size']) % 32 == 0
