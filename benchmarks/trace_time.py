"""Where the first call (compile) of the replicated train loop spends its time.

Builds the real `train.Trainer` (`experiment.build_trainer`) for a tiny
EfficientNet on N logical CPU replicas and splits the compile of its host
loop (`Trainer.train_loop`'s loop function) into:

  python trace  `get_concrete_function`: autograph, Keras layer calls, the
                per-replica copies MirroredStrategy traces (one per
                replica), the optimizer's cross-replica update, automatic
                control dependencies;
  first run     the first call with one step: Grappler's graph
                optimization, executor set-up and one step;
  step          the steady-state step time after both (median of 3 calls
                of 10 steps).

It also prints the traced graph's node count (it grows with the replicas)
and a digest of the state after the 31 steps (every device's weights,
optimizer slots, EMA averages, BN statistics; the weights are seeded), the
same for two trees that train bit for bit alike (`--deterministic` adds TF's
op determinism). `--profile=FILE` writes a cProfile of the trace (the main
thread; the replica threads show as waits).
`--grappler=off` turns TF's graph optimizer off for the whole process
(`disable_meta_optimizer`); `--grappler_off=a,b` turns off single
optimizers (names of `tf.config.optimizer.set_experimental_options`). One
configuration per process, as tracing state does not reset:

  python -m benchmarks.trace_time --replicas=4 --group_size=2 [--no-ema]
  python -m benchmarks.trace_time --replicas=4 --grappler=off

`--compare=OLD,NEW` runs this script `--runs` times per tree in child
processes, alternating, with PYTHONPATH=OLD and NEW (two checkouts of the
repository), and prints every run and the NEW/OLD ratios (median, min-max):

  git archive 450ec1a | tar -x -C /tmp/old
  python benchmarks/trace_time.py --compare=/tmp/old,$PWD --replicas=4 --runs=4

It ends with whether all runs of both trees ended with the same state.
"""

