"""The code paths of GPUs and TPUs, forced on logical CPU devices.

Reference for every forced run: the same config, initial weights and data on
the ordinary CPU-replica path (merge_call, ReductionToOneDevice), which the
rest of the suite checks against numpy and single-device runs.
"""

import json
import os
import platform
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.distribute import cross_device_ops as cross_device_ops_lib

from efficientnet_tpu import distribute
from efficientnet_tpu import experiment
from efficientnet_tpu import run_dir
from efficientnet_tpu import run_lock
from efficientnet_tpu.config import ConfigError
from tests.gpu_path import forced_gpu_path
from tests.helpers import cpu_replicas, free_ports, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _weights(trainer):
  return [v.numpy().copy() for v in trainer.model.variables]


def _train_and_eval(cfg, strategy, initial=None):
  trainer = experiment.build_trainer(cfg, strategy)
  if initial is not None:
    for v, w in zip(trainer.model.variables, initial):
      v.assign(w)
      if trainer.ema is not None:  # The averages start from the weights.
        trainer.ema.shadow_of(v).assign(w)
  start = _weights(trainer)
  metrics = trainer.train(evaluator=experiment.evaluator_for(trainer))
  return trainer, start, metrics


def _gpu_mirrored(n):
  """MirroredStrategy as on n GPUs: default (collective) cross-device ops.

  Each with collective keys of its own: strategies of one process start
  their group and instance keys at the same values, so a later one's
  all-reduce of another shape met an earlier one's state in TF's collective
  executor ("Shape mismatch in the collective instance 100") when this
  module's tests ran in another order. A process of the application builds
  one strategy.
  """
  # pylint: disable=protected-access
  tf.distribute.MirroredStrategy._collective_key_base += 10000
  return tf.distribute.MirroredStrategy([f'/cpu:{i}' for i in range(n)])


@pytest.fixture(scope='module')
def cpu_reference(tmp_path_factory):
  """The ordinary CPU-replica run of a (replicas, bfloat16) pair, once per
  module: (initial weights, final weights, metrics). Runs with and without
  --jit_compile share it (the reference never compiles)."""
  runs = {}

  def get(n, bf16, overrides):
    if (n, bf16) not in runs:
      cfg = small_config(tmp_path_factory.mktemp('ref'), num_replicas=n,
                         **overrides)
      ref, initial, metrics = _train_and_eval(cfg, cpu_replicas(n))
      runs[n, bf16] = (initial, _weights(ref), metrics)
    return runs[n, bf16]

  return get


@pytest.mark.parametrize('n,bf16,jit', [
    (1, False, 'auto'), (2, False, 'auto'), (1, True, 'auto'),
    (2, True, 'auto'),
    (1, False, 'true')])
def test_gpu_path_trains_evaluates_and_resumes_like_the_cpu_path(
    tmp_path, cpu_reference, n, bf16, jit):
  """Default GPU flags (jit auto) and --jit_compile=true (two
  replicas with XLA: the chief + worker test below; CPU XLA compiles
  slowly)."""
  # 32 px: at 16 px the last blocks normalize 1x1 maps, gradients reach
  # ~1e5 and a bfloat16 run can diverge within 4 steps (seen on TF 2.18),
  # which the trainer now stops on.
  overrides = dict(model=dict(use_bfloat16=bf16, image_size=32),
                   optimizer=dict(moving_average_decay=0.9),
                   train=dict(eval_batch_size=16))
  initial, ref_weights, ref_metrics = cpu_reference(n, bf16, overrides)

  overrides['train']['jit_compile'] = jit
  cfg = small_config(tmp_path / 'gpu', num_replicas=n, **overrides)
  with forced_gpu_path():
    strategy = _gpu_mirrored(n)
    trainer, _, metrics = _train_and_eval(cfg, strategy, initial)
    assert trainer.jit_compile == (jit == 'true')
    assert trainer.global_step == 4
    update = max(np.abs(a - b).max() for a, b in zip(ref_weights, initial))
    mismatch = max(np.abs(a - b).max()
                   for a, b in zip(_weights(trainer), ref_weights))
    assert update > 1e-2
    # float32 without XLA: the same arithmetic. XLA fuses and reorders;
    # bfloat16 rounds activations: small relative to the update.
    limit = 1e-6 if not (bf16 or jit) else 0.05
    assert mismatch <= limit * update, (mismatch, update)
    assert metrics['eval/num_examples'] == ref_metrics['eval/num_examples']
    if not (bf16 or jit):
      assert metrics['eval/top_1_accuracy'] == ref_metrics[
          'eval/top_1_accuracy']
      np.testing.assert_allclose(metrics['eval/loss'],
                                 ref_metrics['eval/loss'], rtol=1e-5)
    if jit or (bf16 and n > 1):  # Resume: the same code as float32 runs.
      return
    saved = _weights(trainer)
    # Checkpoint and resume on the same path.
    cfg = cfg.with_settings(train_steps=6)
    resumed = experiment.build_trainer(cfg, _gpu_mirrored(n))
    assert resumed.restore() == 4
    for got, want in zip(_weights(resumed), saved):
      np.testing.assert_array_equal(got, want)
    resumed.train()
    assert resumed.global_step == 6
  assert tf.train.latest_checkpoint(str(tmp_path / 'gpu')).endswith('ckpt-6')


