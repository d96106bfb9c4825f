"""Fine-tuning initialization against keras.applications and our checkpoints.

The reference for the Keras mapping is keras.applications' own EfficientNet
(weights=None, 64 px, random batch-norm statistics so that a wrong mapping
shows): its logits on 0..255 pixels, through its own Rescaling and
Normalization layers set to the ImageNet statistics, must equal ours on
`preprocessing.normalize` of the same pixels. That checks the layer mapping
and that our input normalization is the one the Keras weights expect.
"""

import logging
import os

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import init_checkpoint
from efficientnet_tpu import model as model_lib
from efficientnet_tpu import state as state_lib
from efficientnet_tpu.config import ModelConfig
from efficientnet_tpu.data import preprocessing
from efficientnet_tpu.data import synthetic
from tests.helpers import cpu_replicas, small_config

SIZE = 64
CLASSES = 10
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
APPS = {
    'efficientnet-b0': keras.applications.EfficientNetB0,
    'efficientnet-b1': keras.applications.EfficientNetB1,
    'efficientnet-b2': keras.applications.EfficientNetB2,
}


def _keras_model(name, include_top=True, seed=0):
  """keras.applications' model with random BN statistics and the ImageNet
  input normalization."""
  rng = np.random.default_rng(seed)
  model = APPS[name](weights=None, include_top=include_top,
                     input_shape=(SIZE, SIZE, 3), classes=CLASSES,
                     classifier_activation=None)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.gamma.shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c),
                         rng.normal(0, 0.1, c), rng.uniform(0.5, 2.0, c)])
    elif isinstance(layer, keras.layers.Normalization):
      layer.set_weights([IMAGENET_MEAN, IMAGENET_STD**2, np.array(0)])
      layer.finalize_state()  # What load_weights does after reading.
  return model


def _write_keras2_h5(model, path):
  """The layout tf.keras 2 `save_weights(... .h5)` wrote (the published
  efficientnetb0.h5): root `layer_names`, per layer `weight_names` such as
  'stem_bn/gamma:0' and 'block1a_dwconv/depthwise_kernel:0'. The
  Normalization variance is stored as the std, as in the published files."""
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = [l.name.encode() for l in model.layers]
    f.attrs['backend'] = b'tensorflow'
    f.attrs['keras_version'] = b'2.4.0'
    for layer in model.layers:
      group = f.create_group(layer.name)
      names = []
      for v in layer.weights:
        short = v.path.rpartition('/')[2]
        if isinstance(layer, keras.layers.DepthwiseConv2D):
          short = 'depthwise_kernel'
        value = v.numpy()
        if isinstance(layer, keras.layers.Normalization) and short == (
            'variance'):
          value = IMAGENET_STD
        names.append(f'{layer.name}/{short}:0')
        group.create_dataset(names[-1], data=value)
      group.attrs['weight_names'] = [n.encode() for n in names]


def _ours(name, num_classes=CLASSES, **kwargs):
  return model_lib.build_model(ModelConfig(
      name=name, num_label_classes=num_classes, image_size=SIZE,
      **kwargs))


def _keras_weights(kmodel):
  """{our variable path: value} of the keras.applications model."""
  out = {}
  for layer in kmodel.layers:
    for v in layer.weights:
      if isinstance(layer, keras.layers.Normalization):
        continue
      name = layer.name
      if name.endswith('_se_reduce') or name.endswith('_se_expand'):
        name = name[:-len('_reduce')] + '/' + name.rpartition('_')[2]
      if name == 'predictions':
        name = 'logits'
      out[f'{name}/{v.path.rpartition("/")[2]}'] = v.numpy()
  return out


@pytest.fixture(scope='module')
def b0(tmp_path_factory):
  """keras.applications B0: the model, its .weights.h5 and Keras 2 .h5."""
  d = tmp_path_factory.mktemp('b0')
  # Not the process's first Normalization layer: Keras then names the
  # model's input normalization `normalization_N`, as in a file saved by a
  # process that built other models first.
  keras.layers.Normalization()
  kmodel = _keras_model('efficientnet-b0')
  kmodel.save_weights(str(d / 'b0.weights.h5'))
  _write_keras2_h5(kmodel, d / 'efficientnetb0.h5')
  return kmodel, str(d / 'b0.weights.h5'), str(d / 'efficientnetb0.h5')


