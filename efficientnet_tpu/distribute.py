"""Builds the tf.distribute strategy for TPU, GPU, multi-worker and CPU runs.

The CPU mode splits the one physical CPU into N logical devices and runs a
`MirroredStrategy` over them, so the pod code path (replica groups, one input
pipeline per host, sharded evaluation) runs and is tested on a laptop.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import FrozenSet, List, Optional, Tuple

from absl import logging
import tensorflow as tf
from tensorflow.python.distribute import multi_worker_util

from efficientnet_tpu.config import ConfigError, DistributeConfig
from efficientnet_tpu.config import ExperimentConfig


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
        'num_cpu_replicas', f'expected at most {len(logical)} (TensorFlow '
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
    hint = ('on a TPU VM use `tpu=local` with a TPU-enabled TensorFlow'
            if cfg.tpu == 'local' else
            'check `tpu`/`tpu_zone`/`gcp_project`, and install the '
            "'tpu_node' extra (cloud-tpu-client) for legacy TPU Nodes")
    raise ConfigError('tpu', f'could not reach TPU {cfg.tpu!r} '
                      f'({type(e).__name__}: {first_line}); {hint}') from None
  return tf.distribute.TPUStrategy(resolver)


def _gpu_strategy(cfg: DistributeConfig) -> tf.distribute.Strategy:
  gpus = tf.config.list_logical_devices('GPU')
  if not gpus:
    raise ConfigError('strategy', 'expected at least one visible GPU, '
                      'found none (use `strategy=cpu`)')
  if cfg.num_gpus:
    if cfg.num_gpus > len(gpus):
      raise ConfigError('num_gpus', f'expected at most {len(gpus)} (visible '
                        f'GPUs), got {cfg.num_gpus}')
    gpus = gpus[:cfg.num_gpus]
  return tf.distribute.MirroredStrategy([g.name for g in gpus])


# What a process writes into model_dir (see writer_roles).
TRAIN_WRITER = 'train'
EVAL_WRITER = 'eval'


def read_tf_config() -> Optional[dict]:
  """TF_CONFIG as a dict (None if unset), failing with a one-line error."""
  raw = os.environ.get('TF_CONFIG')
  if not raw:
    return None
  try:
    tf_config = json.loads(raw)
    cluster, task = tf_config['cluster'], tf_config['task']
    if not (cluster.get('worker') or cluster.get('chief')):
      raise KeyError('cluster.worker or cluster.chief')
    multi_worker_util._validate_cluster_spec(  # pylint: disable=protected-access
        cluster, task['type'], int(task['index']))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConfigError('TF_CONFIG', 'expected JSON with cluster.worker (and '
                      'optionally chief / evaluator) and task.type / '
                      f'task.index, got {raw!r} ({e})') from None
  return tf_config


def task_of(tf_config: Optional[dict]) -> Tuple[Optional[str], int]:
  """(task type, task index) of this process; (None, 0) without TF_CONFIG."""
  if not tf_config:
    return None, 0
  return tf_config['task']['type'], int(tf_config['task']['index'])


def writer_roles(tf_config: Optional[dict]) -> FrozenSet[str]:
  """What this process writes into model_dir, by TF's chief rule.

  TRAIN_WRITER: checkpoints, config.json, train summaries, the export after
  training. EVAL_WRITER: eval summaries, eval_results.jsonl, best/. Exactly
  one process of a cluster holds each role:
  * no TF_CONFIG, or a cluster of workers only: worker 0 holds both;
  * chief + workers: the chief holds both (`multi_worker_util.is_chief`);
  * ... + evaluator: the chief trains and writes, the evaluator (a side-car
    that evaluates each new checkpoint) holds EVAL_WRITER, and the training
    cluster does not evaluate.
  """
  if not tf_config:
    return frozenset((TRAIN_WRITER, EVAL_WRITER))
  cluster = tf_config['cluster']
  task_type, task_id = task_of(tf_config)
  if task_type == 'evaluator':
    return frozenset((EVAL_WRITER,))
  if not multi_worker_util.is_chief(cluster, task_type, task_id):
    return frozenset()
  if cluster.get('evaluator'):
    return frozenset((TRAIN_WRITER,))
  return frozenset((TRAIN_WRITER, EVAL_WRITER))


@dataclasses.dataclass(frozen=True)
class ClusterRole:
  """This process's place in the cluster (see `writer_roles`)."""
  task: Tuple[Optional[str], int] = (None, 0)
  writer_roles: FrozenSet[str] = frozenset((TRAIN_WRITER, EVAL_WRITER))
  # An evaluator task evaluates; the training tasks then do not.
  has_evaluator_task: bool = False

  @property
  def is_train_writer(self) -> bool:
    return TRAIN_WRITER in self.writer_roles

  @property
  def is_eval_writer(self) -> bool:
    return EVAL_WRITER in self.writer_roles


