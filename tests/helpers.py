"""Shared test helpers: CPU-replica strategies and tiny experiment configs."""

import socket

import numpy as np
import tensorflow as tf

from efficientnet_tpu import config as config_lib
from efficientnet_tpu import distribute


def cpu_replicas(n):
  """A MirroredStrategy over the first n of conftest's logical CPUs."""
  return tf.distribute.MirroredStrategy(
      [f'/cpu:{i}' for i in range(n)],
      cross_device_ops=tf.distribute.ReductionToOneDevice())


def per_replica(strategy, arrays):
  """A distributed value holding arrays[i] on replica i."""
  return strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(arrays[ctx.replica_id_in_sync_group]))


def local_values(strategy, value):
  """The per-replica components of a distributed value, as numpy arrays."""
  return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def tiny_config(model_dir, num_replicas=1, **overrides):
  """A scaled-down EfficientNet-B0 on synthetic data; cheap to trace."""
  sections = {k: dict(overrides.pop(k, {})) for k in
              ('model', 'data', 'optimizer', 'train')}
  assert not overrides, overrides
  model = dict(width_coefficient=0.1, depth_coefficient=0.1, image_size=16,
               num_classes=5, dropout_rate=0.0, stochastic_depth_rate=0.0,
               bn_momentum=0.9)
  data = dict(num_train_images=512, num_eval_images=75)
  optimizer = dict(optimizer='momentum', base_learning_rate=0.1,
                   lr_scaling='none', lr_schedule='constant',
                   lr_warmup_epochs=0.0, moving_average_decay=0.0,
                   label_smoothing=0.0)
  train = dict(model_dir=str(model_dir), train_batch_size=32,
               eval_batch_size=16, train_steps=4, iterations_per_loop=2)
  for base, section in ((model, 'model'), (data, 'data'),
                        (optimizer, 'optimizer'), (train, 'train')):
    base.update(sections[section])
  return config_lib.ExperimentConfig(
      model=config_lib.ModelConfig(**model),
      data=config_lib.DataConfig(**data),
      optimizer=config_lib.OptimizerConfig(**optimizer),
      distribute=config_lib.DistributeConfig(num_cpu_replicas=num_replicas),
      train=config_lib.TrainConfig(**train))


def free_ports(n):
  """n free TCP ports on 127.0.0.1 (for multi-process runs on localhost)."""
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def strategy_for(cfg):
  return distribute.build_strategy(cfg.distribute)