def _images(seed=1):
  return np.random.default_rng(seed).uniform(
      0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)


def _assert_same_logits(kmodel, model):
  x = _images()
  theirs = kmodel(x, training=False).numpy()
  ours = model(preprocessing.normalize(x), training=False).numpy()
  assert np.abs(theirs).max() > 0.1  # Not trivially equal.
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_b0_weights_h5_gives_keras_logits_on_every_replica(b0, caplog):
  kmodel, weights_h5, _ = b0
  strategy = cpu_replicas(2)
  with strategy.scope():
    model = _ours('efficientnet-b0')
  with caplog.at_level(logging.INFO, logger='absl'):
    report = init_checkpoint.load_initial_weights(model, weights_h5)
  assert report.source_format == init_checkpoint.FORMAT_KERAS_H5
  assert not report.head_reinitialized and report.excluded == ()
  assert 'as our pipeline' in report.preprocessing
  expected = _keras_weights(kmodel)
  assert sorted(report.loaded) == sorted(expected)
  for v in model.variables:
    if v.path in expected:
      for copy in strategy.experimental_local_results(v.value):
        np.testing.assert_array_equal(copy.numpy(), expected[v.path])
  _assert_same_logits(kmodel, model)
  assert any('variables loaded' in r.getMessage() for r in caplog.records)


def test_b2_weights_h5_gives_keras_logits(tmp_path):
  """Width 1.1 and depth 1.2: other channel counts and more blocks."""
  kmodel = _keras_model('efficientnet-b2', seed=2)
  kmodel.save_weights(str(tmp_path / 'b2.weights.h5'))
  model = _ours('efficientnet-b2')
  init_checkpoint.load_initial_weights(model, str(tmp_path / 'b2.weights.h5'))
  _assert_same_logits(kmodel, model)


def test_keras2_and_legacy_full_model_h5_give_keras_logits(b0, tmp_path):
  kmodel, _, keras2_h5 = b0
  model = _ours('efficientnet-b0')
  report = init_checkpoint.load_initial_weights(model, keras2_h5)
  assert report.source_format == init_checkpoint.FORMAT_LEGACY_H5
  # Variance stored as std: keras.applications' weights='imagenet' layout.
  assert 'extra rescaling' in report.preprocessing
  _assert_same_logits(kmodel, model)

  kmodel.save(str(tmp_path / 'full.h5'))  # Legacy full-model HDF5.
  model = _ours('efficientnet-b0')
  report = init_checkpoint.load_initial_weights(model, str(tmp_path /
                                                           'full.h5'))
  assert report.source_format == init_checkpoint.FORMAT_LEGACY_H5
  _assert_same_logits(kmodel, model)


def test_bfloat16_model_gets_the_float32_weights(b0):
  kmodel, weights_h5, _ = b0
  model = _ours('efficientnet-b0', use_bfloat16=True)
  init_checkpoint.load_initial_weights(model, weights_h5)
  expected = _keras_weights(kmodel)
  for v in model.variables:
    if v.path in expected:
      assert v.dtype == 'float32'
      np.testing.assert_array_equal(v.numpy(), expected[v.path])


