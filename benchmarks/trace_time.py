"""First-call (trace) time of the replicated train loop on CPU replicas.

Builds the real `train.Trainer` (`experiment.build_trainer`) for a tiny EfficientNet on N logical CPU
replicas and times its first `train_loop(2)` call (tracing, iterator set-up
and two steps), then the steady-state step time, for a BN group size and EMA
setting. One configuration per process, as tracing state does not reset.

  python -m benchmarks.trace_time --group_size=2 [--no-ema]
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
  args = parser.parse_args()

  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # pylint: disable=g-import-not-at-top
  from benchmarks import common
  from efficientnet_tpu import distribute
  from efficientnet_tpu import experiment
  distribute.configure_cpu_devices(args.replicas)
  cfg = common.experiment_config(
      tempfile.mkdtemp(prefix='bench_trace_'), num_replicas=args.replicas,
      batch=64, width=0.25, depth=0.25, image_size=32, num_classes=10,
      bn_group_size=args.group_size, ema=args.ema, dropout=0.0)
  trainer = experiment.build_trainer(
      cfg, distribute.build_strategy(cfg.distribute))
  start = time.time()
  trainer.train_loop(2)
  first = time.time() - start
  metrics = trainer.train_loop(5)
  print(f'replicas={args.replicas} group_size={args.group_size} '
        f'ema={args.ema}: first call {first:.1f} s, then '
        f'{metrics["step_time_ms"]:.0f} ms/step', flush=True)


if __name__ == '__main__':
  main()
