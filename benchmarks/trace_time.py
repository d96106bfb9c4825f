"""First-call (trace) time of the replicated train loop on CPU replicas.

Builds the real `train.Trainer` for a tiny EfficientNet on N logical CPU
replicas and times its first `train_loop(2)` call (tracing, iterator set-up
and two steps), then the steady-state step time, for a BN group size and EMA
setting. One configuration per process, as tracing state does not reset.

  python benchmarks/trace_time.py --group_size=2 --ema=0.99
"""

import argparse
import os
import tempfile
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--replicas', type=int, default=4)
  parser.add_argument('--group_size', type=int, default=2)
  parser.add_argument('--ema', type=float, default=0.99)
  args = parser.parse_args()

  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import config as C
  from efficientnet_tpu import distribute
  from efficientnet_tpu import train
  distribute.configure_cpu_devices(args.replicas)
  cfg = C.ExperimentConfig(
      model=C.ModelConfig(width_coefficient=0.25, depth_coefficient=0.25,
                          image_size=32, num_classes=10, dropout_rate=0.0,
                          bn_group_size=args.group_size),
      data=C.DataConfig(num_train_images=2048, num_eval_images=100),
      optimizer=C.OptimizerConfig(
          optimizer='lars', base_learning_rate=1.0, lr_scaling='none',
          lr_schedule='poly', lr_warmup_epochs=0.1,
          moving_average_decay=args.ema),
      distribute=C.DistributeConfig(num_cpu_replicas=args.replicas),
      train=C.TrainConfig(model_dir=tempfile.mkdtemp(), train_batch_size=64,
                          eval_batch_size=64, train_steps=100,
                          iterations_per_loop=5))
  trainer = train.Trainer(cfg, distribute.build_strategy(cfg.distribute))
  start = time.time()
  trainer.train_loop(2)
  first = time.time() - start
  metrics = trainer.train_loop(5)
  print(f'replicas={args.replicas} group_size={args.group_size} '
        f'ema={args.ema}: first call {first:.1f} s, then '
        f'{metrics["step_time_ms"]:.0f} ms/step', flush=True)


if __name__ == '__main__':
  main()