def test_float16_and_group_bn_with_collective_ops_like_the_cpu_path(
    tmp_path):
  """float16's loss-scale tf.cond around the optimizer's all-reduce, and
  batch norm over both replicas, with MirroredStrategy's default
  cross-device ops on GPUs (collective all-reduce: NCCL there, RING on
  these CPUs) against the CPU path (ReductionToOneDevice)."""
  overrides = dict(model=dict(use_float16=True, bn_group_size=0,
                              image_size=32),
                   optimizer=dict(moving_average_decay=0.9),
                   train=dict(eval_batch_size=16))
  ref_cfg = small_config(tmp_path / 'ref', num_replicas=2, **overrides)
  ref, initial, ref_metrics = _train_and_eval(ref_cfg, cpu_replicas(2))
  cfg = small_config(tmp_path / 'gpu', num_replicas=2, **overrides)
  with forced_gpu_path():
    strategy = _gpu_mirrored(2)
    assert isinstance(strategy.extended._cross_device_ops,  # pylint: disable=protected-access
                      cross_device_ops_lib.CollectiveAllReduce)
    trainer, _, metrics = _train_and_eval(cfg, strategy, initial)
  assert trainer.bn_group_size == 2 and trainer.global_step == 4
  update = max(np.abs(a - b).max() for a, b in zip(_weights(ref), initial))
  mismatch = max(np.abs(a - b).max()
                 for a, b in zip(_weights(trainer), _weights(ref)))
  assert update > 1e-2
  assert mismatch <= 1e-6 * update, (mismatch, update)
  scale = lambda t: (float(t.state.loss_scale.scale.numpy()),
                     int(t.state.loss_scale.good_steps.numpy()))
  assert scale(trainer) == scale(ref)
  assert metrics['eval/num_examples'] == ref_metrics['eval/num_examples']
  assert metrics['eval/top_1_accuracy'] == ref_metrics['eval/top_1_accuracy']


def test_whole_step_under_xla_is_what_fails_on_the_gpu_path(tmp_path):
  """Why XLA covers only the forward/backward pass: the previous policy
  (the whole replica step in a jit function) fails on the all-GPU path."""
  cfg = small_config(tmp_path, num_replicas=1)
  with forced_gpu_path():
    trainer = experiment.build_trainer(cfg, _gpu_mirrored(1))
    step = tf.function(trainer.replica_step, jit_compile=True)

    @tf.function
    def loop(iterator):
      trainer.strategy.run(step, args=(next(iterator),))

    with pytest.raises(RuntimeError, match='merge_call'):
      loop(iter(trainer.distribute_input(is_training=True)))


def test_jit_compile_policy_per_strategy():
  with forced_gpu_path():
    gpu = _gpu_mirrored(2)
    assert not distribute.resolve_jit_compile(gpu, 'auto')  # auto: off
    assert distribute.resolve_jit_compile(gpu, 'true')
  cpu2 = cpu_replicas(2)
  assert not distribute.resolve_jit_compile(cpu2, 'auto')
  with pytest.raises(ConfigError, match='^jit_compile: .*2 CPU replicas.*'
                     'use `jit_compile=auto`'):
    distribute.resolve_jit_compile(cpu2, 'true')
  assert distribute.resolve_jit_compile(cpu_replicas(1), 'true')
  with mock.patch.object(distribute, 'is_tpu', lambda s=None: True):
    # TPUStrategy compiles the whole loop: nothing is compiled twice.
    assert not distribute.resolve_jit_compile(cpu2, 'auto')
    assert not distribute.resolve_jit_compile(cpu2, 'true')
    with pytest.raises(ConfigError, match='^jit_compile: TPUs always'):
      distribute.resolve_jit_compile(cpu2, 'false')


