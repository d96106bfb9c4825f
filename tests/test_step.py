"""The replica steps (step.py) against numpy and TF-direct references."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import experiment
from efficientnet_tpu import model as model_lib
from efficientnet_tpu import replicated
from efficientnet_tpu import state as state_lib
from efficientnet_tpu import step
from efficientnet_tpu.config import DEFAULT_WEIGHT_DECAY_EXCLUDE
from tests.helpers import (cpu_replicas, local_values, per_replica,
                           small_config, split_batch, strategy_for)

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
CLASSES = 10


def _batch(n, size=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
  labels = rng.integers(0, CLASSES, n).astype(np.int32)
  return images, labels


def _normalized(images):
  return (images.astype(np.float32) - MEAN) / STD


def _log_softmax(logits):
  z = logits - logits.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _smoothed_ce(labels, logits, smoothing):
  targets = np.full(logits.shape, smoothing / CLASSES)
  targets[np.arange(len(labels)), labels] += 1 - smoothing
  return -(targets * _log_softmax(logits)).sum(axis=1)


def _decayed(variables):
  """The variables an L2 term covers: all but BN gamma / beta and biases."""
  return [v for v in variables
          if not v.path.endswith(('/gamma', '/beta', '/bias'))]


def _reference(model, images, labels, smoothing, weight_decay, global_batch,
               num_replicas):
  """Loss (TF ops on the float32 model, numpy-normalized input), its
  gradients, and the logits."""
  variables = model.trainable_variables
  with tf.GradientTape() as tape:
    logits = model(_normalized(images), training=True)
    onehot = tf.one_hot(labels, CLASSES)
    targets = onehot * (1 - smoothing) + smoothing / CLASSES
    ce = tf.nn.softmax_cross_entropy_with_logits(targets, logits)
    l2 = tf.add_n([tf.reduce_sum(tf.square(v)) / 2
                   for v in _decayed(variables)])
    loss = (tf.reduce_sum(ce) / global_batch +
            weight_decay * l2 / num_replicas)
  return loss.numpy(), tape.gradient(loss, variables), logits.numpy()


def _assert_close_grads(got, want):
  """Equal up to float32 rounding, which training-mode BN amplifies; some
  gradients (a BN beta before another BN) are rounding noise around 0, so
  each error is measured against the norm of all gradients."""
  got = [np.asarray(g).ravel() for g in got]
  want = [np.asarray(w).ravel() for w in want]
  total = np.linalg.norm(np.concatenate(want))
  assert total > 1e-3
  errors = [np.linalg.norm(g - w) / total for g, w in zip(got, want)]
  assert max(errors) < 1e-4, max(errors)


@pytest.fixture(name='model_cfg', scope='module')
def fixture_model_cfg(tmp_path_factory):
  return small_config(tmp_path_factory.mktemp('step'),
                      model=dict(num_label_classes=CLASSES)).model


def test_forward_backward_is_cross_entropy_over_the_global_batch(model_cfg):
  model = model_lib.build_model(model_cfg)
  spec = step.StepSpec(global_batch=16, num_replicas=2, num_classes=CLASSES,
                       label_smoothing=0.1, weight_decay=1e-3,
                       weight_decay_exclude=DEFAULT_WEIGHT_DECAY_EXCLUDE)
  images, labels = _batch(8)
  assert 0 < len(_decayed(model.trainable_variables)) < len(
      model.trainable_variables)
  want_loss, want_grads, want_logits = _reference(
      model, images, labels, 0.1, 1e-3, global_batch=16, num_replicas=2)
  # numpy cross entropy: the same loss without TF's.
  l2 = sum(float(np.sum(np.square(v.numpy())))
           for v in _decayed(model.trainable_variables)) / 2
  np.testing.assert_allclose(
      want_loss, _smoothed_ce(labels, want_logits, 0.1).sum() / 16 +
      1e-3 * l2 / 2, rtol=1e-5)
  seed = tf.constant([0, 0], tf.int64)
  for scale in (None, tf.constant(1024.0)):
    loss, logits, grads = step.forward_backward(
        spec, model, tf.constant(images), tf.constant(labels), seed, scale)
    assert logits.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-5)
    np.testing.assert_allclose(logits.numpy(), want_logits, rtol=1e-4,
                               atol=1e-5)
    assert len(grads) == len(want_grads)
    _assert_close_grads(grads, want_grads)


def test_train_step_applies_the_reference_update_and_sums(tmp_path):
  cfg = small_config(tmp_path, model=dict(num_label_classes=CLASSES),
                     optimizer=dict(label_smoothing=0.1, weight_decay=1e-3))
  strategy = cpu_replicas(1)
  state = state_lib.build_model_state(cfg, strategy, 1)
  spec = step.StepSpec.from_config(cfg, strategy)
  assert (spec.global_batch, spec.num_replicas, spec.weight_decay) == (
      32, 1, 1e-3)
  sums = replicated.Accumulators(strategy, 'test', step.TRAIN_SUMS)
  images, labels = _batch(32, seed=1)
  ref = model_lib.build_model(cfg.model)
  ref.set_weights(state.model.get_weights())
  want_loss, want_grads, want_logits = _reference(
      ref, images, labels, 0.1, 1e-3, global_batch=32, num_replicas=1)
  before = [v.numpy() for v in state.model.trainable_variables]

  @tf.function
  def run(batch):
    strategy.run(lambda b: step.train_step(spec, state, sums, b),
                 args=(batch,))

  sums.reset()
  run({'images': tf.constant(images), 'labels': tf.constant(labels)})
  got = sums.read()
  assert state.step == 1
  # Momentum SGD's first step: w - lr * grad (lr 0.1).
  _assert_close_grads(
      [(v.numpy() - b) / -0.1
       for b, v in zip(before, state.model.trainable_variables)], want_grads)
  assert got['examples'] == 32
  np.testing.assert_allclose(got['loss'], want_loss, rtol=1e-5)
  np.testing.assert_allclose(got['cross_entropy'],
                             _smoothed_ce(labels, want_logits, 0.0).sum(),
                             rtol=1e-5)
  assert got['correct'] == np.sum(want_logits.argmax(axis=1) == labels)


def test_eval_step_counts_masked_top_1_and_top_5(model_cfg):
  model = model_lib.build_model(model_cfg)
  # Moved BN statistics make the predictions differ between images.
  rng = np.random.default_rng(2)
  for layer in model.layers:
    if hasattr(layer, 'moving_mean'):
      layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
  spec = step.StepSpec(global_batch=16, num_replicas=1, num_classes=CLASSES)
  images, labels = _batch(24, seed=3)
  mask = np.ones(24, np.float32)
  mask[17:] = 0.0  # Padding.
  sums = {name: tf.Variable(0.0) for name in step.EVAL_SUMS}
  step.eval_step(spec, model, sums, {'images': tf.constant(images),
                                     'labels': tf.constant(labels),
                                     'mask': tf.constant(mask)})
  logits = model(_normalized(images), training=False).numpy()
  order = np.argsort(-logits, axis=1)
  real = mask > 0
  top_1 = order[real, 0] == labels[real]
  top_5 = (order[real, :5] == labels[real, None]).any(axis=1)
  assert 0 < top_5.sum() < 17  # Neither all nor none: the test can fail.
  assert sums['count'].numpy() == 17
  assert sums['top_1'].numpy() == top_1.sum()
  assert sums['top_5'].numpy() == top_5.sum()
  np.testing.assert_allclose(
      sums['loss'].numpy(), _smoothed_ce(labels[real], logits[real], 0.0).sum(),
      rtol=1e-5)


@pytest.mark.parametrize('precision', ['float32', 'bfloat16', 'float16'])
def test_input_dtype_is_the_models_compute_dtype(model_cfg, precision):
  model_cfg = dataclasses.replace(
      model_cfg, use_bfloat16=precision == 'bfloat16',
      use_float16=precision == 'float16')
  model = model_lib.build_model(model_cfg)
  dtype = step.compute_dtype(model_cfg.use_bfloat16, model_cfg.use_float16)
  assert dtype == tf.as_dtype(precision)
  # The first layer computes in that dtype: nothing is cast again.
  assert model.get_layer('stem_conv').compute_dtype == precision
  spec = step.StepSpec(global_batch=2, num_replicas=1, num_classes=CLASSES,
                       input_dtype=dtype)
  assert step.normalize(spec, tf.zeros([2, 16, 16, 3], tf.uint8)).dtype == (
      dtype)


def test_float16_eval_feeds_float16_and_matches_float32(tmp_path):
  """Eval of a float16 run normalizes to float16 as training does, and its
  metrics are those of the same weights in float32 (within rounding)."""
  cfg = small_config(tmp_path, model=dict(use_float16=True,
                                          num_label_classes=CLASSES))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  evaluator = experiment.evaluator_for(trainer)
  assert evaluator.spec == trainer.spec
  assert evaluator.spec.input_dtype == trainer.spec.input_dtype == tf.float16
  rng = np.random.default_rng(4)
  for layer in trainer.model.layers:
    if hasattr(layer, 'moving_mean'):
      layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
  got = evaluator.evaluate()

  ref = model_lib.build_model(dataclasses.replace(cfg.model,
                                                  use_float16=False))
  ref.set_weights(trainer.model.get_weights())
  batches = evaluator.eval_input.fn(tf.distribute.InputContext()).take(
      evaluator.num_steps)
  hits, losses, count = 0, 0.0, 0
  for batch in batches:
    real = batch['mask'].numpy() > 0
    logits = ref(_normalized(batch['images'].numpy()),
                 training=False).numpy()[real]
    labels = batch['labels'].numpy()[real]
    hits += np.sum(logits.argmax(axis=1) == labels)
    losses += _smoothed_ce(labels, logits, 0.0).sum()
    count += real.sum()
  assert got['num_examples'] == count == cfg.data.num_eval_images
  # float16 rounding may flip a near tie, no more.
  assert abs(got['top_1_accuracy'] * count - hits) <= 2, (got, hits)
  np.testing.assert_allclose(got['loss'], losses / count, rtol=1e-2)


def _conv_ops(concrete):
  """Convolution ops in a traced function, its function library included."""
  graph_def = concrete.graph.as_graph_def()
  nodes = list(graph_def.node)
  for fdef in graph_def.library.function:
    nodes.extend(fdef.node_def)
  return sum(n.op in ('Conv2D', 'DepthwiseConv2dNative') for n in nodes)


@pytest.mark.parametrize('group_size', [2, 0])
def test_traced_once_step_matches_the_per_replica_trace(tmp_path, group_size):
  """4 CPU replicas: the forward and backward pass traced once (TF's
  collective ops for group BN, replica ids as inputs) gives every replica
  the loss, gradients, logits, moving statistics and dropout draws of
  MirroredStrategy's per-replica trace (tf.distribute's all-reduce), with
  one copy of the model's convolutions instead of four."""
  cfg = small_config(tmp_path, num_replicas=4,
                     model=dict(num_label_classes=CLASSES, image_size=16,
                                bn_group_size=group_size, dropout_rate=0.3,
                                stochastic_depth_rate=0.3),
                     optimizer=dict(label_smoothing=0.1, weight_decay=1e-3))
  strategy = cpu_replicas(4)
  spec = step.StepSpec.from_config(cfg, strategy)
  assert spec.trace_once_devices == tuple(strategy.extended.worker_devices)
  per_replica_spec = dataclasses.replace(spec, trace_once_devices=())
  state = state_lib.build_model_state(cfg, strategy,
                                      group_size or 4)
  model = state.model
  images, labels = _batch(32, seed=3)
  batch = {'images': split_batch(strategy, images),
           'labels': split_batch(strategy, labels)}
  initial = [v.numpy() for v in model.variables]

  def run(fb_fn):
    for v, value in zip(model.variables, initial):
      v.assign(value)

    def replica(images, labels):
      seed = tf.constant([1, 2], tf.int64)
      loss, logits, grads = fb_fn(images, labels, seed)
      stats = [tf.identity(v) for v in model.non_trainable_variables]
      return loss, logits, grads, stats

    fn = tf.function(lambda b: strategy.run(
        replica, args=(b['images'], b['labels'])))
    concrete = fn.get_concrete_function(batch)
    out = concrete(batch)
    return _conv_ops(concrete), tf.nest.map_structure(
        lambda v: local_values(strategy, v), out)

  traced_once = step.compile_forward_backward(spec, model)
  assert isinstance(traced_once, step.TracedOnceForwardBackward)
  once_convs, once = run(traced_once)
  per_convs, want = run(step.compile_forward_backward(per_replica_spec, model))
  assert per_convs == 4 * once_convs > 0
  want_loss, want_logits, want_grads, want_stats = want
  loss, logits, grads, stats = once
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
  for got_v, want_v in zip(grads, want_grads):
    _assert_close_grads(got_v, want_v)
  for got_v, want_v in zip(stats, want_stats):
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-6)
  # The draws and statistics are per replica (or per group), not shared.
  assert not np.allclose(loss[0], loss[1])
  moving_mean = next(i for i, v in enumerate(model.non_trainable_variables)
                     if v.path.endswith('moving_mean'))
  first = stats[moving_mean]
  assert np.allclose(first[0], first[1]) and (
      np.allclose(first[0], first[2]) == (group_size == 0))


def test_traced_once_step_refuses_replicas_of_other_batch_shapes(tmp_path):
  """A replica whose batch differs in shape from the first replica's would
  need a trace of its own, whose collectives no other replica joins (a
  hang): it is refused when tracing, naming the shapes."""
  cfg = small_config(tmp_path, num_replicas=2,
                     model=dict(num_label_classes=CLASSES, bn_group_size=0))
  strategy = cpu_replicas(2)
  spec = step.StepSpec.from_config(cfg, strategy)
  state = state_lib.build_model_state(cfg, strategy, 2)
  fb = step.compile_forward_backward(spec, state.model)
  images = [_batch(n)[0] for n in (8, 4)]
  labels = [_batch(n)[1] for n in (8, 4)]
  batch = (per_replica(strategy, images), per_replica(strategy, labels))
  run = tf.function(lambda x, y: strategy.run(
      lambda a, b: fb(a, b, tf.constant([0, 0], tf.int64))[0], args=(x, y)))
  with pytest.raises(ValueError, match=r'replica 1 .*\(4, 16, 16, 3\)'):
    run.get_concrete_function(*batch)