@pytest.mark.parametrize('source', ['other_classes', 'notop'])
def test_head_is_left_initialized_when_classes_differ_or_absent(
    b0, source, tmp_path, caplog):
  kmodel, weights_h5, _ = b0
  if source == 'notop':
    notop = _keras_model('efficientnet-b0', include_top=False)
    weights_h5 = str(tmp_path / 'notop.weights.h5')
    notop.save_weights(weights_h5)
    kmodel, num_classes = notop, CLASSES
  else:
    num_classes = 7
  model = _ours('efficientnet-b0', num_classes=num_classes)
  head = {v.path: v.numpy().copy() for v in model.get_layer('logits').weights}
  with caplog.at_level(logging.INFO, logger='absl'):
    report = init_checkpoint.load_initial_weights(model, weights_h5)
  assert report.head_reinitialized
  assert ('no classifier head' if source == 'notop' else
          f'{CLASSES} classes') in report.head_reason
  assert any('logits left as initialized' in r.getMessage()
             for r in caplog.records)
  for v in model.get_layer('logits').weights:
    np.testing.assert_array_equal(v.numpy(), head[v.path])
    assert v.path not in report.loaded
  expected = _keras_weights(kmodel)
  if source == 'other_classes':
    assert not np.array_equal(head['logits/kernel'][:, :7],
                              expected['logits/kernel'][:, :7])
  body = [p for p in expected if not p.startswith('logits/')]
  assert sorted(report.loaded) == sorted(body)
  values = {v.path: v.numpy() for v in model.variables}
  for p in body:
    np.testing.assert_array_equal(values[p], expected[p])


def test_excluded_variables_keep_their_initialization(b0):
  kmodel, weights_h5, _ = b0
  model = _ours('efficientnet-b0')
  before = {v.path: v.numpy().copy() for v in model.variables}
  report = init_checkpoint.load_initial_weights(
      model, weights_h5, exclude=['block7.*', 'logits', r'top_bn/gamma$'])
  expected = _keras_weights(kmodel)
  excluded = [p for p in expected if p.startswith(('block7', 'logits/'))]
  excluded.append('top_bn/gamma')
  assert sorted(report.excluded) == sorted(excluded)
  assert not report.head_reinitialized
  for v in model.variables:
    # Excluded, and the dropout / stochastic depth RNG state: untouched.
    if v.path in excluded or v.path not in expected:
      assert v.path in excluded or v.path.endswith('seed_generator_state')
      np.testing.assert_array_equal(v.numpy(), before[v.path])
    else:
      np.testing.assert_array_equal(v.numpy(), expected[v.path])


@pytest.mark.parametrize('fmt', ['weights_h5', 'keras2_h5'])
def test_b0_weights_into_b1_names_the_first_missing_layer(b0, fmt):
  _, weights_h5, keras2_h5 = b0
  model = _ours('efficientnet-b1')
  before = [v.numpy().copy() for v in model.variables]
  path = weights_h5 if fmt == 'weights_h5' else keras2_h5
  with pytest.raises(ValueError) as e:
    init_checkpoint.load_initial_weights(model, path)
  message = str(e.value)
  # B1 repeats stage 1 (depth 1.1): block1b is the first layer B0 lacks.
  assert '\n' not in message and 'block1b_dwconv' in message, message
  assert 'model_name' in message and 'exclude' in message
  for v, b in zip(model.variables, before):  # Nothing assigned.
    np.testing.assert_array_equal(v.numpy(), b)


def test_b1_weights_into_b0_names_the_extra_source_layer(tmp_path):
  """Every B0 layer is in a B1 Keras 2 file with its shape: the layers left
  over still tell the variants apart."""
  path = tmp_path / 'efficientnetb1.h5'
  _write_keras2_h5(_keras_model('efficientnet-b1'), path)
  with pytest.raises(ValueError, match=r'has \d+ layers.*first block1b_.*'
                     r'model_name'):
    init_checkpoint.load_initial_weights(_ours('efficientnet-b0'), str(path))


def test_not_a_weights_file(tmp_path):
  (tmp_path / 'x.txt').write_text('hello')
  with h5py.File(tmp_path / 'other.h5', 'w') as f:
    f.create_dataset('x', data=np.zeros(3))
  model = _ours('efficientnet-b0', width_coefficient=0.1,
                depth_coefficient=0.1)
  for path, match in [(tmp_path / 'x.txt', 'neither a checkpoint'),
                      (tmp_path / 'absent', 'neither a checkpoint'),
                      (tmp_path, 'directory without a checkpoint'),
                      (tmp_path / 'other.h5', 'not Keras weights')]:
    with pytest.raises(ValueError, match=match):
      init_checkpoint.load_initial_weights(model, str(path))


