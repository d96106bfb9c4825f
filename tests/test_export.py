"""SavedModel export: reload it and classify encoded images."""

import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from efficientnet_tpu import experiment
from efficientnet_tpu import export
from efficientnet_tpu.config import ConfigError
from efficientnet_tpu.data import preprocessing
from tests.helpers import small_config, strategy_for


def _jpegs(n, seed=0):
  rng = np.random.default_rng(seed)
  return [tf.io.encode_jpeg(rng.integers(0, 256, size=(40 + 7 * i, 30, 3),
                                         dtype=np.uint8)).numpy()
          for i in range(n)]


def _encode(image, fmt, **kwargs):
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _pixels(rng, height, width, channels=3):
  return rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def _animation(frames, fmt, **kwargs):
  return _encode(frames[0], fmt, save_all=True, append_images=frames[1:],
                 **kwargs)


def _fixtures(seed=0):
  """{name: bytes}: one of each supported format, in a few pixel modes."""
  rng = np.random.default_rng(seed)
  rgba = _pixels(rng, 30, 44, 4)
  rgba[..., 3] = rng.integers(1, 256, size=rgba.shape[:2])  # Keep RGB.
  frames = [Image.fromarray(_pixels(rng, 36, 28)) for _ in range(3)]
  return {
      'jpeg': tf.io.encode_jpeg(_pixels(rng, 40, 30)).numpy(),
      'png_rgba': _encode(Image.fromarray(rgba, 'RGBA'), 'PNG'),
      'png_gray': _encode(Image.fromarray(_pixels(rng, 25, 33)[..., 0], 'L'),
                          'PNG'),
      'gif_animated': _animation(frames, 'GIF'),
      'bmp': _encode(Image.fromarray(_pixels(rng, 31, 22)), 'BMP'),
      'bmp_palette': _encode(Image.fromarray(_pixels(rng, 23, 35)).convert(
          'P'), 'BMP'),
      'webp': _encode(Image.fromarray(_pixels(rng, 27, 41)), 'WEBP',
                      quality=90),
      'webp_rgba': _encode(Image.fromarray(rgba, 'RGBA'), 'WEBP',
                           lossless=True, exact=True),
  }


