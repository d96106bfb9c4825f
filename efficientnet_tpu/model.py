"""EfficientNet B0-B7 as a Keras 3 functional model (compound scaling).

The network takes images that are already normalized ([B, H, W, 3], float32,
bfloat16 or float16) and returns float32 logits [B, num_classes]. With
`use_bfloat16` (`use_float16`) every layer computes in bfloat16 (float16)
with float32 variables ('mixed_bfloat16' / 'mixed_float16', passed per
layer; the global policy is untouched) except the final Dense, which is
float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import keras

from efficientnet_tpu import layers
from efficientnet_tpu.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class BlockArgs:
  """One stage of the base (B0) network, before scaling."""
  kernel_size: int
  repeats: int
  filters_in: int
  filters_out: int
  expand_ratio: int
  strides: int
  se_ratio: float = 0.25


# The standard EfficientNet-B0 stage table.
BASE_BLOCKS: Tuple[BlockArgs, ...] = (
    BlockArgs(3, 1, 32, 16, 1, 1),
    BlockArgs(3, 2, 16, 24, 6, 2),
    BlockArgs(5, 2, 24, 40, 6, 2),
    BlockArgs(3, 3, 40, 80, 6, 2),
    BlockArgs(5, 3, 80, 112, 6, 1),
    BlockArgs(5, 4, 112, 192, 6, 2),
    BlockArgs(3, 1, 192, 320, 6, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280


def round_filters(filters: int, width_coefficient: float,
                  depth_divisor: int = 8) -> int:
  """Scales a channel count by width, rounding to a multiple of the divisor.

  Never rounds down by more than 10%.
  """
  filters *= width_coefficient
  new = max(depth_divisor,
            int(filters + depth_divisor / 2) // depth_divisor * depth_divisor)
  if new < 0.9 * filters:
    new += depth_divisor
  return int(new)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  """Scales a stage's block count by depth (ceil)."""
  return int(math.ceil(depth_coefficient * repeats))


def block_plan(width_coefficient: float = 1.0, depth_coefficient: float = 1.0,
               depth_divisor: int = 8, stochastic_depth_rate: float = 0.0
               ) -> List[dict]:
  """The scaled block list: one dict of mbconv_block arguments per block.

  Stochastic depth drop rate grows linearly with the block index from 0 at
  the first block to `stochastic_depth_rate` at the last.
  """
  plan = []
  for stage, args in enumerate(BASE_BLOCKS):
    filters_in = round_filters(args.filters_in, width_coefficient,
                               depth_divisor)
    filters_out = round_filters(args.filters_out, width_coefficient,
                                depth_divisor)
    for j in range(round_repeats(args.repeats, depth_coefficient)):
      plan.append(dict(
          filters_in=filters_in if j == 0 else filters_out,
          filters_out=filters_out,
          kernel_size=args.kernel_size,
          strides=args.strides if j == 0 else 1,
          expand_ratio=args.expand_ratio,
          se_ratio=args.se_ratio,
          name=f'block{stage + 1}{chr(ord("a") + j)}_' if j < 26 else
          f'block{stage + 1}_{j}_'))
  last = max(len(plan) - 1, 1)
  for i, block in enumerate(plan):
    block['drop_rate'] = stochastic_depth_rate * i / last
  return plan