def test_own_checkpoint_loads_model_weights_only(tmp_path):
  strategy = cpu_replicas(2)
  cfg = small_config(tmp_path / 'src', num_replicas=2,
                     optimizer=dict(moving_average_decay=0.9))
  source = state_lib.build_model_state(cfg, strategy, 1)
  rng = np.random.default_rng(3)
  saved = {}
  for v in source.model.variables:
    saved[v.path] = rng.normal(size=v.shape).astype(np.float32)
    v.assign(saved[v.path])
  averages = [rng.normal(size=a.shape).astype(np.float32)
              for a in source.ema.averages]
  for a, value in zip(source.ema.averages, averages):
    a.assign(value)
  source.optimizer.iterations.assign(7)
  for slot in source.optimizer.variables:
    if slot is not source.optimizer.iterations:
      slot.assign(tf.ones_like(slot))
  source.checkpoint.save(str(tmp_path / 'src' / 'ckpt'))

  target = state_lib.build_model_state(
      small_config(tmp_path / 'dst', num_replicas=2,
                   optimizer=dict(moving_average_decay=0.9)), strategy, 1)
  slots = [s.numpy().copy() for s in target.optimizer.variables]
  # A directory: its latest checkpoint.
  report = init_checkpoint.load_initial_weights(
      target.model, str(tmp_path / 'src'), ema=target.ema)
  assert report.source_format == init_checkpoint.FORMAT_CHECKPOINT
  assert report.path.endswith('ckpt-1') and report.ema_reset
  assert sorted(report.loaded) == sorted(saved)
  for v in target.model.variables:
    for copy in strategy.experimental_local_results(v.value):
      np.testing.assert_array_equal(copy.numpy(), saved[v.path])
  # EMA shadows start from the loaded weights, on every replica.
  for a, v in zip(target.ema.averages, target.ema.model_variables):
    for copy in strategy.experimental_local_results(a):
      np.testing.assert_array_equal(copy.numpy(), saved[v.path])
  assert target.step == 0
  for s, before in zip(target.optimizer.variables, slots):
    np.testing.assert_array_equal(s.numpy(), before)

  # use_ema_weights: the checkpoint's averages instead.
  fresh = state_lib.build_model_state(
      small_config(tmp_path / 'dst2'), tf.distribute.get_strategy(), 1)
  init_checkpoint.load_initial_weights(
      fresh.model, str(tmp_path / 'src' / 'ckpt-1'), use_ema_weights=True)
  by_path = {v.path: a for v, a in zip(source.ema.model_variables, averages)}
  for v in fresh.model.variables:
    np.testing.assert_array_equal(v.numpy(), by_path[v.path])


def test_own_checkpoint_with_other_classes_and_other_width(tmp_path):
  cfg = small_config(tmp_path / 'src')
  source = state_lib.build_model_state(cfg, tf.distribute.get_strategy(), 1)
  source.checkpoint.save(str(tmp_path / 'src' / 'ckpt'))
  target = state_lib.build_model_state(
      small_config(tmp_path / 'dst', model=dict(num_label_classes=3)),
      tf.distribute.get_strategy(), 1)
  head = [v.numpy().copy() for v in target.model.get_layer('logits').weights]
  report = init_checkpoint.load_initial_weights(target.model,
                                                str(tmp_path / 'src'))
  assert report.head_reinitialized and '5 classes' in report.head_reason
  for v, h in zip(target.model.get_layer('logits').weights, head):
    np.testing.assert_array_equal(v.numpy(), h)
  expected = {v.path: v.numpy() for v in source.model.variables}
  for v in target.model.variables:
    if not v.path.startswith('logits/'):
      np.testing.assert_array_equal(v.numpy(), expected[v.path])

  wider = state_lib.build_model_state(
      small_config(tmp_path / 'w', model=dict(width_coefficient=0.2)),
      tf.distribute.get_strategy(), 1)
  # The first variable, in layer order, whose shape the width changes.
  first = next((s, w) for s, w in zip(source.model.variables,
                                      wider.model.variables)
               if s.shape != w.shape)
  with pytest.raises(ValueError) as e:
    init_checkpoint.load_initial_weights(wider.model, str(tmp_path / 'src'))
  assert (f'variable {first[1].path} has shape {tuple(first[0].shape)} '
          in str(e.value)), str(e.value)
  assert f'the model {tuple(first[1].shape)}' in str(e.value)