def _bad_inputs():
  jpeg = tf.io.encode_jpeg(np.zeros([40, 30, 3], np.uint8)).numpy()
  frames = [Image.fromarray(np.full([20, 20, 3], v, np.uint8))
            for v in (0, 255)]
  return {
      'garbage': b'not an image at all',
      'truncated_jpeg': jpeg[:len(jpeg) // 2],
      'empty': b'',
      # TF 2.21's WebP decoder crashes on these, so they are refused.
      'webp_animated': _animation(frames, 'WEBP', lossless=True),
  }


def _reference_image(data, image_size):
  """uint8 [S, S, 3] from an independent decode (PIL) + the eval crop."""
  if data[:3] == b'\xff\xd8\xff':  # JPEG: the unchanged eval path.
    return preprocessing.preprocess_for_eval(tf.constant(data), image_size)
  image = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  y, x, h, w = preprocessing.center_crop_window(
      tf.shape(image), image_size).numpy()
  return preprocessing.resize(image[y:y + h, x:x + w], image_size)


@pytest.fixture(scope='module')
def exported_dir(tmp_path_factory):
  """(trainer, export dir) of one tiny trained model, shared."""
  tmp_path = tmp_path_factory.mktemp('export')
  cfg = small_config(tmp_path / 'run')
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  trainer.train_loop(2)  # Moving BN statistics move off their init.
  export_dir = str(tmp_path / 'export')
  experiment.export_model(trainer.cfg, trainer.state, export_dir)
  return trainer, export_dir


@pytest.fixture(scope='module')
def exported(exported_dir):
  """(trainer, serving signature) of `exported_dir`'s model."""
  trainer, export_dir = exported_dir
  return trainer, tf.saved_model.load(export_dir).signatures[
      'serving_default']


def test_decode_rgb_matches_pil():
  """Every format and pixel mode decodes as PIL does (RGB, first frame);
  without TF's WebP decoder (TF 2.18), a WebP fails like bad bytes."""
  for name, data in _fixtures().items():
    if name.startswith('webp') and not preprocessing.WEBP_DECODER:
      with pytest.raises(tf.errors.InvalidArgumentError, match='WebP needs'):
        preprocessing.decode_rgb(tf.constant(data))
      continue
    got = preprocessing.decode_rgb(tf.constant(data)).numpy()
    if name == 'jpeg':  # libjpeg and PIL may differ by rounding.
      assert got.shape == (40, 30, 3)
      continue
    want = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
    np.testing.assert_array_equal(got, want, err_msg=name)
  gif = Image.open(io.BytesIO(_fixtures()['gif_animated']))
  gif.seek(1)
  assert np.abs(np.asarray(gif.convert('RGB')).astype(int) -
                preprocessing.decode_rgb(tf.constant(
                    _fixtures()['gif_animated'])).numpy()).max() > 0


def test_export_serves_mixed_formats_and_flags_bad_rows(exported):
  trainer, served = exported
  size = trainer.cfg.model.image_size
  good, bad = _fixtures(), _bad_inputs()
  # Bad rows between good ones: the good rows must keep their positions.
  names = ['garbage', 'jpeg', 'png_rgba', 'truncated_jpeg', 'png_gray',
           'gif_animated', 'empty', 'bmp', 'bmp_palette', 'webp',
           'webp_animated', 'webp_rgba']
  inputs = {**good, **bad}
  if not preprocessing.WEBP_DECODER:  # TF 2.18: WebP rows are invalid.
    good = {n: v for n, v in good.items() if not n.startswith('webp')}
  out = served(image_bytes=tf.constant([inputs[n] for n in names]))
  out = {k: v.numpy() for k, v in out.items()}

  is_good = np.array([n in good for n in names])
  np.testing.assert_array_equal(out['valid'], is_good)
  images = tf.stack([preprocessing.normalize(_reference_image(inputs[n], size))
                     for n in names if n in good])
  want = trainer.model(images, training=False).numpy()
  np.testing.assert_allclose(out['logits'][is_good], want, rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_array_equal(out['classes'][is_good], want.argmax(-1))
  np.testing.assert_allclose(out['probabilities'][is_good],
                             tf.nn.softmax(want).numpy(), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_array_equal(out['top_5_classes'][is_good],
                                np.argsort(-want, axis=-1)[:, :5])

  assert out['top_5_classes'].shape == (len(names), 5)
  np.testing.assert_array_equal(out['classes'][~is_good], -1)
  np.testing.assert_array_equal(out['top_5_classes'][~is_good], -1)
  np.testing.assert_array_equal(out['logits'][~is_good], 0.0)
  np.testing.assert_array_equal(out['probabilities'][~is_good], 0.0)


# Serves batches in which no row decodes, in a fresh process: whether
# TF's oneDNN graph rewrites run is fixed when TensorFlow is imported.
_SERVE_UNDECODABLE = r'''
import json, sys
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port
serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']
out = {'onednn': bool(_pywrap_util_port.IsMklEnabled())}
for name, batch in (('all_invalid', [b'', b'garbage']), ('empty', [])):
  result = serve(image_bytes=tf.constant(batch, tf.string))
  out[name] = {k: [v.dtype.name, v.shape.as_list(),
                   v.numpy().astype(str).tolist() if v.dtype == tf.string
                   else v.numpy().tolist()] for k, v in result.items()}
print(json.dumps(out))
'''


@pytest.mark.parametrize('onednn', ['1', '0'])
def test_export_all_invalid_and_empty_batches(exported_dir, onednn):
  """A batch in which nothing decodes (one bad upload, or none) gives the
  documented outputs, with TF's oneDNN rewrites on (its default on CPUs
  with AVX512 BF16 / VNNI, which fail on a zero-size batch) and off."""
  _, export_dir = exported_dir
  env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn,
             TF_CPP_MIN_LOG_LEVEL='2')
  proc = subprocess.run([sys.executable, '-c', _SERVE_UNDECODABLE, export_dir],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['onednn'] == (onednn == '1')
  num_classes = 5  # small_config
  for name, n in (('all_invalid', 2), ('empty', 0)):
    want = {
        'logits': ['float32', [n, num_classes], [[0.0] * num_classes] * n],
        'probabilities': ['float32', [n, num_classes],
                          [[0.0] * num_classes] * n],
        'classes': ['int32', [n], [-1] * n],
        'class_names': ['string', [n], [''] * n],
        'top_5_classes': ['int32', [n, 5], [[-1] * 5] * n],
        'top_5_probabilities': ['float32', [n, 5], [[0.0] * 5] * n],
        'valid': ['bool', [n], [False] * n],
    }
    assert out[name] == want, name


def test_declared_pixels_reads_jpeg_png_and_gif_headers():
  """Height x width from the header, as PIL reads the image's size; 0 for
  formats whose header is not read."""
  rng = np.random.default_rng(2)
  # 300 x 2: the GIF fields' high bytes matter.
  for h, w in ((40, 30), (2, 300), (300, 2)):
    image = Image.fromarray(_pixels(rng, h, w))
    for fmt in ('JPEG', 'PNG', 'GIF'):
      data = _encode(image, fmt)
      assert Image.open(io.BytesIO(data)).size == (w, h)
      assert int(export.declared_pixels(tf.constant(data))) == h * w, fmt
  for data in (_fixtures()['bmp'], _fixtures()['webp'], b'GIF8', b''):
    assert int(export.declared_pixels(tf.constant(data))) == 0


def test_export_serves_images_over_max_image_pixels_as_invalid(exported,
                                                               tmp_path):
  """With the training input's pixel limit, a larger image of any format
  is an invalid row and does not fail the batch; the others are served as
  without a limit."""
  trainer, unlimited = exported
  limit = 1000
  cfg = dataclasses.replace(trainer.cfg, data=dataclasses.replace(
      trainer.cfg.data, max_image_pixels=limit))
  export_dir = str(tmp_path / 'export')
  experiment.export_model(cfg, trainer.state, export_dir)
  limited = tf.saved_model.load(export_dir).signatures['serving_default']

  rng = np.random.default_rng(3)
  inputs, pixels = [], []
  # Either side of the limit in each format (1000 itself is allowed).
  for fmt, sizes in (('JPEG', [(25, 40), (40, 26)]),
                     ('PNG', [(30, 20), (41, 25)]),
                     ('GIF', [(20, 50), (34, 30)]),
                     ('BMP', [(31, 22), (32, 32)]),
                     ('WEBP', [(27, 30), (33, 31)])):
    if fmt == 'WEBP' and not preprocessing.WEBP_DECODER:
      continue
    for h, w in sizes:
      inputs.append(_encode(Image.fromarray(_pixels(rng, h, w)), fmt))
      pixels.append(h * w)
  is_small = np.array(pixels) <= limit
  assert is_small.sum() == len(pixels) // 2

  out = {k: v.numpy() for k, v in limited(
      image_bytes=tf.constant(inputs)).items()}
  want = {k: v.numpy() for k, v in unlimited(
      image_bytes=tf.constant(inputs)).items()}
  assert want['valid'].all()  # Every image decodes without the limit.
  np.testing.assert_array_equal(out['valid'], is_small)
  np.testing.assert_allclose(out['logits'][is_small],
                             want['logits'][is_small], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out['classes'][~is_small], -1)
  np.testing.assert_array_equal(out['top_5_classes'][~is_small], -1)
  np.testing.assert_array_equal(out['class_names'][~is_small], b'')
  np.testing.assert_array_equal(out['logits'][~is_small], 0.0)
  np.testing.assert_array_equal(out['probabilities'][~is_small], 0.0)


def test_export_serves_jpeg_bytes_with_ema_weights(tmp_path):
  cfg = small_config(tmp_path / 'run', num_replicas=2,
                     optimizer=dict(moving_average_decay=0.5))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  trainer.train_loop(2)  # Averages now differ from the weights.
  export_dir = str(tmp_path / 'export')
  experiment.export_model(trainer.cfg, trainer.state, export_dir)
  assert not tf.io.gfile.exists(export_dir + '.tmp')

  served = tf.saved_model.load(export_dir).signatures['serving_default']
  jpegs = _jpegs(3)
  out = served(image_bytes=tf.constant(jpegs))

  # Reference: the trained Keras model with the EMA averages swapped in,
  # fed the eval preprocessing of each JPEG.
  images = tf.stack([preprocessing.normalize(preprocessing.preprocess_for_eval(
      tf.constant(j), cfg.model.image_size)) for j in jpegs])
  trainer.ema.swap()
  want = trainer.model(images, training=False).numpy()
  trainer.ema.swap()
  without_ema = trainer.model(images, training=False).numpy()
  np.testing.assert_allclose(out['logits'].numpy(), want, rtol=1e-4,
                             atol=1e-4)
  assert np.abs(without_ema - want).max() > 1e-3
  np.testing.assert_array_equal(out['classes'].numpy(), want.argmax(-1))
  np.testing.assert_allclose(out['probabilities'].numpy().sum(-1), 1.0,
                             rtol=1e-5)
  assert out['top_5_classes'].shape == (3, 5)
  assert out['valid'].numpy().all()


def test_export_never_overwrites(tmp_path):
  cfg = small_config(tmp_path / 'run')
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  target = tmp_path / 'export'
  target.mkdir()
  (target / 'mine.txt').write_text('keep')
  with pytest.raises(ConfigError, match='export_dir'):
    experiment.export_model(trainer.cfg, trainer.state, str(target))
  assert (target / 'mine.txt').read_text() == 'keep'
