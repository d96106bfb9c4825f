"""Converts an ImageNet-style folder or a prepared tfds dataset to TFRecords.

Writes the standard sharded layout read by `efficientnet_tpu.data.tfrecord`:
`train-%05d-of-%05d` and `validation-%05d-of-%05d`, each record an
`Example` with image/encoded, image/format, image/filename,
image/height, image/width, image/channels, image/colorspace,
image/class/label (1..N over the sorted synsets), image/class/synset and,
when known, image/class/text. Each record decodes, through the trainer's
checks and decode, to the pixels the exported model's decoder gets from
the original file (`encode_image`): JPEGs are copied byte for byte, other
formats stored as the lossless RGB PNG of serving's decode. Images that
cannot be (corrupt, empty, a format serving cannot decode, over
--max_image_pixels, not a regular file, a non-UTF-8 name) fail the
conversion in one line, or with --on_bad_image=skip are left out, one line
each. Shards get their final names only once every split is written, and
dataset_info.json comes last (`convert`).

Folder input (`--input_dir`):
  train/<synset>/*.JPEG
  val/<synset>/*.JPEG, or val/*.JPEG plus --val_labels, a text file of
  either '<file> <synset>' / '<file>,<synset> ...' lines (as in
  LOC_val_solution.csv) or one synset per line in sorted file order.

tfds input (`--from_tfds=NAME --tfds_data_dir=DIR`): a dataset already
prepared under DIR (never downloaded), or `--from_tfds=image_folder` to read
DIR/<split>/<label>/* with tfds.ImageFolder. Labels become 1 + the tfds
class index; synsets are the tfds class names.

Shard counts default to one shard per 1024 train / 256 validation images,
at most 1024 / 128 (ImageNet's standard layout). A conversion ends by
writing dataset_info.json beside the shards (`data.dataset_info`: record
counts per split and per file, classes, label base) and printing each
split's image and class counts. `--index=DIR` writes dataset_info.json for
shards that already exist (e.g. the standard ImageNet TFRecords): it counts
each file's records from the frame headers and reads every record's
image/class/label (and image/class/synset, image/class/text if present).

Examples:
  efficientnet-tpu-make-tfrecords --input_dir=/data/imagenet \
      --output_dir=/data/imagenet-tfrecords
  efficientnet-tpu-make-tfrecords --index=gs://BUCKET/imagenet
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import fnmatch
import io
import math
import os
import random
import re
import signal
import stat
import sys
import threading
import time
from typing import (Callable, Dict, Iterable, Iterator, List, Optional,
                    Sequence, Set, Tuple)

import numpy as np
from PIL import Image
import tqdm

from efficientnet_tpu import fileio
from efficientnet_tpu.config import DataConfig
from efficientnet_tpu.data import dataset_info as info_lib
from efficientnet_tpu.data import tfrecord

_IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif', '.tif', '.tiff',
                     '.webp')

# (source, synset, label); source is a path or an in-memory (name, bytes).
Item = Tuple[object, str, int]

# Default shard counts: one shard per this many images, at most MAX_SHARDS.
# ImageNet (1,281,167 / 50,000 images) gets its standard 1024 / 128 shards
# (about 140 / 50 MB each). Validation shards are smaller: eval is sharded
# by file over the hosts, and smaller files balance them better.
IMAGES_PER_SHARD = {'train': 1024, 'validation': 256}
MAX_SHARDS = {'train': 1024, 'validation': 128}

# The trainer's default --max_image_pixels: larger images are refused.
DEFAULT_MAX_IMAGE_PIXELS = {
    f.name: f.default for f in dataclasses.fields(DataConfig)
}['max_image_pixels']
ON_BAD_IMAGE = ('fail', 'skip')


class ConversionError(ValueError):
  """A single-line, user-facing error of this tool."""


# ---------------------------------------------------------------------------
# Encoding.
# ---------------------------------------------------------------------------


class BadImage(Exception):
  """An image the trainer or the exported model would not read as it is."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def shown(path: str) -> str:
  """`path` printable on any terminal: bytes that are not UTF-8 (kept by
  os.listdir as surrogates) as backslash escapes."""
  return os.fsencode(path).decode('utf-8', 'backslashreplace')


_FUNCTIONS = {}
_TF_NOISE = re.compile(r'\{\{function_node [^}]*\}\}\s*')


