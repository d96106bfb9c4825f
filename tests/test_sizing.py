"""Sizing before work: parameters, FLOPs, memory per replica, refusals."""

import dataclasses
import re

from absl import flags
import keras
import numpy as np
import pytest

from efficientnet_tpu import main as main_lib
from efficientnet_tpu import model as model_lib
from efficientnet_tpu import presets
from efficientnet_tpu import sizing
from efficientnet_tpu.config import ConfigError
from tests.helpers import small_config

FLAGS = flags.FLAGS
GIB = 1024 ** 3


@pytest.fixture(autouse=True)
def _reset_flags():
  yield
  FLAGS.unparse_flags()


def _run(capsys, *args):
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', f'--flagfile={presets.path("cpu_smoke")}',
         *args])
  rc = main_lib.main(['efficientnet-tpu-train'])
  return rc, capsys.readouterr()


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  cfg = small_config(tmp_path_factory.mktemp('run'))
  return cfg, sizing.model_size(cfg)


def test_activations_are_the_conv_and_dense_outputs_of_a_real_forward(small):
  """The symbolic count equals the sizes of the tensors a forward pass of
  one image produces at those layers."""
  cfg, size = small
  model = model_lib.build_model(cfg.model)
  kept = [l.output for l in model.layers
          if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]
  probe = keras.Model(model.inputs, kept)
  image = np.zeros((1, cfg.model.image_size, cfg.model.image_size, 3),
                   np.float32)
  outputs = probe(image, training=False)
  assert size.activations_per_image == sum(int(np.size(o)) for o in outputs)
  assert size.parameters == model.count_params()
  assert size.trainable_parameters == sum(
      int(np.size(w)) for w in model.trainable_weights)
  assert size.flops_per_image == model_lib.flops_per_image(cfg.model)


@pytest.mark.parametrize('optimizer,ema,copies', [
    ('lars', 0.0, 3), ('momentum', 0.99, 4), ('lamb', 0.99, 5),
    ('rmsprop', 0.0, 4), ('sgd', 0.0, 2)])
