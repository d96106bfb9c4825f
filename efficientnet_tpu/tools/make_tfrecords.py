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

Example:
  efficientnet-tpu-make-tfrecords --input_dir=/data/imagenet \
      --output_dir=/data/imagenet-tfrecords
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import os
import random
import sys
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from PIL import Image
import tqdm

_IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif', '.tif', '.tiff',
                     '.webp')

# (source, synset, label); source is a path or an in-memory (name, bytes).
Item = Tuple[object, str, int]


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


def write_split(items: Iterable[Item], num_items: int, output_dir: str,
                prefix: str, num_shards: int, num_threads: int,
                texts: Dict[str, str], progress: bool = True) -> List[str]:
  """Streams `num_items` items into `num_shards` files; returns the paths.

  Items are decoded / re-encoded on worker threads; shard i holds items
  [n i / shards, n (i + 1) / shards) in order.
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
            tfds_data_dir: Optional[str] = None, train_shards: int = 1024,
            validation_shards: int = 128, num_threads: int = 8,
            synset_texts: Optional[str] = None, shuffle_seed: int = 12345,
            progress: bool = True) -> Dict[str, List[str]]:
  """Converts one source; returns {'train': paths, 'validation': paths}."""
  if bool(input_dir) == bool(from_tfds):
    raise ConversionError('--input_dir/--from_tfds: expected exactly one of '
                          'them')
  texts = _read_texts(synset_texts)
  if input_dir:
    lists, _ = list_folder(input_dir, val_labels)
    # Mix classes across shards, as training reads a few shards at a time.
    random.Random(shuffle_seed).shuffle(lists['train'])
    splits = {k: (v, len(v)) for k, v in lists.items()}
  else:
    # tfds shuffles examples when preparing: stream them in stored order.
    lazy, _, sizes = list_tfds(from_tfds, tfds_data_dir)
    splits = {k: (v, sizes[k]) for k, v in lazy.items()}
  written = {}
  for split, (items, num_items) in splits.items():
    shards = train_shards if split == 'train' else validation_shards
    written[split] = write_split(items, num_items, output_dir, split, shards,
                                 num_threads, texts, progress)
  return written


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
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--train_shards', type=int, default=1024)
  parser.add_argument('--validation_shards', type=int, default=128)
  parser.add_argument('--num_threads', type=int, default=8)
  parser.add_argument('--synset_texts',
                      help="optional 'synset text' lines (synset_words.txt)")
  parser.add_argument('--no_progress', action='store_true')
  return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    written = convert(args.output_dir, args.input_dir, args.val_labels,
                      args.from_tfds, args.tfds_data_dir, args.train_shards,
                      args.validation_shards, args.num_threads,
                      args.synset_texts, progress=not args.no_progress)
  except ConversionError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for split, paths in written.items():
    print(f'{split}: {len(paths)} files in {args.output_dir}')
  return 0


def run() -> None:
  """Console entry point (efficientnet-tpu-make-tfrecords)."""
  sys.exit(main(sys.argv[1:]))


if __name__ == '__main__':
  run()