def _tf_functions():
  """(training_decode, serving_decode, encode_png), traced once.

  training_decode(bytes, max_pixels) runs the trainer's own record checks
  (`checks.check_payload`) and decode (`preprocessing.decode_and_crop`)
  over the whole image; serving_decode(bytes, max_pixels) decodes the
  original file as the exported model does (`export.declared_pixels`
  before decoding, `preprocessing.decode_rgb` for what is not JPEG).
  """
  if not _FUNCTIONS:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from efficientnet_tpu import export  # pylint: disable=g-import-not-at-top
    from efficientnet_tpu.data import checks  # pylint: disable=g-import-not-at-top
    from efficientnet_tpu.data import preprocessing  # pylint: disable=g-import-not-at-top

    def whole(shape):
      return tf.stack([0, 0, shape[0], shape[1]])

    def within(pixels, max_pixels):
      return [tf.debugging.Assert(pixels <= max_pixels, [
          'max_image_pixels: the image has', pixels, 'pixels'])]

    spec = [tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64)]

    @tf.function(input_signature=spec)
    def training_decode(encoded, max_pixels):
      with tf.control_dependencies(checks.check_payload(
          encoded, tf.constant(0), tf.constant('record'), False, None,
          max_pixels)):
        return preprocessing.decode_and_crop(encoded, whole)

    @tf.function(input_signature=spec)
    def serving_decode(original, max_pixels):
      with tf.control_dependencies(within(export.declared_pixels(original),
                                          max_pixels)):
        image = tf.cond(
            tf.io.is_jpeg(original),
            lambda: preprocessing.decode_and_crop(original, whole),
            lambda: preprocessing.decode_rgb(original))
      shape = tf.cast(tf.shape(image), tf.int64)
      with tf.control_dependencies(within(shape[0] * shape[1], max_pixels)):
        return tf.identity(image)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def encode_png(image):
      return tf.io.encode_png(image)

    _FUNCTIONS.update(training=training_decode, serving=serving_decode,
                      png=encode_png)
  return _FUNCTIONS['training'], _FUNCTIONS['serving'], _FUNCTIONS['png']


def _bad_decode(error, max_pixels: int) -> BadImage:
  message = _TF_NOISE.sub('', getattr(error, 'message', str(error)))
  if 'max_image_pixels' in message:
    return BadImage(f'more than --max_image_pixels={max_pixels} pixels (the '
                    'trainer and the exported model refuse it)')
  if 'Corrupt, truncated or non-JPEG' in message:
    return BadImage('a corrupt or truncated JPEG')
  # The op's own message: the last line that is not the graph's traceback.
  lines = [l for l in message.splitlines() if l.strip() and not l[0].isspace()
           and not l.startswith(('Graph execution error', 'Detected at node',
                                 '[['))] or [type(error).__name__]
  return BadImage(f'does not decode as the exported model decodes images '
                  f'({lines[-1][:160]})')


def _jpeg_end(data: bytes) -> Optional[int]:
  """Offset just past the end-of-image marker of a JPEG's frame, found by
  walking its marker segments and scans; None if it has none."""
  pos, n = 2, len(data)
  while pos + 2 <= n:
    if data[pos] != 0xFF:
      return None
    marker = data[pos + 1]
    if marker == 0xFF:  # Fill byte.
      pos += 1
    elif marker == 0xD9:
      return pos + 2
    elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # No length field.
      pos += 2
    else:
      if pos + 4 > n:
        return None
      pos += 2 + int.from_bytes(data[pos + 2:pos + 4], 'big')
      if marker == 0xDA:  # Entropy-coded data up to the next real marker.
        while True:
          pos = data.find(b'\xff', pos)
          if pos < 0 or pos + 1 >= n:
            return None
          following = data[pos + 1]
          if following == 0xFF:
            pos += 1
          elif following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
          else:
            break
  return None


def _check_header_size(data: bytes, max_pixels: int) -> None:
  """Refuses an image whose header (as PIL reads it) declares more than
  `max_pixels` pixels, before TensorFlow decodes it: BMP and WebP headers
  are not read by `export.declared_pixels`."""
  too_big = BadImage(f'more than --max_image_pixels={max_pixels} pixels '
                     '(the trainer and the exported model refuse it)')
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
  except Image.DecompressionBombError:  # Far over PIL's own limit.
    raise too_big from None
  except Exception:  # pylint: disable=broad-except
    return  # Not for PIL to judge: TensorFlow's decoders decide.
  if width * height > max_pixels:
    raise too_big


