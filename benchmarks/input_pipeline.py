"""Input pipeline throughput: bare JPEG decode vs the full training pipeline.

Writes (or reuses) TFRecords of synthetic JPEGs shaped like ImageNet's
(`--images imagenet`, the default: the common train shapes, mean ~381x453,
~0.6 bytes/pixel) or small 256x320 ones (`--images small`), or reads a real
ImageNet TFRecord directory (`--data_dir` holding train-*), then measures
images/sec per core and process CPU time per image of
  (a) decode: read + parse + `tf.io.decode_jpeg` of the whole image,
  (b) full:   the real training pipeline (`data.pipeline.build_input`):
              read, byte-count check, parse, payload check, fused random
              crop + decode, flip, resize, round to uint8, batch; once with
              bicubic (the default) and once with --resize_method=bilinear.
Images stay uint8 (normalization runs on the accelerator). Everything runs
on a private tf.data pool of `--threads` threads, so per-core = images/sec
/ threads. Target: full >= 0.75 x decode. The configurations are measured
in turn for `--rounds` rounds and the medians are printed: on a shared
machine wall clock is noisy; CPU time per image is steadier.

The ratio depends on the images: decode cost grows with the pixels of the
source JPEG, the resize cost with the 224x224 output, so small sources
give a lower ratio (docs/input_pipeline.md has both).

  python -m benchmarks.input_pipeline [--images imagenet|small]
      [--data_dir DIR] [--threads 1] [--seconds 5] [--rounds 3]
  python -m benchmarks.input_pipeline --resize_table --seconds 1.5
      (resize of single crops from uint8 vs float32 input only)
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image
import tensorflow as tf

from efficientnet_tpu import fileio  # pylint: disable=g-import-not-at-top
from efficientnet_tpu.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
from efficientnet_tpu.config import DataConfig  # pylint: disable=g-import-not-at-top


# (height, width, share): the common shapes of ImageNet train JPEGs (most
# were stored with a long side of 500). Mean about 381x453 (height x
# width), near the 469x387 (width x height) average that Chrabaszcz et al.
# 2017 (arXiv 1707.08819) report for ImageNet.
IMAGENET_SHAPES = ((375, 500, 0.40), (333, 500, 0.20), (500, 375, 0.15),
                   (300, 400, 0.10), (500, 500, 0.05), (500, 333, 0.05),
                   (225, 300, 0.05))
# The 256x320 set earlier versions of this benchmark used: small images,
# where the fixed per-image resize weighs most.
SMALL_SHAPES = ((256, 320, 1.0),)
IMAGE_SETS = {'imagenet': (IMAGENET_SHAPES, 24.0),
              'small': (SMALL_SHAPES, 8.0)}


def _photo_like(rng: np.random.RandomState, h: int, w: int,
                noise: float = 8.0) -> np.ndarray:
  """Smooth shapes + texture + noise: decodes like a natural photo.

  `noise` (pixel std) sets the entropy: 24 gives ~0.6 bytes per pixel at
  JPEG quality 90, the density of ImageNet's train set (~110 KB per image
  at ~180k pixels); 8 gives ~0.33.
  """
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  channels = []
  for _ in range(3):
    f = rng.uniform(0.01, 0.08, 4)
    p = rng.uniform(0, 6.28, 4)
    c = (np.sin(xx * f[0] + p[0]) * np.cos(yy * f[1] + p[1]) * 60 +
         np.sin((xx + yy) * f[2] + p[2]) * 40 +
         np.sin(xx * f[3] * 4 + yy * f[3] * 3 + p[3]) * 15 + 128)
    channels.append(c)
  img = np.stack(channels, -1) + rng.normal(0, noise, (h, w, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def write_records(data_dir: str, num_images: int, num_files: int,
                  shapes=SMALL_SHAPES, noise: float = 8.0) -> None:
  """train-* shards of JPEGs with shapes drawn from `shapes`.

  Skipped when the directory already holds train-* files (records written
  by an earlier run, or a real ImageNet directory given as --data_dir).
  """
  if _train_files(data_dir):
    return
  os.makedirs(data_dir, exist_ok=True)
  rng = np.random.RandomState(0)
  share = np.array([s for _, _, s in shapes], np.float64)
  per_file = num_images // num_files
  for i in range(num_files):
    name = os.path.join(data_dir, f'train-{i:05d}-of-{num_files:05d}')
    with tf.io.TFRecordWriter(name + '.tmp') as w:
      for _ in range(per_file):
        height, width, _ = shapes[rng.choice(len(shapes), p=share / share.sum())]
        buf = io.BytesIO()
        Image.fromarray(_photo_like(rng, height, width, noise)).save(
            buf, 'JPEG', quality=90)
        label = int(rng.randint(1, 1001))
        ex = tf.train.Example(features=tf.train.Features(feature={
            'image/encoded': tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[buf.getvalue()])),
            'image/class/label': tf.train.Feature(
                int64_list=tf.train.Int64List(value=[label])),
        }))
        w.write(ex.SerializeToString())
    # Renamed when complete: an interrupted run leaves no train-* file.
    os.replace(name + '.tmp', name)


def describe(data_dir: str, max_records: int = 1024) -> str:
  """Mean JPEG shape and bytes per pixel of (up to) the first records."""
  files = _train_files(data_dir)
  ds = tf.data.TFRecordDataset(files).take(max_records).map(
      lambda r: tf.io.parse_single_example(r, {
          'image/encoded': tf.io.FixedLenFeature((), tf.string)})[
              'image/encoded'])
  shapes, nbytes = [], 0
  for data in ds:
    shapes.append(tf.image.extract_jpeg_shape(data).numpy()[:2])
    nbytes += len(data.numpy())
  shapes = np.array(shapes, np.float64)
  mean_h, mean_w = shapes.mean(0)
  return (f'{len(files)} files, first {len(shapes)} JPEGs: mean '
          f'{mean_h:.0f}x{mean_w:.0f}, '
          f'{nbytes / np.prod(shapes, 1).sum():.2f} bytes/pixel')


def _train_files(data_dir: str):
  return fileio.list_matching(data_dir, 'train-*')  # data_dir: a name.


def _per_record(data_dir: str, batch: int, threads: int,
                fn) -> tf.data.Dataset:
  """`fn(record)` over the repeated train-* records, batched, on `threads`.

  `fn` returns one value per image: crops (and JPEGs of different shapes)
  are ragged and cannot be batched. This leaves out the copy of the pixels
  into a batch, a cost the full pipeline (b) pays.
  """
  files = _train_files(data_dir)
  ds = tf.data.Dataset.from_tensor_slices(files).repeat()
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=len(files),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.deterministic = False
  return ds.with_options(options)


def decode_only(data_dir: str, batch: int, threads: int) -> tf.data.Dataset:
  """(a): parse + whole-image `decode_jpeg`."""

  def parse(record):
    f = tf.io.parse_single_example(record, {
        'image/encoded': tf.io.FixedLenFeature((), tf.string),
        'image/class/label': tf.io.FixedLenFeature((), tf.int64)})
    image = tf.io.decode_jpeg(f['image/encoded'], channels=3)
    return image[0, 0, 0], f['image/class/label']

  return _per_record(data_dir, batch, threads, parse)


def stage(data_dir: str, batch: int, threads: int, image_size: int,
          resize_method: str = '') -> tf.data.Dataset:
  """Crop-decode (+ flip + resize to uint8) alone, for the breakdown."""
  from efficientnet_tpu.data import preprocessing  # pylint: disable=g-import-not-at-top

  def fn(record):
    data = tf.io.parse_single_example(record, {
        'image/encoded': tf.io.FixedLenFeature((), tf.string)})[
            'image/encoded']
    image = preprocessing.decode_and_crop(
        data, lambda s: preprocessing.random_crop_window(s, image_size))
    if resize_method:
      image = tf.image.random_flip_left_right(image)
      image = preprocessing.resize(image, image_size, resize_method)
    return image[0, 0, 0]

  return _per_record(data_dir, batch, threads, fn)


def measure(ds: tf.data.Dataset, batch: int, seconds: float,
            warmup_batches: int = 10):
  """(images/sec wall-clock, process CPU ms per image)."""
  it = iter(ds)
  for _ in range(warmup_batches):
    next(it)
  n, start, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    next(it)
    n += 1
  images = n * batch
  return (images / (time.perf_counter() - start),
          (time.process_time() - cpu) / images * 1e3)


RESIZE_CROPS = ((120, 150), (200, 260), (300, 330), (350, 450))


def resize_table(image_size: int, threads: int, seconds: float,
                 rounds: int) -> None:
  """CPU ms per image of resizing one crop from uint8 vs from float32.

  `preprocessing.resize` casts to float32 first; this is the measurement
  behind that choice. Each variant maps over one constant crop (so the
  figures include a small, equal tf.data cost per image).
  """
  rng = np.random.RandomState(0)
  crops = {hw: rng.randint(0, 256, hw + (3,)).astype(np.uint8)
           for hw in RESIZE_CROPS}

  def resized(method, dtype):
    def fn(crop):
      image = tf.image.resize(tf.cast(crop, dtype), [image_size, image_size],
                              method=method, antialias=False)
      return image[0, 0, 0]
    return fn

  variants = {(m, d): resized(m, d) for m in ('bicubic', 'bilinear')
              for d in (tf.uint8, tf.float32)}
  runs = {}
  batch = 64
  for _ in range(rounds):
    for hw, crop in crops.items():
      for key, fn in variants.items():
        ds = tf.data.Dataset.from_tensors(crop).repeat().map(fn).batch(batch)
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        runs.setdefault((hw,) + key, []).append(
            measure(ds.with_options(options), batch, seconds, 3)[1])
  print(f'resize to {image_size} only, CPU ms/img, median of {rounds} '
        f'rounds x {seconds:g} s (float32 in: the cast is included)')
  print(f'{"crop":>9s}  {"bicubic uint8":>14s}{"float32":>9s}'
        f'{"bilinear uint8":>16s}{"float32":>9s}')
  for hw in RESIZE_CROPS:
    cells = [float(np.median(runs[(hw, m, d)]))
             for m in ('bicubic', 'bilinear') for d in (tf.uint8, tf.float32)]
    print(f'{hw[0]:4d}x{hw[1]:<4d}  {cells[0]:14.3f}{cells[1]:9.3f}'
          f'{cells[2]:16.3f}{cells[3]:9.3f}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', default='imagenet',
                      choices=sorted(IMAGE_SETS),
                      help='shapes and density of the synthetic JPEGs')
  parser.add_argument('--data_dir', default='',
                      help='TFRecords to read (train-*); written there when '
                      'absent. Default: a temp directory per --images set')
  parser.add_argument('--num_images', type=int, default=1024)
  parser.add_argument('--num_files', type=int, default=8)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--threads', type=int, default=1)
  parser.add_argument('--seconds', type=float, default=5.0,
                      help='per configuration and round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--augment', default='none')
  parser.add_argument('--resize_table', action='store_true',
                      help='only time resizing single crops from uint8 vs '
                      'float32 input')
  args = parser.parse_args(argv)
  if args.resize_table:
    resize_table(args.image_size, args.threads, args.seconds, args.rounds)
    return

  shapes, noise = IMAGE_SETS[args.images]
  if not args.data_dir:
    args.data_dir = os.path.join(tempfile.gettempdir(),
                                 f'efficientnet_tpu_bench_{args.images}')
  write_records(args.data_dir, args.num_images, args.num_files, shapes,
                noise)
  size, batch, threads = args.image_size, args.batch, args.threads

  def full(method):
    cfg = DataConfig(source='tfrecord', data_dir=args.data_dir,
                     augment_name=args.augment, resize_method=method,
                     shuffle_buffer=256)
    return data_pipeline.build_input(
        cfg, size, True, batch, private_threadpool_size=threads).fn(None)

  configs = {
      'decode': lambda: decode_only(args.data_dir, batch, threads),
      'bicubic': lambda: full('bicubic'),
      'bilinear': lambda: full('bilinear'),
      'crop': lambda: stage(args.data_dir, batch, threads, size),
      'crop+bicubic': lambda: stage(args.data_dir, batch, threads, size,
                                    'bicubic'),
      'crop+bilinear': lambda: stage(args.data_dir, batch, threads, size,
                                     'bilinear'),
  }
  runs = {name: [] for name in configs}
  for _ in range(args.rounds):
    for name, make in configs.items():
      runs[name].append(measure(make(), batch, args.seconds))
  rate = {k: float(np.median([r for r, _ in v])) / threads
          for k, v in runs.items()}
  cpu = {k: float(np.median([c for _, c in v])) for k, v in runs.items()}

  print(f'records: {args.data_dir} ({describe(args.data_dir)})')
  print(f'tf.data threads: {threads}, median of {args.rounds} rounds x '
        f'{args.seconds:g} s')
  print(f'{"":34s}img/s/core  CPU ms/img  ratio to (a): wall   CPU')
  print(f'{"(a) decode_jpeg only:":34s}{rate["decode"]:10.1f}'
        f'{cpu["decode"]:12.3f}')
  for method in ('bicubic', 'bilinear'):
    print(f'{"(b) full train pipeline, " + method + ":":34s}'
          f'{rate[method]:10.1f}{cpu[method]:12.3f}'
          f'{rate[method] / rate["decode"]:19.2f}'
          f'{cpu["decode"] / cpu[method]:6.2f}  (target >= 0.75)')
  print(f'    (uint8 out: crop+flip+resize to {size}+batch, '
        f'augment={args.augment})')
  print('breakdown (no checks, no batching of images):')
  for name, label in (('crop', 'fused crop-decode only:'),
                      ('crop+bicubic', '  + flip + bicubic to uint8:'),
                      ('crop+bilinear', '  + flip + bilinear to uint8:')):
    print(f'    {label:30s}{rate[name]:10.1f}{cpu[name]:12.3f}'
          f'{"":19s}{cpu["decode"] / cpu[name]:6.2f}')


if __name__ == '__main__':
  main()
