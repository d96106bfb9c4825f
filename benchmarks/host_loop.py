"""Host-loop benefit: images/s at iterations_per_loop 1, 10 and 100.

`Trainer.train_loop(n)` runs n replicated steps inside ONE tf.function call
(the TPUEstimator host loop). With n = 1 every step pays the host overhead:
the Python call, the function dispatch, the per-replica `strategy.run`
set-up, resetting and reading the metric accumulators. A tiny model makes
that overhead visible. Every timed round runs the same number of steps
(`--steps_per_round`, default 100) for each setting: 100 calls of
`train_loop(1)`, 10 of `train_loop(10)`, 1 of `train_loop(100)`, through
the same Trainer (the step count is a tensor: no retracing), alternating.

Each replica reads one cached synthetic batch (see `common.cached_train_input`).

    python -m benchmarks.host_loop                   # 1 and 8 replicas, ~4 min
    python -m benchmarks.host_loop --replicas=1 --rounds=7
    python -m benchmarks.host_loop --from_json=benchmarks/results/host_loop.json

Writes benchmarks/results/host_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--replicas', default='1,8',
                 help='comma-separated CPU replica counts (one Trainer each)')
  p.add_argument('--iterations', default='1,10,100',
                 help='comma-separated iterations_per_loop values')
  p.add_argument('--steps_per_round', type=int, default=100)
  p.add_argument('--batch', type=int, default=32, help='global batch')
  p.add_argument('--width', type=float, default=0.1)
  p.add_argument('--depth', type=float, default=0.1)
  p.add_argument('--image_size', type=int, default=16)
  p.add_argument('--num_classes', type=int, default=10)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--name', default='host_loop', help='results file stem')
  p.add_argument('--from_json', default=None,
                 help='only re-print the table of an existing results file')
  args = p.parse_args()
  args.replicas = common.parse_int_list(args.replicas, '--replicas')
  args.iterations = common.parse_int_list(args.iterations, '--iterations')
  for k in args.iterations:
    if args.steps_per_round % k:
      raise SystemExit(f'--steps_per_round: expected a multiple of every '
                       f'--iterations value ({args.iterations}), got '
                       f'{args.steps_per_round}')
  for r in args.replicas:
    if args.batch % r:
      raise SystemExit(f'--batch: expected a multiple of every replica '
                       f'count ({args.replicas}), got {args.batch}')
  return args


def report(payload: dict) -> None:
  """Adds the derived figures to payload['results'] and prints the table.

  Host overhead per call (smallest-loop rows): the extra time of the
  smallest loop length over the largest at the same replica count, divided
  by the extra host calls it made.
  """
  steps, batch = payload['steps_per_round'], payload['global_batch']
  results = payload['results']
  for res in results:
    res.update(common.summarize(res['durations'], steps * batch))
    res['step_ms'] = 1e3 * res['median_seconds_per_call'] / steps
  for res in results:
    same = [o for o in results if o['replicas'] == res['replicas']]
    small = min(same, key=lambda o: o['iterations_per_loop'])
    large = max(same, key=lambda o: o['iterations_per_loop'])
    res['speedup_vs_smallest'] = (res['images_per_second'] /
                                  small['images_per_second'])
    extra_calls = small['host_calls_per_round'] - large['host_calls_per_round']
    if res is small and extra_calls > 0:
      res['host_overhead_ms_per_call'] = 1e3 * (
          small['median_seconds_per_call'] -
          large['median_seconds_per_call']) / extra_calls
  rows = [(res['variant'], res['host_calls_per_round'],
           res['images_per_second'], res['images_per_second_worst'],
           res['images_per_second_best'], res['step_ms'],
           res['speedup_vs_smallest'],
           res.get('host_overhead_ms_per_call', '-')) for res in results]
  print()
  print(common.format_table(
      rows, ('variant', 'calls/round', 'img/s', 'worst', 'best', 'ms/step',
             'speedup', 'host ms/call')))


def main():
  args = _parse()
  if args.from_json:
    with open(args.from_json) as f:
      report(json.load(f))
    return
  from efficientnet_tpu import distribute  # pylint: disable=g-import-not-at-top
  distribute.configure_cpu_devices(max(args.replicas))
  from efficientnet_tpu import experiment  # pylint: disable=g-import-not-at-top

  info = common.machine_info()
  print(f'machine: {common.describe_machine(info)}')
  print(f'EfficientNet width {args.width} depth {args.depth} at '
        f'{args.image_size}px, global batch {args.batch}, '
        f'{args.steps_per_round} steps per round', flush=True)

  model_dir = tempfile.mkdtemp(prefix='bench_host_loop_')
  calls, meta = {}, {}
  for r in args.replicas:
    cfg = common.experiment_config(
        os.path.join(model_dir, f'r{r}'), num_replicas=r, batch=args.batch,
        width=args.width, depth=args.depth, image_size=args.image_size,
        num_classes=args.num_classes, bn_group_size=1)
    trainer = experiment.build_trainer(
        cfg, distribute.build_strategy(cfg.distribute),
        input_for_step=common.cached_train_input(cfg))
    start = time.perf_counter()
    trainer.train_loop(1)
    first_s = time.perf_counter() - start
    for k in args.iterations:  # warm-up: every loop length once
      trainer.train_loop(k)
    print(f'{r} replica(s): first call (trace + 1 step) {first_s:.1f}s',
          flush=True)
    for k in args.iterations:
      name = f'{r}x ipl={k}'

      def run(trainer=trainer, k=k):
        for _ in range(args.steps_per_round // k):
          trainer.train_loop(k)

      calls[name] = run
      meta[name] = dict(replicas=r, iterations_per_loop=k,
                        host_calls_per_round=args.steps_per_round // k,
                        first_call_seconds=first_s)

  print(f'{args.rounds} alternating rounds', flush=True)
  times = common.alternating_rounds(calls, args.rounds)
  payload = dict(
      benchmark='host_loop', command=common.command_line(),
      global_batch=args.batch, width=args.width, depth=args.depth,
      image_size=args.image_size, num_classes=args.num_classes,
      steps_per_round=args.steps_per_round, rounds=args.rounds,
      results=[dict(meta[name], variant=name, durations=times[name])
               for name in calls], machine=info)
  report(payload)
  path = common.write_json(args.name, payload)
  print(f'\nwrote {path}')
  common.exit_now()


if __name__ == '__main__':
  main()