def encode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
                ) -> Tuple[bytes, str, int, int]:
  """(image/encoded, image/format, height, width) of one image file.

  The record decodes, through the trainer's checks and decode, to exactly
  the pixels the exported model's decoder gets from `data`: a JPEG is
  kept byte for byte (cut after its end-of-image marker when more data
  follows, which the trainer's checks would refuse, if that leaves its
  pixels unchanged); any other format is decoded as serving decodes it
  (grayscale replicated, alpha dropped, 16-bit scaled to 8 bits, the
  first GIF frame) and stored as a lossless RGB PNG.

  Raises:
    BadImage: empty, corrupt or truncated data; a format the exported
      model cannot decode (TIFF, 1-bit BMP, ...); more than `max_pixels`
      pixels (by its header, checked before decoding).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not data:
    raise BadImage('an empty file')
  training_decode, serving_decode, encode_png = _tf_functions()
  is_jpeg = data[:3] == b'\xff\xd8\xff'  # tf.io.is_jpeg's test.
  try:
    if is_jpeg:
      stored, served = data, None
      # The trainer's check: an end-of-image marker in the last 32 bytes.
      if b'\xff\xd9' not in data[-32:]:
        end = _jpeg_end(data)
        if end is None:
          raise BadImage('a truncated JPEG (no end-of-image marker)')
        stored = data[:end]
        served = serving_decode(data, max_pixels).numpy()
      decoded = training_decode(stored, max_pixels).numpy()
      if served is not None and not np.array_equal(decoded, served):
        raise BadImage('a JPEG whose data after its end-of-image marker '
                       'changes its pixels')
      return stored, 'JPEG', decoded.shape[0], decoded.shape[1]
    _check_header_size(data, max_pixels)
    served = serving_decode(data, max_pixels)
    stored = encode_png(served).numpy()
    decoded = training_decode(stored, max_pixels).numpy()
  except tf.errors.OpError as e:
    raise _bad_decode(e, max_pixels) from None
  served = served.numpy()
  if not np.array_equal(decoded, served):  # Lossless: never expected.
    raise BadImage('its PNG re-encoding does not decode to its pixels')
  return stored, 'PNG', served.shape[0], served.shape[1]


def make_example(encoded: bytes, filename: str, height: int, width: int,
                 label: int, synset: str, text: str = '',
                 image_format: str = 'JPEG'):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def b(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

  def i(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

  feature = {
      'image/encoded': b(encoded),
      'image/format': b(image_format.encode()),
      'image/filename': b(filename.encode()),
      'image/height': i(height),
      'image/width': i(width),
      'image/channels': i(3),
      'image/colorspace': b(b'RGB'),
      'image/class/label': i(label),
      'image/class/synset': b(synset.encode()),
  }
  if text:
    feature['image/class/text'] = b(text.encode())
  return tf.train.Example(features=tf.train.Features(feature=feature))


# ---------------------------------------------------------------------------
# Listing inputs.
# ---------------------------------------------------------------------------


def _is_image(name: str) -> bool:
  return name.lower().endswith(_IMAGE_EXTENSIONS)


def _listdir(folder: str) -> List[str]:
  try:
    return sorted(os.listdir(folder))
  except OSError as e:
    raise ConversionError(f'{shown(folder)}: could not list it '
                          f'({e.strerror})') from None


def _is_utf8(name: str) -> bool:
  try:
    name.encode('utf-8')
  except UnicodeEncodeError:  # Bytes os.listdir kept as surrogates.
    return False
  return True


def _class_folders(split_dir: str) -> List[str]:
  """Sorted class folder names; one-line errors for folders that cannot be
  named in the records or links that lead nowhere."""
  folders = []
  for name in _listdir(split_dir):
    path = os.path.join(split_dir, name)
    if os.path.isdir(path):
      if not _is_utf8(name):
        raise ConversionError(f'{shown(path)}: class folder name is not '
                              'valid UTF-8 (rename it)')
      folders.append(name)
    elif os.path.islink(path) and not os.path.exists(path):
      raise ConversionError(f'{shown(path)}: a broken symbolic link or a '
                            'symlink loop (fix or remove it)')
  return folders


def _list_class_folders(split_dir: str,
                        labels: Dict[str, int]) -> List[Item]:
  items = []
  for synset in _class_folders(split_dir):
    if synset not in labels:
      raise ConversionError(f'{split_dir}/{synset}: class folder not among the '
                            'training synsets')
    folder = os.path.join(split_dir, synset)
    for name in _listdir(folder):
      if _is_image(name):
        items.append((os.path.join(folder, name), synset, labels[synset]))
  return items


def read_val_labels(path: str, files: Sequence[str]) -> Dict[str, str]:
  """Maps each val file name to its synset from `path` (see module doc)."""
  with open(path) as f:
    rows = [r for r in csv.reader(
        (l.replace(' ', ',', 1) if ',' not in l else l for l in f)) if r]
  if rows and rows[0][0].lower() in ('imageid', 'image', 'filename', 'file'):
    rows = rows[1:]
  if rows and all(len(r) == 1 or not r[1].strip() for r in rows):
    synsets = [r[0].strip() for r in rows]
    if len(synsets) != len(files):
      raise ConversionError(f'--val_labels: expected one synset per val image '
                            f'({len(files)}), got {len(synsets)} lines in '
                            f'{path}')
    return dict(zip(sorted(files), synsets))
  mapping = {}
  for row in rows:
    stem = os.path.splitext(os.path.basename(row[0].strip()))[0]
    mapping[stem] = row[1].strip().split()[0]
  out = {}
  for name in files:
    stem = os.path.splitext(name)[0]
    if stem not in mapping:
      raise ConversionError(f'--val_labels: no synset for {name} in {path}')
    out[name] = mapping[stem]
  return out


def list_folder(input_dir: str, val_labels: Optional[str]
               ) -> Tuple[Dict[str, List[Item]], List[str]]:
  """Returns ({'train': items, 'validation': items}, sorted synsets)."""
  train_dir = os.path.join(input_dir, 'train')
  if not os.path.isdir(train_dir):
    raise ConversionError(f'--input_dir: expected {train_dir} with one folder '
                          'per synset, found none')
  synsets = _class_folders(train_dir)
  if not synsets:
    raise ConversionError(f'--input_dir: expected synset folders in '
                          f'{train_dir}, found none')
  labels = {s: i + 1 for i, s in enumerate(synsets)}
  splits = {'train': _list_class_folders(train_dir, labels)}
  val_dir = next((os.path.join(input_dir, d) for d in ('val', 'validation')
                  if os.path.isdir(os.path.join(input_dir, d))), None)
  if val_dir is not None:
    if _class_folders(val_dir):
      splits['validation'] = _list_class_folders(val_dir, labels)
    else:
      files = [n for n in _listdir(val_dir) if _is_image(n)]
      if files:
        if not val_labels:
          raise ConversionError(f'--val_labels: expected a labels file for the '
                                f'flat folder {val_dir}')
        mapping = read_val_labels(val_labels, files)
        items = []
        for name in files:
          synset = mapping[name]
          if synset not in labels:
            raise ConversionError(f'--val_labels: synset {synset!r} of {name} '
                                  'is not a training synset')
          items.append((os.path.join(val_dir, name), synset, labels[synset]))
        splits['validation'] = items
  return splits, synsets


def _tfds_builder(name: str, data_dir: str):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError('--from_tfds: expected tensorflow-datasets to be '
                          'installed') from None
  if name == 'image_folder':
    if not data_dir or not os.path.isdir(data_dir):
      raise ConversionError('--tfds_data_dir: expected a folder of '
                            f'<split>/<label>/* images, got {data_dir!r}')
    return tfds, tfds.ImageFolder(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConversionError(f'--from_tfds: could not load {name!r} ({first})'
                          ) from None
  if not builder.is_prepared():
    raise ConversionError(f'--tfds_data_dir: expected a prepared {name!r} '
                          f'under {data_dir!r} (this tool never downloads)')
  return tfds, builder


def list_tfds(name: str, data_dir: str
             ) -> Tuple[Dict[str, Iterable[Item]], List[str], Dict[str, int]]:
  """Returns (split -> lazy items, class names, split -> size)."""
  tfds, builder = _tfds_builder(name, data_dir)
  names = list(builder.info.features['label'].names)
  splits_available = list(builder.info.splits.keys())
  chosen = {}
  for ours, theirs in (('train', ('train',)),
                       ('validation', ('validation', 'val', 'test'))):
    split = next((s for s in theirs if s in splits_available), None)
    if split is not None:
      chosen[ours] = split
  if 'train' not in chosen:
    raise ConversionError(f'--from_tfds: expected a train split in {name!r}, '
                          f'found {", ".join(splits_available)}')

  def items(split: str) -> Iterator[Item]:
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    for i, ex in enumerate(tfds.as_numpy(ds)):
      label = int(ex['label'])
      fname = ex.get('image/filename', b'')
      fname = fname.decode() if isinstance(fname, bytes) and fname else (
          f'{split}_{i:08d}.JPEG')
      yield (os.path.basename(fname), bytes(ex['image'])), names[label], (
          label + 1)

  sizes = {ours: builder.info.splits[s].num_examples
           for ours, s in chosen.items()}
  return ({ours: items(s) for ours, s in chosen.items()}, names, sizes)


# ---------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------


def _shard_bounds(n: int, num_shards: int) -> List[Tuple[int, int]]:
  return [(n * i // num_shards, n * (i + 1) // num_shards)
          for i in range(num_shards)]


def _read_source(path: str) -> bytes:
  """The bytes of an image file; BadImage for what is not a readable,
  regular file (a directory named like an image, a FIFO, a symlink loop)."""
  try:
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
      raise BadImage('a directory, not an image file')
    if not stat.S_ISREG(mode):
      raise BadImage('not a regular file')
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    raise BadImage(f'could not read it ({e.strerror})') from None


def _encode(item: Item, texts: Dict[str, str], max_pixels: int):
  """The serialized Example of `item`, or (where, reason) of a bad image."""
  source, synset, label = item
  if isinstance(source, tuple):
    filename, data = source
    where = filename
  else:
    filename, where = os.path.basename(source), shown(source)
  try:
    if not _is_utf8(filename):
      raise BadImage('its name is not valid UTF-8 (rename it)')
    if not isinstance(source, tuple):
      data = _read_source(source)
    encoded, image_format, height, width = encode_image(data, max_pixels)
  except BadImage as e:
    return where, e.reason
  return make_example(encoded, filename, height, width, label, synset,
                      texts.get(synset, ''),
                      image_format).SerializeToString()


def _encoded_in_order(items: Iterable[Item], texts: Dict[str, str],
                      num_threads: int, max_pixels: int, chunk: int = 256
                     ) -> Iterator[Tuple[Item, object]]:
  """(item, record or (where, reason)) in order, encoded on `num_threads`
  threads with bounded memory; queued work is cancelled on an error."""
  pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
  encode = lambda it: _encode(it, texts, max_pixels)  # pylint: disable=unnecessary-lambda-assignment
  try:
    batch = []
    for item in items:
      batch.append(item)
      if len(batch) == chunk:
        yield from zip(batch, pool.map(encode, batch))
        batch = []
    yield from zip(batch, pool.map(encode, batch))
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def default_num_shards(num_images: int, split: str) -> int:
  """Shards for `num_images` of `split` ('train' or 'validation'): one per
  IMAGES_PER_SHARD images, at least 1, at most MAX_SHARDS (and so never
  more than the images)."""
  return max(1, min(MAX_SHARDS[split],
                    math.ceil(num_images / IMAGES_PER_SHARD[split])))


def partial_name(name: str) -> str:
  """Where shard `name` is written until the whole conversion succeeds: a
  hidden name that no `train-*` / `validation-*` pattern matches, so that
  neither the trainer nor `--index` takes it for a shard."""
  return f'.{name}.partial'


@dataclasses.dataclass
class Shard:
  """One shard written under its partial name: renamed in `commit`."""
  partial: str
  final: str
  records: int


def write_split(items: Iterable[Item], num_items: int, output_dir: str,
                prefix: str, num_shards: int, num_threads: int,
                texts: Dict[str, str], progress: bool = True,
                labels_seen: Optional[Set[int]] = None,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                on_bad_image: str = 'fail',
                skipped: Optional[List[Tuple[str, str]]] = None,
                report: Optional[Callable[[str], None]] = None
               ) -> List[Shard]:
  """Streams `num_items` items into `num_shards` partial files.

  Items are decoded / re-encoded on worker threads (`encode_image`); shard
  i holds the good ones of items [n i / shards, n (i + 1) / shards), in
  order. The labels written are added to `labels_seen`. A bad image
  raises ConversionError naming it (`on_bad_image='fail'`) or is left
  out, added to `skipped` as (file, reason) and reported in one line
  (`'skip'`). Nothing gets its final name here: see `commit`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  flag = 'train_shards' if prefix == 'train' else 'validation_shards'
  if num_shards < 1:
    raise ConversionError(f'--{flag}: expected an integer >= 1, got '
                          f'{num_shards}')
  if num_items < num_shards:
    raise ConversionError(f'--{flag}: expected at most one shard per image '
                          f'({num_items} {prefix} images), got {num_shards}')
  report = report or _report
  names = [f'{prefix}-{i:05d}-of-{num_shards:05d}' for i in range(num_shards)]
  shards = [Shard(os.path.join(output_dir, partial_name(n)),
                  os.path.join(output_dir, n), 0) for n in names]
  ends = [end for _, end in _shard_bounds(num_items, num_shards)]
  shard, count, writer = 0, 0, None
  # Everything from the first file's creation on is inside the try: a
  # SIGTERM (raised as `Interrupted` between any two bytecodes) right after
  # it must remove it too; the caller only knows the shards returned.
  try:
    writer = tf.io.TFRecordWriter(shards[0].partial)
    with tqdm.tqdm(total=num_items, desc=prefix, unit='img',
                   disable=not progress) as bar:
      for item, record in _encoded_in_order(items, texts, num_threads,
                                            max_pixels):
        while count >= ends[shard]:
          writer.close()
          shard += 1
          writer = tf.io.TFRecordWriter(shards[shard].partial)
        count += 1
        bar.update(1)
        if isinstance(record, tuple):
          where, reason = record
          if on_bad_image == 'fail':
            raise ConversionError(f'{where}: {reason} (--on_bad_image=skip '
                                  'leaves such images out)')
          if skipped is not None:
            skipped.append(record)
          report(f'skipped {where}: {reason}')
          continue
        writer.write(record)
        shards[shard].records += 1
        if labels_seen is not None:
          labels_seen.add(item[2])
    writer.close()
  except BaseException:
    if writer is not None:
      writer.close()
    _remove_partials(shards)
    raise
  if count != num_items:
    raise ConversionError(f'{prefix}: expected {num_items} images, read '
                          f'{count}')
  # Shards after the last item's (none unless items were missing) are empty.
  for s in shards[shard + 1:]:
    with tf.io.TFRecordWriter(s.partial):
      pass
  return shards


