"""The converter writes only what the trainer reads back as serving reads it.

Every image efficientnet-tpu-make-tfrecords accepts must decode, through the
trainer's own checks and decode, to the pixels the exported model's decoder
gets from the original file; anything else is refused (exit 2, one line) or
skipped (one line per file). The references are independent of both: the
original bytes (JPEGs are copied), and numpy over PIL's raw arrays (palette
lookups, gray replicated, 16-bit scaled by TensorFlow's rule v >> 8).
"""

import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from efficientnet_tpu.config import ConfigError, DataConfig
from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.data import pipeline as data_pipeline
from efficientnet_tpu.data import preprocessing
from efficientnet_tpu.data import tfrecord
from efficientnet_tpu.export import declared_pixels
from efficientnet_tpu.tools import make_tfrecords

SIZE = 16
H, W = 12, 14
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rgb(seed, h=H, w=W):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(
      np.uint8)


def _encode(image, fmt, **kwargs):
  out = io.BytesIO()
  image.save(out, fmt, **kwargs)
  return out.getvalue()


def _palette_rgb(image):
  """The RGB a paletted PIL image shows: numpy lookup of its raw indices."""
  palette = np.asarray(image.getpalette('RGB'), np.uint8).reshape(-1, 3)
  return palette[np.asarray(image)]


def _exif_rotated_jpeg(rgb):
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 CW to display.
  return _encode(Image.fromarray(rgb), 'JPEG', exif=exif.tobytes())


def _cases():
  """{name: (file bytes, expected full-resolution RGB or None for JPEGs)}."""
  rgb = _rgb(1)
  gray = rgb[..., 0]
  cases = {
      'rgb.jpg': (_encode(Image.fromarray(rgb), 'JPEG'), None),
      'gray.jpg': (_encode(Image.fromarray(gray), 'JPEG'), None),
      'cmyk.jpg': (_encode(Image.fromarray(rgb).convert('CMYK'), 'JPEG'),
                   None),
      'progressive.jpg': (_encode(Image.fromarray(rgb), 'JPEG',
                                  progressive=True), None),
      'exif_rotated.jpg': (_exif_rotated_jpeg(rgb), None),
      'rgb.png': (_encode(Image.fromarray(rgb), 'PNG'), rgb),
      'gray.png': (_encode(Image.fromarray(gray), 'PNG'),
                   np.repeat(gray[..., None], 3, -1)),
      'gray_alpha.png': (
          _encode(Image.fromarray(np.dstack([gray, rgb[..., 1]]), 'LA'),
                  'PNG'), np.repeat(gray[..., None], 3, -1)),
      'rgba.png': (_encode(Image.fromarray(np.dstack([rgb, gray])), 'PNG'),
                   rgb),
      'bilevel.png': (_encode(Image.fromarray(gray > 127), 'PNG'),
                      np.repeat(np.where(gray > 127, 255, 0).astype(
                          np.uint8)[..., None], 3, -1)),
      # A PNG named .JPEG, as one ImageNet training image is.
      'png_named.JPEG': (_encode(Image.fromarray(rgb), 'PNG'), rgb),
  }
  paletted = Image.fromarray(rgb).quantize(16)
  cases['palette.png'] = (_encode(paletted, 'PNG'), _palette_rgb(paletted))
  cases['palette_transparent.png'] = (
      _encode(paletted, 'PNG', transparency=3), _palette_rgb(paletted))
  cases['palette.gif'] = (_encode(paletted, 'GIF'), _palette_rgb(paletted))
  cases['palette.bmp'] = (_encode(paletted, 'BMP'), _palette_rgb(paletted))
  cases['rgb.bmp'] = (_encode(Image.fromarray(rgb), 'BMP'), rgb)
  deep = np.random.RandomState(2).randint(0, 65536, (H, W)).astype(np.uint16)
  deep[0, :4] = [0, 255, 65280, 65535]  # Clipping would give 255 for all.
  cases['deep16.png'] = (_encode(Image.fromarray(deep), 'PNG'),
                         np.repeat((deep >> 8).astype(np.uint8)[..., None], 3,
                                   -1))
  if preprocessing.WEBP_DECODER:
    cases['lossless.webp'] = (_encode(Image.fromarray(rgb), 'WEBP',
                                      lossless=True), rgb)
  # A JPEG with data after its end (as phones append a video): the trainer
  # checks the end marker, so the converter cuts the trailer off.
  jpeg = _encode(Image.fromarray(_rgb(3)), 'JPEG')
  cases['trailer.jpg'] = (jpeg + b'\0\0\0\x18ftypmp42' + os.urandom(300),
                          None)
  return cases