@pytest.mark.parametrize('variance, imagenet_rescaling, matches', [
    (IMAGENET_STD**2, False, True),
    # The published files: variance = std, and keras.applications adds
    # Rescaling(1 / sqrt(std)) when built with weights='imagenet'.
    (IMAGENET_STD, True, True),
    (np.ones(3), False, False),
])
def test_input_normalization_check_agrees_with_keras_layers(
    variance, imagenet_rescaling, matches):
  """keras.applications' preprocessing layers on 0..255 pixels equal our
  `normalize` exactly when the check says they match."""
  mean = IMAGENET_MEAN if matches else np.zeros(3)
  x = _images()
  y = keras.layers.Rescaling(1.0 / 255.0)(x)
  y = keras.layers.Normalization(axis=-1, mean=mean, variance=variance)(y)
  if imagenet_rescaling:
    y = keras.layers.Rescaling(1.0 / np.sqrt(IMAGENET_STD))(y)
  same = np.allclose(np.asarray(y), preprocessing.normalize(x).numpy(),
                     atol=1e-5)
  ok, note = init_checkpoint.check_input_normalization(mean, variance)
  assert ok == same == matches, note


# ---- the command line: --init_checkpoint on a new and a resumed run --------
# The smoke preset scaled down to small_config's model on one replica: what
# is checked here is the flag's wiring (new run, resumed run, refusals); the
# loading itself is checked above, on every replica of 2 too.
_SMALL = ('--num_cpu_replicas=1', '--bn_group_size=1',
          '--width_coefficient=0.1', '--depth_coefficient=0.1',
          '--image_size=16')


def _cli(capsys, *args):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import main as main_lib  # pylint: disable=g-import-not-at-top
  smoke = os.path.join(os.path.dirname(main_lib.presets_lib.__file__),
                       'cpu_smoke.cfg')
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(['efficientnet-tpu-train', f'--flagfile={smoke}',
                 '--train_steps=2', '--iterations_per_loop=2',
                 '--mode=train', '--lr_warmup_epochs=0', *_SMALL, *args])
    rc = main_lib.main(['efficientnet-tpu-train'])
  finally:
    flags.FLAGS.unparse_flags()
  return rc, capsys.readouterr()


def _latest_weights(model_dir):
  """The conv kernels (4-D) of model_dir's latest checkpoint, by key."""
  reader = tf.train.load_checkpoint(model_dir)
  shapes = reader.get_variable_to_shape_map()
  return {k: reader.get_tensor(k) for k, shape in shapes.items()
          if k.startswith('ema/_model_variables/') and len(shape) == 4}


def test_cli_fine_tunes_from_a_run_not_when_resuming_and_refuses_others(
    tmp_path, capsys):
  from efficientnet_tpu import experiment  # pylint: disable=g-import-not-at-top
  source = tmp_path / 'source'
  assert _cli(capsys, f'--model_dir={source}', '--seed=1')[0] == 0
  # The new run starts from the source's weights: its updates are tiny
  # steps away from them (LR ~0), not from another initialization.
  target = tmp_path / 'target'
  rc, out = _cli(capsys, f'--model_dir={target}', '--seed=2',
                 f'--init_checkpoint={source}', '--base_learning_rate=1e-12')
  assert rc == 0, out.err
  src, got = _latest_weights(str(source)), _latest_weights(str(target))
  assert len(src) > 10 and set(got) == set(src)
  for k in src:
    np.testing.assert_allclose(got[k], src[k], atol=1e-6)
  # Resuming (target has a checkpoint): the init checkpoint is not read.
  cfg = small_config(target)
  cfg = cfg.with_settings(init_checkpoint=str(source))
  state = state_lib.build_model_state(cfg, cpu_replicas(1), 1)
  assert experiment.maybe_initialize(cfg, state) is None
  # A missing file, or another architecture: one line, nothing written.
  rc, out = _cli(capsys, f'--model_dir={tmp_path / "a"}',
                 f'--init_checkpoint={tmp_path / "missing.h5"}')
  assert rc == 2
  assert out.err.startswith('error: --init_checkpoint: ') and (
      out.err.count('\n') == 1), out.err
  rc, out = _cli(capsys, f'--model_dir={tmp_path / "b"}',
                 f'--init_checkpoint={source}', '--width_coefficient=0.2')
  assert rc == 2
  assert out.err.startswith('error: --init_checkpoint: ') and (
      'shape' in out.err and out.err.count('\n') == 1), out.err
  assert not tf.train.latest_checkpoint(str(tmp_path / 'b'))


