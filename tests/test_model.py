"""Tests for efficientnet_tpu.model."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import collectives
from efficientnet_tpu import layers
from efficientnet_tpu import model as model_lib
from efficientnet_tpu.config import ConfigError, ModelConfig
from tests.helpers import cpu_replicas

# Base repeats of the 7 stages (EfficientNet paper, Table 1).
BASE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
KERAS_APPS = {
    'efficientnet-b0': keras.applications.EfficientNetB0,
    'efficientnet-b1': keras.applications.EfficientNetB1,
    'efficientnet-b2': keras.applications.EfficientNetB2,
    'efficientnet-b3': keras.applications.EfficientNetB3,
    'efficientnet-b4': keras.applications.EfficientNetB4,
    'efficientnet-b5': keras.applications.EfficientNetB5,
    'efficientnet-b6': keras.applications.EfficientNetB6,
    'efficientnet-b7': keras.applications.EfficientNetB7,
}


def _tiny(**kwargs):
  defaults = dict(width_coefficient=0.25, depth_coefficient=0.1,
                  image_size=32, num_label_classes=10)
  defaults.update(kwargs)
  return ModelConfig(**defaults)


def _blocks(model):
  """Block name prefixes in graph order (one project_conv per block)."""
  return [l.name[:-len('project_conv')] for l in model.layers
          if l.name.endswith('project_conv')]


def _count_params(build):
  """count_params() of the model build() returns, its variables created
  without values: Keras defers initializers inside a StatelessScope, and
  the count only reads the variables' shapes. Drawing B7's 66M initial
  values took most of the build time."""
  with keras.StatelessScope(initialize_variables=False):
    count = build().count_params()
  keras.backend.clear_session()  # Also drops the uninitialized variables.
  return count


@pytest.mark.parametrize('name', sorted(KERAS_APPS))
def test_param_count_matches_keras_applications(name):
  ours = _count_params(
      lambda: model_lib.build_model(ModelConfig(name=name)))
  theirs = _count_params(
      lambda: KERAS_APPS[name](weights=None, classes=1000))
  assert abs(ours - theirs) / theirs < 0.005, (ours, theirs)


def test_model_scaling_table():
  # Table 1 of the paper's code (tensorflow/tpu efficientnet_builder.py).
  b4 = ModelConfig(name='efficientnet-b4')
  assert (b4.width_coefficient, b4.depth_coefficient, b4.image_size,
          b4.dropout_rate) == (1.4, 1.8, 380, 0.4)
  with pytest.raises(ConfigError, match='^model_name: expected one of'):
    ModelConfig(name='efficientnet-b9')


@pytest.mark.parametrize('depth', [0.1, 1.0, 3.1])
def test_block_counts_are_depth_scaled(depth):
  cfg = ModelConfig(width_coefficient=0.25, depth_coefficient=depth,
                    image_size=32)
  want = sum(math.ceil(depth * r) for r in BASE_REPEATS)
  assert len(model_lib.block_plan(0.25, depth)) == want
  if depth < 1.5:  # Building is cheap enough.
    assert len(_blocks(model_lib.build_model(cfg))) == want


def test_stochastic_depth_rate_grows_linearly_to_the_last_block():
  cfg = _tiny(depth_coefficient=1.0, stochastic_depth_rate=0.2,
              dropout_rate=0.3)
  model = model_lib.build_model(cfg)
  blocks = _blocks(model)
  n = len(blocks)
  drops = {l.name[:-len('drop')]: l.drop_rate for l in model.layers
           if isinstance(l, layers.StochasticDepth)}
  assert drops
  for i, prefix in enumerate(blocks):
    if prefix in drops:
      np.testing.assert_allclose(drops[prefix], 0.2 * i / (n - 1))
  plan = model_lib.block_plan(1.0, 1.0, stochastic_depth_rate=0.2)
  np.testing.assert_allclose(plan[-1]['drop_rate'], 0.2)
  # The head dropout is the dropout rate, not the stochastic depth rate.
  assert model.get_layer('top_dropout').rate == 0.3
  none = model_lib.build_model(_tiny(stochastic_depth_rate=0.0))
  assert not any(isinstance(l, layers.StochasticDepth) for l in none.layers)


def test_every_normalization_layer_is_group_bn_with_config_settings():
  cfg = _tiny(batch_norm_momentum=0.9, batch_norm_epsilon=1e-4)
  model = model_lib.build_model(cfg, bn_group_size=4)
  bns = [l for l in model.layers
         if 'bn' in l.name or 'Normalization' in type(l).__name__]
  # stem + top + (expand?) dw + project per block.
  assert len(bns) >= 2 + 2 * len(_blocks(model))
  for l in bns:
    assert isinstance(l, layers.GroupSyncBatchNormalization), l.name
    assert (l.group_size, l.momentum, l.epsilon) == (4, 0.9, 1e-4)


@pytest.mark.parametrize('bf16', [False, True])
def test_forward_fp32_and_bf16(bf16):
  cfg = _tiny(use_bfloat16=bf16)
  model = model_lib.build_model(cfg)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  inputs = [x, tf.cast(x, tf.bfloat16)] if bf16 else [x]
  for xi in inputs:
    for training in (True, False):
      y = model(xi, training=training)
      assert y.dtype == tf.float32 and y.shape == (2, 10)
      assert np.all(np.isfinite(y.numpy()))
  want = 'bfloat16' if bf16 else 'float32'
  assert model.get_layer('stem_conv').compute_dtype == want
  assert model.get_layer('top_bn').compute_dtype == want
  assert model.get_layer('logits').compute_dtype == 'float32'
  assert all(v.dtype == 'float32' for v in model.weights)
  if bf16:  # Same weights in fp32 give close logits at inference.
    ref = model_lib.build_model(_tiny())
    ref.set_weights(model.get_weights())
    np.testing.assert_allclose(model(x, training=False),
                               ref(x, training=False), atol=0.1, rtol=0.1)


def test_training_on_replicas_keeps_moving_stats_identical():
  """Integration: a train step on 4 replicas with BN groups of 2, then the
  synchronization the trainer runs before checkpoints."""
  strategy = cpu_replicas(4)
  with strategy.scope():
    model = model_lib.build_model(_tiny(), bn_group_size=2)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(4, 2, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=(4, 2))

  @tf.function
  def step(x, y):
    def fn(x, y):
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
      grads = tape.gradient(loss, model.trainable_weights)
      return [tf.reduce_sum(tf.abs(g)) for g in grads]
    return strategy.run(fn, args=(x, y))

  dist = lambda a: strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group]))
  grad_norms = np.array([[np.asarray(v) for v in
                          strategy.experimental_local_results(g)]
                         for g in step(dist(images), dist(labels))])
  assert np.isfinite(grad_norms).all() and (grad_norms.sum(1) > 0).all()
  collectives.replica_mean_assigner(strategy, model.non_trainable_weights)()
  for v in model.non_trainable_weights:
    values = [np.asarray(c) for c in
              strategy.experimental_local_results(v.value)]
    for other in values[1:]:
      np.testing.assert_array_equal(other, values[0], err_msg=v.path)
  # The stem BN saw all images: its moving mean moved off zero.
  assert np.abs(model.get_layer('stem_bn').moving_mean.numpy()).max() > 0


def test_flops_per_image_of_b0_matches_the_paper():
  """EfficientNet-B0 at 224: 0.39B multiply-adds (Tan & Le 2019, Table 2),
  i.e. ~0.78e9 floating-point operations at 2 per multiply-add."""
  flops = model_lib.flops_per_image(ModelConfig(name='efficientnet-b0'))
  assert abs(flops / 0.78e9 - 1) < 0.05, flops
