"""Training-step throughput: our EfficientNet-B0 vs keras.applications B0.

Both models run the identical step code: one `tf.function` with forward,
label-smoothed cross entropy, backward and an optimizer update (the same
optimizer class for both, our LARS by default), on the same device, batch,
resolution and precision, fed with constant tensors (no tf.data). Keras'
model is built with raw logits (`classifier_activation=None`); its built-in
input Rescaling + Normalization layers (always present in Keras 3, two
cheap elementwise ops) stay in, a small handicap for Keras. Both have
dropout 0.2 and
stochastic depth (drop-connect) 0.2. Our model uses GroupSyncBatchNormalization
with group size 1 (plain BN outside a replica context).

After tracing and warm-up, timed rounds alternate between the variants in one
process; each round is `--steps` steps followed by one device->host read; the
median round gives images/s. `--mirrored` adds the same step under a
1-replica MirroredStrategy (the Trainer's code path) for both models.

    python -m benchmarks.train_step                       # CPU: 64px/bs64 and 224px/bs32, fp32
    python -m benchmarks.train_step --configs=64:64 --rounds=7 --mirrored
    python -m benchmarks.train_step --device=gpu          # XLA + bf16 default on GPU

Writes benchmarks/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-order
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-order
import keras  # pylint: disable=g-import-not-at-top,wrong-import-order

from efficientnet_tpu import losses  # pylint: disable=g-import-not-at-top
from efficientnet_tpu import model as model_lib  # pylint: disable=g-import-not-at-top
from efficientnet_tpu import optimizers  # pylint: disable=g-import-not-at-top
from efficientnet_tpu.config import ModelConfig, OptimizerConfig  # pylint: disable=g-import-not-at-top

NUM_CLASSES = 1000
LABEL_SMOOTHING = 0.1


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
  p.add_argument('--configs', default=None,
                 help='comma-separated RESOLUTION:BATCH pairs (default CPU '
                      '64:64,224:32; GPU 224:128)')
  p.add_argument('--precision', choices=('fp32', 'bf16'), default=None,
                 help='default fp32 on CPU (bf16 is slower there), bf16 on GPU')
  p.add_argument('--xla', choices=('auto', 'on', 'off'), default='auto',
                 help='jit_compile the step; auto = on for GPU, off for CPU')
  p.add_argument('--optimizer', choices=('lars', 'momentum'), default='lars')
  p.add_argument('--mirrored', action='store_true',
                 help='also time both models under a 1-replica '
                      'MirroredStrategy')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps')
  p.add_argument('--rounds', type=int, default=7, help='timed rounds')
  p.add_argument('--steps', type=int, default=None,
                 help='steps per round (default: >= 64 images per round)')
  p.add_argument('--op_counts', action='store_true',
                 help='print the op types whose counts differ most between '
                      'the two traced steps (profiling aid)')
  p.add_argument('--name', default=None, help='results file stem')
  return p.parse_args()


def _parse_configs(text):
  out = []
  for item in text.split(','):
    try:
      res, batch = (int(v) for v in item.split(':'))
    except ValueError:
      raise SystemExit(f'--configs: expected RESOLUTION:BATCH pairs like '
                       f'64:64,224:32, got {text!r}') from None
    if res < 32 or batch < 1:
      raise SystemExit(f'--configs: expected resolution >= 32 and batch >= '
                       f'1, got {item!r}')
    out.append((res, batch))
  return out


def build_ours(resolution: int, bf16: bool) -> keras.Model:
  cfg = ModelConfig(name='efficientnet-b0', image_size=resolution,
                    num_label_classes=NUM_CLASSES, use_bfloat16=bf16)
  return model_lib.build_model(cfg, bn_group_size=1)


def build_keras(resolution: int, bf16: bool) -> keras.Model:
  previous = keras.config.dtype_policy()
  # keras.applications follows the global policy; restored right after.
  keras.config.set_dtype_policy('mixed_bfloat16' if bf16 else 'float32')
  try:
    return keras.applications.EfficientNetB0(
        weights=None, input_shape=(resolution, resolution, 3),
        classes=NUM_CLASSES,
        classifier_activation=None)
  finally:
    keras.config.set_dtype_policy(previous)


def build_optimizer(kind: str):
  cfg = OptimizerConfig(name=kind, weight_decay=1e-5)
  return optimizers.build_optimizer(cfg, 0.01)


def _loss_and_update(model, optimizer, images, labels):
  with tf.GradientTape() as tape:
    logits = model(images, training=True)
    loss = tf.reduce_mean(losses.smoothed_cross_entropy(
        labels, logits, NUM_CLASSES, LABEL_SMOOTHING))
  grads = tape.gradient(loss, model.trainable_variables)
  optimizer.apply_gradients(zip(grads, model.trainable_variables))
  return loss


def make_plain_step(model, optimizer, jit: bool):
  @tf.function(jit_compile=jit)
  def step(images, labels):
    return _loss_and_update(model, optimizer, images, labels)
  return step


def make_mirrored_step(strategy, model, optimizer, jit: bool):
  replica_fn = lambda x, y: _loss_and_update(model, optimizer, x, y)
  if jit:
    replica_fn = tf.function(replica_fn, jit_compile=True)

  @tf.function
  def step(images, labels):
    loss = strategy.run(replica_fn, args=(images, labels))
    return strategy.reduce('MEAN', loss, axis=None)
  return step


def op_counts(step, images, labels) -> collections.Counter:
  """Op types in the traced step graph, including nested function bodies."""
  graph_def = step.get_concrete_function(images, labels).graph.as_graph_def()
  counts = collections.Counter(n.op for n in graph_def.node)
  for f in graph_def.library.function:
    counts.update(n.op for n in f.node_def)
  return counts


def main():
  args = _parse()
  if args.device == 'gpu':
    gpus = tf.config.list_physical_devices('GPU')
    if not gpus:
      raise SystemExit('--device=gpu: expected a visible GPU, found none '
                       '(use --device=cpu)')
    for g in gpus:
      tf.config.experimental.set_memory_growth(g, True)
  configs = _parse_configs(args.configs or (
      '224:128' if args.device == 'gpu' else '64:64,224:32'))
  bf16 = (args.precision or ('bf16' if args.device == 'gpu' else 'fp32')
          ) == 'bf16'
  jit = {'on': True, 'off': False}.get(args.xla, args.device == 'gpu')
  device = '/gpu:0' if args.device == 'gpu' else '/cpu:0'
  info = common.machine_info()
  print(f'machine: {common.describe_machine(info)}')
  print(f'device {device}, precision {"bf16" if bf16 else "fp32"}, XLA '
        f'{"on" if jit else "off"}, optimizer {args.optimizer}', flush=True)

  results = []
  for resolution, batch in configs:
    steps = args.steps or max(1, -(-64 // batch))
    rng = np.random.default_rng(0)
    with tf.device(device):
      # float32 for both models also in bf16 mode: each casts in its first
      # layer (the Keras model's Input is float32 under any policy).
      images = tf.constant(rng.normal(
          size=(batch, resolution, resolution, 3)).astype(np.float32))
      labels = tf.constant(rng.integers(0, NUM_CLASSES, batch), tf.int32)

    variants, params, traces, counts = {}, {}, {}, {}
    strategies = [('', None)]
    if args.mirrored:
      strategies.append((' mirrored1',
                         tf.distribute.MirroredStrategy(
                             [device],
                             cross_device_ops=tf.distribute
                             .ReductionToOneDevice())))
    for suffix, strategy in strategies:
      for label, build in (('ours', build_ours), ('keras', build_keras)):
        name = label + suffix
        scope = (strategy.scope() if strategy is not None
                 else tf.device(device))
        with scope:
          model = build(resolution, bf16)
          optimizer = build_optimizer(args.optimizer)
          optimizer.build(model.trainable_variables)
        params[name] = int(sum(np.prod(v.shape)
                               for v in model.trainable_variables))
        step = (make_plain_step(model, optimizer, jit) if strategy is None
                else make_mirrored_step(strategy, model, optimizer, jit))
        start = time.perf_counter()
        with tf.device(device):
          step(images, labels).numpy()
        traces[name] = time.perf_counter() - start
        for _ in range(args.warmup):
          step(images, labels).numpy()
        print(f'{resolution}px bs{batch} {name}: {params[name]:,} trainable '
              f'params, trace + first step {traces[name]:.1f}s', flush=True)
        if args.op_counts and strategy is None:
          counts[label] = op_counts(step, images, labels)

        def run(step=step):
          with tf.device(device):
            for _ in range(steps):
              loss = step(images, labels)
            loss.numpy()
        variants[name] = run

    if counts:
      ours, ref = counts['ours'], counts['keras']
      print(f'op counts (step graph): ours {sum(ours.values())}, keras '
            f'{sum(ref.values())}; largest differences:')
      diff = sorted(set(ours) | set(ref),
                    key=lambda k: -abs(ours[k] - ref[k]))[:15]
      for k in diff:
        print(f'  {k:<32}{ours[k]:>6}{ref[k]:>6}')

    print(f'{resolution}px bs{batch}: {args.rounds} alternating rounds x '
          f'{steps} steps', flush=True)
    times = common.alternating_rounds(variants, args.rounds)
    for name in variants:
      s = common.summarize(times[name], steps * batch)
      kind = 'ours' if name.startswith('ours') else 'keras'
      other = name.replace(kind, 'keras' if kind == 'ours' else 'ours', 1)
      results.append(dict(
          resolution=resolution, batch=batch, variant=name, model=kind,
          mirrored=name.endswith('mirrored1'), steps_per_round=steps,
          trainable_params=params[name], trace_seconds=traces[name],
          _other=other, **s))
    # ratio ours / keras for matching variants, from the round medians
    for r in results:
      if r['resolution'] == resolution and r['batch'] == batch and (
          '_other' in r):
        match = [o for o in results if o['resolution'] == resolution and
                 o['batch'] == batch and o['variant'] == r['_other']]
        r['ours_over_keras'] = (
            r['images_per_second'] / match[0]['images_per_second']
            if r['model'] == 'ours' else
            match[0]['images_per_second'] / r['images_per_second'])
        # Per-round ratios: both variants ran back to back in each round.
        a = r['durations'] if r['model'] == 'keras' else match[0]['durations']
        b = match[0]['durations'] if r['model'] == 'keras' else r['durations']
        r['ours_over_keras_per_round'] = [x / y for x, y in zip(a, b)]
        del r['_other']

  rows = [(f'{r["resolution"]}px bs{r["batch"]}', r['variant'],
           r['images_per_second'], r['images_per_second_worst'],
           r['images_per_second_best'], r['ours_over_keras'],
           min(r['ours_over_keras_per_round']),
           max(r['ours_over_keras_per_round']), r['trace_seconds'])
          for r in results]
  print()
  print(common.format_table(
      rows, ('config', 'variant', 'img/s', 'worst', 'best', 'ours/keras',
             'ratio min', 'ratio max', 'trace s')))
  path = common.write_json(
      args.name or f'train_step_{args.device}',
      dict(benchmark='train_step', device=args.device,
           precision='bf16' if bf16 else 'fp32', xla=jit,
           optimizer=args.optimizer, rounds=args.rounds, warmup=args.warmup,
           command=common.command_line(), results=results,
           machine=info))
  print(f'\nwrote {path}')


if __name__ == '__main__':
  main()
