"""SIGTERM: the run stops at the next step, saves there, and resumes exactly.

References: a counter the replica step increments (how many steps ran),
the signal delivered by the OS while the main thread is inside one long
`tf.function` call (where a Python signal handler cannot run), and an
uninterrupted training process (for the weights after a preemption and a
rerun).
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import preemption
from efficientnet_tpu import replicated
from tests.helpers import cpu_replicas, free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERROR_RE = re.compile(
    r'^error: preempted \((SIGTERM|SIGTERM to another worker)\) at step '
    r'(\d+); checkpoint ckpt-\2 saved: rerun the same command to resume$')


def _counting_loop(strategy, flag, agree, request_at=None):
  """A stoppable loop whose step counts itself; at step `request_at` the
  step itself sets the flag (after any vote of that step)."""
  with strategy.scope():
    count = tf.Variable(0, dtype=tf.int32,
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

  def step(batch):
    del batch
    count.assign_add(1)
    if request_at is not None:
      tf.cond(tf.equal(count, request_at), lambda: flag.assign(1.0),
              lambda: flag.read_value())

  dataset = tf.data.Dataset.from_tensors(tf.zeros([2])).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(dataset))
  loop = replicated.stoppable_loop(strategy, step, flag, agree=agree)
  return loop, iterator, count


@pytest.mark.parametrize('agree', [False, True])
def test_loop_stops_at_the_step_boundary_after_a_request(agree):
  """Without agreement the flag is read before each step: a request during
  step 3 stops after step 3. With agreement each step all-reduces the flag
  at its start: the request during step 3 is seen by step 4's all-reduce,
  and the loop stops after step 4 (on every process alike)."""
  strategy = cpu_replicas(2)
  flag = tf.Variable(0.0, trainable=False)
  loop, iterator, count = _counting_loop(strategy, flag, agree, request_at=3)
  stopped = loop(iterator, tf.constant(10))
  assert bool(stopped.numpy())
  assert int(count.numpy()) == (4 if agree else 3)
  # Without a request the loop runs all its steps.
  flag.assign(0.0)
  loop, iterator, count = _counting_loop(strategy, flag, agree)
  assert not bool(loop(iterator, tf.constant(5)).numpy())
  assert int(count.numpy()) == 5


def test_request_before_the_loop_takes_no_step():
  strategy = cpu_replicas(1)
  flag = tf.Variable(1.0, trainable=False)
  loop, iterator, count = _counting_loop(strategy, flag, agree=False)
  assert bool(loop(iterator, tf.constant(5)).numpy())
  assert int(count.numpy()) == 0


def test_sigterm_stops_a_loop_running_inside_one_tf_function_call():
  """The OS delivers SIGTERM while the main thread is blocked in a
  million-step call; the loop ends within a fraction of that, and the
  previous SIGTERM handler is back afterwards."""
  strategy = cpu_replicas(1)
  stop = preemption.StopRequest()
  loop, iterator, count = _counting_loop(strategy, stop.flag, agree=False)
  loop(iterator, tf.constant(0))  # Traced before the clock starts.
  previous = signal.getsignal(signal.SIGTERM)
  sender = threading.Timer(
      1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
  with stop.watch():
    sender.start()
    start = time.time()
    stopped = loop(iterator, tf.constant(10**6))
    elapsed = time.time() - start
    sender.join()  # Delivered inside the handler's scope, whatever happens.
  assert bool(stopped.numpy()) and stop.signum == signal.SIGTERM
  assert 0 < int(count.numpy()) < 10**6
  assert elapsed < 30, elapsed
  assert signal.getsignal(signal.SIGTERM) is previous


def test_preempted_line():
  e = preemption.Preempted(133, '/runs/x/ckpt-133', signal.SIGTERM)
  assert str(e) == ('preempted (SIGTERM) at step 133; checkpoint ckpt-133 '
                    'saved: rerun the same command to resume')
  assert e.exit_code == 128 + 15
  assert ERROR_RE.match('error: ' + str(
      preemption.Preempted(7, '/a/.worker_1_tmp/ckpt-7', None)))


# ---- the command line: a real SIGTERM ---------------------------------------


def _flags(model_dir, steps, loop):
  return [
      f'--model_dir={model_dir}', f'--train_steps={steps}',
      f'--iterations_per_loop={loop}', '--mode=train', '--num_label_classes=5',
      # 32 px and a small LR: the run must stay finite (the trainer stops a
      # diverging one; see test_resume's KILL_SIZE).
      '--width_coefficient=0.1', '--depth_coefficient=0.1', '--image_size=32',
      '--num_train_images=512', '--num_eval_images=16',
      '--train_batch_size=8', '--optimizer=lars', '--base_learning_rate=0.005',
      '--lr_scaling=none', '--lr_warmup_epochs=0.5',
      '--moving_average_decay=0.9', '--deterministic', '--seed=3',
      '--summary_images=0',
  ]


def _cpu_command(model_dir, steps, loop):
  # One BN group over both replicas: see test_..._bitwise_equal.
  return [sys.executable, '-m', 'efficientnet_tpu.main', '--strategy=cpu',
          '--num_cpu_replicas=2', '--bn_group_size=2', '--dropout_rate=0.3',
          '--stochastic_depth_rate=0.2', *_flags(model_dir, steps, loop)]


def _env(**extra):
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT, **extra)


def _wait_then_signal(procs, victim, marker, delay):
  """SIGTERM to `victim` `delay` s after file `marker` appears (the first
  loop's checkpoint: the second loop is running then)."""
  deadline = time.time() + 600
  while not marker.exists():
    assert all(p.poll() is None for p in procs), 'a process ended early'
    assert time.time() < deadline, f'no {marker.name}'
    time.sleep(0.02)
  time.sleep(delay)
  victim.send_signal(signal.SIGTERM)


def _error_line(stderr):
  """The process's only error line, checked to be the last line it wrote.

  TF's runtime may still log after it while the process exits (a worker
  whose chief has gone logs gRPC connection errors from a C++ thread):
  those lines are the runtime's, not the run's, and may follow.
  """
  lines = stderr.strip().splitlines()
  assert 'Traceback' not in stderr, stderr[-3000:]
  errors = [i for i, l in enumerate(lines) if l.startswith('error:')]
  assert len(errors) == 1, lines[-5:]
  after = lines[errors[0] + 1:]
  assert not [l for l in after if re.search(r'\.py:\d+\]', l)], after
  return lines[errors[0]]


def _weights(model_dir):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
  # save_counter counts saves, and the preempted run saved once more.
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if k not in ('_CHECKPOINTABLE_OBJECT_GRAPH',
                       'save_counter/.ATTRIBUTES/VARIABLE_VALUE')}