def efficientnet(*, width_coefficient: float, depth_coefficient: float,
                 image_size: int, num_classes: int, depth_divisor: int = 8,
                 dropout_rate: float = 0.0,
                 stochastic_depth_rate: float = 0.0, dtype: str = 'float32',
                 batch_norm: layers.BatchNormSpec = layers.BatchNormSpec(),
                 name: str = 'efficientnet',
                 batch_norm_fn: Optional[layers.BatchNormFactory] = None
                 ) -> keras.Model:
  """Builds an EfficientNet from explicit arguments.

  Call inside `strategy.scope()` for distributed training.

  Args:
    width_coefficient: channel scaling.
    depth_coefficient: block-count scaling.
    image_size: input height and width.
    num_classes: logits.
    depth_divisor: channels are rounded to multiples of it.
    dropout_rate: before the classifier.
    stochastic_depth_rate: drop rate of the last block (linear from 0).
    dtype: dtype policy of every layer but the float32 logits
      (`layers.dtype_policy`).
    batch_norm: momentum, epsilon, resolved group size and dtype of every
      normalization layer.
    name: the model's name.
    batch_norm_fn: builds every normalization layer, called as
      `batch_norm_fn(batch_norm, layer_name)`; None (training, export) is
      `layers.make_batch_norm`. The hook for benchmarks that compare other
      layers (benchmarks/bn_variants.py).

  Returns:
    A functional keras.Model: normalized images [B, S, S, 3] -> float32
    logits [B, num_classes].
  """
  bn = batch_norm_fn or layers.make_batch_norm
  policy = dtype
  width, divisor, size = width_coefficient, depth_divisor, image_size
  inputs = keras.Input((size, size, 3), name='images')

  x = keras.layers.Conv2D(
      round_filters(STEM_FILTERS, width, divisor), 3, strides=2,
      padding='same', use_bias=False,
      kernel_initializer=layers.conv_kernel_initializer(), dtype=policy,
      name='stem_conv')(inputs)
  x = bn(batch_norm, 'stem_bn')(x)
  x = keras.layers.Activation('swish', dtype=policy,
                              name='stem_activation')(x)

  for block in block_plan(width, depth_coefficient, divisor,
                          stochastic_depth_rate):
    x = layers.mbconv_block(x, dtype=policy, batch_norm=batch_norm,
                            batch_norm_fn=bn, **block)

  x = keras.layers.Conv2D(
      round_filters(HEAD_FILTERS, width, divisor), 1, padding='same',
      use_bias=False, kernel_initializer=layers.conv_kernel_initializer(),
      dtype=policy, name='top_conv')(x)
  x = bn(batch_norm, 'top_bn')(x)
  x = keras.layers.Activation('swish', dtype=policy, name='top_activation')(x)
  x = keras.layers.GlobalAveragePooling2D(dtype=policy, name='avg_pool')(x)
  if dropout_rate > 0:
    # Not keras.layers.Dropout: it draws the same mask on every replica.
    x = layers.ReplicaDropout(dropout_rate, dtype=policy,
                              name='top_dropout')(x)
  # float32 logits: softmax / cross-entropy precision.
  logits = keras.layers.Dense(
      num_classes, kernel_initializer=layers.dense_kernel_initializer(),
      bias_initializer='zeros', dtype='float32', name='logits')(x)
  return keras.Model(inputs, logits, name=name)


def build_model(config: ModelConfig, bn_group_size: int = 1,
                name: Optional[str] = None, *,
                dtype: Optional[str] = None,
                batch_norm_fn: Optional[layers.BatchNormFactory] = None
                ) -> keras.Model:
  """EfficientNet for `config`: the one adapter from the config to
  `efficientnet`'s arguments.

  Args:
    config: architecture, scaling coefficients, BN and dtype settings.
    bn_group_size: replicas per batch-norm group, resolved (1 = local BN,
      0 = all replicas); see `replica_plan.ReplicaPlan`.
    name: model name (default: config.name).
    dtype: a dtype policy instead of the config's precision (export and
      sizing build float32 copies).
    batch_norm_fn: see `efficientnet`.
  """
  policy = dtype or layers.dtype_policy(config.use_bfloat16,
                                        config.use_float16)
  return efficientnet(
      width_coefficient=config.width_coefficient,
      depth_coefficient=config.depth_coefficient,
      image_size=config.image_size, num_classes=config.num_label_classes,
      depth_divisor=config.depth_divisor, dropout_rate=config.dropout_rate,
      stochastic_depth_rate=config.stochastic_depth_rate, dtype=policy,
      batch_norm=layers.BatchNormSpec(
          momentum=config.batch_norm_momentum,
          epsilon=config.batch_norm_epsilon, group_size=bn_group_size,
          dtype=policy),
      name=name or config.name, batch_norm_fn=batch_norm_fn)


def flops_per_image(config: ModelConfig, model=None) -> int:
  """Floating-point operations of one inference at `config.image_size`.

  Counted by TF's graph profiler on a float32 copy of the model (local BN,
  batch 1): each multiply-add is 2 operations, so EfficientNet-B0 at 224
  gives ~0.80e9, twice the 0.39B multiply-adds of the paper's Table 2.
  `model`: that copy, if the caller has already built one (saves a build).
  """
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.python.profiler import model_analyzer  # pylint: disable=g-import-not-at-top
  from tensorflow.python.profiler import option_builder  # pylint: disable=g-import-not-at-top
  with tf.device('/cpu:0'):
    if model is None:
      model = build_model(config, bn_group_size=1, dtype='float32')
    size = config.image_size
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, size, size, 3], tf.float32)).graph
  options = option_builder.ProfileOptionBuilder.float_operation()
  options['output'] = 'none'
  # The profiler is a TF1 API and says so on every call.
  tf_logger = py_logging.getLogger('tensorflow')
  level = tf_logger.level
  tf_logger.setLevel(py_logging.ERROR)
  try:
    return int(model_analyzer.profile(graph, options=options).total_float_ops)
  finally:
    tf_logger.setLevel(level)
