"""A small real-data convergence run through the real TFRecord pipeline.

scikit-learn's bundled digits (offline), upsampled to 32x32 PNGs, converted
by `make_tfrecords` to the standard sharded layout, read with the ImageNet
training preprocessing (random crops down to 8% of the area, flips), and
learned by a scaled-down EfficientNet with LARS at batch 256 (a sixth of the
training set per step). Chance is 10% top-1 / 50% top-5. Runs of this
setting reached 55-59% top-1 and 94-96% top-5 after 150 steps; the ImageNet
crop policy caps it well below what digits allow without it.
"""

import pytest

from efficientnet_tpu import experiment
from tests.digits import write_digits_tfrecords
from tests.helpers import small_config, strategy_for

TOP_1_THRESHOLD = 0.40
TOP_5_THRESHOLD = 0.80


@pytest.mark.slow
def test_lars_large_batch_learns_digits(tmp_path):
  data_dir, num_train, num_eval = write_digits_tfrecords(str(tmp_path),
                                                         size=32)
  cfg = small_config(
      tmp_path / 'run',
      model=dict(width_coefficient=0.25, image_size=32, num_label_classes=10),
      data=dict(data='tfrecord', data_dir=data_dir,
                num_train_images=num_train, num_eval_images=num_eval),
      optimizer=dict(optimizer='lars', base_learning_rate=3.0,
                     lr_schedule='poly', lr_warmup_epochs=2.0,
                     weight_decay=1e-4, label_smoothing=0.1),
      train=dict(train_batch_size=256, eval_batch_size=128, train_steps=150,
                 iterations_per_loop=50))
  trainer = experiment.build_trainer(cfg, strategy_for(cfg))
  metrics = trainer.train(evaluator=experiment.evaluator_for(trainer))
  assert metrics['eval/num_examples'] == num_eval
  assert metrics['eval/top_1_accuracy'] > TOP_1_THRESHOLD, metrics
  assert metrics['eval/top_5_accuracy'] > TOP_5_THRESHOLD, metrics