def _moving_stats(model_dir, layer):
  """(moving_mean, moving_variance, and the kernel of the conv before it)
  of `layer` in model_dir's latest checkpoint, by variable path."""
  source = init_checkpoint._CheckpointSource(  # pylint: disable=protected-access
      tf.train.latest_checkpoint(str(model_dir)), use_ema_weights=False)
  reader = tf.train.load_checkpoint(str(model_dir))
  get = lambda path: reader.get_tensor(source._keys[path])  # pylint: disable=protected-access
  return get(f'{layer}/moving_mean'), get(f'{layer}/moving_variance')


def test_short_fine_tune_evaluates_with_the_datas_bn_statistics(
    tmp_path, capsys, caplog):
  # A source whose moving statistics belong to other data: the stem's are
  # off by 5 in mean and 50x in variance. A 30-step fine-tune at the
  # default momentum 0.99 kept 0.99^30 = 74% of them, and evaluations
  # normalized with them (eval cross entropy 36.5 after a 60-step
  # fine-tune whose train cross entropy was 2.1).
  source_dir = tmp_path / 'source'
  cfg = small_config(source_dir, model=dict(num_label_classes=10))
  source = state_lib.build_model_state(cfg, tf.distribute.get_strategy(), 1)
  stem_bn = source.model.get_layer('stem_bn')
  stem_bn.moving_mean.assign(stem_bn.moving_mean + 5.0)
  stem_bn.moving_variance.assign(stem_bn.moving_variance * 50.0)
  prefix = source.checkpoint.write(str(source_dir / 'ckpt-1'))
  kernel = source.model.get_layer('stem_conv').kernel.numpy()

  target = tmp_path / 'target'
  with caplog.at_level(logging.INFO, logger='absl'):
    rc, out = _cli(capsys, f'--model_dir={target}',
                   f'--init_checkpoint={prefix}', '--base_learning_rate=1e-12',
                   '--train_steps=30', '--iterations_per_loop=30',
                   '--batch_norm_momentum=0.99', '--verbosity=0')
  assert rc == 0, out.err
  assert 'its raw weights, not its EMA averages' in caplog.text
  mean, variance = _moving_stats(target, 'stem_bn')
  # Reference: the stem BN's input statistics on the run's (synthetic)
  # training images, from the unchanged stem kernel (the LR is ~0).
  data_cfg = small_config(target, data=dict(num_train_images=2048)).data
  images = next(iter(synthetic.synthetic_input(
      data_cfg, 10, 16, True, 512).fn()))['images']
  x = tf.nn.conv2d(preprocessing.normalize(images), kernel, 2, 'SAME').numpy()
  ref_mean, ref_var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(mean, ref_mean, atol=0.05 * np.sqrt(
      ref_var.max()) + 0.02)
  np.testing.assert_allclose(variance, ref_var, rtol=0.2)
  # Resumed without --init_checkpoint (warm-up off now): not refused.
  rc, out = _cli(capsys, f'--model_dir={target}', '--train_steps=32',
                 '--iterations_per_loop=2', '--base_learning_rate=1e-12',
                 '--batch_norm_momentum=0.99')
  assert rc == 0, out.err
  assert tf.train.latest_checkpoint(str(target)).endswith('ckpt-32')
