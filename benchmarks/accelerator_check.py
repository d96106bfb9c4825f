"""One command that checks the accelerator paths on this machine's devices.

On a machine with GPUs it runs, through the real `train.Trainer` on a
MirroredStrategy over all GPUs (what `--strategy=gpu` builds):
  1. device discovery (names, compute capability);
  2. EfficientNet-B0 at 224 px with default flags, float32 and bfloat16,
     XLA off (the GPU default) and on (`--jit_compile=true`: forward and
     backward pass compiled), each for a few hundred steps: first call
     (trace + compile) and steady images/s;
  3. exact evaluation (every image counted once), a checkpoint, and a resume
     into a new Trainer that must restore the same step and weights;
  4. our B0 training step vs keras.applications.EfficientNetB0 with the same
     LARS step, alternating in one process (benchmarks/train_step.py's
     steps, on one device);
and prints one table. Each check that fails is reported in its row, not
raised. On a machine without GPUs, `--quick` runs the same checks with a
scaled-down model on 2 CPU replicas (1 where XLA is on); the test suite runs
it.

    python -m benchmarks.accelerator_check            # GPU: ~10-20 min
    python -m benchmarks.accelerator_check --quick    # CPU smoke, ~2 min

Writes benchmarks/results/accelerator_check.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import traceback

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='scaled-down model on CPU replicas (no GPU needed)')
  p.add_argument('--steps', type=int, default=300,
                 help='training steps per variant (after the first call)')
  p.add_argument('--batch_per_replica', type=int, default=128)
  p.add_argument('--rounds', type=int, default=5,
                 help='alternating rounds of the keras.applications race')
  p.add_argument('--results_dir', default=common.RESULTS_DIR)
  p.add_argument('--variants', default=None,
                 help="'all' (float32 and bfloat16, XLA off and on; the "
                 "default) or 'corners' (float32 XLA off, bfloat16 XLA on; "
                 'the default with --quick)')
  args = p.parse_args()
  if args.quick:
    args.steps, args.batch_per_replica, args.rounds = 6, 8, 3
  if args.variants is None:
    args.variants = 'corners' if args.quick else 'all'
  if args.variants not in ('all', 'corners'):
    raise SystemExit(f"--variants: expected 'all' or 'corners', got "
                     f'{args.variants!r}')
  return args


def discover(tf):
  """Devices as (kind, name, details) rows."""
  rows = []
  for d in tf.config.list_physical_devices('GPU'):
    details = tf.config.experimental.get_device_details(d)
    rows.append(('GPU', details.get('device_name', d.name),
                 f"compute capability {details.get('compute_capability')}"))
  if not rows:
    rows.append(('CPU', common.describe_machine(common.machine_info()), ''))
  return rows


def _config(model_dir, args, num_replicas, bf16, jit, quick):
  from efficientnet_tpu import config as config_lib  # pylint: disable=g-import-not-at-top
  batch = args.batch_per_replica * num_replicas
  model = dict(use_bfloat16=bf16)
  if quick:
    model.update(width_coefficient=0.1, depth_coefficient=0.1, image_size=32,
                 num_label_classes=10)
  return config_lib.ExperimentConfig.from_settings(
      **model, data='synthetic', num_train_images=batch * 100,
      num_eval_images=3 * batch + 5, optimizer='lars', base_learning_rate=1.0,
      lr_scaling='none', lr_schedule='poly', lr_warmup_epochs=1.0,
      moving_average_decay=0.999, num_cpu_replicas=num_replicas,
      model_dir=model_dir, train_batch_size=batch, eval_batch_size=batch,
      train_steps=10**6, jit_compile='true' if jit else 'false')


def check_variant(tf, strategy_fn, cfg, steps):
  """Trains, evaluates, checkpoints and resumes; returns a result row."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import experiment  # pylint: disable=g-import-not-at-top
  row = {}
  # Time the step, not image synthesis: one cached batch per replica.
  trainer = experiment.build_trainer(
      cfg, strategy_fn(), input_for_step=common.cached_train_input(cfg))
  row['xla'] = trainer.jit_compile
  start = time.perf_counter()
  first = trainer.train_loop(2)
  row['first_call_s'] = time.perf_counter() - start
  start = time.perf_counter()
  metrics = trainer.train_loop(steps)
  elapsed = time.perf_counter() - start
  row['images_per_second'] = steps * cfg.train.train_batch_size / elapsed
  row['ms_per_step'] = 1e3 * elapsed / steps
  row['loss'] = metrics['loss']
  assert np.isfinite([first['loss'], metrics['loss']]).all(), 'loss not finite'
  ev = experiment.evaluator_for(trainer).evaluate()  # The real eval set.
  row['eval_images'] = ev['num_examples']
  assert ev['num_examples'] == cfg.data.num_eval_images, ev
  trainer.save_checkpoint()
  # Weights and BN statistics.
  floats = lambda t: [v for v in t.model.variables
                      if tf.as_dtype(v.dtype).is_floating]
  saved = [v.numpy() for v in floats(trainer)]
  resumed = experiment.build_trainer(cfg, strategy_fn())
  assert resumed.restore() == trainer.global_step
  for got, want in zip(floats(resumed), saved):
    np.testing.assert_array_equal(got.numpy(), want)
  resumed.train_loop(2)
  row['resume'] = 'ok'
  return row