def test_state_counts_weights_gradients_slots_and_ema(small, optimizer, ema,
                                                       copies):
  cfg, size = small
  cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(
      cfg.optimizer, name=optimizer, moving_average_decay=ema))
  memory = sizing.training_memory(cfg, size, per_replica_batch=8)
  # Non-trainable weights (BN statistics) once; trainable ones `copies`
  # times: weights, gradients, the optimizer's slots (Keras' own slot
  # counts) and the EMA.
  non_trainable = size.parameters - size.trainable_parameters
  assert memory.state_bytes == 4 * (non_trainable +
                                    copies * size.trainable_parameters)
  assert memory.activation_bytes == 4 * 8 * size.activations_per_image
  bf16 = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, use_bfloat16=True))
  assert sizing.training_memory(bf16, size, 8).activation_bytes == (
      memory.activation_bytes // 2)


def test_slot_counts_match_the_optimizers_own_variables(small):
  """The slot table against the variables each optimizer really builds."""
  cfg, _ = small
  from efficientnet_tpu import optimizers  # pylint: disable=g-import-not-at-top
  weights = [keras.Variable(np.zeros((3, 2), np.float32)),
             keras.Variable(np.zeros((2,), np.float32))]
  for name, slots in sizing._SLOTS.items():  # pylint: disable=protected-access
    opt_cfg = dataclasses.replace(cfg.optimizer, name=name)
    opt = optimizers.build_optimizer(opt_cfg, 0.1)
    opt.build(weights)
    per_weight = [v for v in opt.variables
                  if tuple(v.shape) in ((3, 2), (2,))]
    assert len(per_weight) == slots * len(weights), name


def _estimate(per_replica_gib):
  return sizing.MemoryEstimate(8, 0, int(per_replica_gib * GIB))


def test_fits_warns_and_refuses_by_strategy(small):
  cfg, _ = small
  tpu = dataclasses.replace(cfg, distribute=dataclasses.replace(
      cfg.distribute, strategy='tpu', tpu='local'))
  assert sizing.check_fits(tpu, _estimate(7.4), 1024) == []
  assert 'TPU v3 core (16 GiB)' in sizing.check_fits(tpu, _estimate(20),
                                                      1024)[0]
  with pytest.raises(ConfigError) as info:
    sizing.check_fits(tpu, _estimate(100), 1024)
  assert info.value.setting == 'train_batch_size'
  assert 'TPU v5p chip (95 GiB)' in info.value.message
  # CPU replicas share the host: 4 replicas of 3 GiB do not fit in 10 GiB.
  assert sizing.check_fits(cfg, _estimate(3), 3, host_bytes=10 * GIB) == []
  with pytest.raises(ConfigError, match="more than this machine's 10 GiB"):
    sizing.check_fits(cfg, _estimate(3), 4, host_bytes=10 * GIB)


def test_dry_run_sizes_the_model_warns_and_rounds(tmp_path, capsys):
  rc, out = _run(capsys, f'--model_dir={tmp_path}', '--dry_run')
  assert rc == 0, out.err
  text = out.out
  assert re.search(r'^Model: efficientnet-b0 at 32 px: 0\.\d+M parameters, '
                   r'[\d.e-]+ GFLOPs per image$', text, re.M), text[-2000:]
  assert re.search(r'^Memory: ~[\d.e-]+ GiB per replica for training at 16 '
                   r'images per replica', text, re.M)
  # The smoke preset runs LARS at batch 64: the sources' warning.
  assert re.search(r'^warning: LARS at a global batch of 64', text, re.M)
  # Every number of the schedule block reads with at most 6 digits.
  schedule = text[text.index('Learning-rate schedule:'):]
  for number in re.findall(r'\d+\.\d+', schedule.split('plot:')[0]):
    assert len(number.replace('.', '').lstrip('0')) <= 6, number


@pytest.mark.parametrize('dry_run', [True, False])
def test_absurd_batch_is_refused_before_any_step(tmp_path, capsys, dry_run):
  model_dir = tmp_path / 'run'
  rc, out = _run(capsys, f'--model_dir={model_dir}',
                 '--train_batch_size=1000000000', '--eval_batch_size=64',
                 *(['--dry_run'] if dry_run else []))
  assert rc == 2
  lines = out.err.strip().splitlines()
  assert lines[-1].startswith('error: --train_batch_size: 1000000000 images '
                              'per step need about ')
  assert "more than this machine's" in lines[-1]
  assert not list(model_dir.glob('ckpt-*'))


@pytest.mark.parametrize('images,batch,epochs,loop,evals', [
    # Small data (the fine-tuning example): a line and an eval every epoch.
    (3000, 64, 20, 47, 47),
    # ImageNet at 2048 for 350 epochs: a line every epoch, 20 evaluations.
    (1281167, 2048, 350, 626, 10948),
    # A run shorter than an epoch: 20 lines, one eval at the end.
    (100000, 256, 0.5, 10, 195),
])
def test_reporting_defaults_follow_the_data(tmp_path, images, batch, epochs,
                                            loop, evals):
  cfg = small_config(tmp_path, data=dict(num_train_images=images),
                     train=dict(train_batch_size=batch, train_epochs=epochs,
                                train_steps=None, iterations_per_loop=None,
                                mode='train_and_eval'))
  steps_per_epoch = images / batch
  total = round(epochs * steps_per_epoch)
  assert cfg.total_train_steps == total
  # A loop: at most an epoch, at most a 20th of the run.
  assert cfg.loop_steps == loop == min(round(steps_per_epoch),
                                       -(-total // 20), total)
  # Evaluations: every epoch or every 20th of the run, whichever is longer.
  assert cfg.eval_interval_steps == evals == min(
      max(round(steps_per_epoch), -(-total // 20)), total)
  assert sizing.recipe_warnings(cfg) == []


def test_a_run_silent_until_its_end_is_warned_in_the_dry_run(tmp_path,
                                                             capsys):
  """docs/fine_tuning.md's case: ~1400 steps with a loop of 1251 and no
  eval interval."""
  rc, out = _run(capsys, f'--model_dir={tmp_path}', '--dry_run',
                 '--train_steps=1406', '--iterations_per_loop=1251',
                 '--eval_every_steps=1406',
                 '--optimizer=momentum')
  assert rc == 0, out.err
  warnings = [l for l in out.out.splitlines() if l.startswith('warning:')]
  assert warnings == [
      'warning: `iterations_per_loop=1251` of 1406 steps: 2 progress line(s) '
      'and checkpoint(s) in the whole run; leave it out (one epoch, at most '
      'a 20th of the run) or lower it',
      'warning: train_and_eval evaluates only at the end of 1406 steps '
      '(43.9 epochs); set `eval_every_epochs` or leave it out (every epoch, '
      'at most 20 evaluations)']
