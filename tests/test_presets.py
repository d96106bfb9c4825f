"""Presets ship with the package and load by name: --preset=NAME / list.

Also checks that the flags docs/recipes.md gives for reproducing the paper's
code (tensorflow/tpu@4b544d49) yield, in a --dry_run, the schedule of that
code's `utils.build_learning_rate(lr_decay_type='poly')`, computed here in
numpy from its source.
"""

import ast
import json
import logging
import os
import pathlib
import subprocess
import sys

from absl import flags
import numpy as np
import pytest

from efficientnet_tpu import main as main_lib
from efficientnet_tpu import presets
from efficientnet_tpu.config import ConfigError

FLAGS = flags.FLAGS
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset_flags():
  yield
  FLAGS.unparse_flags()


def _cli(*args, cwd):
  return subprocess.run(
      [sys.executable, '-m', 'efficientnet_tpu.main', *args], cwd=cwd,
      env=dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL='2'),
      capture_output=True, text=True, timeout=300)


def _parse(*args):
  """Parses argv the way `main.run` does; returns the resolved config."""
  FLAGS.unparse_flags()
  FLAGS(presets.expand_argv(['efficientnet-tpu-train', *args]))
  return main_lib.config_from_flags(FLAGS)


def test_presets_are_package_files():
  assert pathlib.Path(presets.DIRECTORY) == (
      REPO / 'efficientnet_tpu' / 'presets')
  assert 'cpu_smoke' in presets.names()
  assert 'efficientnet-b5-lars-65536' in presets.names()
  for name in presets.names():
    assert presets.description(name), name
    assert '\n' not in presets.description(name)


