"""Tests for tools/make_tfrecords.py: folder -> TFRecords -> real pipeline."""

import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from efficientnet_tpu.config import DataConfig
from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.data import pipeline as data_pipeline
from efficientnet_tpu.tools import make_tfrecords
from tests.test_input_pipeline import write_split

SYNSETS = ['n02000000', 'n01000000', 'n03000000']  # Deliberately unsorted.
# Sorted synsets get labels 1..N.
LABEL = {s: i + 1 for i, s in enumerate(sorted(SYNSETS))}


def _save(path, kind, seed):
  """Writes an image in one of the formats ImageNet actually contains."""
  rng = np.random.RandomState(seed)
  h, w = 20 + seed % 7, 24 + seed % 5
  yy, xx = np.mgrid[0:h, 0:w]
  # Smooth colour ramps (plus mild noise) survive JPEG chroma subsampling.
  rgb = np.stack([yy * 9 + seed * 20, xx * 7, (yy + xx) * 4 + 30], -1)
  rgb = (rgb + rng.randint(0, 8, (h, w, 3))) % 256
  rgb = rgb.astype(np.uint8)
  if kind == 'png':
    Image.fromarray(rgb).save(path, 'PNG')
  elif kind == 'cmyk':
    Image.fromarray(rgb).convert('CMYK').save(path, 'JPEG')
  elif kind == 'gray':
    Image.fromarray(rgb[..., 0]).save(path, 'JPEG')
  elif kind == 'rgba_png':
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(path, 'PNG')
  else:
    Image.fromarray(rgb).save(path, 'JPEG')
  return h, w


KINDS = ['jpeg', 'png', 'cmyk', 'gray', 'rgba_png']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """train/<synset>/ with 5 images each (every kind), flat val/ + labels."""
  root = tmp_path_factory.mktemp('imagenet')
  expected = {'train': {}, 'validation': {}}
  seed = 0
  for synset in SYNSETS:
    os.makedirs(root / 'train' / synset)
    for kind in KINDS:
      name = f'{synset}_{seed}.JPEG'
      expected['train'][name] = (synset, _save(root / 'train' / synset / name,
                                               kind, seed))
      seed += 1
  os.makedirs(root / 'val')
  lines = []
  for j in range(7):
    synset = SYNSETS[j % 3]
    name = f'ILSVRC2012_val_{j + 1:08d}.JPEG'
    expected['validation'][name] = (synset, _save(root / 'val' / name,
                                                  KINDS[j % 5], 100 + j))
    lines.append(f'{name[:-5]},{synset} 1 2 3 4')
  labels = root / 'LOC_val_solution.csv'
  labels.write_text('ImageId,PredictionString\n' + '\n'.join(lines) + '\n')
  return root, labels, expected


def _records(paths):
  out = []
  for p in paths:
    for raw in tf.data.TFRecordDataset(p):
      out.append(tf.train.Example.FromString(raw.numpy()).features.feature)
  return out


def test_converts_folder_with_full_feature_set(folder, tmp_path):
  root, labels, expected = folder
  written = make_tfrecords.convert(
      str(tmp_path), input_dir=str(root), val_labels=str(labels),
      train_shards=4, validation_shards=3, num_threads=3, progress=False)
  assert [os.path.basename(p) for p in written['train']] == [
      f'train-{i:05d}-of-00004' for i in range(4)]
  assert [os.path.basename(p) for p in written['validation']] == [
      f'validation-{i:05d}-of-00003' for i in range(3)]
  for split in ('train', 'validation'):
    feats = _records(written[split])
    assert len(feats) == len(expected[split])
    for f in feats:
      name = f['image/filename'].bytes_list.value[0].decode()
      synset, (h, w) = expected[split][name]
      assert f['image/class/synset'].bytes_list.value[0].decode() == synset
      assert f['image/class/label'].int64_list.value[0] == LABEL[synset]
      assert f['image/colorspace'].bytes_list.value[0] == b'RGB'
      assert f['image/channels'].int64_list.value[0] == 3
      assert f['image/height'].int64_list.value[0] == h
      assert f['image/width'].int64_list.value[0] == w
      source = (root / 'train' / synset / name if split == 'train' else
                root / 'val' / name).read_bytes()
      encoded = f['image/encoded'].bytes_list.value[0]
      image_format = f['image/format'].bytes_list.value[0]
      if source[:3] == b'\xff\xd8\xff':
        # JPEGs (RGB, grayscale, CMYK) are copied byte for byte.
        assert image_format == b'JPEG' and encoded == source
        continue
      # Other formats: a lossless RGB PNG of their pixels, alpha dropped.
      assert image_format == b'PNG'
      with Image.open(io.BytesIO(encoded)) as im:
        assert im.format == 'PNG' and im.mode == 'RGB'
        assert im.size == (w, h)
        with Image.open(io.BytesIO(source)) as src:
          np.testing.assert_array_equal(np.asarray(im),
                                        np.asarray(src.convert('RGB')))


