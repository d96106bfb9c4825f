"""SavedModel export: reload it and classify JPEG bytes."""

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import export
from efficientnet_tpu import preprocessing
from efficientnet_tpu import train as train_lib
from efficientnet_tpu.config import ConfigError
from tests.helpers import strategy_for, tiny_config


def _jpegs(n, seed=0):
  rng = np.random.default_rng(seed)
  return [tf.io.encode_jpeg(rng.integers(0, 256, size=(40 + 7 * i, 30, 3),
                                         dtype=np.uint8)).numpy()
          for i in range(n)]


def test_export_serves_jpeg_bytes_with_ema_weights(tmp_path):
  cfg = tiny_config(tmp_path / 'run', num_replicas=2,
                    optimizer=dict(moving_average_decay=0.5))
  trainer = train_lib.Trainer(cfg, strategy_for(cfg))
  trainer.train_loop(2)  # Averages now differ from the weights.
  export_dir = str(tmp_path / 'export')
  export.export_saved_model(trainer, export_dir)
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


def test_export_never_overwrites(tmp_path):
  cfg = tiny_config(tmp_path / 'run')
  trainer = train_lib.Trainer(cfg, strategy_for(cfg))
  target = tmp_path / 'export'
  target.mkdir()
  (target / 'mine.txt').write_text('keep')
  with pytest.raises(ConfigError, match='--export_dir'):
    export.export_saved_model(trainer, str(target))
  assert (target / 'mine.txt').read_text() == 'keep'