CASES = _cases()


def _make_folder(root, val_files):
  """train/ with one JPEG per class (the synsets); val/n02/v.jpg, and
  `val_files` in val/n01/."""
  for i, synset in enumerate(('n01', 'n02')):
    os.makedirs(root / 'train' / synset)
    (root / 'train' / synset / 'a.jpg').write_bytes(
        _encode(Image.fromarray(_rgb(10 + i)), 'JPEG'))
    os.makedirs(root / 'val' / synset)
  (root / 'val' / 'n02' / 'v.jpg').write_bytes(
      _encode(Image.fromarray(_rgb(12)), 'JPEG'))
  for name, data in val_files.items():
    (root / 'val' / 'n01' / name).write_bytes(data)


def _records(path):
  return [tf.train.Example.FromString(r.numpy()).features.feature
          for r in tf.data.TFRecordDataset(path)]


def _whole(shape):
  return tf.stack([0, 0, shape[0], shape[1]])


def _serving(data):
  """What the exported model feeds the network for `data` (its
  `ServingModule._preprocess`: header pixel check, then decode)."""
  limit = DataConfig().max_image_pixels
  assert int(declared_pixels(tf.constant(data))) <= limit
  return preprocessing.preprocess_for_serving(
      tf.constant(data), SIZE, max_pixels=limit).numpy()


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp('fidelity')
  _make_folder(root / 'in', {n: d for n, (d, _) in CASES.items()})
  out = root / 'out'
  make_tfrecords.convert(str(out), input_dir=str(root / 'in'),
                         train_shards=1, validation_shards=1, num_threads=2,
                         progress=False)
  return out


def test_every_mode_decodes_in_training_as_serving_decodes_the_original(
    converted):
  records = _records(str(converted / 'validation-00000-of-00001'))
  assert sorted(r['image/filename'].bytes_list.value[0].decode()
                for r in records) == sorted(list(CASES) + ['v.jpg'])
  for r in records:
    name = r['image/filename'].bytes_list.value[0].decode()
    if name == 'v.jpg':
      continue
    original, expected = CASES[name]
    encoded = r['image/encoded'].bytes_list.value[0]
    trained = preprocessing.decode_and_crop(tf.constant(encoded),
                                            _whole).numpy()
    if expected is None:  # JPEG: the same bytes (up to its end marker).
      assert r['image/format'].bytes_list.value[0] == b'JPEG'
      assert original.startswith(encoded), name
      assert encoded.endswith(b'\xff\xd9') and len(encoded) == (
          len(original) if name != 'trailer.jpg' else len(original) - 312)
    else:
      assert r['image/format'].bytes_list.value[0] == b'PNG', name
      np.testing.assert_array_equal(trained, expected, err_msg=name)
    assert (r['image/height'].int64_list.value[0],
            r['image/width'].int64_list.value[0]) == trained.shape[:2]
    # What training decodes of the record, serving decodes of the file.
    served = preprocessing.decode_rgb(tf.constant(original)).numpy()
    np.testing.assert_array_equal(trained, served, err_msg=name)
    np.testing.assert_array_equal(
        preprocessing.preprocess_for_eval(tf.constant(encoded), SIZE).numpy(),
        _serving(original), err_msg=name)
  # 16-bit: scaled (v >> 8, within 1 of round(v / 257)), never clipped.
  deep = next(r for r in records if r['image/filename'].bytes_list.value[0] ==
              b'deep16.png')
  got = preprocessing.decode_and_crop(
      tf.constant(deep['image/encoded'].bytes_list.value[0]), _whole).numpy()
  assert got[0, :4, 0].tolist() == [0, 0, 255, 255]
  with Image.open(io.BytesIO(CASES['deep16.png'][0])) as im:
    values = np.asarray(im).astype(np.int64)
  assert np.abs(got[..., 0] - np.round(values / 257)).max() <= 1