def test_pixels_survive_conversion(folder, tmp_path):
  root, labels, _ = folder
  written = make_tfrecords.convert(
      str(tmp_path), input_dir=str(root), val_labels=str(labels),
      train_shards=1, validation_shards=1, num_threads=2, progress=False)
  for f in _records(written['train']):
    name = f['image/filename'].bytes_list.value[0].decode()
    synset = name.split('_')[0]
    src = Image.open(root / 'train' / synset / name).convert('RGB')
    got = Image.open(io.BytesIO(
        f['image/encoded'].bytes_list.value[0])).convert('RGB')
    diff = np.abs(np.asarray(src, int) - np.asarray(got, int))
    # PIL's CMYK -> RGB conversion differs from TensorFlow's by a little;
    # everything else decodes to the same pixels.
    assert diff.mean() < 3, name


def test_round_trip_through_pipeline(folder, tmp_path):
  root, labels, expected = folder
  make_tfrecords.convert(str(tmp_path), input_dir=str(root),
                         val_labels=str(labels), train_shards=3,
                         validation_shards=2, num_threads=2, progress=False)
  cfg = DataConfig(source='tfrecord', data_dir=str(tmp_path),
                   num_eval_images=7, shuffle_buffer=8)
  got = []
  for b in data_pipeline.build_input(cfg, 16, False, 4).fn(None):
    got.extend(b['labels'].numpy()[b['mask'].numpy() == 1].tolist())
  want = [LABEL[s] - 1 for s, _ in expected['validation'].values()]
  assert sorted(got) == sorted(want)
  train = data_pipeline.build_input(cfg, 16, True, 5).fn(None)
  seen = set()
  for b in train.take(12):
    seen.update(b['labels'].numpy().tolist())
  assert seen == {0, 1, 2}


def test_val_class_folders_and_synset_per_line_labels(tmp_path):
  root = tmp_path / 'in'
  for split in ('train', 'val'):
    for i, synset in enumerate(SYNSETS):
      os.makedirs(root / split / synset)
      _save(root / split / synset / f'{i}.JPEG', 'jpeg', i)
  written = make_tfrecords.convert(str(tmp_path / 'out'),
                                   input_dir=str(root), train_shards=1,
                                   validation_shards=1, progress=False)
  labels = sorted((f['image/class/synset'].bytes_list.value[0].decode(),
                   f['image/class/label'].int64_list.value[0])
                  for f in _records(written['validation']))
  assert labels == sorted(LABEL.items())
  # Flat val/ with one synset per line in sorted file order.
  flat = tmp_path / 'flat'
  os.makedirs(flat / 'val')
  for i, synset in enumerate(SYNSETS):
    os.makedirs(flat / 'train' / synset)
    _save(flat / 'train' / synset / 'a.JPEG', 'jpeg', i)
    _save(flat / 'val' / f'v{i}.JPEG', 'jpeg', i)
  (tmp_path / 'labels.txt').write_text('\n'.join(SYNSETS) + '\n')
  written = make_tfrecords.convert(str(tmp_path / 'out2'),
                                   input_dir=str(flat),
                                   val_labels=str(tmp_path / 'labels.txt'),
                                   train_shards=1, validation_shards=1,
                                   progress=False)
  got = {f['image/filename'].bytes_list.value[0].decode():
         f['image/class/label'].int64_list.value[0]
         for f in _records(written['validation'])}
  assert got == {f'v{i}.JPEG': LABEL[s] for i, s in enumerate(SYNSETS)}


