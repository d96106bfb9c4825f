"""A small real dataset, offline: scikit-learn's bundled 8x8 digits.

Written as an ImageNet-style folder of PNGs (upsampled, grayscale) and
converted by the real `make_tfrecords` tool into the standard sharded
TFRecord layout, so tests train through the real input pipeline.
"""

import os

import numpy as np
from PIL import Image
from sklearn import datasets

from efficientnet_tpu.tools import make_tfrecords


def write_digits_tfrecords(root, size=32, train_shards=4, validation_shards=3,
                           num_eval=None):
  """Returns (data_dir, num_train, num_eval) of digits TFRecords under root."""
  digits = datasets.load_digits()
  images = (digits.images * (255.0 / 16.0)).astype(np.uint8)
  order = np.random.default_rng(0).permutation(len(images))
  num_eval = num_eval or len(images) // 5
  splits = {'val': order[:num_eval], 'train': order[num_eval:]}
  folder = os.path.join(root, 'digits_folder')
  for split, indices in splits.items():
    for i in indices:
      class_dir = os.path.join(folder, split, f'digit{digits.target[i]}')
      os.makedirs(class_dir, exist_ok=True)
      Image.fromarray(images[i]).resize((size, size), Image.BILINEAR).save(
          os.path.join(class_dir, f'{i:05d}.png'))
  data_dir = os.path.join(root, 'digits_tfrecords')
  make_tfrecords.convert(data_dir, input_dir=folder,
                         train_shards=train_shards,
                         validation_shards=validation_shards, progress=False)
  return data_dir, len(splits['train']), len(splits['val'])