def test_is_tpu_checks_the_strategy_not_the_devices():
  assert not distribute.is_tpu()  # The default strategy.
  strategy = cpu_replicas(2)
  assert not distribute.is_tpu(strategy)
  with strategy.scope():
    assert not distribute.is_tpu()
  # The strategy type decides (a TPUStrategy cannot be built on CPU).
  tpu = object.__new__(tf.distribute.TPUStrategy)
  assert distribute.is_tpu(tpu)


def test_cli_refuses_xla_on_cpu_replicas_with_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'efficientnet_tpu.main',
       '--preset=cpu_smoke',
       f'--model_dir={tmp_path}', '--jit_compile=true'],
      env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2'),
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and '--jit_compile' in lines[0], out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  assert not list(tmp_path.glob('ckpt-*'))


# ---- writer election ---------------------------------------------------------

_LAYOUTS = {
    'workers': {'worker': ['h:1', 'h:2', 'h:3']},
    'chief+workers': {'chief': ['h:0'], 'worker': ['h:1', 'h:2']},
    'chief+workers+evaluator': {'chief': ['h:0'], 'worker': ['h:1', 'h:2'],
                                'evaluator': ['h:9']},
    'workers+evaluator': {'worker': ['h:1', 'h:2'], 'evaluator': ['h:9']},
}


@pytest.mark.parametrize('layout', sorted(_LAYOUTS))
def test_exactly_one_writer_per_role_by_tfs_chief_rule(layout):
  from tensorflow.python.distribute import multi_worker_util  # pylint: disable=g-import-not-at-top
  cluster = _LAYOUTS[layout]
  tasks = [(t, i) for t in cluster for i in range(len(cluster[t]))]
  roles = {task: distribute.writer_roles(
      {'cluster': cluster, 'task': {'type': task[0], 'index': task[1]}})
           for task in tasks}
  for role in (distribute.TRAIN_WRITER, distribute.EVAL_WRITER):
    assert sum(role in r for r in roles.values()) == 1, (role, roles)
  # The train writer is TF's chief among the training tasks.
  (writer,) = [t for t, r in roles.items() if distribute.TRAIN_WRITER in r]
  assert multi_worker_util.is_chief(cluster, *writer)
  assert writer[0] != 'evaluator'
  if 'evaluator' in cluster:
    assert roles[('evaluator', 0)] == {distribute.EVAL_WRITER}
  # Without TF_CONFIG: one process, both roles.
  assert distribute.writer_roles(None) == {distribute.TRAIN_WRITER,
                                           distribute.EVAL_WRITER}


def test_bad_tf_config_is_a_one_line_error(monkeypatch):
  monkeypatch.setenv('TF_CONFIG', json.dumps(
      {'cluster': {'chief': ['a:1', 'b:2'], 'worker': ['c:3']},
       'task': {'type': 'chief', 'index': 0}}))
  with pytest.raises(ConfigError, match='^TF_CONFIG: '):
    distribute.read_tf_config()


@pytest.mark.slow
@pytest.mark.parametrize('flags', [
    ['--jit_compile=true'],
    # float16's loss-scale cond and batch norm over both tasks, with the
    # collective ops between the processes.
    ['--use_float16', '--bn_group_size=0']], ids=['xla', 'float16_bn'])