def cluster_role(cfg: DistributeConfig) -> ClusterRole:
  """This process's role, from TF_CONFIG for multi-worker runs."""
  tf_config = read_tf_config() if cfg.strategy == 'multi_worker' else None
  return ClusterRole(
      task=task_of(tf_config), writer_roles=writer_roles(tf_config),
      has_evaluator_task=bool(tf_config and
                              tf_config['cluster'].get('evaluator')))


def _local_strategy() -> tf.distribute.Strategy:
  """All local GPUs, else the CPU: for a side-car evaluator task."""
  gpus = tf.config.list_logical_devices('GPU')
  return tf.distribute.MirroredStrategy(
      [d.name for d in gpus] or [tf.config.list_logical_devices('CPU')[0].name])


def _multi_worker_strategy(cfg: DistributeConfig) -> tf.distribute.Strategy:
  del cfg
  tf_config = read_tf_config()
  if tf_config is None:
    raise ConfigError('strategy', 'expected the TF_CONFIG '
                      'environment variable (cluster and task), found none')
  if task_of(tf_config)[0] == 'evaluator':
    # The evaluator is no part of the training cluster (TF's rule): it
    # evaluates checkpoints on its own devices.
    return _local_strategy()
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


def _is_gpu_device(device: str) -> bool:
  return tf.DeviceSpec.from_string(device).device_type == 'GPU'


