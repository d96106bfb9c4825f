"""Replica scaling on CPU: the cost of synchronizing batch norm.

A small EfficientNet trains through the real `train.Trainer` (its replicated
host loop `train_loop(n)`: LARS, label smoothing, EMA, group BN) on 1, 2, 4
and 8 logical CPU replicas (MirroredStrategy) with the SAME global batch, in
three batch-norm modes:

  local   bn_group_size=1  per-replica statistics, no collective in BN
                            (moving statistics averaged at checkpoints)
  local_stepsync           local BN as it was: + 1 all-reduce per layer per
                            step of the moving statistics
  group2  bn_group_size=2  statistics shared by pairs of replicas
  global  bn_group_size=0  statistics over all replicas

(With 1 replica the three are the same network; with 2, group2 == global, so
those duplicates are skipped.) On one 2-core CPU the replicas share the same
cores: more replicas do NOT add compute, so images/s falls with the replica
count; what the table shows is the per-replica overhead of the replicated
step and, between the BN modes at a fixed replica count, the price of the
collectives. The first call (trace of the replicated loop + iterator set-up +
first steps) is reported separately from the steady state.

Each replica reads one cached synthetic batch (see `common.cached_train_input`),
so image generation does not compete with the step for the cores.

    python -m benchmarks.scaling                    # ~10 min on 2 busy cores
    python -m benchmarks.scaling --quick            # 1,2,4 replicas, ~4 min
    python -m benchmarks.scaling --replicas=1,8 --modes=local,global
    python -m benchmarks.scaling --replicas=8 --modes=local,local_stepsync

Writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from unittest import mock

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

MODES = {'local': 1, 'local_stepsync': 1, 'group2': 2, 'global': 0}


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--replicas', default='1,2,4,8')
  p.add_argument('--modes', default='local,group2,global',
                 help=f'comma-separated subset of {",".join(MODES)}')
  p.add_argument('--batch', type=int, default=64, help='global batch')
  p.add_argument('--width', type=float, default=0.25)
  p.add_argument('--depth', type=float, default=0.25)
  p.add_argument('--image_size', type=int, default=64)
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--steps', type=int, default=4,
                 help='steps per host call (= per timed round)')
  p.add_argument('--warmup', type=int, default=1,
                 help='untimed host calls after the first')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--quick', action='store_true',
                 help='1,2,4 replicas and 3 rounds')
  p.add_argument('--name', default='scaling', help='results file stem')
  args = p.parse_args()
  if args.quick:
    args.replicas, args.rounds = '1,2,4', 3
  args.replicas = common.parse_int_list(args.replicas, '--replicas')
  args.modes = [m.strip() for m in args.modes.split(',') if m.strip()]
  for m in args.modes:
    if m not in MODES:
      raise SystemExit(f'--modes: expected a subset of {",".join(MODES)}, '
                       f'got {m!r}')
  for r in args.replicas:
    if args.batch % r:
      raise SystemExit(f'--batch: expected a multiple of every replica '
                       f'count ({args.replicas}), got {args.batch}')
  return args


def variants(replicas, modes):
  """(replicas, label, bn_group_size), each distinct grouping once.

  A mode that degenerates at a replica count is relabelled (group2 on 2
  replicas is global; anything on 1 replica is local) and kept only once.
  """
  out = []
  for r in replicas:
    labels = set()
    for m in modes:
      g = MODES[m]
      effective = r if g == 0 else g
      if effective > r or r % effective:
        continue
      if m == 'local_stepsync':
        if r == 1:
          continue
        label = m
      elif effective == 1:
        label, g = 'local', 1
      elif effective == r:
        label, g = 'global', 0
      else:
        label = m
      if label not in labels:
        labels.add(label)
        out.append((r, label, g))
  return out


def _step_sync_builder(model_lib):
  """build_model with the per-step moving-statistics all-reduce."""
  from benchmarks import bn_variants  # pylint: disable=g-import-not-at-top
  original = model_lib.build_model
  return lambda *args, **kwargs: original(
      *args, batch_norm_fn=bn_variants.group_step_sync, **kwargs)


def main():
  args = _parse()
  # Before TensorFlow initializes: the logical CPUs every strategy uses.
  from efficientnet_tpu import distribute  # pylint: disable=g-import-not-at-top
  distribute.configure_cpu_devices(max(args.replicas))
  from efficientnet_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import experiment  # pylint: disable=g-import-not-at-top

  info = common.machine_info()
  print(f'machine: {common.describe_machine(info)}')
  print(f'EfficientNet width {args.width} depth {args.depth} at '
        f'{args.image_size}px, {args.num_classes} classes, global batch '
        f'{args.batch}, {args.steps} steps per host call', flush=True)

  model_dir = tempfile.mkdtemp(prefix='bench_scaling_')
  calls, meta = {}, {}
  for r, mode, g in variants(args.replicas, args.modes):
    name = f'{r}x {mode}'
    cfg = common.experiment_config(
        os.path.join(model_dir, name.replace(' ', '_')), num_replicas=r,
        batch=args.batch, width=args.width, depth=args.depth,
        image_size=args.image_size, num_classes=args.num_classes,
        bn_group_size=g)
    strategy = distribute.build_strategy(cfg.distribute)
    start = time.perf_counter()
    if mode == 'local_stepsync':
      # The Trainer builds its model through model_lib.build_model.
      with mock.patch.object(model_lib, 'build_model',
                             _step_sync_builder(model_lib)):
        trainer = experiment.build_trainer(
            cfg, strategy, input_for_step=common.cached_train_input(cfg))
    else:
      trainer = experiment.build_trainer(
          cfg, strategy, input_for_step=common.cached_train_input(cfg))
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    trainer.train_loop(args.steps)
    first_s = time.perf_counter() - start
    for _ in range(args.warmup):
      trainer.train_loop(args.steps)
    meta[name] = dict(replicas=r, mode=mode, bn_group_size=trainer.bn_group_size,
                      per_replica_batch=trainer.per_replica_batch,
                      build_seconds=build_s, first_call_seconds=first_s)
    print(f'{name:<10} group size {trainer.bn_group_size}: build {build_s:.1f}s,'
          f' first call (trace + {args.steps} steps) {first_s:.1f}s',
          flush=True)
    calls[name] = lambda t=trainer: t.train_loop(args.steps)

  print(f'{args.rounds} alternating rounds x {args.steps} steps', flush=True)
  times = common.alternating_rounds(calls, args.rounds)
  base = None
  results = []
  for name in calls:
    s = common.summarize(times[name], args.steps * args.batch)
    if base is None:
      base = s['images_per_second']
    results.append(dict(meta[name], variant=name,
                        relative_to_first=s['images_per_second'] / base, **s))

  # Price of synchronization at each replica count, vs local BN there.
  local = {r['replicas']: r['images_per_second'] for r in results
           if r['mode'] == 'local'}
  for r in results:
    if r['replicas'] in local:
      r['relative_to_local'] = r['images_per_second'] / local[r['replicas']]

  rows = [(r['variant'], r['bn_group_size'], r['per_replica_batch'],
           r['images_per_second'], r['images_per_second_worst'],
           r['images_per_second_best'],
           1e3 * r['median_seconds_per_call'] / args.steps,
           r.get('relative_to_local', float('nan')), r['first_call_seconds'])
          for r in results]
  print()
  print(common.format_table(
      rows, ('variant', 'group', 'per-replica', 'img/s', 'worst', 'best',
             'ms/step', 'vs local', 'first call s')))
  path = common.write_json(args.name, dict(
      benchmark='scaling', command=common.command_line(),
      global_batch=args.batch, width=args.width, depth=args.depth,
      image_size=args.image_size, num_classes=args.num_classes,
      steps_per_call=args.steps, rounds=args.rounds, warmup=args.warmup,
      results=results, machine=info))
  print(f'\nwrote {path}')
  common.exit_now()


if __name__ == '__main__':
  main()