import argparse
import cProfile
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _measure(args) -> dict:
  """Builds the trainer and times trace, first run and steps."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # pylint: disable=g-import-not-at-top
  import keras
  import tensorflow as tf
  from benchmarks import common
  from efficientnet_tpu import distribute
  from efficientnet_tpu import experiment
  from efficientnet_tpu import replicated
  # pylint: enable=g-import-not-at-top
  if args.grappler == 'off':
    tf.config.optimizer.set_experimental_options(
        {'disable_meta_optimizer': True})
  if args.grappler_off:
    tf.config.optimizer.set_experimental_options(
        {name: False for name in args.grappler_off.split(',')})
  if args.deterministic:
    tf.config.experimental.enable_op_determinism()
  # The same initial weights in every run (as experiment.run seeds them).
  keras.utils.set_random_seed(0)
  distribute.configure_cpu_devices(args.replicas)
  cfg = common.experiment_config(
      tempfile.mkdtemp(prefix='bench_trace_'), num_replicas=args.replicas,
      batch=64, width=0.25, depth=0.25, image_size=32, num_classes=10,
      bn_group_size=args.group_size, ema=args.ema, dropout=0.0)
  # One cached batch per replica: no synthetic image generation beside the
  # timed steps.
  trainer = experiment.build_trainer(
      cfg, distribute.build_strategy(cfg.distribute),
      input_for_step=common.cached_train_input(cfg))
  # The loop exactly as `Trainer.train_loop` builds and calls it; its
  # trace is timed apart (`get_concrete_function`) just before its first
  # call, which then runs Grappler and one step.
  traced = {}
  build_loop = replicated.stoppable_loop

  def timed_loop(*loop_args, **loop_kwargs):
    loop = build_loop(*loop_args, **loop_kwargs)

    def call(iterator, num_steps):
      if not traced:
        profiler = cProfile.Profile() if args.profile else None
        start = time.time()
        if profiler:
          profiler.enable()
        graph = loop.get_concrete_function(
            iterator, tf.TensorSpec([], tf.int32)).graph
        if profiler:
          profiler.disable()
          profiler.dump_stats(args.profile)
        traced['trace_s'] = time.time() - start
        graph_def = graph.as_graph_def()
        traced['nodes'] = len(graph_def.node) + sum(
            len(f.node_def) for f in graph_def.library.function)
      return loop(iterator, num_steps)

    return call

  replicated.stoppable_loop = timed_loop
  try:
    start = time.time()
    trainer.train_loop(1)
    compile_s = time.time() - start
  finally:
    replicated.stoppable_loop = build_loop
  trace_s, nodes = traced['trace_s'], traced['nodes']
  steps, times = 10, []
  for _ in range(3):
    start = time.time()
    trainer.train_loop(steps)
    times.append((time.time() - start) / steps)
  step_ms = 1000 * statistics.median(times)
  return dict(replicas=args.replicas, group_size=args.group_size,
              ema=args.ema, grappler=args.grappler,
              grappler_off=args.grappler_off, compile_s=compile_s,
              trace_s=trace_s, first_run_s=compile_s - trace_s,
              step_ms=step_ms, nodes=nodes, state=_state_digest(trainer))


def _state_digest(trainer) -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  """SHA-256 of every device's copy of the weights, optimizer slots, EMA
  averages and BN moving statistics after the 31 steps: two trees that
  train alike give the same digest (the cached batches are the same)."""
  state = trainer.state
  variables = list(state.model.variables) + list(state.optimizer.variables)
  if state.ema is not None:
    variables += list(state.ema.averages)
  digest = hashlib.sha256()
  for v in variables:
    for copy in trainer.strategy.experimental_local_results(
        v if isinstance(v, tf.Variable) else v.value):
      digest.update(copy.numpy().tobytes())
  return digest.hexdigest()[:16]


def _compare(args, argv) -> None:
  """Alternates child runs of this script on two trees; prints ratios."""
  trees = args.compare.split(',')
  if len(trees) != 2:
    sys.exit('--compare: expected OLD,NEW (two repository roots)')
  child = [a for a in argv if not a.startswith(('--compare', '--runs'))]
  results = {tree: [] for tree in trees}
  for r in range(args.runs):
    # The order flips every run: neither tree always runs first.
    for tree in (trees if r % 2 == 0 else trees[::-1]):
      env = dict(os.environ, PYTHONPATH=tree)
      out = subprocess.run(
          [sys.executable, os.path.abspath(__file__), '--json'] + child,
          env=env, check=True, capture_output=True, text=True).stdout
      result = json.loads(out.strip().splitlines()[-1])
      results[tree].append(result)
      print(f'run {r + 1} {tree}: compile {result["compile_s"]:.1f} s '
            f'(trace {result["trace_s"]:.1f} s), '
            f'{result["step_ms"]:.0f} ms/step, {result["nodes"]} nodes, '
            f'state {result["state"]}', flush=True)
  old, new = (results[t] for t in trees)
  same = {r['state'] for r in old + new}
  print('state after the steps: ' + (
      'the same bits in every run' if len(same) == 1 else
      f'DIFFERS ({len(same)} digests)'))
  for key in ('compile_s', 'trace_s', 'step_ms'):
    ratios = [n[key] / o[key] for o, n in zip(old, new)]
    print(f'{key} new/old: median {statistics.median(ratios):.2f} '
          f'(runs {min(ratios):.2f}-{max(ratios):.2f}); old median '
          f'{statistics.median(o[key] for o in old):.1f}, new median '
          f'{statistics.median(n[key] for n in new):.1f}')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--replicas', type=int, default=4)
  parser.add_argument('--group_size', type=int, default=2)
  parser.add_argument('--ema', action=argparse.BooleanOptionalAction,
                      default=True, help='EMA of the weights (--no-ema)')
  parser.add_argument('--grappler', choices=('on', 'off'), default='on',
                      help="TF's graph optimizer (default: %(default)s)")
  parser.add_argument('--grappler_off', default='',
                      help='Grappler optimizers to turn off, comma-separated')
  parser.add_argument('--compare', default='',
                      help='OLD,NEW: repository roots to compare')
  parser.add_argument('--runs', type=int, default=3,
                      help='runs per tree with --compare')
  parser.add_argument('--profile', default='',
                      help='file for a cProfile of the Python trace (main '
                      'thread; pstats format)')
  parser.add_argument('--deterministic', action='store_true',
                      help="TF's op determinism (the run's --deterministic):"
                      ' the state digest is then the same in every run')
  parser.add_argument('--json', action='store_true',
                      help='print the result as one JSON line')
  args = parser.parse_args(argv)
  if args.compare:
    _compare(args, argv)
    return
  result = _measure(args)
  if args.json:
    print(json.dumps(result), flush=True)
    return
  print(f'replicas={args.replicas} group_size={args.group_size} '
        f'ema={args.ema} grappler={args.grappler}'
        f'{" off: " + args.grappler_off if args.grappler_off else ""}: '
        f'compile {result["compile_s"]:.1f} s (python trace '
        f'{result["trace_s"]:.1f} s, the rest {result["first_run_s"]:.1f} s),'
        f' then {result["step_ms"]:.0f} ms/step; {result["nodes"]} graph '
        'nodes', flush=True)


if __name__ == '__main__':
  main()