def test_from_tfds_image_folder(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  del tfds
  src = tmp_path / 'src'
  for split in ('train', 'val'):
    for i, cls in enumerate(['cat', 'dog']):
      os.makedirs(src / split / cls)
      for j in range(2 + i):
        _save(src / split / cls / f'{j}.png', 'png' if j else 'jpeg', j)
  written = make_tfrecords.convert(str(tmp_path / 'out'),
                                   from_tfds='image_folder',
                                   tfds_data_dir=str(src), train_shards=2,
                                   validation_shards=1, progress=False)
  for split in ('train', 'validation'):
    feats = _records(written[split])
    assert len(feats) == 5
    pairs = sorted((f['image/class/synset'].bytes_list.value[0].decode(),
                    f['image/class/label'].int64_list.value[0])
                   for f in feats)
    assert pairs == [('cat', 1)] * 2 + [('dog', 2)] * 3
    for f in feats:
      # JPEGs (0.png holds one) as they are, PNGs as (re-encoded) PNGs.
      name = f['image/filename'].bytes_list.value[0].decode()
      assert f['image/encoded'].bytes_list.value[0][:4] == (
          b'\xff\xd8\xff\xe0' if name == '0.png' else b'\x89PNG')
  cfg = DataConfig(source='tfrecord', data_dir=str(tmp_path / 'out'),
                   num_eval_images=5, include_background_label=True)
  got = []
  for b in data_pipeline.build_input(cfg, 16, False, 2).fn(None):
    got.extend(b['labels'].numpy()[b['mask'].numpy() == 1].tolist())
  assert sorted(got) == [1, 1, 2, 2, 2]


def test_cli_errors_are_one_line(tmp_path, capsys):
  assert make_tfrecords.main(['--input_dir', str(tmp_path / 'missing'),
                              '--output_dir', str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and 'train' in err and 'missing' in err
  root = tmp_path / 'in'
  os.makedirs(root / 'train' / 'n1')
  _save(root / 'train' / 'n1' / 'a.JPEG', 'jpeg', 0)
  assert make_tfrecords.main(['--input_dir', str(root), '--output_dir',
                              str(tmp_path / 'o'), '--train_shards', '4',
                              '--no_progress']) == 2
  assert '--train_shards' in capsys.readouterr().err
  assert make_tfrecords.main(['--output_dir', str(tmp_path / 'o')]) == 2


def _labels(path):
  return [f['image/class/label'].int64_list.value[0]
          for f in _records([path])]


def test_conversion_writes_dataset_info(folder, tmp_path):
  root, labels, expected = folder
  texts = tmp_path / 'synset_words.txt'
  texts.write_text('n01000000 first class\nn03000000\tthird class\n')
  written = make_tfrecords.convert(
      str(tmp_path / 'out'), input_dir=str(root), val_labels=str(labels),
      train_shards=4, validation_shards=3, num_threads=2,
      synset_texts=str(texts), progress=False)
  info = dataset_info.read(str(tmp_path / 'out'))
  assert info.label_base == 1 and info.num_classes == 3
  assert [(c.label, c.synset, c.text) for c in info.classes] == [
      (1, 'n01000000', 'first class'), (2, 'n02000000', ''),
      (3, 'n03000000', 'third class')]
  assert info.class_names() == ['first class', 'n02000000', 'third class']
  for split, paths in written.items():
    # Counts and sizes as TF's reader and the filesystem see them.
    assert info.file_counts(split) == {
        os.path.basename(p): dataset_info.FileInfo(
            sum(1 for _ in tf.data.TFRecordDataset(p)), os.path.getsize(p))
        for p in paths}
    assert info.num_records(split) == len(expected[split])
    assert info.splits[split].num_classes == len(
        {l for p in paths for l in _labels(p)})


def test_default_shard_counts():
  # ImageNet's standard layout.
  assert make_tfrecords.default_num_shards(1_281_167, 'train') == 1024
  assert make_tfrecords.default_num_shards(50_000, 'validation') == 128
  assert make_tfrecords.default_num_shards(3000, 'train') == 3
  assert make_tfrecords.default_num_shards(3000, 'validation') == 12
  for n in range(1, 6):
    assert make_tfrecords.default_num_shards(n, 'train') == 1
    assert make_tfrecords.default_num_shards(n, 'validation') == 1


def test_cli_prints_counts_per_split(folder, tmp_path, capsys):
  root, labels, expected = folder
  out = tmp_path / 'out'
  assert make_tfrecords.main(['--input_dir', str(root), '--val_labels',
                              str(labels), '--output_dir', str(out),
                              '--no_progress']) == 0
  # Defaults: one shard per split for 15 / 7 images.
  assert sorted(os.listdir(out)) == [
      dataset_info.FILENAME, 'train-00000-of-00001',
      'validation-00000-of-00001']
  printed = capsys.readouterr().out.splitlines()
  assert printed == [
      f'train: 15 images, 3 classes, 1 files in {out}',
      f'validation: 7 images, 3 classes, 1 files in {out}',
      f'3 classes (labels from 1); {out / dataset_info.FILENAME}']


def test_index_describes_existing_shards(tmp_path, capsys):
  """Shards in the standard layout written without the converter."""
  train = write_split(str(tmp_path), 'train', [4, 0, 3],
                      lambda f, j: 1 + (f * 4 + j) % 6)
  val = write_split(str(tmp_path), 'validation', [2, 3],
                    lambda f, j: 2 + (f + j) % 3)
  assert make_tfrecords.main(['--index', str(tmp_path),
                              '--num_threads', '2']) == 0
  out = capsys.readouterr()
  # A plain-text progress line on stderr, ending with the totals.
  assert '\rindex: 5/5 files (100%), 12 records' in out.err
  assert out.out.splitlines()[:2] == [
      f'train: 7 images, {len(set(train))} classes, 3 files in {tmp_path}',
      f'validation: 5 images, {len(set(val))} classes, 2 files in '
      f'{tmp_path}']
  info = dataset_info.read(str(tmp_path))
  assert info.label_base == 1 and info.num_classes == max(train + val)
  # write_split's records hold synset n%08d of their label, and no text.
  assert [(c.label, c.synset, c.text) for c in info.classes] == [
      (l, f'n{l:08d}', '') for l in range(1, max(train + val) + 1)]
  for name, fi in info.file_counts('train').items():
    path = os.path.join(tmp_path, name)
    assert fi == dataset_info.FileInfo(len(_labels(path)),
                                       os.path.getsize(path))
  assert info.num_records('validation') == len(val)
  assert info.splits['validation'].num_classes == len(set(val))


def test_index_zero_based_labels_and_errors(tmp_path):
  write_split(str(tmp_path / 'zero'), 'validation', [3],
              lambda f, j: j)
  info = make_tfrecords.index(str(tmp_path / 'zero'), 2, progress=False)
  assert info.label_base == 0 and info.num_classes == 3
  assert dataset_info.read(str(tmp_path / 'zero')) == info
  # One label, two synsets.
  bad = tmp_path / 'bad'
  write_split(str(bad), 'train', [1])
  path = os.path.join(bad, 'train-00001-of-00002')
  with tf.io.TFRecordWriter(path) as w:
    w.write(make_tfrecords.make_example(b'x', 'a.JPEG', 1, 1, 1,
                                        'other').SerializeToString())
  with pytest.raises(make_tfrecords.ConversionError,
                     match="label 1 has synset .* and 'other'"):
    make_tfrecords.index(str(bad), 2, progress=False)
  with pytest.raises(make_tfrecords.ConversionError,
                     match='expected train-. or validation-. TFRecord'):
    make_tfrecords.index(str(tmp_path / 'empty'), 2, progress=False)
  assert make_tfrecords.main(['--index', str(bad), '--output_dir',
                              str(tmp_path)]) == 2
