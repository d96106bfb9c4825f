"""Where the first call (compile) of the replicated train loop spends its time.

Builds the real `train.Trainer` (`experiment.build_trainer`) for a tiny
EfficientNet on N logical CPU replicas and splits the compile of its host
loop (`replicated.stoppable_loop` over `step.train_step`, as
`Trainer.replica_step` runs it) into:

  python trace  `get_concrete_function`: autograph, Keras layer calls, the
                per-replica copies MirroredStrategy traces (one per
                replica), the optimizer's cross-replica update, automatic
                control dependencies;
  first run     the first call with one step: Grappler's graph
                optimization, executor set-up and one step;
  step          the steady-state step time after both.

It also prints the traced graph's node count (it grows with the replicas).
`--grappler=off` turns TF's graph optimizer off (`disable_meta_optimizer`)
to show its share. One configuration per process, as tracing state does
not reset:

  python -m benchmarks.trace_time --replicas=4 --group_size=2 [--no-ema]
  python -m benchmarks.trace_time --replicas=4 --grappler=off
"""

import argparse
import os
import tempfile
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--replicas', type=int, default=4)
  parser.add_argument('--group_size', type=int, default=2)
  parser.add_argument('--ema', action=argparse.BooleanOptionalAction,
                      default=True, help='EMA of the weights (--no-ema)')
  parser.add_argument('--grappler', choices=('on', 'off'), default='on',
                      help="TF's graph optimizer (default: %(default)s)")
  args = parser.parse_args()

  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from benchmarks import common
  from efficientnet_tpu import distribute
  from efficientnet_tpu import experiment
  from efficientnet_tpu import replicated
  from efficientnet_tpu import step as step_lib
  if args.grappler == 'off':
    tf.config.optimizer.set_experimental_options(
        {'disable_meta_optimizer': True})
  distribute.configure_cpu_devices(args.replicas)
  cfg = common.experiment_config(
      tempfile.mkdtemp(prefix='bench_trace_'), num_replicas=args.replicas,
      batch=64, width=0.25, depth=0.25, image_size=32, num_classes=10,
      bn_group_size=args.group_size, ema=args.ema, dropout=0.0)
  trainer = experiment.build_trainer(
      cfg, distribute.build_strategy(cfg.distribute))
  # The trainer's step on sums of our own, to block on.
  spec, strategy = trainer.spec, trainer.strategy
  sums = replicated.Accumulators(strategy, 'bench', step_lib.TRAIN_SUMS)
  forward_backward = step_lib.compile_forward_backward(spec, trainer.model)
  loop = replicated.stoppable_loop(
      strategy,
      lambda batch: step_lib.train_step(spec, trainer.state, sums, batch,
                                        forward_backward),
      trainer.stop.flag,
      agree=distribute.runs_in_several_processes(strategy))
  iterator = iter(trainer.distribute_input())
  start = time.time()
  graph = loop.get_concrete_function(
      iterator, tf.TensorSpec([], tf.int32)).graph
  trace_s = time.time() - start
  graph_def = graph.as_graph_def()
  nodes = len(graph_def.node) + sum(len(f.node_def)
                                    for f in graph_def.library.function)
  start = time.time()
  loop(iterator, tf.constant(1, tf.int32))
  sums.read()  # Blocks until the step ran.
  first_s = time.time() - start
  steps = 10
  start = time.time()
  loop(iterator, tf.constant(steps, tf.int32))
  sums.read()
  step_ms = 1000 * (time.time() - start) / steps
  print(f'replicas={args.replicas} group_size={args.group_size} '
        f'ema={args.ema} grappler={args.grappler}: python trace '
        f'{trace_s:.1f} s, first run {first_s:.1f} s (compile '
        f'{trace_s + first_s:.1f} s), then {step_ms:.0f} ms/step; '
        f'{nodes} graph nodes', flush=True)


if __name__ == '__main__':
  main()