def on_host_cpus(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process's replicas are several logical CPU devices."""
  if strategy.num_replicas_in_sync < 2:  # (The default strategy has no
    return False                         # worker_devices.)
  devices = strategy.extended.worker_devices
  # `_is_gpu_device` too: the tests that force TF's all-GPU path on CPU
  # devices (tests/gpu_path.py) then get the GPUs' per-device updates.
  return len(devices) > 1 and all(
      tf.DeviceSpec.from_string(d).device_type == 'CPU' and
      not _is_gpu_device(d) for d in devices)


def host_cpu_copies(strategy: tf.distribute.Strategy, variable):
  """The per-device copies of `variable` (a mirrored Keras or tf variable)
  when `on_host_cpus(strategy)`, else None. Call in cross-replica context
  (in replica context there is only the replica's own copy).

  Logical CPU replicas (`--strategy=cpu`) share one host's memory: a copy
  from one device to another costs nothing, so state that is the same on
  every device (the trainable weights, their optimizer slots and averages)
  is computed on the first device and copied to the others
  (`optimizers.first_device_copy`, `ema.ExponentialMovingAverage.update`):
  the same bits, and 1/R of the ops to trace and run.
  """
  if not on_host_cpus(strategy):
    return None
  if not isinstance(variable, tf.Variable):  # Keras: the tf.Variable inside
    variable = variable.value
  return strategy.experimental_local_results(variable)


def read_on_its_device(copy) -> tf.Tensor:
  """The value of one device's copy of a variable (a `host_cpu_copies`
  element), read on that device: assigned to another device's copy, the
  value then moves, not a read placed by the assign."""
  with tf.device(copy.device):
    return tf.convert_to_tensor(copy)


def is_tpu(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
  """Whether `strategy` is a TPU strategy (the one TPU test of the package).

  True exactly when `strategy` is an instance of `tf.distribute.TPUStrategy`
  or `tf.distribute.experimental.TPUStrategy`; the visible devices are not
  consulted. Without an argument it checks the strategy in scope,
  `tf.distribute.get_strategy()`: the one whose `run` is executing inside a
  replica context (e.g. the collectives of a replica step), the default
  (non-TPU) strategy outside any scope.
  """
  if strategy is None:
    strategy = tf.distribute.get_strategy()
  return isinstance(strategy, (tf.distribute.TPUStrategy,
                               tf.distribute.experimental.TPUStrategy))


def num_input_pipelines(strategy: tf.distribute.Strategy) -> int:
  """Number of hosts, each of which runs one input pipeline."""
  if is_tpu(strategy):
    return strategy.extended.num_hosts
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is not None and isinstance(
      strategy, tf.distribute.MultiWorkerMirroredStrategy):
    spec = resolver.cluster_spec().as_dict()
    return max(1, len(spec.get('worker', [])) + len(spec.get('chief', [])))
  return 1


def runs_in_several_processes(strategy: tf.distribute.Strategy) -> bool:
  """Whether several processes each run the training loop: the workers of a
  MultiWorkerMirroredStrategy cluster (a TPU pod has one client)."""
  return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
          and num_input_pipelines(strategy) > 1)


def trace_once_devices(strategy: tf.distribute.Strategy) -> Tuple[str, ...]:
  """The devices of a MirroredStrategy over several CPU devices (the logical
  CPU replicas), whose replica step can be traced once for all replicas
  (`step.TracedOnceForwardBackward`); () for any other strategy.

  GPUs keep MirroredStrategy's per-replica trace: the traced-once step's
  collectives are untested on them.
  """
  if type(strategy) is not tf.distribute.MirroredStrategy:  # pylint: disable=unidiomatic-typecheck
    return ()
  devices = tuple(strategy.extended.worker_devices)
  if len(devices) < 2 or any(
      tf.DeviceSpec.from_string(d).device_type != 'CPU' for d in devices):
    return ()
  return devices


def resolve_jit_compile(strategy: tf.distribute.Strategy,
                        requested: str) -> bool:
  """Whether the forward and backward pass run in an XLA-compiled function.

  * TPU: TPUStrategy compiles the whole replicated loop with XLA; nothing is
    wrapped again (returns False). --jit_compile=false cannot be honoured.
  * GPU (MirroredStrategy, MultiWorkerMirroredStrategy): off by default.
    Compiling the whole replica step, as `strategy.run(tf.function(...,
    jit_compile=True))`, puts MirroredStrategy into its all-GPU no-merge_call
    mode, where the optimizer's `iterations` update (ONLY_FIRST_REPLICA, a
    merge_call) fails at the first step. --jit_compile=true compiles only
    the forward and backward pass; apply_gradients, EMA and metric updates
    run outside it.
  * CPU: off (XLA is ~8x slower on CPU); on only with one replica, since the
    logical CPU replicas of one host cannot run compiled functions that
    touch another replica's variables or collectives.

  Raises:
    ConfigError: the request cannot work on this strategy's devices.
  """
  if requested not in ('auto', 'true', 'false'):
    raise ValueError(f"jit_compile: expected 'auto', 'true' or 'false', got "
                     f'{requested!r}')
  if is_tpu(strategy):
    if requested == 'false':
      raise ConfigError('jit_compile', 'TPUs always compile the training '
                        'step with XLA; use `jit_compile=auto`')
    return False
  if requested != 'true':
    return False
  if all(_is_gpu_device(d) for d in strategy.extended.worker_devices):
    return True
  if strategy.num_replicas_in_sync > 1:
    raise ConfigError('jit_compile', f'XLA cannot compile the step of '
        f'{strategy.num_replicas_in_sync} CPU replicas (their variables and '
        'collectives span logical CPU devices that one XLA CPU program '
        'cannot address); use `jit_compile=auto` (XLA is ~8x slower on '
        'CPU anyway)')
  return True


# ---------------------------------------------------------------------------
# Paths every host can reach.
# ---------------------------------------------------------------------------


def is_remote_path(path: str) -> bool:
  """Whether `path` names a filesystem scheme (gs://, s3://, hdfs://...)
  rather than this machine's disk."""
  return '://' in path


def cluster_processes(cfg: DistributeConfig) -> int:
  """Processes of a multi-worker cluster, from TF_CONFIG before any
  strategy exists (chief, workers and a side-car evaluator all read or
  write model_dir); 1 otherwise."""
  if cfg.strategy != 'multi_worker':
    return 1
  tf_config = read_tf_config()
  if not tf_config:
    return 1
  cluster = tf_config['cluster']
  return sum(len(cluster.get(t) or ())
             for t in ('chief', 'worker', 'evaluator'))


def check_shared_paths(cfg: ExperimentConfig,
                       strategy: Optional[tf.distribute.Strategy] = None
                       ) -> None:
  """Refuses local paths that several hosts would read or write.

  On a multi-host TPU slice each host's input pipeline reads `data_dir`
  inside that host's TPU server, and ops placed on a worker (summaries,
  the export's variable save) use that worker's disk; in a multi-worker
  cluster every process reads model_dir (the checkpoints it resumes from).
  A local path there is read or written on the wrong machine, or not at
  all. `shared_filesystem` declares local paths shared (NFS, Filestore,
  or every process on one machine).

  Args:
    cfg: the run's paths and `shared_filesystem`.
    strategy: the built strategy (a TPU slice's host count is known only
      then); None: the TF_CONFIG cluster's processes (before the
      strategy).

  Raises:
    ConfigError: one line naming the first local path and what to do.
  """
  if cfg.distribute.shared_filesystem:
    return
  if strategy is not None and is_tpu(strategy):
    hosts = num_input_pipelines(strategy)
    where = f'this TPU slice has {hosts} hosts'
  else:
    hosts = cluster_processes(cfg.distribute)
    where = f"TF_CONFIG's cluster has {hosts} processes"
  if hosts <= 1:
    return
  paths = [('model_dir', cfg.train.model_dir),
           ('export_dir', cfg.train.export_dir)]
  if cfg.data.source != 'synthetic':
    paths.append(('data_dir', cfg.data.data_dir))
  for name, path in paths:
    if path and not is_remote_path(path):
      raise ConfigError(
          name, f'{path!r} is a local path, but {where}, each reading and '
          "writing its own disk; use a gs:// path (or another remote "
          'scheme), or set `shared_filesystem` if every host mounts it '
          '(NFS, Filestore)')


def check_same_start(strategy: tf.distribute.Strategy, step: int,
                     model_dir: str) -> None:
  """Fails on every worker alike unless all resume from the same step of
  the same model_dir (MultiWorkerMirroredStrategy).

  Each worker restores from its own view of `model_dir`: per-machine
  directories (or different --model_dir values) resume at different steps,
  and the workers would then diverge, or hang in a collective one of them
  never joins. One all-gather of (step, fingerprint of the model_dir
  value) per replica gives every worker the same table, hence the same
  decision.

  Raises:
    ConfigError: one line naming model_dir and the steps found.
  """
  fingerprint = int(tf.strings.to_hash_bucket_fast(model_dir, 2**62))
  mine = tf.constant([[step, fingerprint]], tf.int64)

  @tf.function
  def gather():
    return strategy.run(lambda: tf.distribute.get_replica_context(
        ).all_gather(tf.identity(mine), axis=0))

  table = strategy.experimental_local_results(gather())[0].numpy()
  steps: List[int] = sorted({int(s) for s in table[:, 0]})
  same_dir = len({int(f) for f in table[:, 1]}) == 1
  if len(steps) == 1 and same_dir:
    return
  found = ('; the workers were given different model_dir values'
           if not same_dir else '')
  raise ConfigError(
      'model_dir', f'the workers would resume from different steps '
      f'({", ".join(map(str, steps))}; this worker: {step} in '
      f'{model_dir}){found}: every worker must see the same model_dir '
      '(a gs:// path, or one every host mounts, with `shared_filesystem`)')