def _report(line: str) -> None:
  tqdm.tqdm.write(line, file=sys.stderr)


def _read_texts(path: Optional[str]) -> Dict[str, str]:
  """Synset -> human-readable text from 'nXXXX<tab or space>text' lines."""
  if not path:
    return {}
  out = {}
  with open(path) as f:
    for line in f:
      parts = line.strip().split(None, 1)
      if len(parts) == 2:
        out[parts[0]] = parts[1]
  return out


def _is_ours(name: str) -> bool:
  """A shard, partial shard or dataset_info.json of a conversion."""
  bare = name[1:-len('.partial')] if (
      name.startswith('.') and name.endswith('.partial')) else name
  return bare == info_lib.FILENAME or any(
      fnmatch.fnmatchcase(bare, f'{split}-*') for split in info_lib.SPLITS)


def prepare_output_dir(output_dir: str) -> None:
  """Creates `output_dir` and removes the partial shards an interrupted
  conversion left there; refuses a directory that already holds a data set
  (its shards could mix with the new ones). Names are matched literally:
  `output_dir` may hold glob characters."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.io.gfile.makedirs(output_dir)
    names = tf.io.gfile.listdir(output_dir)
  except tf.errors.OpError as e:
    raise ConversionError(f'--output_dir: could not create or list '
                          f'{output_dir!r} ({e.message})') from None
  names = [n.rstrip('/') for n in names if _is_ours(n.rstrip('/'))]
  existing = sorted(n for n in names if not n.endswith('.partial'))
  if existing:
    raise ConversionError(
        f'--output_dir: {output_dir!r} already holds a data set ({existing[0]}'
        f'{", ..." if len(existing) > 1 else ""}); convert into a new or '
        'empty directory, or delete those files first')
  for name in names:
    tf.io.gfile.remove(os.path.join(output_dir, name))


def commit(shards: Sequence[Shard]) -> None:
  """Gives complete shards their final names (dataset_info.json is then
  written last)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for s in shards:
    tf.io.gfile.rename(s.partial, s.final, overwrite=True)