def test_trainer_eval_pipeline_sees_what_serving_sees(converted):
  """The real input pipeline (record checks, decode, crop, resize) over the
  converted split gives, image for image, the exported model's input."""
  names = [r['image/filename'].bytes_list.value[0].decode()
           for r in _records(str(converted / 'validation-00000-of-00001'))]
  cfg = DataConfig(source='tfrecord', data_dir=str(converted),
                   num_eval_images=len(names), resize_method='bicubic')
  images = []
  for batch in data_pipeline.build_input(cfg, SIZE, False, 32).fn(None):
    keep = batch['mask'].numpy() == 1
    images.extend(batch['images'].numpy()[keep])
  assert len(images) == len(names)
  for name, image in zip(names, images):
    if name != 'v.jpg':
      np.testing.assert_array_equal(image, _serving(CASES[name][0]),
                                    err_msg=name)
  # And training reads every record (PNG ones included) without error.
  train_cfg = DataConfig(source='tfrecord', data_dir=str(converted),
                         shuffle_buffer=4)
  batch = next(iter(data_pipeline.build_input(train_cfg, SIZE, True,
                                              2).fn(None)))
  assert batch['images'].shape == (2, SIZE, SIZE, 3)


def _png_chunk(kind, body):
  return (struct.pack('>I', len(body)) + kind + body +
          struct.pack('>I', zlib.crc32(kind + body)))


def _huge_png():
  """A 300-byte PNG whose header claims 100000 x 100000 pixels."""
  header = struct.pack('>IIBBBBB', 100_000, 100_000, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header) +
          _png_chunk(b'IDAT', zlib.compress(b'\0' * 3000)) +
          _png_chunk(b'IEND', b''))


def _huge_jpeg():
  """A small JPEG whose frame header claims 60000 x 60000 pixels."""
  data = bytearray(_encode(Image.fromarray(_rgb(4)), 'JPEG'))
  sof = data.index(b'\xff\xc0')
  data[sof + 5:sof + 9] = struct.pack('>HH', 60000, 60000)
  return bytes(data)


def _bad_crc_png():
  data = bytearray(_encode(Image.fromarray(_rgb(5)), 'PNG'))
  idat = data.index(b'IDAT')
  data[idat + 8] ^= 0xFF  # Inside the compressed data: its CRC fails.
  return bytes(data)


def _make_hostile(folder, case):
  """Writes one hostile entry into `folder`; returns its name."""
  if case == 'directory':
    os.makedirs(folder / 'album.jpg')
    return 'album.jpg'
  if case == 'symlink_loop':
    os.symlink('loop.jpg', folder / 'loop.jpg')
    return 'loop.jpg'
  if case == 'fifo':
    os.mkfifo(folder / 'pipe.jpg')
    return 'pipe.jpg'
  if case == 'non_utf8_name':
    name = os.fsdecode(b'caf\xe9.jpg')  # Latin-1, as old archives hold.
    (folder / name).write_bytes(_encode(Image.fromarray(_rgb(6)), 'JPEG'))
    return 'caf\\xe9.jpg'
  data = {
      'empty': b'',
      'text': b'<html>404 Not Found</html>\n',
      'truncated_jpeg': _encode(Image.fromarray(_rgb(7, 40, 40)),
                                'JPEG')[:400],
      'bad_crc_png': _bad_crc_png(),
      'huge_png': _huge_png(),
      'huge_jpeg': _huge_jpeg(),
      'tiff': _encode(Image.fromarray(_rgb(8)), 'TIFF'),
      'bilevel_bmp': _encode(Image.fromarray(_rgb(9)[..., 0] > 127), 'BMP'),
  }[case]
  name = f'{case}.jpg'
  (folder / name).write_bytes(data)
  return name