def test_chief_and_worker_on_localhost_only_the_chief_writes(tmp_path, flags):
  """Vertex AI's layout: a chief task plus workers, MultiWorkerMirrored
  on the GPU path (forced); XLA on the forward/backward pass, or float16
  with batch norm over the cluster."""
  chief, worker = [f'127.0.0.1:{p}' for p in free_ports(2)]
  cluster = {'chief': [chief], 'worker': [worker]}
  model_dir = tmp_path / 'run'
  procs = []
  for task_type in ('chief', 'worker'):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2',
               TF_CONFIG=json.dumps({'cluster': cluster, 'task': {
                   'type': task_type, 'index': 0}}))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'tests', 'gpu_path.py'),
         '--strategy=multi_worker', f'--model_dir={model_dir}',
         '--shared_filesystem',  # Both processes on this machine.
         '--width_coefficient=0.1', '--depth_coefficient=0.1',
         '--image_size=16', '--num_label_classes=5', '--dropout_rate=0',
         '--stochastic_depth_rate=0', '--train_batch_size=16',
         '--eval_batch_size=16', '--train_steps=4', '--iterations_per_loop=2',
         '--mode=train_and_eval', '--num_train_images=256',
         '--num_eval_images=37', '--optimizer=momentum',
         '--lr_scaling=none', '--base_learning_rate=0.1',
         '--lr_schedule=constant', '--lr_warmup_epochs=0',
         '--moving_average_decay=0.9', *flags,
         f'--export_dir={tmp_path / "export"}'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]
      outs.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      p.kill()
  # Identical training and eval on both; wall-clock figures differ.
  timing = ('_per_second', '_per_replica', '_ms', '_s')
  for key in outs[0]:
    if not key.endswith(timing):
      assert outs[0][key] == outs[1][key], key
  assert outs[0]['eval/num_examples'] == 37
  names = sorted(os.listdir(model_dir))
  assert 'ckpt-4.index' in names and 'config.json' in names
  # No scratch dirs; the training lock file stays (empty once released).
  assert not [n for n in names if n.startswith('.')
              and n != run_lock.LOCK_FILENAME], names
  # One eval line per evaluation (steps 4: the end), written once.
  lines = (model_dir / run_dir.RESULTS_FILENAME).read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [4]
  assert (tmp_path / 'export' / 'saved_model.pb').exists()


@pytest.mark.slow
def test_accelerator_check_quick_mode_runs_every_check(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.accelerator_check', '--quick',
       f'--results_dir={tmp_path}'],
      env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2'),
      capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  # The stack it ran on heads the output, as this interpreter reports it.
  first = out.stdout.splitlines()[0]
  assert first.startswith(f'Stack: Python {platform.python_version()}, '
                          f'TensorFlow {tf.__version__}'), first
  assert first.endswith(f', Keras {keras.__version__}'), first
  result = json.loads((tmp_path / 'accelerator_check_quick.json').read_text())
  assert len(result['rows']) == 2
  for row in result['rows']:
    assert row['status'] == 'ok' and row['resume'] == 'ok', row
    assert row['eval_images'] == 3 * row['global_batch'] + 5
    assert row['xla'] == ('--jit_compile=true' in row['variant'])
  assert result['keras_race']['speed_ratio_median'] > 0


@pytest.mark.slow
def test_evaluator_task_evaluates_checkpoints_and_writes_only_eval(tmp_path):
  """A side-car evaluator (TF_CONFIG task type 'evaluator') evaluates the
  training cluster's checkpoints and writes eval results, nothing else."""
  model_dir = tmp_path / 'run'
  common = ['--preset=cpu_smoke',
            f'--model_dir={model_dir}', '--num_cpu_replicas=1',
            '--bn_group_size=1', '--train_steps=4', '--iterations_per_loop=2',
            '--width_coefficient=0.1', '--depth_coefficient=0.1',
            '--image_size=16', '--num_eval_images=20', '--lr_warmup_epochs=0',
            '--eval_batch_size=10']
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2')
  train = subprocess.run(
      [sys.executable, '-m', 'efficientnet_tpu.main', *common,
       '--mode=train'], env=env, capture_output=True, text=True, timeout=300)
  assert train.returncode == 0, train.stderr[-2000:]
  assert not (model_dir / run_dir.RESULTS_FILENAME).exists()
  before = {p.name: p.stat().st_mtime for p in model_dir.iterdir()}
  (worker,) = [f'127.0.0.1:{p}' for p in free_ports(1)]
  env['TF_CONFIG'] = json.dumps({
      'cluster': {'worker': [worker], 'evaluator': ['127.0.0.1:1']},
      'task': {'type': 'evaluator', 'index': 0}})
  ev = subprocess.run(
      [sys.executable, '-m', 'efficientnet_tpu.main', *common,
       '--mode=train_and_eval', '--strategy=multi_worker',
       '--shared_filesystem'], env=env, capture_output=True,
      text=True, timeout=300)
  assert ev.returncode == 0, ev.stderr[-2000:]
  assert 'Evaluator task' in ev.stderr
  lines = (model_dir / run_dir.RESULTS_FILENAME).read_text().splitlines()
  assert [json.loads(l)['num_examples'] for l in lines] == [20]
  assert json.loads(lines[0])['step'] == 4
  # Training files untouched: no new checkpoint, config or train summary.
  for name, mtime in before.items():
    assert (model_dir / name).stat().st_mtime == mtime, name
  assert not (model_dir / 'ckpt-6.index').exists()
  assert not [p for p in os.listdir(model_dir)
              if p.startswith('.') and p != run_lock.LOCK_FILENAME]