def _remove_partials(shards: Sequence[Shard]) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for s in shards:
    try:
      tf.io.gfile.remove(s.partial)
    except tf.errors.OpError:
      pass  # Never created, or already renamed.


def convert(output_dir: str, input_dir: Optional[str] = None,
            val_labels: Optional[str] = None, from_tfds: Optional[str] = None,
            tfds_data_dir: Optional[str] = None,
            train_shards: Optional[int] = None,
            validation_shards: Optional[int] = None, num_threads: int = 8,
            synset_texts: Optional[str] = None, shuffle_seed: int = 12345,
            progress: bool = True,
            max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
            on_bad_image: str = 'fail',
            skipped: Optional[List[Tuple[str, str]]] = None,
            report: Optional[Callable[[str], None]] = None
           ) -> Dict[str, List[str]]:
  """Converts one source; returns {'train': paths, 'validation': paths}.

  Shard counts left None default to `default_num_shards`. Images go through
  `encode_image`: a bad one fails the conversion (`on_bad_image='fail'`)
  or is skipped, reported and added to `skipped` (`'skip'`). Shards are
  written under partial names (`partial_name`) and renamed only once every
  split is complete; `output_dir/dataset_info.json` (`data.dataset_info`)
  comes last. An error or interruption removes the partial files (a kill
  may leave them: they match no shard pattern, and the next conversion
  into the directory removes them).
  """
  if bool(input_dir) == bool(from_tfds):
    raise ConversionError('--input_dir/--from_tfds: expected exactly one of '
                          'them')
  if on_bad_image not in ON_BAD_IMAGE:
    raise ConversionError(f'--on_bad_image: expected fail or skip, got '
                          f'{on_bad_image!r}')
  if max_image_pixels < 1:
    raise ConversionError(f'--max_image_pixels: expected an integer >= 1, '
                          f'got {max_image_pixels}')
  texts = _read_texts(synset_texts)
  if input_dir:
    lists, synsets = list_folder(input_dir, val_labels)
    # Mix classes across shards, as training reads a few shards at a time.
    random.Random(shuffle_seed).shuffle(lists['train'])
    splits = {k: (v, len(v)) for k, v in lists.items()}
  else:
    # tfds shuffles examples when preparing: stream them in stored order.
    lazy, synsets, sizes = list_tfds(from_tfds, tfds_data_dir)
    splits = {k: (v, sizes[k]) for k, v in lazy.items()}
  prepare_output_dir(output_dir)
  written, labels = {}, {}
  try:
    for split, (items, num_items) in splits.items():
      shards = train_shards if split == 'train' else validation_shards
      if shards is None:
        shards = default_num_shards(num_items, split)
      labels[split] = set()
      written[split] = write_split(
          items, num_items, output_dir, split, shards, num_threads, texts,
          progress, labels[split], max_image_pixels, on_bad_image, skipped,
          report)
    for split, shards in written.items():
      if not any(s.records for s in shards):
        raise ConversionError(f'{split}: no image of the split could be '
                              'converted (see the lines above)')
    commit([s for shards in written.values() for s in shards])
  finally:
    _remove_partials([s for shards in written.values() for s in shards])
  split_infos = {}
  for split, shards in written.items():
    sizes = _file_sizes([s.final for s in shards])
    split_infos[split] = info_lib.SplitInfo(
        files={os.path.basename(s.final): info_lib.FileInfo(s.records, size)
               for s, size in zip(shards, sizes)},
        num_classes=len(labels[split]))
  info_lib.write(output_dir, info_lib.DatasetInfo(
      splits=split_infos, label_base=1,
      classes=[info_lib.ClassInfo(i + 1, s, texts.get(s, ''))
               for i, s in enumerate(synsets)]))
  return {split: [s.final for s in shards]
          for split, shards in written.items()}


