"""Builds the tf.distribute strategy for TPU, GPU, multi-worker and CPU runs.

The CPU mode splits the one physical CPU into N logical devices and runs a
`MirroredStrategy` over them, so the pod code path (replica groups, one input
pipeline per host, sharded evaluation) runs and is tested on a laptop.
"""

from __future__ import annotations

import json
import os

from absl import logging
import tensorflow as tf

from efficientnet_tpu.config import ConfigError, DistributeConfig


def configure_cpu_devices(num_devices: int) -> list:
  """Splits the host CPU into `num_devices` logical devices.

  Must run before TensorFlow initializes its devices. If they are already
  initialized (another strategy in the same process, or a test harness that
  split the CPU first), the existing logical devices are reused when there
  are enough of them.

  Returns:
    The names of the first `num_devices` logical CPU devices.
  """
  cpu = tf.config.list_physical_devices('CPU')[0]
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError:
    pass  # Already initialized: use what is there.
  logical = tf.config.list_logical_devices('CPU')
  if len(logical) < num_devices:
    raise ConfigError(
        f'--num_cpu_replicas: expected at most {len(logical)} (TensorFlow '
        f'was initialized with {len(logical)} logical CPUs before the '
        f'strategy was built), got {num_devices}')
  return [d.name for d in logical[:num_devices]]


def _tpu_strategy(cfg: DistributeConfig) -> tf.distribute.Strategy:
  tpu = '' if cfg.tpu == 'local' else cfg.tpu
  try:
    if cfg.tpu == 'local':
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu='local')
    else:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
          tpu=tpu, zone=cfg.tpu_zone, project=cfg.gcp_project)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except Exception as e:  # pylint: disable=broad-except
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    hint = ('on a TPU VM use --tpu=local with a TPU-enabled TensorFlow'
            if cfg.tpu == 'local' else
            'check --tpu/--tpu_zone/--gcp_project, and install the '
            "'tpu_node' extra (cloud-tpu-client) for legacy TPU Nodes")
    raise ConfigError(f'--tpu: could not reach TPU {cfg.tpu!r} '
                      f'({type(e).__name__}: {first_line}); {hint}') from None
  return tf.distribute.TPUStrategy(resolver)


def _gpu_strategy(cfg: DistributeConfig) -> tf.distribute.Strategy:
  gpus = tf.config.list_logical_devices('GPU')
  if not gpus:
    raise ConfigError('--strategy=gpu: expected at least one visible GPU, '
                      'found none (use --strategy=cpu)')
  if cfg.num_gpus:
    if cfg.num_gpus > len(gpus):
      raise ConfigError(f'--num_gpus: expected at most {len(gpus)} (visible '
                        f'GPUs), got {cfg.num_gpus}')
    gpus = gpus[:cfg.num_gpus]
  return tf.distribute.MirroredStrategy([g.name for g in gpus])


def _multi_worker_strategy(cfg: DistributeConfig) -> tf.distribute.Strategy:
  del cfg
  raw = os.environ.get('TF_CONFIG')
  if not raw:
    raise ConfigError('--strategy=multi_worker: expected the TF_CONFIG '
                      'environment variable (cluster and task), found none')
  try:
    tf_config = json.loads(raw)
    tf_config['cluster']['worker']  # pylint: disable=pointless-statement
    tf_config['task']['index']  # pylint: disable=pointless-statement
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError('TF_CONFIG: expected JSON with cluster.worker and '
                      f'task.index, got {raw!r} ({e})') from None
  return tf.distribute.MultiWorkerMirroredStrategy()


def build_strategy(cfg: DistributeConfig) -> tf.distribute.Strategy:
  """Returns the strategy `cfg` asks for, failing with a one-line error."""
  if cfg.strategy == 'tpu':
    strategy = _tpu_strategy(cfg)
  elif cfg.strategy == 'gpu':
    strategy = _gpu_strategy(cfg)
  elif cfg.strategy == 'multi_worker':
    strategy = _multi_worker_strategy(cfg)
  else:
    devices = configure_cpu_devices(cfg.num_cpu_replicas)
    strategy = tf.distribute.MirroredStrategy(
        devices,
        # Plain reductions: NCCL is GPU-only and the CPU has one host.
        cross_device_ops=tf.distribute.ReductionToOneDevice())
  logging.info('Strategy %s: %d replicas, %d input pipelines',
               type(strategy).__name__, strategy.num_replicas_in_sync,
               num_input_pipelines(strategy))
  return strategy


def is_tpu_strategy(strategy: tf.distribute.Strategy) -> bool:
  return isinstance(strategy, (tf.distribute.TPUStrategy,
                               tf.distribute.experimental.TPUStrategy))


def num_input_pipelines(strategy: tf.distribute.Strategy) -> int:
  """Number of hosts, each of which runs one input pipeline."""
  if is_tpu_strategy(strategy):
    return strategy.extended.num_hosts
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is not None and isinstance(
      strategy, tf.distribute.MultiWorkerMirroredStrategy):
    spec = resolver.cluster_spec().as_dict()
    return max(1, len(spec.get('worker', [])) + len(spec.get('chief', [])))
  return 1


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the one worker that writes summaries, configs and exports."""
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    resolver = strategy.cluster_resolver
    return resolver.task_type in (None, 'chief') or (
        resolver.task_type == 'worker' and resolver.task_id == 0)
  return True


def default_jit_compile(strategy: tf.distribute.Strategy) -> bool:
  """XLA on TPU and GPU; off on CPU, where it is ~8x slower."""
  if is_tpu_strategy(strategy):
    return True
  devices = strategy.extended.worker_devices
  return any('GPU' in d.upper() for d in devices)
