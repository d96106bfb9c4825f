"""Converts an ImageNet-style folder or a prepared tfds dataset to TFRecords.

Writes the standard sharded layout read by `efficientnet_tpu.data.tfrecord`:
`train-%05d-of-%05d` and `validation-%05d-of-%05d`, each record an
`Example` with image/encoded (RGB JPEG), image/format, image/filename,
image/height, image/width, image/channels, image/colorspace,
image/class/label (1..N over the sorted synsets), image/class/synset and,
when known, image/class/text. PNG, CMYK, grayscale and other non-RGB images
are re-encoded as RGB JPEG; RGB JPEGs are copied byte for byte.

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
import io
import math
import os
import random
import sys
import threading
import time
from typing import (Callable, Dict, Iterable, Iterator, List, Optional,
                    Sequence, Set, Tuple)

from PIL import Image
import tqdm

from efficientnet_tpu import fileio
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


class ConversionError(ValueError):
  """A single-line, user-facing error of this tool."""


# ---------------------------------------------------------------------------
# Encoding.
# ---------------------------------------------------------------------------


def to_rgb_jpeg(data: bytes, quality: int = 95) -> Tuple[bytes, int, int]:
  """Returns (jpeg_bytes, height, width); re-encodes unless RGB JPEG."""
  with Image.open(io.BytesIO(data)) as image:
    if image.format == 'JPEG' and image.mode == 'RGB':
      return data, image.height, image.width
    rgb = image.convert('RGB')
  out = io.BytesIO()
  rgb.save(out, format='JPEG', quality=quality)
  return out.getvalue(), rgb.height, rgb.width


def make_example(jpeg: bytes, filename: str, height: int, width: int,
                 label: int, synset: str, text: str = ''):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def b(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

  def i(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

  feature = {
      'image/encoded': b(jpeg),
      'image/format': b(b'JPEG'),
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


def _class_folders(split_dir: str) -> List[str]:
  return sorted(d for d in os.listdir(split_dir)
                if os.path.isdir(os.path.join(split_dir, d)))


def _list_class_folders(split_dir: str,
                        labels: Dict[str, int]) -> List[Item]:
  items = []
  for synset in _class_folders(split_dir):
    if synset not in labels:
      raise ConversionError(f'{split_dir}/{synset}: class folder not among the '
                            'training synsets')
    folder = os.path.join(split_dir, synset)
    for name in sorted(os.listdir(folder)):
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
      files = sorted(n for n in os.listdir(val_dir) if _is_image(n))
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


def _encode(item: Item, texts: Dict[str, str]):
  source, synset, label = item
  if isinstance(source, tuple):
    filename, data = source
  else:
    filename = os.path.basename(source)
    with open(source, 'rb') as f:
      data = f.read()
  try:
    jpeg, height, width = to_rgb_jpeg(data)
  except Exception as e:  # pylint: disable=broad-except
    where = filename if isinstance(source, tuple) else source
    raise ConversionError(f'{where}: not a readable image ({e})') from None
  return make_example(jpeg, filename, height, width, label, synset,
                      texts.get(synset, '')).SerializeToString()


def _encoded_in_order(items: Iterable[Item], texts: Dict[str, str],
                      num_threads: int, chunk: int = 256) -> Iterator[bytes]:
  """Encodes on `num_threads` threads, keeping order and bounded memory."""
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    batch = []
    for item in items:
      batch.append(item)
      if len(batch) == chunk:
        yield from pool.map(lambda it: _encode(it, texts), batch)
        batch = []
    yield from pool.map(lambda it: _encode(it, texts), batch)


def default_num_shards(num_images: int, split: str) -> int:
  """Shards for `num_images` of `split` ('train' or 'validation'): one per
  IMAGES_PER_SHARD images, at least 1, at most MAX_SHARDS (and so never
  more than the images)."""
  return max(1, min(MAX_SHARDS[split],
                    math.ceil(num_images / IMAGES_PER_SHARD[split])))


def write_split(items: Iterable[Item], num_items: int, output_dir: str,
                prefix: str, num_shards: int, num_threads: int,
                texts: Dict[str, str], progress: bool = True,
                labels_seen: Optional[Set[int]] = None) -> List[str]:
  """Streams `num_items` items into `num_shards` files; returns the paths.

  Items are decoded / re-encoded on worker threads; shard i holds items
  [n i / shards, n (i + 1) / shards) in order. The labels written are
  added to `labels_seen`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  flag = 'train_shards' if prefix == 'train' else 'validation_shards'
  if num_shards < 1:
    raise ConversionError(f'--{flag}: expected an integer >= 1, got '
                          f'{num_shards}')
  if num_items < num_shards:
    raise ConversionError(f'--{flag}: expected at most one shard per image '
                          f'({num_items} {prefix} images), got {num_shards}')
  tf.io.gfile.makedirs(output_dir)
  paths = [os.path.join(output_dir, f'{prefix}-{i:05d}-of-{num_shards:05d}')
           for i in range(num_shards)]
  ends = [end for _, end in _shard_bounds(num_items, num_shards)]
  if labels_seen is not None:
    items = _tap_labels(items, labels_seen)
  shard, count, writer = 0, 0, tf.io.TFRecordWriter(paths[0])
  with tqdm.tqdm(total=num_items, desc=prefix, unit='img',
                 disable=not progress) as bar:
    try:
      for record in _encoded_in_order(items, texts, num_threads):
        while count >= ends[shard]:
          writer.close()
          shard += 1
          writer = tf.io.TFRecordWriter(paths[shard])
        writer.write(record)
        count += 1
        bar.update(1)
    finally:
      writer.close()
  if count != num_items:
    raise ConversionError(f'{prefix}: expected {num_items} images, read '
                          f'{count}')
  return paths


