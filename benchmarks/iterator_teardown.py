"""Deleting a distributed input iterator: TF's default vs `replicated.iterate`.

A distributed iterator over R devices holds one `MultiDeviceIterator` per
host, which builds a small pipeline per device with tf.data's default
options: autotuning on, one tuning thread per device. Deleting the iterator
waits for those threads one after the other, and on a busy host a wait can
last a thread's whole tuning interval (it doubles while the iterator lives,
up to a minute). `replicated.iterate` builds the per-device stages without
autotuning (they have nothing to tune); the host's pipeline keeps the
application's options, autotuning included, in both variants.

Each round builds both iterators over the same pipeline (a map, a batch and
a prefetch, like the application's), reads `--batches` batches from each,
lets them live `--live` seconds and deletes them one after the other, the
order alternating between rounds. `--busy` CPU-bound processes run beside it
for the whole benchmark (a TPU VM's host is busy decoding images; the tests
run two processes on two cores).

    python -m benchmarks.iterator_teardown                 # 8 devices, busy 3
    python -m benchmarks.iterator_teardown --busy 0 --live 30

Writes benchmarks/results/iterator_teardown.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

_BUSY_LOOP = 'while True: pass'


def _pipeline(ctx):
  """A host pipeline with the application's options (autotuning on)."""
  del ctx
  ds = tf.data.Dataset.range(10**9).map(
      lambda x: tf.fill([16, 16, 3], tf.cast(x % 251, tf.uint8)),
      num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.autotune.enabled = True
  return ds.batch(8).prefetch(tf.data.AUTOTUNE).with_options(options)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--replicas', type=int, default=8)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--live', type=float, default=60.0,
                 help='seconds each iterator lives after its reads')
  p.add_argument('--batches', type=int, default=20)
  p.add_argument('--busy', type=int, default=3,
                 help='CPU-bound processes running beside the benchmark')
  args = p.parse_args()

  from efficientnet_tpu import distribute  # pylint: disable=g-import-not-at-top
  devices = distribute.configure_cpu_devices(args.replicas)
  from efficientnet_tpu import replicated  # pylint: disable=g-import-not-at-top

  info = common.machine_info()
  print(f'machine: {common.describe_machine(info)}')
  print(f'{args.replicas} devices, iterators live {args.live:.0f} s, '
        f'{args.busy} CPU-bound processes beside', flush=True)
  strategy = tf.distribute.MirroredStrategy(
      devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
  dataset = replicated.distribute_input(strategy, _pipeline)
  builders = {'iter() (TF default)': iter, 'replicated.iterate': replicated.iterate}
  busy = [subprocess.Popen([sys.executable, '-c', _BUSY_LOOP])
          for _ in range(args.busy)]
  times = {name: [] for name in builders}
  try:
    for r in range(args.rounds):
      iterators = {name: build(dataset) for name, build in builders.items()}
      for it in iterators.values():
        for _ in range(args.batches):
          next(it)
      time.sleep(args.live)
      names = list(builders)[::1 if r % 2 == 0 else -1]
      for name in names:
        it = iterators.pop(name)
        start = time.perf_counter()
        del it
        gc.collect()
        times[name].append(time.perf_counter() - start)
      print(f'  round {r + 1}/{args.rounds}: ' + ', '.join(
          f'{n} {times[n][-1]:.2f}s' for n in builders), flush=True)
  finally:
    for proc in busy:
      proc.kill()
  rows = [(name, statistics.median(t), min(t), max(t))
          for name, t in times.items()]
  print()
  print(common.format_table(rows, ('delete', 'median s', 'best s',
                                   'worst s')))
  path = common.write_json('iterator_teardown', dict(
      benchmark='iterator_teardown', command=common.command_line(),
      replicas=args.replicas, rounds=args.rounds, live_s=args.live,
      busy=args.busy, delete_seconds=times, machine=info))
  print(f'\nwrote {path}')
  common.exit_now()


if __name__ == '__main__':
  main()
