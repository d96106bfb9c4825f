"""EMA swap on CPU replicas: one compiled replicated call vs the eager loop.

Evaluation swaps the model weights with their moving averages twice (before
and after). The peer is the previous implementation, kept here: an eager
loop of `strategy.extended.update(average, swap, group=False)` per variable,
which TF runs device by device (on TPU, TPUExtended loops over every
variable's devices from the host, several remote calls per variable and
replica). Ours (`ema.ExponentialMovingAverage.swap`) is one tf.function in
which every replica exchanges its own copies with local assigns.

Full-size EfficientNet-B0 variables (~310 float variables), built at a small
resolution (the variables do not depend on it), on 8 logical CPU replicas.
Both swaps run in one process, in alternating rounds; each round is two
swaps (weights restored).

    python -m benchmarks.ema_swap                 # 8 replicas, 7 rounds
    python -m benchmarks.ema_swap --replicas 4 --rounds 5

Writes benchmarks/results/ema_swap.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position


def eager_swap(ema) -> None:
  """The previous EMA swap: per variable, per device, from the host."""
  strategy = ema._strategy  # pylint: disable=protected-access

  def _swap(average, var):
    tmp = tf.identity(average.read_value())
    average.assign(tf.cast(var.read_value(), average.dtype))
    var.assign(tf.cast(tmp, var.dtype))
    return tmp

  for average, var in zip(ema.averages, ema.model_variables):
    strategy.extended.update(average, _swap,
                             args=(getattr(var, 'value', var),), group=False)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--replicas', type=int, default=8)
  p.add_argument('--rounds', type=int, default=7)
  args = p.parse_args()

  from efficientnet_tpu import distribute  # pylint: disable=g-import-not-at-top
  devices = distribute.configure_cpu_devices(args.replicas)
  from efficientnet_tpu import ema as ema_lib  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu.config import ModelConfig  # pylint: disable=g-import-not-at-top

  info = common.machine_info()
  print(f'machine: {common.describe_machine(info)}')
  strategy = tf.distribute.MirroredStrategy(
      devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
  with strategy.scope():
    model = model_lib.build_model(ModelConfig(image_size=32))
    ema = ema_lib.ExponentialMovingAverage(model.variables, 0.9999)
  print(f'EfficientNet-B0: {len(ema.averages)} averaged variables on '
        f'{args.replicas} replicas', flush=True)
  variants = {'eager loop (before)': lambda: (eager_swap(ema),
                                              eager_swap(ema)),
              'compiled (ours)': lambda: (ema.swap(), ema.swap())}
  first = {}
  for name, fn in variants.items():
    start = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - start
  times = common.alternating_rounds(variants, args.rounds)
  before = times['eager loop (before)']
  ours = times['compiled (ours)']
  ratios = sorted(b / o for b, o in zip(before, ours))
  rows = [(name, 1e3 * statistics.median(t) / 2, 1e3 * min(t) / 2,
           1e3 * max(t) / 2, first[name]) for name, t in times.items()]
  print()
  print(common.format_table(rows, ('swap', 'median ms', 'best ms',
                                   'worst ms', 'first call s')))
  print(f'\nspeed-up per round (before / ours): median '
        f'{statistics.median(ratios):.1f}x, range {ratios[0]:.1f}-'
        f'{ratios[-1]:.1f}x')
  path = common.write_json('ema_swap', dict(
      benchmark='ema_swap', command=common.command_line(),
      replicas=args.replicas, rounds=args.rounds,
      variables=len(ema.averages), seconds_per_round=times,
      first_call_seconds=first, speedup_median=statistics.median(ratios),
      speedup_range=[ratios[0], ratios[-1]], machine=info))
  print(f'\nwrote {path}')
  common.exit_now()


if __name__ == '__main__':
  main()
