"""Cost of --skip_corrupt on the training input pipeline (no bad records).

With --skip_corrupt every record goes through its own one-element dataset,
so a decode error drops only that record and is counted (see
efficientnet_tpu/data/pipeline.py). This measures what that costs against
the strict pipeline, on the same clean JPEG TFRecords, alternating in one
process:

  python -m benchmarks.skip_corrupt_cost [--rounds 3] [--batches 40]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import numpy as np
from PIL import Image
import tensorflow as tf

from efficientnet_tpu.config import DataConfig
from efficientnet_tpu.data import pipeline


def _example(image_bytes: bytes, label: int) -> bytes:
  feature = {
      'image/encoded': tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[image_bytes])),
      'image/class/label': tf.train.Feature(
          int64_list=tf.train.Int64List(value=[label])),
  }
  return tf.train.Example(features=tf.train.Features(
      feature=feature)).SerializeToString()


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--batches', type=int, default=40)
  p.add_argument('--batch', type=int, default=32)
  args = p.parse_args()
  data_dir = tempfile.mkdtemp(prefix='bench_skip_')
  rng = np.random.default_rng(0)
  for f in range(4):  # 800 random 500x375 JPEGs (ImageNet-like size).
    with tf.io.TFRecordWriter(f'{data_dir}/train-{f:05d}-of-00004') as w:
      for _ in range(200):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3),
                                     dtype=np.uint8)).save(out, 'JPEG',
                                                           quality=90)
        w.write(_example(out.getvalue(), 1))
  rates = {False: [], True: []}
  for _ in range(args.rounds):
    for skip in (False, True):
      cfg = DataConfig(source='tfrecord', data_dir=data_dir,
                       shuffle_buffer=64, num_train_images=800,
                       skip_corrupt=skip)
      it = iter(pipeline.build_input(cfg, 224, True, args.batch,
                                     num_classes=5).fn(None))
      next(it)  # Fill the buffers.
      start = time.perf_counter()
      for _ in range(args.batches):
        next(it)
      rates[skip].append(args.batches * args.batch /
                         (time.perf_counter() - start))
  ratios = sorted(s / k for s, k in zip(rates[True], rates[False]))
  print('strict images/s:', [round(r) for r in rates[False]])
  print('skip_corrupt images/s:', [round(r) for r in rates[True]])
  print(f'skip_corrupt / strict: median {ratios[len(ratios) // 2]:.3f}, '
        f'range {ratios[0]:.3f}-{ratios[-1]:.3f}')


if __name__ == '__main__':
  main()