HOSTILE = ['directory', 'symlink_loop', 'fifo', 'non_utf8_name', 'empty',
           'text', 'truncated_jpeg', 'bad_crc_png', 'huge_png', 'huge_jpeg',
           'tiff', 'bilevel_bmp']


def _listing(out):
  return sorted(os.listdir(out)) if os.path.isdir(out) else []


@pytest.mark.parametrize('case', HOSTILE)
def test_hostile_file_is_one_line_then_skipped_or_refused(tmp_path, capsys,
                                                          case):
  _make_folder(tmp_path / 'in', {})
  shown = _make_hostile(tmp_path / 'in' / 'train' / 'n01', case)
  argv = ['--input_dir', str(tmp_path / 'in'), '--no_progress']
  # Refused (the default): exit 2, one line naming the file, nothing left.
  assert make_tfrecords.main(argv + ['--output_dir',
                                     str(tmp_path / 'fail')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and err.startswith('error: ') and shown in err
  assert 'Traceback' not in err and '--on_bad_image=skip' in err
  assert _listing(tmp_path / 'fail') == []
  # Skipped: one line, counted, and the rest converts and reads back.
  assert make_tfrecords.main(argv + ['--output_dir', str(tmp_path / 'skip'),
                                     '--on_bad_image=skip']) == 0
  out = capsys.readouterr()
  assert out.err.strip().count('\n') == 0, out.err
  assert out.err.startswith('skipped ') and shown in out.err
  assert 'skipped 1 images' in out.out
  info = dataset_info.read(str(tmp_path / 'skip'))
  assert info.num_records('train') == 2
  for r in _records(str(tmp_path / 'skip' / 'train-00000-of-00001')):
    encoded = tf.constant(r['image/encoded'].bytes_list.value[0])
    assert preprocessing.preprocess_for_eval(encoded, SIZE).shape == (
        SIZE, SIZE, 3)


def test_max_image_pixels_matches_the_trainers_limit(tmp_path, capsys):
  """A real image over a lowered --max_image_pixels is refused, as the
  trainer with that limit would refuse its record."""
  _make_folder(tmp_path / 'in', {})
  argv = ['--input_dir', str(tmp_path / 'in'), '--no_progress',
          '--output_dir', str(tmp_path / 'out')]
  assert make_tfrecords.main(argv + [f'--max_image_pixels={H * W - 1}']) == 2
  err = capsys.readouterr().err
  assert '--max_image_pixels=167' in err and 'a.jpg' in err
  assert make_tfrecords.main(argv + [f'--max_image_pixels={H * W}']) == 0


def test_class_folder_problems_are_one_line(tmp_path, capsys):
  for case in ('loop', 'non_utf8'):
    root = tmp_path / case
    _make_folder(root, {})
    if case == 'loop':
      os.symlink('n03', root / 'train' / 'n03')
      shown = 'n03'
    else:
      os.makedirs(root / 'train' / os.fsdecode(b'n\xff'))
      shown = 'n\\xff'
    assert make_tfrecords.main(['--input_dir', str(root), '--output_dir',
                                str(tmp_path / 'out'), '--no_progress']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith('error: ') and shown in err


def _trainer_sees_no_data_set(out):
  names = _listing(out)
  assert dataset_info.FILENAME not in names
  assert not [n for n in names if n.startswith(('train-', 'validation-'))]
  for training in (True, False):
    with pytest.raises(ConfigError, match='found none'):
      tfrecord.list_files(str(out), training)


def test_failed_conversion_leaves_nothing_that_looks_complete(tmp_path,
                                                              capsys):
  """The train split is complete when a bad validation image fails the
  conversion: its shard is never given its final name."""
  _make_folder(tmp_path / 'in', {'ok.jpg': CASES['rgb.jpg'][0],
                                 'zz_bad.jpg': b'not an image'})
  out = tmp_path / 'out'
  assert make_tfrecords.main(['--input_dir', str(tmp_path / 'in'),
                              '--output_dir', str(out), '--no_progress']) == 2
  assert 'zz_bad.jpg' in capsys.readouterr().err
  _trainer_sees_no_data_set(out)
  assert _listing(out) == []  # Partial shards removed too.


def test_existing_data_set_is_not_overwritten(tmp_path, capsys):
  _make_folder(tmp_path / 'in', {})
  out = tmp_path / 'out'
  argv = ['--input_dir', str(tmp_path / 'in'), '--output_dir', str(out),
          '--no_progress']
  assert make_tfrecords.main(argv) == 0
  before = {n: (out / n).read_bytes() for n in _listing(out)}
  assert make_tfrecords.main(argv + ['--train_shards=2']) == 2
  err = capsys.readouterr().err
  assert 'already holds a data set' in err and err.count('\n') == 1
  assert {n: (out / n).read_bytes() for n in _listing(out)} == before


@pytest.fixture(scope='module')
def slow_folder(tmp_path_factory):
  """A folder whose last validation image (a large noisy PNG) keeps the
  converter busy for a while after the train split is written."""
  root = tmp_path_factory.mktemp('slow')
  _make_folder(root, {'ok.jpg': CASES['rgb.jpg'][0]})
  big = np.random.RandomState(0).randint(0, 256, (1500, 1500, 3), np.uint8)
  Image.fromarray(big).save(root / 'val' / 'n02' / 'zz_big.png',
                            compress_level=1)
  return root


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGKILL])
def test_killed_conversion_leaves_nothing_that_looks_complete(
    tmp_path, slow_folder, signum):
  out = tmp_path / 'out'
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'efficientnet_tpu.tools.make_tfrecords',
       '--input_dir', str(slow_folder), '--output_dir', str(out),
       '--no_progress', '--num_threads=1'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  # Validation (after train) has started: its partial shard exists.
  partial = out / make_tfrecords.partial_name('validation-00000-of-00001')
  deadline = time.time() + 300
  while not partial.exists() and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.005)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=300)
  want = 128 + signum if signum == signal.SIGTERM else -signum
  assert proc.returncode == want, err.decode()[-2000:]
  _trainer_sees_no_data_set(out)
  if signum == signal.SIGTERM:
    lines = [l for l in err.decode().splitlines() if l.startswith('error:')]
    assert len(lines) == 1 and 'interrupted (SIGTERM)' in lines[0]
    assert 'Traceback' not in err.decode()
    assert _listing(out) == []
  else:
    # A kill may leave partial shards; they are hidden from the trainer,
    # and the next conversion into the directory removes them.
    make_tfrecords.convert(str(out), input_dir=str(slow_folder),
                           progress=False, num_threads=2)
    assert _listing(out) == [dataset_info.FILENAME, 'train-00000-of-00001',
                             'validation-00000-of-00001']


def test_interruption_right_after_the_first_shard_is_created(tmp_path,
                                                             monkeypatch):
  """A SIGTERM raises `Interrupted` between any two bytecodes; one that lands
  just after the first partial shard exists (here: in the progress bar's
  set-up) still removes it."""
  created = []
  real_writer = tf.io.TFRecordWriter

  def writer(path):
    created.append(path)
    return real_writer(path)

  def interrupted(*args, **kwargs):
    raise make_tfrecords.Interrupted('SIGTERM')

  monkeypatch.setattr(tf.io, 'TFRecordWriter', writer)
  monkeypatch.setattr(make_tfrecords.tqdm, 'tqdm', interrupted)
  with pytest.raises(make_tfrecords.Interrupted):
    make_tfrecords.write_split([], 2, str(tmp_path), 'validation', 1, 1, {},
                               progress=False)
  assert [os.path.basename(p) for p in created] == [
      make_tfrecords.partial_name('validation-00000-of-00001')]
  assert os.listdir(tmp_path) == []
