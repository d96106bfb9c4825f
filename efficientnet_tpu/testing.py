"""Small experiment configs for the tests and the benchmarks.

One builder, `small_config`, so that tests and benchmarks scale the model and
the loop down the same way and name overrides by config section.
"""

from __future__ import annotations

from efficientnet_tpu import config as config_lib

_SECTIONS = {
    'model': config_lib.ModelConfig,
    'data': config_lib.DataConfig,
    'optimizer': config_lib.OptimizerConfig,
    'distribute': config_lib.DistributeConfig,
    'train': config_lib.TrainConfig,
}


def small_config(model_dir, num_replicas: int = 1,
                 **overrides) -> config_lib.ExperimentConfig:
  """A scaled-down EfficientNet-B0 on synthetic data; cheap to trace.

  Defaults: width and depth 0.1 at 16px, 5 classes, no dropout or stochastic
  depth, BN momentum 0.9; 512 train / 75 eval images; momentum SGD at a
  constant 0.1 without warm-up, EMA or label smoothing; batches 32 (train)
  and 16 (eval), 4 steps, 2 per loop.

  Args:
    model_dir: TrainConfig.model_dir (str or path-like).
    num_replicas: logical CPU replicas (DistributeConfig.num_cpu_replicas).
    **overrides: setting values on top of the defaults, as dicts keyed by
      section: model=, data=, optimizer= (schedule and per-optimizer
      settings included), distribute=, train= (e.g.
      `train=dict(train_steps=60)`).

  Returns:
    An ExperimentConfig (validated by its sections' constructors).

  Raises:
    TypeError: an override names no section, or a setting its section
      lacks.
  """
  unknown = set(overrides) - set(_SECTIONS)
  if unknown:
    raise TypeError(f'small_config: expected overrides among '
                    f'{sorted(_SECTIONS)}, got {sorted(unknown)}')
  fields = {
      'model': dict(width_coefficient=0.1, depth_coefficient=0.1,
                    image_size=16, num_label_classes=5, dropout_rate=0.0,
                    stochastic_depth_rate=0.0, batch_norm_momentum=0.9),
      'data': dict(num_train_images=512, num_eval_images=75),
      'optimizer': dict(optimizer='momentum', base_learning_rate=0.1,
                        lr_scaling='none', lr_schedule='constant',
                        lr_warmup_epochs=0.0, moving_average_decay=0.0,
                        label_smoothing=0.0),
      'distribute': dict(num_cpu_replicas=num_replicas),
      'train': dict(model_dir=str(model_dir), train_batch_size=32,
                    eval_batch_size=16, train_steps=4, iterations_per_loop=2),
  }
  for section, values in overrides.items():
    unknown = set(values) - _SECTIONS[section].setting_names()
    if unknown:
      raise TypeError(f'small_config: {section} has no settings named '
                      f'{sorted(unknown)}')
    fields[section].update(values)
  settings = {}
  for values in fields.values():
    settings.update(values)
  return config_lib.ExperimentConfig.from_settings(**settings)
