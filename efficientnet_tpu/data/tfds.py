"""tensorflow-datasets source: a prepared tfds dataset as (bytes, label,
source) triples, for the same decoding as TFRecords.

tensorflow-datasets is optional (`pip install 'efficientnet_tpu[tfds]'`) and
imported only when a tfds source is used; this program never downloads.
Images are read undecoded (`SkipDecoding`) and may be any format TF decodes.
"""

from __future__ import annotations

import tensorflow as tf

from efficientnet_tpu.config import ConfigError, DataConfig
from efficientnet_tpu.data import stream


def load_builder(data_cfg: DataConfig):
  """(the tfds module, the builder of the prepared `tfds:NAME` dataset)."""
  name = data_cfg.source[len('tfds:'):]
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(
        'data', f'{data_cfg.source}: expected tensorflow-datasets to be '
        "installed (pip install 'efficientnet_tpu[tfds]')") from None
  try:
    builder = tfds.builder(name, data_dir=data_cfg.data_dir)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConfigError('data', f'{data_cfg.source}: could not load tfds '
                      f'dataset {name!r} from {data_cfg.data_dir!r} '
                      f'({first})') from None
  if not builder.is_prepared():
    raise ConfigError(
        'data_dir', f'expected a prepared tfds dataset {name!r} under '
        f'{data_cfg.data_dir!r}, found none (prepare it with tfds first; '
        'this program never downloads)')
  return tfds, builder


def split_name(builder, is_training: bool, data_cfg: DataConfig) -> str:
  """'train' for training, else 'validation' or 'test'; must exist."""
  splits = list(builder.info.splits.keys())
  wanted = ['train'] if is_training else ['validation', 'test']
  for split in wanted:
    if split in splits:
      return split
  raise ConfigError('data', f'{data_cfg.source}: expected a split named '
                    f'{" or ".join(wanted)}, found {", ".join(splits)}')


def read_records(data_cfg: DataConfig, is_training: bool,
                 ctx: tf.distribute.InputContext, start_step: int = 0,
                 global_batch_size: int = 0):
  """Like `tfrecord.read_records`, from a prepared tfds dataset.

  Returns (this pipeline's share, the function that turns one of its
  elements into an (image_bytes, label, source) triple: the counterpart of
  `tfrecord.parse_record`).

  tfds readers cannot be positioned: a resumed run reshuffles with seeds
  derived from the step, so it continues with new batches rather than the
  run's first ones, but not with the exact stream of an uninterrupted run.
  """
  tfds, builder = load_builder(data_cfg)
  split = split_name(builder, is_training, data_cfg)
  features = builder.info.features
  image_key = 'image' if 'image' in features else None
  if image_key is None or 'label' not in features:
    raise ConfigError('data', f'{data_cfg.source}: expected image and label '
                      f'features, found {", ".join(features.keys())}')
  position = stream.pipeline_position(ctx, global_batch_size, start_step)
  seed = data_cfg.seed * 7_919 + ctx.input_pipeline_id + 1_000_003 * position
  read_config = tfds.ReadConfig(
      input_context=ctx if is_training else None,
      shuffle_seed=seed % (1 << 31),
      add_tfds_id=True, try_autocache=False,
      interleave_cycle_length=16)
  ds = builder.as_dataset(
      split=split, shuffle_files=is_training, read_config=read_config,
      decoders={image_key: tfds.decode.SkipDecoding()})
  offset = 1 if data_cfg.include_background_label else 0

  if is_training:
    ds = ds.repeat().shuffle(data_cfg.shuffle_buffer, seed=seed % (1 << 31))
    ds = ds.enumerate(start=position)
  else:
    ds = ds.take(data_cfg.num_eval_images)
    if ctx.num_input_pipelines > 1:
      ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)

  def to_triple(ex):
    # tfds ClassLabel is 0-based: shift to match the TFRecord convention.
    return (ex[image_key], tf.cast(ex['label'], tf.int32) + offset,
            tf.strings.join(['tfds:', ex['tfds_id']]))

  return ds, to_triple