def _file_sizes(paths: Sequence[str]) -> List[int]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return [tf.io.gfile.stat(p).length for p in paths]


# ---------------------------------------------------------------------------
# Indexing existing shards.
# ---------------------------------------------------------------------------


class _Progress:
  """A one-line, plain-text progress counter on stderr (thread-safe)."""

  def __init__(self, total: int, unit: str, enabled: bool = True,
               interval_s: float = 0.5):
    self.total, self.unit, self.enabled = total, unit, enabled
    self.done, self.records = 0, 0
    self._interval, self._last, self._start = interval_s, 0.0, time.time()
    self._lock = threading.Lock()

  def update(self, records: int) -> None:
    with self._lock:
      self.done += 1
      self.records += records
      now = time.time()
      if self.enabled and (now - self._last >= self._interval or
                           self.done == self.total):
        self._last = now
        percent = 100 * self.done // max(1, self.total)
        sys.stderr.write(
            f'\r{self.unit}: {self.done}/{self.total} files ({percent}%), '
            f'{self.records} records, {now - self._start:.0f} s')
        if self.done == self.total:
          sys.stderr.write('\n')
        sys.stderr.flush()


_LABEL_KEYS = ('image/class/label', 'image/class/synset', 'image/class/text')


def _scan_file(path: str, size: int) -> Tuple[int, Set[Tuple[int, str, str]]]:
  """(records, {(label, synset, text)}) of one TFRecord file.

  The count comes from the frame headers (`tfrecord.count_records`); the
  labels from reading every record, which must agree with it.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    count = tfrecord.count_records([path], [size], num_threads=1)[0]
  except ValueError as e:  # ConfigError, naming the file.
    raise ConversionError(str(e).replace('--data_dir: ', '', 1)) from None
  spec = {
      'image/class/label': tf.io.FixedLenFeature((), tf.int64, -1),
      'image/class/synset': tf.io.FixedLenFeature((), tf.string, ''),
      'image/class/text': tf.io.FixedLenFeature((), tf.string, ''),
  }
  seen, read = set(), 0
  try:
    ds = tf.data.TFRecordDataset(path, buffer_size=8 * 1024 * 1024)
    for batch in ds.batch(1024):
      parsed = tf.io.parse_example(batch, spec)
      rows = zip(*(parsed[k].numpy().tolist() for k in _LABEL_KEYS))
      seen.update((label, synset.decode(), text.decode())
                  for label, synset, text in rows)
      read += int(batch.shape[0])
  except (tf.errors.OpError, UnicodeDecodeError) as e:
    message = getattr(e, 'message', str(e)).splitlines()[0]
    raise ConversionError(f'{path}: could not read its records '
                          f'({type(e).__name__}: {message})') from None
  if read != count:
    raise ConversionError(f'{path}: {count} record frames but {read} records '
                          'read')
  if any(label < 0 for label, _, _ in seen):
    bad = min(seen)[0]
    raise ConversionError(f'{path}: a record has image/class/label {bad} '
                          '(expected >= 0; -1: missing)')
  return count, seen


def index(data_dir: str, num_threads: int = 32, progress: bool = True,
          scan: Optional[Callable[[str, int], Tuple[int, Set]]] = None
         ) -> info_lib.DatasetInfo:
  """Describes the existing `train-*` / `validation-*` shards of `data_dir`
  and writes its dataset_info.json.

  Files are scanned `num_threads` at a time (counts from the frame headers,
  labels from the records), with a progress line on stderr. The label base
  is 0 if some record has label 0, else 1; the classes run from it to the
  largest label, with the synset and text the records give (else '').

  Raises:
    ConversionError: no shards, a corrupt file, a missing or negative label,
      or two synsets for one label.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  scan = scan or _scan_file
  found = {}
  for split in info_lib.SPLITS:
    try:
      # Listed, not globbed: data_dir is a name, never a pattern.
      files = fileio.list_matching(data_dir, f'{split}-*')
    except tf.errors.OpError as e:
      raise ConversionError(f'--index: could not list {data_dir!r} '
                            f'({e.message})') from None
    files = [f for f in files if '.tmp-' not in os.path.basename(f)]
    if files:
      found[split] = files
  if not found:
    raise ConversionError(f'--index: expected train-* or validation-* '
                          f'TFRecord files in {data_dir!r}, found none')
  all_files = [f for files in found.values() for f in files]
  sizes = dict(zip(all_files, _parallel(
      lambda f: tf.io.gfile.stat(f).length, all_files, num_threads)))
  bar = _Progress(len(all_files), 'index', progress)

  def task(path):
    count, seen = scan(path, sizes[path])
    bar.update(count)
    return count, seen

  results = dict(zip(all_files, _parallel(task, all_files, num_threads)))
  synsets: Dict[int, Tuple[str, str]] = {}
  split_infos = {}
  for split, files in found.items():
    labels = set()
    for f in files:
      for label, synset, text in results[f][1]:
        labels.add(label)
        old = synsets.setdefault(label, (synset, text))
        if old[0] != synset:
          raise ConversionError(
              f'--index: label {label} has synset {old[0]!r} and {synset!r} '
              f'({os.path.basename(f)})')
        if not old[1] and text:
          synsets[label] = (synset, text)
    split_infos[split] = info_lib.SplitInfo(
        files={os.path.basename(f): info_lib.FileInfo(results[f][0], sizes[f])
               for f in files},
        num_classes=len(labels))
  base = 0 if 0 in synsets else 1
  top = max(synsets, default=base - 1)
  info = info_lib.DatasetInfo(
      splits=split_infos, label_base=base,
      classes=[info_lib.ClassInfo(label, *synsets.get(label, ('', '')))
               for label in range(base, top + 1)])
  info_lib.write(data_dir, info)
  return info


