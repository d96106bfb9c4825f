"""The small_images preset on a real data set: convert, train, evaluate.

Runs what docs/quickstart.md ("Small images") shows, as a user would, and
prints the figures it records there: wall-clock time of the training
command, the load average around it, and the final eval top-1.

  # MNIST's IDX files, already on disk (nothing is downloaded): the first
  # 12,000 training images and the 10,000 test images as PNG class folders.
  python -m benchmarks.small_images --mnist_idx_dir=/data/mnist \\
      --folder=/tmp/mnist_folder --tfrecord_dir=/tmp/mnist_tfr \\
      --model_dir=/tmp/mnist_run -- --norandom_flip

  # Any ImageNet-style folder (train/<class>/*, val/<class>/*):
  python -m benchmarks.small_images --folder=/data/my_folder \\
      --tfrecord_dir=/tmp/my_tfr --model_dir=/tmp/my_run

  # TFRecords already converted:
  python -m benchmarks.small_images --tfrecord_dir=/tmp/my_tfr \\
      --model_dir=/tmp/my_run

Flags after `--` go to `efficientnet-tpu-train` after the preset (they
override it). Writes benchmarks/results/small_images.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

_IDX = {'train': 'train', 'val': 't10k'}


def read_idx(path):
  """An IDX file (MNIST's format) as a numpy array."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  if data[:2] != b'\0\0' or data[2] != 0x08:
    raise ValueError(f'{path}: not an unsigned-byte IDX file')
  ndim = data[3]
  shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big')
           for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist_folder(idx_dir, folder, num_train=12000, num_val=None):
  """Writes MNIST's IDX files as PNGs in class folders train/ and val/.

  Returns:
    {split: image count}.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  counts = {}
  for split, prefix in _IDX.items():
    images = read_idx(os.path.join(idx_dir, f'{prefix}-images.idx3-ubyte'))
    labels = read_idx(os.path.join(idx_dir, f'{prefix}-labels.idx1-ubyte'))
    n = num_train if split == 'train' else (num_val or len(images))
    for i, (image, label) in enumerate(zip(images[:n], labels[:n])):
      out = os.path.join(folder, split, f'digit_{label}')
      os.makedirs(out, exist_ok=True)
      Image.fromarray(image).save(os.path.join(out, f'{i:05d}.png'))
    counts[split] = min(n, len(images))
  return counts


def _load():
  return os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--mnist_idx_dir',
                      help='folder with MNIST train-images.idx3-ubyte etc.')
  parser.add_argument('--num_train', type=int, default=12000,
                      help='with --mnist_idx_dir: the first N train images')
  parser.add_argument('--folder', help='ImageNet-style folder (written '
                      'from --mnist_idx_dir when given)')
  parser.add_argument('--tfrecord_dir', required=True)
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--preset', default='small_images')
  parser.add_argument('train_flags', nargs='*',
                      help='flags for efficientnet-tpu-train, after --')
  args = parser.parse_args()
  if args.mnist_idx_dir:
    if not args.folder:
      parser.error('--mnist_idx_dir needs --folder to write to')
    print('folder:', mnist_folder(args.mnist_idx_dir, args.folder,
                                  args.num_train), flush=True)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  if args.folder:
    subprocess.run([sys.executable, '-m',
                    'efficientnet_tpu.tools.make_tfrecords',
                    f'--input_dir={args.folder}',
                    f'--output_dir={args.tfrecord_dir}', '--no_progress'],
                   check=True, env=env)
  command = [sys.executable, '-m', 'efficientnet_tpu.main',
             f'--preset={args.preset}', '--data=tfrecord',
             f'--data_dir={args.tfrecord_dir}',
             f'--model_dir={args.model_dir}', *args.train_flags]
  print(' '.join(command), flush=True)
  load_before = _load()
  start = time.time()
  result = subprocess.run(command, env=env, capture_output=True, text=True)
  wall = time.time() - start
  load_after = _load()
  if result.returncode:
    sys.stderr.write(result.stderr[-4000:])
    sys.exit(result.returncode)
  # The last stdout line is the final metrics as JSON.
  final = json.loads(result.stdout.strip().splitlines()[-1])
  figures = {
      'benchmark': 'small_images', 'command': command[1:],
      'wall_s': round(wall, 1),
      'elapsed_train_s': final.get('elapsed_s'),
      'eval_top_1': final.get('eval/top_1_accuracy'),
      'eval_cross_entropy': final.get('eval/loss'),
      'train_images_per_second': final.get('images_per_second'),
      'load_average_1min': [round(load_before, 2), round(load_after, 2)],
      'machine': f'{platform.machine()}, {os.cpu_count()} CPUs',
      'date': time.strftime('%Y-%m-%d'),
  }
  for key, value in figures.items():
    print(f'{key}: {value}')
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                     'small_images.json')
  with open(out, 'w') as f:
    json.dump(figures, f, indent=2)
  print('wrote', out)


if __name__ == '__main__':
  main()
