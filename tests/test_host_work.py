"""What the host does per loop: how many calls, and what its clock says.

On a pod every eager op on a replicated variable is a remote call per
core, so the host's work per training loop and eval pass must not grow with
the replicas: counted here with TensorFlow's op callbacks (every op the host
executes eagerly, a tf.function call counting as one) at 2 and 8 replicas.
And the first loop's compile happens at its first step (TPUStrategy compiles
lazily): with a fake clock whose compile lands there, the throughput and ETA
must be those of the compiled steps.
"""

import collections
import re
import time

import keras
import pytest
from tensorflow.python.framework import op_callbacks

from efficientnet_tpu import experiment
from efficientnet_tpu import layers
from efficientnet_tpu import model as model_lib
from efficientnet_tpu import replicated
from efficientnet_tpu import train as train_lib
from tests.helpers import cpu_replicas, small_config


def _tiny_model(config, bn_group_size=1, **unused):
  """Conv, the project's batch norm, pooling, classifier: the host loop
  does the same per variable whatever the model, and this one traces in
  a fraction of the time on 8 replicas."""
  inputs = keras.Input((config.image_size, config.image_size, 3))
  x = keras.layers.Conv2D(4, 3, strides=2, use_bias=False)(inputs)
  x = layers.make_batch_norm(layers.BatchNormSpec(
      momentum=config.batch_norm_momentum, group_size=bn_group_size), 'bn')(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs,
                     keras.layers.Dense(config.num_label_classes)(x))


@pytest.fixture
def tiny_model(monkeypatch):
  monkeypatch.setattr(model_lib, 'build_model', _tiny_model)


class _EagerOps:
  """Counts the ops the host executes eagerly (not those traced into a
  graph), by type; tf.function calls by function name."""

  def __init__(self):
    self.counts = collections.Counter()

  def __call__(self, op_type, inputs, attrs, outputs, op_name=None,
               graph=None):
    del inputs, attrs, outputs, op_name
    if graph is None:
      name = op_type.decode() if isinstance(op_type, bytes) else op_type
      # Function names end in a per-trace number.
      self.counts[re.sub(r'_\d+$', '', name)] += 1

  def __enter__(self):
    op_callbacks.add_op_callback(self)
    return self

  def __exit__(self, *exc):
    op_callbacks.remove_op_callback(self)


def _host_ops_per_loop(tmp_path, n):
  cfg = small_config(tmp_path / str(n), num_replicas=n,
                     model=dict(bn_group_size=2),
                     optimizer=dict(moving_average_decay=0.9),
                     train=dict(train_batch_size=16, eval_batch_size=16))
  trainer = experiment.build_trainer(cfg, cpu_replicas(n))
  evaluator = experiment.evaluator_for(trainer)
  for _ in range(2):  # Traced, compiled, every iterator made.
    trainer.train_loop(2)
    evaluator.evaluate()
    trainer.save_checkpoint()
  with _EagerOps() as ops:
    trainer.train_loop(2)
    evaluator.evaluate()
    trainer.save_checkpoint()
  return ops.counts


def test_host_work_per_loop_does_not_grow_with_the_replicas(tmp_path,
                                                            tiny_model):
  """Metric reset and read, the EMA swaps, the replica-local sync, the
  loop and the checkpoint: the same eager ops at 2 and 8 replicas."""
  del tiny_model
  two, eight = (_host_ops_per_loop(tmp_path, n) for n in (2, 8))
  assert two == eight, {k: (two[k], eight[k]) for k in set(two) | set(eight)
                        if two[k] != eight[k]}
  # The loop, the sums' reset and read, the sync and the swaps are calls.
  assert sum(v for k, v in two.items() if k.startswith('__inference')) >= 8


def _recording_trainer(tmp_path, monkeypatch, steps, per_loop):
  """(cfg, a 1-replica trainer, the metrics of each loop it writes)."""
  cfg = small_config(tmp_path, train=dict(train_steps=steps,
                                          iterations_per_loop=per_loop))
  trainer = experiment.build_trainer(cfg, cpu_replicas(1))
  loops = []
  monkeypatch.setattr(trainer, 'write_summaries',
                      lambda metrics, step: loops.append(dict(metrics)))
  return cfg, trainer, loops


class _FakeClock:
  """train.py's `time`: only what the test advances passes."""

  def __init__(self):
    self.now = 1000.0

  def time(self):
    return self.now


def test_first_loop_reports_its_compile_apart_from_its_steps(
    tmp_path, tiny_model, monkeypatch):
  """As on TPU, the compile happens at the first call that takes a step
  (a call of zero steps compiles nothing): 100 s, then 1 s per step."""
  del tiny_model
  clock = _FakeClock()
  monkeypatch.setattr(train_lib, 'time', clock)
  real_loop = replicated.stoppable_loop

  def lazily_compiled_loop(*args, **kwargs):
    loop = real_loop(*args, **kwargs)
    compiled = []

    def timed(iterator, num_steps):
      stopped = loop(iterator, num_steps)
      steps = int(num_steps)
      if steps and not compiled:
        compiled.append(True)
        clock.now += 100.0
      clock.now += 1.0 * steps
      return stopped

    return timed

  monkeypatch.setattr(replicated, 'stoppable_loop', lazily_compiled_loop)
  cfg, trainer, loops = _recording_trainer(tmp_path, monkeypatch, 6, 3)
  trainer.train()
  first, second = loops
  batch = cfg.train.train_batch_size
  # The compile and the step it ran with; the other 2 steps at 1 s each.
  assert first['compile_time_s'] == 101.0
  assert first['images_per_second'] == batch / 1.0
  assert first['step_time_ms'] == 1000.0
  assert first['eta_s'] == 3 * 1.0  # 3 steps to go at 1 s.
  assert 'compile_time_s' not in second
  assert second['images_per_second'] == batch / 1.0
  assert second['eta_s'] == 0.0
  assert second['elapsed_s'] == 106.0


def test_a_first_loop_of_one_step_has_no_throughput_yet(tmp_path, tiny_model,
                                                        monkeypatch):
  del tiny_model
  _, trainer, loops = _recording_trainer(tmp_path, monkeypatch, 3, 1)
  start = time.time()
  trainer.train()
  assert len(loops) == 3
  assert 0 < loops[0]['compile_time_s'] < time.time() - start
  assert 'images_per_second' not in loops[0] and 'eta_s' not in loops[0]
  line = train_lib.progress_line(1, 3, dict(loops[0], epoch=0.1))
  assert ' compile=' in line and line.endswith(' ETA unknown'), line
  for metrics in loops[1:]:
    assert metrics['images_per_second'] > 0 and 'compile_time_s' not in metrics
  assert loops[-1]['eta_s'] == 0.0