def _parallel(fn, items, num_threads):
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    return list(pool.map(fn, items))


def summary(info: info_lib.DatasetInfo, data_dir: str) -> List[str]:
  """One line per split: images, classes and files."""
  return [f'{split}: {s.num_records} images, {s.num_classes} classes, '
          f'{len(s.files)} files in {data_dir}'
          for split, s in sorted(info.splits.items(),
                                 key=lambda kv: kv[0] != 'train')]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--input_dir', help='folder with train/ and val/')
  parser.add_argument('--val_labels',
                      help='labels file for a flat val/ folder')
  parser.add_argument('--from_tfds',
                      help="prepared tfds dataset name, or 'image_folder'")
  parser.add_argument('--tfds_data_dir', help='tfds data_dir (or the folder '
                      'for image_folder)')
  parser.add_argument('--output_dir')
  parser.add_argument('--index', metavar='DIR',
                      help='write DIR/dataset_info.json for the train-* and '
                      'validation-* shards already there (converts nothing)')
  parser.add_argument('--train_shards', type=int, default=None,
                      help='default: one per 1024 images, at most 1024')
  parser.add_argument('--validation_shards', type=int, default=None,
                      help='default: one per 256 images, at most 128')
  parser.add_argument('--num_threads', type=int, default=None,
                      help='encoding threads, default 8 (--index: files '
                      'scanned at once, default 32)')
  parser.add_argument('--synset_texts',
                      help="optional 'synset text' lines (synset_words.txt)")
  parser.add_argument('--on_bad_image', choices=ON_BAD_IMAGE, default='fail',
                      help='an image the trainer or the exported model would '
                      'not read as it is (corrupt, truncated, empty, a format '
                      'serving cannot decode, over --max_image_pixels): fail '
                      '(exit 2 naming it, nothing written) or skip (one line '
                      'per image, counted at the end)')
  parser.add_argument('--max_image_pixels', type=int,
                      default=DEFAULT_MAX_IMAGE_PIXELS,
                      help='refuse images of more pixels; match the '
                      "trainer's --max_image_pixels (default %(default)s, "
                      'its default)')
  parser.add_argument('--no_progress', action='store_true')
  return parser.parse_args(argv)