def keras_race(tf, args, quick):
  """Our B0 step vs keras.applications B0, one device, same LARS step."""
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  resolution = 32 if quick else 224
  batch = args.batch_per_replica
  images = tf.random.uniform((batch, resolution, resolution, 3))
  labels = tf.random.uniform((batch,), 0, train_step.NUM_CLASSES, tf.int32)
  steps = {}
  for name, build in (('ours', train_step.build_ours),
                      ('keras.applications', train_step.build_keras)):
    model = build(resolution, False)
    step = train_step.make_plain_step(
        model, train_step.build_optimizer('lars'), jit=False)
    step(images, labels).numpy()  # Trace and first step.
    steps[name] = lambda s=step: [s(images, labels) for _ in range(3)][-1]\
        .numpy()
  times = common.alternating_rounds(steps, args.rounds, log=None)
  ratios = sorted(k / o for k, o in zip(times['keras.applications'],
                                        times['ours']))
  return {'ours_ms_per_step': 1e3 * statistics.median(times['ours']) / 3,
          'keras_ms_per_step':
              1e3 * statistics.median(times['keras.applications']) / 3,
          'speed_ratio_median': statistics.median(ratios),
          'speed_ratio_range': [ratios[0], ratios[-1]]}


def main():
  args = _parse()
  from efficientnet_tpu import stack  # pylint: disable=g-import-not-at-top
  try:
    found = stack.check()
  except stack.UnsupportedStack as e:
    raise SystemExit(f'accelerator_check: error: {e}') from None
  # The table is only comparable with the stack it ran on.
  print(f'Stack: {stack.describe(found)}', flush=True)
  from efficientnet_tpu import distribute  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = tf.config.list_physical_devices('GPU')
  if not gpus and not args.quick:
    raise SystemExit('accelerator_check: expected a visible GPU, found none '
                     '(use --quick for the CPU smoke mode)')
  if not gpus:
    distribute.configure_cpu_devices(2)
  devices = discover(tf)
  for kind, name, details in devices:
    print(f'{kind}: {name} {details}', flush=True)

  def strategy_fn(xla):
    if gpus:
      return tf.distribute.MirroredStrategy(
          [d.name for d in tf.config.list_logical_devices('GPU')])
    # CPU: XLA cannot span logical CPU replicas, so XLA rows use one.
    return tf.distribute.MirroredStrategy(
        ['/cpu:0'] if xla else ['/cpu:0', '/cpu:1'],
        cross_device_ops=tf.distribute.ReductionToOneDevice())

  root = tempfile.mkdtemp(prefix='accelerator_check_')
  rows = []
  combos = [(False, None), (False, True), (True, None), (True, True)]
  if args.variants == 'corners':
    combos = [(False, None), (True, True)]
  for bf16, jit in combos:
    name = (f'B0 {"bfloat16" if bf16 else "float32"} '
            f'{"--jit_compile=true" if jit else "default flags"}')
    n = len(gpus) or (1 if jit else 2)
    cfg = _config(os.path.join(root, name.replace(' ', '_')), args, n,
                  bf16, jit, args.quick)
    row = dict(variant=name, replicas=n,
               global_batch=cfg.train.train_batch_size)
    try:
      row.update(check_variant(tf, lambda j=jit: strategy_fn(j), cfg,
                               args.steps))
      row['status'] = 'ok'
    except Exception as e:  # pylint: disable=broad-except
      row['status'] = f'FAIL {type(e).__name__}: {str(e).splitlines()[0]}'
      traceback.print_exc()
    print(f'{name}: {row["status"]}', flush=True)
    rows.append(row)
  try:
    race = keras_race(tf, args, args.quick)
  except Exception as e:  # pylint: disable=broad-except
    race = {'status': f'FAIL {type(e).__name__}: {e}'}
    traceback.print_exc()

  table = [(r['variant'], r['replicas'], r['global_batch'],
            r.get('first_call_s', float('nan')),
            r.get('images_per_second', float('nan')),
            r.get('ms_per_step', float('nan')),
            r.get('eval_images', '-'), r.get('resume', '-'), r['status'])
           for r in rows]
  print()
  print(common.format_table(table, (
      'variant', 'replicas', 'batch', 'first call s', 'img/s', 'ms/step',
      'eval images', 'resume', 'status')))
  if 'speed_ratio_median' in race:
    print(f"\nB0 train step, one device, batch {args.batch_per_replica}: ours "
          f"{race['ours_ms_per_step']:.1f} ms, keras.applications "
          f"{race['keras_ms_per_step']:.1f} ms; ours is "
          f"{race['speed_ratio_median']:.2f}x as fast (rounds "
          f"{race['speed_ratio_range'][0]:.2f}-"
          f"{race['speed_ratio_range'][1]:.2f})")
  else:
    print(f"\nkeras.applications race: {race['status']}")
  path = common.write_json('accelerator_check' + ('_quick' if args.quick
                                                  else ''), dict(
      benchmark='accelerator_check', command=common.command_line(),
      devices=devices, rows=rows, keras_race=race,
      machine=common.machine_info()), results_dir=args.results_dir)
  print(f'\nwrote {path}')
  failed = any(r['status'] != 'ok' for r in rows) or 'status' in race
  common.exit_now(1 if failed else 0)


if __name__ == '__main__':
  main()
