"""EfficientNet building blocks and the group-synchronized batch norm.

Every normalization layer of the network comes from `make_batch_norm`, so
the whole model switches between local, grouped and global BN in one place
(the group size). Benchmarks that compare other normalization layers pass
their own factory to `model.build_model(batch_norm_fn=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import keras
import tensorflow as tf

from efficientnet_tpu import collectives
_PACKAGE = 'efficientnet_tpu'


def dtype_policy(use_bfloat16: bool = False, use_float16: bool = False
                 ) -> str:
  """Per-layer dtype policy: bfloat16 / float16 compute, float32 variables."""
  if use_bfloat16:
    return 'mixed_bfloat16'
  return 'mixed_float16' if use_float16 else 'float32'


@dataclasses.dataclass(frozen=True)
class BatchNormSpec:
  """What every normalization layer of one network shares.

  Attributes:
    momentum: of the moving statistics.
    epsilon: added to the variance.
    group_size: replicas per BN group, resolved (1: local BN; 0: all).
    dtype: the layers' dtype policy (`dtype_policy`).
  """
  momentum: float = 0.99
  epsilon: float = 1e-3
  group_size: int = 1
  dtype: str = 'float32'


def conv_kernel_initializer():
  """TPU-EN conv init: normal, stddev sqrt(2 / fan_out), fan_out = k*k*out."""
  return keras.initializers.VarianceScaling(
      scale=2.0, mode='fan_out', distribution='untruncated_normal')


def dense_kernel_initializer():
  """TPU-EN dense init: uniform(-1/sqrt(out), 1/sqrt(out))."""
  return keras.initializers.VarianceScaling(
      scale=1.0 / 3.0, mode='fan_out', distribution='uniform')


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GroupSyncBatchNormalization(keras.layers.Layer):
  """Batch norm whose training statistics are shared by groups of replicas.

  `group_size` replicas (contiguous replica ids) form a group; in training
  every replica normalizes with the mean and variance of the concatenation
  of its group's batches, as if the group were one device:

  * per replica, float32 mean and mean of squares over all axes but `axis`
    (also for bfloat16 input);
  * both summed over the group in ONE collective of the concatenated
    [mean, mean_sq] vector and divided by the group size;
  * variance = E[x^2] - E[x]^2, clamped at 0 (biased, like Keras BN).

  group_size 1 is local BN, group_size == number of replicas (or 0) is global
  sync BN. The layer is used for group_size 1 too, because Keras' own
  BatchNormalization lets the moving statistics drift apart per replica
  (its moving variables have aggregation NONE and each replica assigns its
  local statistics).

  Moving statistics are replica-local between synchronizations: every
  replica updates its moving mean and variance with the statistics it
  normalized with (local, group or global), with no communication, as
  TPU-EN's local BN does. `collectives.replica_mean_assigner` then sets all
  copies to their mean over replicas, in one all-reduce for the whole model,
  before anything reads them (checkpoint, evaluation, export). The moving
  average is linear, so the mean of the per-replica averages equals the
  average of the per-step means: the synchronized values are those of an
  all-reduce MEAN in every layer at every step, which cost one collective per
  BN layer per step (benchmarks/bn_variants.py keeps that variant, by
  overriding `_moving_targets`, for benchmarks/scaling.py).

  With `warm_up_momentum(step)` the moving averages use the momentum
  `min(momentum, (1 + step) / (10 + step))` at (0-based) step `step`, the
  EMA's warm-up (`ema.py`): after a few tens of steps they hold the
  statistics of the data seen, not their initial (or loaded) values, which
  a fixed momentum M keeps at weight M^steps (0.99^60 = 0.55).

  Outside a replica context (plain `model.predict`, a single device), or with
  one replica, it is ordinary batch norm. Inference uses moving statistics.
  Output has the compute dtype of the layer (the input dtype after Keras'
  autocasting); all arithmetic is float32.
  """

  def __init__(self,
               group_size: int = 1,
               axis: int = -1,
               momentum: float = 0.99,
               epsilon: float = 1e-3,
               center: bool = True,
               scale: bool = True,
               beta_initializer='zeros',
               gamma_initializer='ones',
               moving_mean_initializer='zeros',
               moving_variance_initializer='ones',
               **kwargs):
    super().__init__(**kwargs)
    if group_size < 0:
      raise ValueError(f'GroupSyncBatchNormalization: expected group_size '
                       f'>= 0 (0 = all replicas), got {group_size}')
    if axis != -1:
      raise ValueError(f'GroupSyncBatchNormalization: only axis=-1 (channels '
                       f'last) is supported, got {axis}')
    self.group_size = int(group_size)
    self.axis = axis
    self.momentum = float(momentum)
    self.epsilon = float(epsilon)
    self.center = center
    self.scale = scale
    self.beta_initializer = keras.initializers.get(beta_initializer)
    self.gamma_initializer = keras.initializers.get(gamma_initializer)
    self.moving_mean_initializer = keras.initializers.get(
        moving_mean_initializer)
    self.moving_variance_initializer = keras.initializers.get(
        moving_variance_initializer)
    self.supports_masking = True
    self._warmup_step = None

  def warm_up_momentum(self, step) -> None:
    """Warms the momentum up with `step`, a variable read at each update
    (the optimizer's iteration count; None: the fixed momentum)."""
    # Held in a closure: a variable set as an attribute would be tracked as
    # one of this layer's weights (and checkpointed with them).
    self._warmup_step = None if step is None else (lambda: step)

  def momentum_at(self, step) -> tf.Tensor:
    """The moving-average momentum used at (0-based) `step` with warm-up."""
    step = tf.cast(step, tf.float32)
    return tf.minimum(self.momentum, (1.0 + step) / (10.0 + step))

  def build(self, input_shape):
    channels = input_shape[-1]
    if channels is None:
      raise ValueError('GroupSyncBatchNormalization: the channel dimension '
                       'must be known')
    shape = (channels,)
    self.gamma = self.add_weight(
        shape=shape, name='gamma', initializer=self.gamma_initializer,
        trainable=True, autocast=False) if self.scale else None
    self.beta = self.add_weight(
        shape=shape, name='beta', initializer=self.beta_initializer,
        trainable=True, autocast=False) if self.center else None
    # aggregation 'none': every replica writes its (identical) value locally.
    # Said explicitly: Keras before 3.8 defaulted to 'mean'.
    self.moving_mean = self.add_weight(
        shape=shape, name='moving_mean',
        initializer=self.moving_mean_initializer, trainable=False,
        autocast=False, aggregation='none')
    self.moving_variance = self.add_weight(
        shape=shape, name='moving_variance',
        initializer=self.moving_variance_initializer, trainable=False,
        autocast=False, aggregation='none')
    self._reduction_axes = list(range(len(input_shape) - 1))

  def compute_output_shape(self, input_shape):
    return input_shape

  def _statistics(self, x32):
    """Returns (mean, variance) over this replica's BN group."""
    channels = x32.shape[-1]
    local = tf.concat([tf.reduce_mean(x32, self._reduction_axes),
                       tf.reduce_mean(tf.square(x32), self._reduction_axes)],
                      axis=0)
    if collectives.in_replica_context():
      _, num_replicas = collectives.replica_index()
      if num_replicas > 1:
        g = collectives.effective_group_size(self.group_size, num_replicas)
        local = collectives.grouped_sum(local, g) / g
    # One split, not two slices: 14 fewer ops per layer and replica in the
    # trace (forward and backward); the same values.
    mean, mean_sq = tf.split(local, [channels, channels])
    return mean, tf.maximum(mean_sq - tf.square(mean), 0.0)

  def _moving_targets(self, mean, var):
    """What the moving averages move towards: this replica's statistics."""
    return mean, var

  def _normalize(self, x, mean, var):
    x32 = tf.cast(x, tf.float32)
    inv = tf.math.rsqrt(var + self.epsilon)
    if self.gamma is not None:
      inv = inv * tf.cast(self.gamma, tf.float32)
    offset = -mean * inv
    if self.beta is not None:
      offset = offset + tf.cast(self.beta, tf.float32)
    return tf.cast(x32 * inv + offset, x.dtype)

  def call(self, inputs, training=None, mask=None):
    del mask
    if training and self.trainable:
      x32 = tf.cast(inputs, tf.float32)
      mean, var = self._statistics(x32)
      ema_mean, ema_var = self._moving_targets(mean, var)
      if self._warmup_step is None:
        decay = 1.0 - self.momentum
      else:
        decay = 1.0 - self.momentum_at(
            tf.convert_to_tensor(self._warmup_step()))
      mm = tf.convert_to_tensor(self.moving_mean)
      mv = tf.convert_to_tensor(self.moving_variance)
      self.moving_mean.assign(mm - (mm - tf.stop_gradient(ema_mean)) * decay)
      self.moving_variance.assign(
          mv - (mv - tf.stop_gradient(ema_var)) * decay)
      return self._normalize(inputs, mean, var)
    return self._normalize(inputs, tf.convert_to_tensor(self.moving_mean),
                           tf.convert_to_tensor(self.moving_variance))

  def get_config(self):
    config = super().get_config()
    config.update({
        'group_size': self.group_size,
        'axis': self.axis,
        'momentum': self.momentum,
        'epsilon': self.epsilon,
        'center': self.center,
        'scale': self.scale,
        'beta_initializer': keras.initializers.serialize(
            self.beta_initializer),
        'gamma_initializer': keras.initializers.serialize(
            self.gamma_initializer),
        'moving_mean_initializer': keras.initializers.serialize(
            self.moving_mean_initializer),
        'moving_variance_initializer': keras.initializers.serialize(
            self.moving_variance_initializer),
    })
    return config


def warm_up_batch_norm(model, step) -> int:
  """Calls `warm_up_momentum(step)` on every batch-norm layer of `model`;
  returns how many there are."""
  found = [layer for layer in model._flatten_layers()  # pylint: disable=protected-access
           if isinstance(layer, GroupSyncBatchNormalization)]
  for layer in found:
    layer.warm_up_momentum(step)
  return len(found)


# (spec, name) -> a normalization layer; see make_batch_norm.
BatchNormFactory = Callable[[BatchNormSpec, Optional[str]], keras.layers.Layer]


def make_batch_norm(spec: BatchNormSpec, name: Optional[str] = None
                    ) -> GroupSyncBatchNormalization:
  """The one factory for every normalization layer of the network.

  Args:
    spec: momentum, epsilon, group size and dtype policy.
    name: layer name.
  """
  return GroupSyncBatchNormalization(
      group_size=spec.group_size, momentum=spec.momentum,
      epsilon=spec.epsilon, name=name, dtype=spec.dtype)


def replica_uniform(shape, seed_generator: keras.random.SeedGenerator
                    ) -> tf.Tensor:
  """float32 U[0, 1) noise, drawn anew on every replica and every call.

  Keras' random layers (`keras.layers.Dropout`) seed from a SeedGenerator
  whose state is one variable: under a tf.distribute strategy every replica
  reads the same state and draws the same mask, so a global batch over R
  replicas holds R copies of one mask pattern. Folding the replica id into
  the seed gives each replica its own stream. The ops are stateless, so the
  same code holds on TPU, GPU and CPU; the state still advances once per
  call (a local assign: the variable's aggregation is 'none').
  """
  seed = tf.cast(seed_generator.next(), tf.int64)
  replica_id, num_replicas = collectives.replica_index()
  if num_replicas > 1:
    seed = tf.random.experimental.stateless_fold_in(seed, replica_id)
  return tf.random.stateless_uniform(shape, seed, dtype=tf.float32)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ReplicaDropout(keras.layers.Layer):
  """Inverted dropout with a different mask on every replica.

  Training: each unit is zeroed with probability `rate` and otherwise
  divided by `1 - rate`, so the expected value is unchanged. Inference:
  identity. Unlike `keras.layers.Dropout`, replicas never share a mask
  (see `replica_uniform`).
  """

  def __init__(self, rate: float, seed: Optional[int] = None, **kwargs):
    super().__init__(**kwargs)
    if not 0 <= rate < 1:
      raise ValueError(f'{type(self).__name__}: expected a drop rate in '
                       f'[0, 1), got {rate}')
    self.rate = float(rate)
    self.seed = seed
    self.seed_generator = keras.random.SeedGenerator(seed)

  def compute_output_shape(self, input_shape):
    return input_shape

  def noise_shape(self, inputs: tf.Tensor) -> tf.Tensor:
    """Shape of the keep mask, broadcast against `inputs`."""
    return tf.shape(inputs)

  def call(self, inputs, training=None):
    if not training or self.rate == 0:
      return inputs
    survival = 1.0 - self.rate
    noise = replica_uniform(self.noise_shape(inputs), self.seed_generator)
    keep = tf.floor(survival + noise)
    return inputs * tf.cast(keep / survival, inputs.dtype)

  def get_config(self):
    config = super().get_config()
    config.update(rate=self.rate, seed=self.seed)
    return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StochasticDepth(ReplicaDropout):
  """Drops the whole residual branch per example (drop-connect).

  `ReplicaDropout` with one keep decision per example: its input is zeroed
  with probability `drop_rate` and otherwise divided by the survival
  probability. Inference: identity.
  """

  def __init__(self, drop_rate: float, seed: Optional[int] = None,
               **kwargs):
    super().__init__(drop_rate, seed, **kwargs)

  @property
  def drop_rate(self) -> float:
    return self.rate

  def noise_shape(self, inputs: tf.Tensor) -> tf.Tensor:
    return tf.concat([tf.shape(inputs)[:1],
                      tf.ones([inputs.shape.rank - 1], tf.int32)], 0)

  def get_config(self):
    config = super().get_config()
    config['drop_rate'] = config.pop('rate')
    return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SqueezeExcite(keras.layers.Layer):
  """Squeeze-and-excitation: channel gates from the spatial mean.

  mean over H, W -> 1x1 conv (`se_filters`, swish) -> 1x1 conv (channels,
  sigmoid) -> scale the input. Both convolutions have biases.
  """

  def __init__(self, se_filters: int, **kwargs):
    super().__init__(**kwargs)
    self.se_filters = int(se_filters)

  def build(self, input_shape):
    channels = input_shape[-1]
    self.reduce = keras.layers.Conv2D(
        self.se_filters, 1, padding='same', activation='swish',
        kernel_initializer=conv_kernel_initializer(), dtype=self.dtype_policy,
        name='reduce')
    self.expand = keras.layers.Conv2D(
        channels, 1, padding='same', activation='sigmoid',
        kernel_initializer=conv_kernel_initializer(), dtype=self.dtype_policy,
        name='expand')
    pooled = (input_shape[0], 1, 1, channels)
    self.reduce.build(pooled)
    self.expand.build(pooled[:-1] + (self.se_filters,))

  def compute_output_shape(self, input_shape):
    return input_shape

  def call(self, inputs):
    # TF reduces bfloat16 means with a float32 accumulator.
    s = tf.reduce_mean(inputs, axis=[1, 2], keepdims=True)
    return inputs * self.expand(self.reduce(s))

  def get_config(self):
    config = super().get_config()
    config['se_filters'] = self.se_filters
    return config


def mbconv_block(x, *, filters_in: int, filters_out: int, kernel_size: int,
                 strides: int, expand_ratio: int, se_ratio: float,
                 drop_rate: float, name: str, dtype: str = 'float32',
                 batch_norm: BatchNormSpec = BatchNormSpec(),
                 id_skip: bool = True,
                 batch_norm_fn: BatchNormFactory = make_batch_norm):
  """Mobile inverted bottleneck (MBConv) on a functional-API tensor.

  expand 1x1 (if expand_ratio > 1) -> depthwise kxk (stride) -> SE
  (ratio of the block's input filters) -> project 1x1 -> stochastic depth
  + identity skip when shapes allow. `batch_norm_fn(batch_norm, name)`
  builds its normalization layers (see `model.efficientnet`); `dtype` is
  the other layers' dtype policy.
  """
  policy = dtype
  inputs = x
  filters = filters_in * expand_ratio

  def bn(suffix):
    return batch_norm_fn(batch_norm, name + suffix)

  if expand_ratio != 1:
    x = keras.layers.Conv2D(
        filters, 1, padding='same', use_bias=False,
        kernel_initializer=conv_kernel_initializer(), dtype=policy,
        name=name + 'expand_conv')(x)
    x = bn('expand_bn')(x)
    x = keras.layers.Activation('swish', dtype=policy,
                                name=name + 'expand_activation')(x)
  x = keras.layers.DepthwiseConv2D(
      kernel_size, strides=strides, padding='same', use_bias=False,
      depthwise_initializer=conv_kernel_initializer(), dtype=policy,
      name=name + 'dwconv')(x)
  x = bn('bn')(x)
  x = keras.layers.Activation('swish', dtype=policy,
                              name=name + 'activation')(x)
  if 0 < se_ratio <= 1:
    se_filters = max(1, int(filters_in * se_ratio))
    x = SqueezeExcite(se_filters, dtype=policy, name=name + 'se')(x)
  x = keras.layers.Conv2D(
      filters_out, 1, padding='same', use_bias=False,
      kernel_initializer=conv_kernel_initializer(), dtype=policy,
      name=name + 'project_conv')(x)
  x = bn('project_bn')(x)
  if id_skip and strides == 1 and filters_in == filters_out:
    if drop_rate > 0:
      x = StochasticDepth(drop_rate, dtype=policy, name=name + 'drop')(x)
    x = keras.layers.Add(dtype=policy, name=name + 'add')([x, inputs])
  return x