@pytest.mark.slow
def test_sigterm_saves_mid_loop_and_rerun_ends_bitwise_equal(tmp_path):
  """SIGTERM during the second host loop of 200 steps: exit 143 with the one
  line, a checkpoint at the step it stopped after (past step 200), and a
  rerun of the same command that resumes there and ends with bitwise the
  weights, EMA, optimizer slots and RNG state of an uninterrupted run.

  BN statistics are synchronized over all replicas (one group): with
  smaller groups each replica's moving statistics drift apart between
  checkpoints, and the extra checkpoint averages them one more time (they
  then match to float rounding; the trained weights are not affected)."""
  steps, loop = 600, 200
  whole_dir, victim_dir = tmp_path / 'whole', tmp_path / 'victim'
  run = lambda d: subprocess.Popen(  # pylint: disable=g-long-lambda
      _cpu_command(d, steps, loop), env=_env(), cwd=ROOT,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  whole, victim = run(whole_dir), run(victim_dir)
  _wait_then_signal([victim], victim, victim_dir / f'ckpt-{loop}.index', 0.5)
  _, err = victim.communicate(timeout=600)
  assert victim.returncode == preemption.EXIT_CODE, err[-3000:]
  match = ERROR_RE.match(_error_line(err))
  assert match and match.group(1) == 'SIGTERM', err[-3000:]
  stopped = int(match.group(2))
  assert loop < stopped < 2 * loop, stopped
  latest = tf.train.latest_checkpoint(str(victim_dir))
  assert latest == str(victim_dir / f'ckpt-{stopped}')
  # The partial loop is in the history, as logged.
  records = [json.loads(l) for l in
             (victim_dir / 'history.jsonl').read_text().splitlines()]
  assert [(r['start_step'], r['step']) for r in records] == [
      (0, loop), (loop, stopped)]

  rerun = run(victim_dir)
  for p in (whole, rerun):
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
  assert f'Restored {victim_dir}/ckpt-{stopped} at step {stopped}' in err
  want, got = _weights(whole_dir), _weights(victim_dir)
  assert set(got) == set(want)
  assert any('rng' in k for k in got)  # Dropout state is checkpointed.
  different = [k for k in want if not np.array_equal(got[k], want[k])]
  assert not different, different[:5]


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_at_the_same_step(tmp_path):
  """Two MultiWorkerMirroredStrategy workers on localhost; SIGTERM to the
  non-chief worker only. Both stop after the same step, past the loop
  boundary, exit 143 with the line (the chief's names the other worker);
  only the chief's checkpoint lands in model_dir; rerunning both resumes
  there and finishes."""
  steps, loop = 300, 100
  model_dir = tmp_path / 'run'

  def start():
    workers = [f'127.0.0.1:{p}' for p in free_ports(2)]
    procs = []
    for index in range(2):
      tf_config = json.dumps({'cluster': {'worker': workers},
                              'task': {'type': 'worker', 'index': index}})
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'efficientnet_tpu.main',
           '--strategy=multi_worker', '--shared_filesystem',
           '--bn_group_size=0',
           '--dropout_rate=0', '--stochastic_depth_rate=0',
           *_flags(model_dir, steps, loop)],
          env=_env(TF_CONFIG=tf_config), cwd=ROOT, stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE, text=True))
    return procs

  procs = start()
  try:
    _wait_then_signal(procs, procs[1], model_dir / f'ckpt-{loop}.index', 0.5)
    errs = [p.communicate(timeout=600)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  matches = []
  for p, err in zip(procs, errs):
    assert p.returncode == preemption.EXIT_CODE, err[-3000:]
    matches.append(ERROR_RE.match(_error_line(err)))
    assert matches[-1], err[-3000:]
  chief, worker = matches
  assert chief.group(1) == 'SIGTERM to another worker'
  assert worker.group(1) == 'SIGTERM'
  stopped = int(chief.group(2))
  assert int(worker.group(2)) == stopped and loop < stopped < 2 * loop
  assert tf.train.latest_checkpoint(str(model_dir)) == str(
      model_dir / f'ckpt-{stopped}')
  assert not list(model_dir.glob('.worker_*'))  # Scratch dirs removed.

  procs = start()
  try:
    errs = [p.communicate(timeout=900)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
    assert f'Restored {model_dir}/ckpt-{stopped} at step {stopped}' in err
  assert tf.train.latest_checkpoint(str(model_dir)) == str(
      model_dir / f'ckpt-{steps}')
