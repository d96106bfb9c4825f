"""Training step time of group-synchronized BN vs Keras synchronized BN.

A small EfficientNet trains on N logical CPU replicas (MirroredStrategy) with
our GroupSyncBatchNormalization at several group sizes and with
`keras.layers.BatchNormalization(synchronized=True)`, swapped in through
`model.build_model(batch_norm_fn=...)` (see `bn_variants`). All variants
live in one process; after a warm-up the timed rounds alternate between
variants, and the median ms/step is reported.

    python -m benchmarks.group_bn                # defaults: ~5 min, 2 cores
    python -m benchmarks.group_bn --group_sizes=1,2,4,8 --rounds=7

Keras' synchronized BN calls `ReplicaContext.all_reduce`, whose
`tf.custom_gradient` walks the whole multi-replica graph once per reduction
in the backward pass; tracing the step then takes minutes (about 4.5 min on
4 CPU replicas for this model, ~10x ours). Unless --stock_keras_trace is
given, the Keras variant is traced with that walk cut off (the forward and
backward collectives it runs are unchanged), so that the benchmark finishes;
only the steady-state step time is compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from efficientnet_tpu import distribute  # pylint: disable=g-import-not-at-top


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--replicas', type=int, default=8)
  p.add_argument('--width', type=float, default=0.25)
  p.add_argument('--depth', type=float, default=0.25)
  p.add_argument('--image_size', type=int, default=64)
  p.add_argument('--per_replica_batch', type=int, default=8)
  p.add_argument('--group_sizes', default='1,2,8',
                 help='comma-separated group sizes for our layer')
  p.add_argument('--no_keras_sync', action='store_true',
                 help='skip keras BatchNormalization(synchronized=True)')
  p.add_argument('--stock_keras_trace', action='store_true',
                 help='trace Keras sync BN with the stock all_reduce gradient '
                      '(very slow to trace, same step time)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--steps', type=int, default=4, help='steps per round')
  return p.parse_args()


def _cheap_all_reduce_gradient():
  """Patches ReplicaContext.all_reduce so its gradient does not walk the graph.

  Same collectives forward and backward; only the trace-time variable search
  of tf.custom_gradient is bounded by a stop_gradient.
  """
  cls = tf.distribute.ReplicaContext
  stock = cls.all_reduce

  def all_reduce(self, reduce_op, value, options=None):
    @tf.custom_gradient
    def reduce(*xs):
      ys = stock(self, reduce_op, [tf.stop_gradient(x) for x in xs], options)
      return ys, lambda *dys: all_reduce(self, reduce_op, list(dys), options)
    flat = tf.nest.flatten(value)
    return tf.nest.pack_sequence_as(value, reduce(*flat))

  cls.all_reduce = all_reduce
  return lambda: setattr(cls, 'all_reduce', stock)


def main():
  args = _parse()
  devices = distribute.configure_cpu_devices(args.replicas)
  # Imported after the CPU split: Keras may touch devices on import.
  import keras  # pylint: disable=g-import-not-at-top
  from benchmarks import bn_variants  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu.config import ModelConfig  # pylint: disable=g-import-not-at-top

  strategy = tf.distribute.MirroredStrategy(
      devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
  r, b, s = args.replicas, args.per_replica_batch, args.image_size
  cfg = ModelConfig(width_coefficient=args.width,
                    depth_coefficient=args.depth, image_size=s,
                    num_label_classes=100)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(r, b, s, s, 3)).astype(np.float32)
  labels = rng.integers(0, cfg.num_label_classes, size=(r, b)).astype(np.int32)
  per_replica = lambda a: strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group]))
  x, y = per_replica(images), per_replica(labels)

  variants = [(f'group g={g}', 'group', g)
              for g in map(int, args.group_sizes.split(','))]
  if not args.no_keras_sync:
    variants.append(('keras sync', 'keras_sync', 0))

  steps = {}
  print(f'{r} CPU replicas x {b} images at {s}px, width {args.width}, depth '
        f'{args.depth}; {os.cpu_count()} cores', flush=True)
  for label, impl, g in variants:
    with strategy.scope():
      model = model_lib.build_model(
          cfg, bn_group_size=g, batch_norm_fn=bn_variants.batch_norm_fn(impl))
      optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
      optimizer.build(model.trainable_variables)

    def make_step(model, optimizer):
      @tf.function
      def step(x, y):
        def fn(x, y):
          with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
          grads = tape.gradient(loss, model.trainable_variables)
          # The optimizer all-reduces the gradients with
          # ReplicaContext.all_reduce; stop_gradient bounds the trace-time
          # graph walk of its custom gradient (119 s -> 49 s to trace).
          grads = [tf.stop_gradient(g) for g in grads]
          optimizer.apply_gradients(zip(grads, model.trainable_variables))
          return loss
        return strategy.reduce('MEAN', strategy.run(fn, args=(x, y)), None)
      return step

    step = make_step(model, optimizer)
    restore = (_cheap_all_reduce_gradient()
               if impl == 'keras_sync' and not args.stock_keras_trace
               else lambda: None)
    t0 = time.perf_counter()
    try:
      step(x, y).numpy()
    finally:
      restore()
    print(f'  {label}: traced + first step in {time.perf_counter() - t0:.1f}s',
          flush=True)
    for _ in range(args.warmup):
      step(x, y).numpy()
    steps[label] = step

  times = {label: [] for label in steps}
  for _ in range(args.rounds):
    for label, step in steps.items():
      t0 = time.perf_counter()
      for _ in range(args.steps):
        loss = step(x, y)
      loss.numpy()
      times[label].append((time.perf_counter() - t0) / args.steps)

  base = statistics.median(times[variants[0][0]])
  print(f'\nmedian of {args.rounds} alternating rounds x {args.steps} steps '
        f'(global batch {r * b})')
  print(f'{"variant":<14}{"ms/step":>10}{"images/s":>10}{"relative":>10}'
        f'{"min ms":>9}{"max ms":>9}')
  for label, ts in times.items():
    med = statistics.median(ts)
    print(f'{label:<14}{med * 1e3:>10.1f}{r * b / med:>10.1f}'
          f'{med / base:>10.2f}{min(ts) * 1e3:>9.1f}{max(ts) * 1e3:>9.1f}')


if __name__ == '__main__':
  main()