def test_list_prints_one_line_per_preset_and_exits_0(tmp_path):
  result = _cli('--preset=list', cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert [l.split()[0] for l in lines] == presets.names()
  assert all(len(l.split(None, 1)) == 2 for l in lines)


def test_unknown_preset_is_one_line_listing_the_names(tmp_path):
  result = _cli('--preset=efficientnet-b9-lars-1', '--model_dir=/tmp/x',
                cwd=tmp_path)
  assert result.returncode == 2
  assert result.stdout == ''
  # Our one line, whatever TensorFlow prints to stderr on import on some
  # CPUs (oneDNN, CPU features).
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, result.stderr
  assert errors[0].startswith('error: --preset: expected list or one of ')
  for name in presets.names():
    assert name in errors[0]
  assert "got 'efficientnet-b9-lars-1'" in errors[0]
  assert 'Traceback' not in result.stderr


def test_preset_loads_by_name_from_any_directory(tmp_path):
  result = _cli('--preset=efficientnet-b2-lars-4096', '--tpu=local',
                f'--model_dir={tmp_path / "run"}', '--dry_run',
                cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'peak_lr: 10.0' in result.stdout
  assert '"mode": "train_and_eval"' in result.stdout


def test_explicit_flags_win_wherever_they_stand(tmp_path):
  mine = tmp_path / 'mine.cfg'
  mine.write_text('--eval_every_epochs=7\n--train_epochs=100\n')
  cfg = _parse('--train_batch_size=512', '--eval_batch_size=512',
               '--preset=efficientnet-b2-lars-4096', f'--flagfile={mine}',
               '--model_dir=/tmp/x', '--data=synthetic', '--tpu=local',
               '--train_epochs=50')
  assert cfg.train.train_batch_size == 512  # Before --preset: still wins.
  assert cfg.train.eval_every_epochs == 7  # The user's flagfile wins.
  assert cfg.train.train_epochs == 50  # The last flag wins.
  assert cfg.optimizer.schedule.base_learning_rate == 10.0  # From the preset.
  assert FLAGS.preset == 'efficientnet-b2-lars-4096'


@pytest.mark.parametrize('argv,name', [
    (['p'], None),
    (['p', '--preset', 'cpu_smoke'], 'cpu_smoke'),
    (['p', '-preset=cpu_smoke.cfg'], 'cpu_smoke.cfg'),
    (['p', '--preset=a', '--preset=list'], 'list'),
    (['p', '--', '--preset=cpu_smoke'], None),
])
def test_requested_reads_absl_spellings(argv, name):
  assert presets.requested(argv) == name


def test_expand_argv():
  assert presets.expand_argv(['p', '--preset=list']) is None
  assert presets.expand_argv(['p', '--x=1']) == ['p', '--x=1']
  assert presets.expand_argv(['p', '--x=1', '--preset=cpu_smoke.cfg']) == [
      'p', f'--flagfile={presets.path("cpu_smoke")}', '--x=1',
      '--preset=cpu_smoke.cfg']
  with pytest.raises(ConfigError, match=r'^preset: expected list or one'):
    presets.expand_argv(['p', '--preset=../setup'])


def _paper_code_poly_lr(step, base_learning_rate, train_batch_size,
                        steps_per_epoch, train_steps, warmup_epochs):
  """tensorflow/tpu@4b544d49 efficientnet `main.py` + `utils.py`, poly.

  scaled_lr = base_learning_rate * (train_batch_size / 256.0);
  tf.train.polynomial_decay(scaled_lr, max(1, step - warmup_steps),
  train_steps - warmup_steps + 1, end_learning_rate=0.1, power=2.0), and
  scaled_lr * step / warmup_steps while step < warmup_steps.
  """
  initial_lr = base_learning_rate * (train_batch_size / 256.0)
  warmup_steps = int(steps_per_epoch * warmup_epochs)
  decay_steps = train_steps - warmup_steps + 1
  global_step = np.minimum(np.maximum(1, step - warmup_steps), decay_steps)
  poly = (initial_lr - 0.1) * (1 - global_step / decay_steps) ** 2.0 + 0.1
  warm = initial_lr * step / warmup_steps
  return np.where(step < warmup_steps, warm, poly)


def _printed_schedule(out):
  values = {}
  for line in out.splitlines():
    key, _, value = line.strip().partition(': ')
    if key in ('lr_at', 'total_steps', 'steps_per_epoch', 'warmup_steps',
               'peak_lr', 'train_batch_size'):
      values[key] = ast.literal_eval(value)
  return values


@pytest.mark.parametrize('batch,peak,warmup_epochs', [
    (4096, 10.0, 5), (16384, 25.0, 5), (32768, 32.0, 14), (65536, 35.6, 40)])
def test_recipes_flags_reproduce_the_paper_codes_schedule(
    tmp_path, capsys, batch, peak, warmup_epochs):
  # docs/recipes.md: --lr_scaling=linear --base_learning_rate=PEAK*256/BATCH
  # --end_learning_rate=0.1 on the LARS preset of that batch.
  base = peak * 256 / batch
  _parse(f'--preset=efficientnet-b5-lars-{batch}', '--tpu=local',
         f'--model_dir={tmp_path}', '--dry_run', '--lr_scaling=linear',
         f'--base_learning_rate={base!r}', '--end_learning_rate=0.1')
  assert main_lib.main(['efficientnet-tpu-train']) == 0
  printed = _printed_schedule(capsys.readouterr().out)
  assert printed['train_batch_size'] == batch
  # The dry run prints 6 significant digits.
  assert printed['peak_lr'] == pytest.approx(peak, rel=1e-5)
  spe = 1281167 / batch
  assert printed['steps_per_epoch'] == pytest.approx(spe, rel=1e-5)
  assert printed['warmup_steps'] == int(spe * warmup_epochs)
  steps = np.array([s for s, _ in printed['lr_at'].values()])
  ours = np.array([lr for _, lr in printed['lr_at'].values()])
  code = _paper_code_poly_lr(steps, base, batch, spe,
                             printed['total_steps'], warmup_epochs)
  # The code decays over one more step (see docs/recipes.md): < 1e-3.
  np.testing.assert_allclose(ours, code, rtol=1e-3, atol=1e-6)
  assert ours[-1] == pytest.approx(0.1, abs=1e-3)


# ---- a preset on the user's data: the description's counts win ------------
@pytest.fixture(scope='module')
def described_data(tmp_path_factory):
  """TFRecords with dataset_info.json: 30 train and 12 eval images of 4
  classes (the preset cpu_smoke says 2048, 500 and 10)."""
  from efficientnet_tpu.tools import make_tfrecords  # pylint: disable=g-import-not-at-top
  from tests.test_input_pipeline import write_split  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('described'))
  label = lambda f, j: (f + j) % 4 + 1
  write_split(data_dir, 'train', [20, 10], label)
  write_split(data_dir, 'validation', [6, 6], label)
  make_tfrecords.index(data_dir, num_threads=2, progress=False)
  return data_dir


def _dry_run(capsys, caplog, *args):
  """`efficientnet-tpu-train ARGS --dry_run`, as main.run parses it."""
  FLAGS.unparse_flags()
  FLAGS(presets.expand_argv(['efficientnet-tpu-train', *args, '--dry_run',
                             '--verbosity=0']))
  with caplog.at_level(logging.INFO, logger='absl'):
    rc = main_lib.main(['efficientnet-tpu-train'])
  out = capsys.readouterr()
  config = None
  if rc == 0:  # The resolved config, then the replica plan.
    config = json.loads(out.out[:out.out.index('\nModel: ')])
  return rc, out, config


def _assert_the_descriptions_counts(config):
  """The counts `described_data`'s dataset_info.json gives, not a preset's."""
  assert (config['data']['num_train_images'],
          config['data']['num_eval_images'],
          config['model']['num_label_classes']) == (30, 12, 4)
  assert config['data']['counts_from'] == 'dataset_info.json'


def test_preset_on_described_data_takes_its_counts(described_data, tmp_path,
                                                   capsys, caplog):
  rc, out, config = _dry_run(
      capsys, caplog, '--preset=cpu_smoke', '--data=tfrecord',
      f'--data_dir={described_data}', f'--model_dir={tmp_path / "run"}')
  assert rc == 0, out.err
  _assert_the_descriptions_counts(config)
  # The preset's other settings stand.
  assert config['distribute']['num_cpu_replicas'] == 4
  assert config['train']['train_steps'] == 120
  assert ('num_eval_images=500 (not given on the command line) replaced by '
          "the description's 12") in caplog.text


def test_a_count_given_on_the_command_line_must_still_agree(
    described_data, tmp_path, capsys, caplog):
  rc, out, _ = _dry_run(
      capsys, caplog, '--preset=cpu_smoke', '--data=tfrecord',
      f'--data_dir={described_data}', f'--model_dir={tmp_path / "run"}',
      '--num_train_images=2048')
  assert rc == 2
  assert out.err == (
      f'error: --num_train_images: 2048 disagrees with '
      f'{described_data}/dataset_info.json (30); leave it out to use the '
      'description\n'), out.err
  # Fewer eval images than described: allowed, and the log says so.
  rc, out, config = _dry_run(
      capsys, caplog, '--preset=cpu_smoke', '--data=tfrecord',
      f'--data_dir={described_data}', f'--model_dir={tmp_path / "run"}',
      '--num_eval_images=5')
  assert rc == 0, out.err
  assert config['data']['num_eval_images'] == 5
  assert 'evaluating the first 5 of the 12 eval records' in caplog.text


def test_preset_on_undescribed_data_says_that_it_narrows_the_eval(
    tmp_path, capsys, caplog):
  from tests.test_input_pipeline import write_split  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / 'data')
  write_split(data_dir, 'train', [2], lambda f, j: j + 1)
  write_split(data_dir, 'validation', [260, 250], lambda f, j: j % 10 + 1)
  rc, out, config = _dry_run(
      capsys, caplog, '--preset=cpu_smoke', '--data=tfrecord',
      f'--data_dir={data_dir}', f'--model_dir={tmp_path / "run"}')
  assert rc == 0, out.err
  # Nothing describes the data: the preset's counts are the settings.
  assert config['data']['num_eval_images'] == 500
  assert config['data']['counts_from'] == 'settings'
  assert 'evaluating the first 500 of the 510 eval records' in caplog.text