def _tap_labels(items: Iterable[Item], seen: Set[int]) -> Iterator[Item]:
  for item in items:
    seen.add(item[2])
    yield item


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


def convert(output_dir: str, input_dir: Optional[str] = None,
            val_labels: Optional[str] = None, from_tfds: Optional[str] = None,
            tfds_data_dir: Optional[str] = None,
            train_shards: Optional[int] = None,
            validation_shards: Optional[int] = None, num_threads: int = 8,
            synset_texts: Optional[str] = None, shuffle_seed: int = 12345,
            progress: bool = True) -> Dict[str, List[str]]:
  """Converts one source; returns {'train': paths, 'validation': paths}.

  Shard counts left None default to `default_num_shards`. Ends by writing
  `output_dir/dataset_info.json` (`data.dataset_info.read` reads it).
  """
  if bool(input_dir) == bool(from_tfds):
    raise ConversionError('--input_dir/--from_tfds: expected exactly one of '
                          'them')
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
  written, split_infos = {}, {}
  for split, (items, num_items) in splits.items():
    shards = train_shards if split == 'train' else validation_shards
    if shards is None:
      shards = default_num_shards(num_items, split)
    labels_seen = set()
    written[split] = write_split(items, num_items, output_dir, split, shards,
                                 num_threads, texts, progress, labels_seen)
    sizes = _file_sizes(written[split])
    split_infos[split] = info_lib.SplitInfo(
        files={os.path.basename(p): info_lib.FileInfo(end - start, size)
               for p, (start, end), size in zip(
                   written[split], _shard_bounds(num_items, shards), sizes)},
        num_classes=len(labels_seen))
  info_lib.write(output_dir, info_lib.DatasetInfo(
      splits=split_infos, label_base=1,
      classes=[info_lib.ClassInfo(i + 1, s, texts.get(s, ''))
               for i, s in enumerate(synsets)]))
  return written


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
  parser.add_argument('--no_progress', action='store_true')
  return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
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
              progress=not args.no_progress)
      info, out_dir = info_lib.read(args.output_dir), args.output_dir
  except ConversionError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for line in summary(info, out_dir):
    print(line)
  print(f'{info.num_classes} classes (labels from {info.label_base}); '
        f'{info_lib.path(out_dir)}')
  return 0


def run() -> None:
  """Console entry point (efficientnet-tpu-make-tfrecords)."""
  sys.exit(main(sys.argv[1:]))


if __name__ == '__main__':
  run()