class Interrupted(KeyboardInterrupt):
  """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt."""


def _raise_interrupted(signum, frame):
  del frame
  raise Interrupted(signal.Signals(signum).name)


def _print_error(message: str) -> None:
  print(f'error: {shown(message)}', file=sys.stderr)


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  skipped = []
  # SIGTERM (a job scheduler's stop) ends the conversion as Ctrl-C does:
  # partial shards removed, one line, nothing that looks complete.
  on_main_thread = threading.current_thread() is threading.main_thread()
  if on_main_thread:
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
  try:
    if bool(args.index) == bool(args.output_dir):
      raise ConversionError('--output_dir/--index: expected exactly one of '
                            'them')
    for name in ('input_dir', 'output_dir', 'index', 'val_labels',
                 'tfds_data_dir', 'synset_texts'):
      value = getattr(args, name, None)
      try:
        if value:
          fileio.check_path_encoding(value)
      except ValueError as e:
        raise ConversionError(f'--{name}: {e}') from None
    if args.index:
      info, out_dir = index(args.index, args.num_threads or 32,
                            progress=not args.no_progress), args.index
    else:
      convert(args.output_dir, args.input_dir, args.val_labels,
              args.from_tfds, args.tfds_data_dir, args.train_shards,
              args.validation_shards, args.num_threads or 8,
              args.synset_texts,
              progress=not args.no_progress,
              max_image_pixels=args.max_image_pixels,
              on_bad_image=args.on_bad_image, skipped=skipped)
      info, out_dir = info_lib.read(args.output_dir), args.output_dir
  except ConversionError as e:
    _print_error(str(e))
    return 2
  except KeyboardInterrupt as e:
    name = str(e) or 'SIGINT'
    _print_error(f'interrupted ({name}): no data set was written '
                 f'({args.output_dir or args.index} holds no new shards)')
    return 128 + (signal.SIGTERM if name == 'SIGTERM' else signal.SIGINT)
  finally:
    if on_main_thread:
      signal.signal(signal.SIGTERM, previous)
  for line in summary(info, out_dir):
    print(shown(line))
  if skipped:
    print(f'skipped {len(skipped)} images (--on_bad_image=skip; listed on '
          'stderr)')
  print(f'{info.num_classes} classes (labels from {info.label_base}); '
        f'{shown(info_lib.path(out_dir))}')
  return 0


def run() -> None:
  """Console entry point (efficientnet-tpu-make-tfrecords)."""
  sys.exit(main(sys.argv[1:]))


if __name__ == '__main__':
  run()