def test_cpu_smoke_on_synthetic_data_keeps_the_presets_counts(
    tmp_path, capsys, caplog):
  rc, out, config = _dry_run(capsys, caplog, '--preset=cpu_smoke',
                             f'--model_dir={tmp_path / "run"}')
  assert rc == 0, out.err
  assert config['data']['data'] == 'synthetic'
  assert (config['data']['num_train_images'],
          config['data']['num_eval_images'],
          config['model']['num_label_classes']) == (2048, 500, 10)
  assert config['data']['counts_from'] == 'settings'


def test_flag_names_reads_the_preset():
  names = presets.flag_names('cpu_smoke')
  assert {'num_train_images', 'num_eval_images', 'bn_group_size',
          'num_cpu_replicas'} <= names
  assert not {'data_dir', 'model_dir', 'preset'} & names


# ---- small_images: a recipe for 28-64 px data sets on one machine ----------
def test_small_images_preset_validates_and_takes_the_datas_counts(
    described_data, tmp_path, capsys, caplog):
  assert 'small_images' in presets.names()
  # The preset pins no data counts (nor the data source or hardware).
  assert not {'num_train_images', 'num_eval_images', 'num_label_classes',
              'data', 'data_dir', 'strategy', 'num_cpu_replicas'} & (
                  presets.flag_names('small_images'))
  rc, out, config = _dry_run(
      capsys, caplog, '--preset=small_images',
      f'--data_dir={described_data}', f'--model_dir={tmp_path / "run"}')
  assert rc == 0, out.err
  _assert_the_descriptions_counts(config)
  # What the preset sets for small images, as the settings a run records.
  assert config['model']['image_size'] == 32
  assert config['data']['eval_crop_fraction'] == 1.0
  assert 0.25 <= config['data']['train_crop_min_area'] <= 0.5
  assert config['data']['random_flip'] is True
  assert config['optimizer']['moving_average_decay'] == 0
  assert config['optimizer']['schedule']['lr_schedule'] == 'cosine'
  assert config['model']['batch_norm_warmup'] is True
  # Epochs, not steps: the run's length follows the data's size.
  assert config['train']['train_steps'] is None
  assert 'total_steps: ' in out.out
  # A flag after the preset still wins (digits: no flips).
  rc, out, config = _dry_run(
      capsys, caplog, '--preset=small_images', '--norandom_flip',
      f'--data_dir={described_data}', f'--model_dir={tmp_path / "run2"}')
  assert rc == 0, out.err
  assert config['data']['random_flip'] is False
