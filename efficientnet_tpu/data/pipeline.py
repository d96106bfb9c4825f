"""Inputs: one entry point per data source, and the checks of the data
files that run before any work.

`make_input` dispatches on `DataConfig.source`: the synthetic source, or the
real pipeline `build_input` over TFRecords (`tfrecord`) or a tfds dataset
(`tfds`). Every one returns a typed input of `contract` (`TrainInput`,
`EvalInput`). The real pipeline is three pieces, composed per host by
`train_pipeline` / `eval_pipeline`:

* the source, `read_source`: this host's files or shards, from the
  resumable stream's position (`stream`);
* the record map, `train_example` / `eval_example`: validate (`checks`),
  decode, crop, resize and augment (`preprocessing`) one record in one fused
  map (`map_train_records` applies it, guarded and counted with
  skip_corrupt);
* the batching, `batch_train` / `batch_eval`: to the element spec of
  `contract` (eval padded and masked, `contract.batch_eval_examples`).
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple, Union

from absl import logging
import tensorflow as tf

from efficientnet_tpu.config import ConfigError, DataConfig
from efficientnet_tpu.data import checks
from efficientnet_tpu.data import contract
from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.data import eval_shards
from efficientnet_tpu.data import preprocessing
from efficientnet_tpu.data import stream
from efficientnet_tpu.data import synthetic
from efficientnet_tpu.data import tfds as tfds_source
from efficientnet_tpu.data import tfrecord


def make_input(data_cfg: DataConfig, num_classes: int, image_size: int,
               is_training: bool, global_batch_size: int,
               start_step: int = 0, count_cache_dir: Optional[str] = None
              ) -> Union[contract.TrainInput, contract.EvalInput]:
  """The input of `data_cfg.source`: a `contract.TrainInput` when
  `is_training`, else a `contract.EvalInput`.

  Every source yields the element spec of `contract`. Training input
  continues the stream of a run resumed at `start_step` (see
  `stream.resumable_stream`; TFRecord counts that place it are cached in
  `count_cache_dir`). TFRecord eval input is sharded by file when the eval
  files' record counts are known (see `build_input`): run
  `EvalInput.steps(num_input_pipelines)` eval steps.
  """
  if data_cfg.source == 'synthetic':
    return synthetic.synthetic_input(data_cfg, num_classes, image_size,
                                     is_training, global_batch_size,
                                     start_step)
  return build_input(data_cfg, image_size, is_training, global_batch_size,
                     num_classes=num_classes, start_step=start_step,
                     count_cache_dir=count_cache_dir)


def check_data_files(data_cfg: DataConfig, mode: str,
                     cache_dir: Optional[str] = None) -> None:
  """Fails before any work when the data the mode needs is not there.

  Modes that evaluate also need at least `num_eval_images` eval records:
  found only when eval starts, that error would come after the whole
  training. TFRecord splits are counted once (see
  `tfrecord.record_counts`), tfds splits come with their size.

  Args:
    data_cfg: the data source, directory and `num_eval_images`.
    mode: 'train', 'eval' or 'train_and_eval'.
    cache_dir: where the per-file eval record counts are cached (the model
      dir); None counts every time.

  Raises:
    ConfigError: one line naming the flag to change.
  """
  evaluates = mode in ('eval', 'train_and_eval')
  if data_cfg.source == 'synthetic':
    return
  if data_cfg.source != 'tfrecord':
    if not tf.io.gfile.isdir(data_cfg.data_dir):
      raise ConfigError('data_dir', f'expected a prepared '
                        f'tensorflow-datasets directory, '
                        f'{data_cfg.data_dir!r} does not exist')
    if evaluates:
      _, builder = tfds_source.load_builder(data_cfg)
      split = tfds_source.split_name(builder, False, data_cfg)
      _check_num_eval_images(
          data_cfg, builder.info.splits[split].num_examples,
          f'split {split!r} of {data_cfg.source} in {data_cfg.data_dir!r}',
          say_narrowed=True)
    return
  if mode in ('train', 'train_and_eval'):
    tfrecord.list_files(data_cfg.data_dir, is_training=True)
  if evaluates:
    files = tfrecord.list_files(data_cfg.data_dir, is_training=False)
    check_description(data_cfg.data_dir, 'validation', files)
    counts = tfrecord.record_counts(files, cache_dir,
                                    create_cache_dir=mode != 'eval')
    _check_num_eval_images(
        data_cfg, sum(counts.values()),
        f'{len(files)} {tfrecord.EVAL_PATTERN!r} files in '
        f'{data_cfg.data_dir!r}', say_narrowed=True)


def check_description(data_dir: str, split: str, files) -> None:
  """Refuses shards that disagree with data_dir's dataset_info.json.

  The description gives the split's record count (the run's
  `num_eval_images` unless one is given) from the shards it lists, by name
  and byte size: a shard it lists that is gone, one it does not list, or
  one rewritten since (another size) makes every result computed from it
  wrong, so the run stops before any work (and before counting anything).
  A shard with its described size is taken at its described count; the
  eval itself checks that it holds as many records (`tfrecord`'s
  `_read_counted_file`, `batch_eval`).

  Args:
    data_dir: the TFRecord directory.
    split: 'validation' or 'train'.
    files: the split's files (`tfrecord.list_files`).

  Raises:
    ConfigError: one line naming the file, the key and the first shards
      that disagree.
  """
  try:
    info = dataset_info.read(data_dir)
  except ValueError as e:
    raise ConfigError('data_dir', str(e)) from None
  if info is None or split not in info.splits:
    return
  described = info.splits[split].files
  found = dict(zip((os.path.basename(f) for f in files),
                   tfrecord.file_sizes(files)))
  problems = [f'{n} is described but missing'
              for n in sorted(set(described) - set(found))]
  problems += [f'{n} ({found[n]} bytes) is not described'
               for n in sorted(set(found) - set(described)) if found[n]]
  problems += [f'{n} has {found[n]} bytes, described {e.bytes}'
               for n, e in sorted(described.items())
               if n in found and found[n] != e.bytes]
  if problems:
    raise ConfigError(
        'data_dir', f'{dataset_info.path(data_dir)}: "splits.{split}.files" '
        f'describes {len(described)} shards of '
        f'{info.splits[split].num_records} records, which the {split}-* '
        f'files in {data_dir} are not ({"; ".join(problems[:3])}); describe '
        f'the files again: efficientnet-tpu-make-tfrecords --index={data_dir}')


def _check_num_eval_images(data_cfg: DataConfig, found: int, where: str,
                           say_narrowed: bool = False) -> None:
  """Refuses more eval images than the split has; logs fewer if asked."""
  if found >= data_cfg.num_eval_images:
    if say_narrowed and found > data_cfg.num_eval_images:
      # A preset's or an old run's count may be what narrows it.
      logging.info('num_eval_images=%d: evaluating the first %d of the %d '
                   'eval records (%s).', data_cfg.num_eval_images,
                   data_cfg.num_eval_images, found, where)
    return
  fix = (f'set `num_eval_images={found}` or less' if found else
         'write eval records or use `mode=train`')
  raise ConfigError(
      'num_eval_images', f'{data_cfg.num_eval_images} requested but the eval '
      f'split has {found} records ({where}); {fix}')


# ---------------------------------------------------------------------------
# The real-data pipeline: source -> record map -> batching (the reader,
# decoder / parser and batching split of tensorflow/models official/vision).
# ---------------------------------------------------------------------------


def build_input(data_cfg: DataConfig,
                image_size: int,
                is_training: bool,
                global_batch_size: int,
                private_threadpool_size: int = 0,
                num_classes: Optional[int] = None,
                start_step: int = 0,
                count_cache_dir: Optional[str] = None
               ) -> Union[contract.TrainInput, contract.EvalInput]:
  """The real-data input: per-replica batches of TFRecords or a tfds set.

  Each pipeline (`train_pipeline`, `eval_pipeline`) reads its share of the
  records (`read_source`), decodes, checks and preprocesses each record in
  one fused map (`train_example` / `map_train_records`, `eval_example`) and
  batches them (`batch_train`; `batch_eval`, padded and masked).

  Args:
    data_cfg: source ('tfrecord' or 'tfds:NAME'), data_dir, label offset,
      augmentation, resize method, shuffle buffer, skip_corrupt and its
      limits, pixel limit, determinism.
    image_size: output resolution S.
    is_training: training (random crop, shuffled, repeated) or eval (center
      crop, padded with a mask, exactly `EvalInput.steps` batches).
    global_batch_size: batch over all replicas; must divide evenly.
    private_threadpool_size: 0 = TensorFlow's shared pool.
    num_classes: labels must be in [0, num_classes): an error naming the
      file, or (skip_corrupt, training) the record is skipped. None: only
      negative labels are refused.
    start_step: training resumes after this many steps: the stream
      continues where it stopped (see `stream.resumable_stream`).
    count_cache_dir: where the record counts that place a resumed stream
      are cached (`tfrecord.record_counts`); None: counted on every resume.
      TFRecord eval: given, the eval files are counted (once, cached here)
      unless dataset_info.json describes them, and eval is sharded by file;
      None: sharded by file only if dataset_info.json gives every eval
      file's count, else by record.

  Returns:
    Training: a `contract.TrainInput`, with skip counts when skip_corrupt.
    Eval: a `contract.EvalInput` (its `file_counts` set when sharded by
    file).

  Raises:
    ConfigError: no matching files, tfds dataset not prepared, etc. Listing
      happens here, before any strategy call.
  """
  if data_cfg.source == 'synthetic':
    raise ValueError('build_input reads real data; use make_input '
                     "for data='synthetic'")
  files = None
  if data_cfg.source.startswith('tfds:'):
    tfds_source.load_builder(data_cfg)  # Fail early, on the caller's thread.
  else:
    files = tuple(tfrecord.list_files(data_cfg.data_dir, is_training))
  if is_training:
    skipped = checks.SkippedRecords() if data_cfg.skip_corrupt else None
    return contract.TrainInput(
        fn=functools.partial(
            train_pipeline, data_cfg=data_cfg, files=files,
            image_size=image_size, global_batch_size=global_batch_size,
            num_classes=num_classes, start_step=start_step,
            count_cache_dir=count_cache_dir, skipped=skipped,
            private_threadpool_size=private_threadpool_size),
        skipped=skipped)
  counts = None
  if files is not None:
    counts = _eval_file_counts(files, count_cache_dir)
    if counts is not None:
      _check_num_eval_images(
          data_cfg, sum(counts),
          f'{len(files)} {tfrecord.EVAL_PATTERN!r} files in '
          f'{data_cfg.data_dir!r}')
  return contract.EvalInput(
      fn=functools.partial(
          eval_pipeline, data_cfg=data_cfg, files=files,
          image_size=image_size, global_batch_size=global_batch_size,
          num_classes=num_classes, file_counts=counts,
          private_threadpool_size=private_threadpool_size),
      num_eval_images=data_cfg.num_eval_images,
      global_batch_size=global_batch_size, file_counts=counts)


def _eval_file_counts(files, count_cache_dir: Optional[str]
                     ) -> Optional[Tuple[int, ...]]:
  """Record counts of the eval files, in order, when known; else None.

  Known: from dataset_info.json, or counted (once, cached) when there is a
  cache dir. The choice depends only on the arguments and the data dir, so
  every host makes the same one and runs the same eval steps.
  """
  files = list(files)
  if count_cache_dir is not None:
    by_file = tfrecord.record_counts(files, count_cache_dir)
  else:
    by_file = tfrecord.described_counts(files)
    if len(by_file) < len(files):
      return None
  return tuple(by_file[f] for f in files)


def train_pipeline(ctx: Optional[tf.distribute.InputContext] = None, *,
                   data_cfg: DataConfig, files: Optional[Tuple[str, ...]],
                   image_size: int, global_batch_size: int,
                   num_classes: Optional[int], start_step: int,
                   count_cache_dir: Optional[str],
                   skipped: Optional[checks.SkippedRecords],
                   private_threadpool_size: int) -> tf.data.Dataset:
  """One host's training pipeline: a `TrainInput`'s function, bound by
  `build_input` (`files`: the TFRecord training files; None: tfds).

  With `skipped` (skip_corrupt), the pipeline's skip counts are created
  here, so on the device the strategy builds the pipeline under.
  """
  ctx = ctx or tf.distribute.InputContext()
  batch = ctx.get_per_replica_batch_size(global_batch_size)
  records, decode = read_source(data_cfg, files, True, ctx, start_step,
                                global_batch_size, count_cache_dir)
  example = train_example(data_cfg, decode, image_size,
                          ctx.input_pipeline_id, num_classes,
                          skip=skipped is not None)
  ds = map_train_records(records, example, data_cfg, image_size, skipped)
  ds = batch_train(ds, batch, skip=skipped is not None)
  return _finish(ds, True, private_threadpool_size, data_cfg.deterministic)


def eval_pipeline(ctx: Optional[tf.distribute.InputContext] = None, *,
                  data_cfg: DataConfig, files: Optional[Tuple[str, ...]],
                  image_size: int, global_batch_size: int,
                  num_classes: Optional[int],
                  file_counts: Optional[Tuple[int, ...]],
                  private_threadpool_size: int) -> tf.data.Dataset:
  """One host's eval pipeline: an `EvalInput`'s function, bound by
  `build_input` (`file_counts`: set when sharded by file, see
  `EvalInput.file_counts`)."""
  ctx = ctx or tf.distribute.InputContext()
  batch = ctx.get_per_replica_batch_size(global_batch_size)
  index, num = ctx.input_pipeline_id, ctx.num_input_pipelines
  plan = None
  if file_counts is not None:
    plan = eval_shards.plan(file_counts, data_cfg.num_eval_images, num,
                            global_batch_size)
  records, decode = read_source(data_cfg, files, False, ctx,
                                eval_plan=plan, eval_counts=file_counts)
  if plan is None:
    # Sharded by record: pipeline i keeps records i, i + k, ...
    real = len(range(index, data_cfg.num_eval_images, num))
    steps = contract.num_eval_steps(data_cfg.num_eval_images,
                                    global_batch_size)
  else:
    real, steps = plan.records(index), plan.steps
  ds = records.map(eval_example(data_cfg, decode, image_size, num_classes),
                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = batch_eval(ds, ctx, batch, steps, real, data_cfg)
  return _finish(ds, False, private_threadpool_size, data_cfg.deterministic)


def read_source(data_cfg: DataConfig, files: Optional[Tuple[str, ...]],
                is_training: bool, ctx: tf.distribute.InputContext,
                start_step: int = 0, global_batch_size: int = 0,
                count_cache_dir: Optional[str] = None,
                eval_plan: Optional[eval_shards.EvalShardPlan] = None,
                eval_counts: Optional[Tuple[int, ...]] = None):
  """The source: this pipeline's records, and how to decode one.

  TFRecords (`files`) are read by `tfrecord.read_records`, a prepared tfds
  set (`files` None) by `tfds.read_records`: training reads this host's
  files, from the resumable stream's position after `start_step`
  (`stream.pipeline_position`); eval reads this host's files of
  `eval_plan` (sharded by file, each checked against `eval_counts`) or
  every k-th record of the split (sharded by record).

  Returns:
    (records, decode): training records are (position, item) pairs, eval
    records items; `decode(*item)` (an item that is no tuple: `decode(item)`)
    gives (image_bytes, label, source).
  """
  if files is None:
    return tfds_source.read_records(data_cfg, is_training, ctx, start_step,
                                    global_batch_size)
  records = tfrecord.read_records(
      data_cfg, list(files), is_training, ctx, start_step, global_batch_size,
      count_cache_dir, eval_plan=eval_plan, eval_counts=eval_counts)
  return records, functools.partial(
      tfrecord.parse_record,
      include_background_label=data_cfg.include_background_label)


def train_example(data_cfg: DataConfig, decode, image_size: int,
                  pipeline: int, num_classes: Optional[int], skip: bool):
  """The training record map: `fn(position, item)` for one record.

  One fused map per record (parse, check, crop-decode, flip, resize, uint8):
  every extra tf.data function call costs per image. The random crop and
  flip are seeded by the element's place in the stream
  (`stream.element_seed`), so a resumed stream augments alike.

  Args:
    data_cfg: augmentation, crop ranges, resize method, pixel limit, seed.
    decode: an item -> (image_bytes, label, source) (`read_source`).
    image_size: output resolution S.
    pipeline: this pipeline's `input_pipeline_id`.
    num_classes: labels outside [0, num_classes) are bad records.
    skip: skip_corrupt: bad records are marked rather than failing.

  Returns:
    The map: strict, `{'images', 'labels'}` (a bad record stops the stream
    with an error naming its file); skipping, `(example, source, reason)`,
    `reason` the index in `checks.SKIP_REASONS` or -1 for a good record
    (whose image alone is decoded).
  """
  is_tfds = data_cfg.source.startswith('tfds:')
  area_range = (data_cfg.train_crop_min_area, data_cfg.train_crop_max_area)
  aspect_ratio_range = (data_cfg.train_crop_min_aspect,
                        data_cfg.train_crop_max_aspect)

  def train_map(position, item):
    image_bytes, label, source = (decode(*item) if isinstance(item, tuple)
                                  else decode(item))
    seed = stream.element_seed(data_cfg.seed, pipeline, position)
    preprocess = lambda: preprocessing.preprocess_for_train(  # pylint: disable=g-long-lambda
        image_bytes, image_size, data_cfg.resize_method,
        data_cfg.augment_name, data_cfg.randaug_num_layers,
        data_cfg.randaug_magnitude, allow_non_jpeg=is_tfds, seed=seed,
        area_range=area_range, aspect_ratio_range=aspect_ratio_range,
        crop_fraction=data_cfg.eval_crop_fraction,
        flip=data_cfg.random_flip)
    if not skip:
      with tf.control_dependencies(checks.check_payload(
          image_bytes, label, source, is_tfds, num_classes,
          data_cfg.max_image_pixels)):
        return {'images': preprocess(), 'labels': label}
    reason = checks.skip_reason(image_bytes, label, is_tfds, num_classes,
                                data_cfg.max_image_pixels)
    image = tf.cond(reason < 0, preprocess,
                    lambda: tf.zeros([image_size, image_size, 3], tf.uint8))
    return {'images': image, 'labels': label}, source, reason

  return train_map


def guard_example(example_map, image_size: int):
  """`example_map` (a skipping `train_example`) made safe for records that
  pass the header checks but fail to parse or decode: `fn(position, item)`
  -> a dataset of exactly one `(example, source, reason)`.

  The record gets its own dataset: an error drops only it, and the fallback
  element then marks it as a bad record (`checks.DECODE_FAILED`), so the
  counts and the skip-rate checks see it and a stream of such records is
  bounded too.
  """

  def guarded_map(position, item):
    source = (item[1] if isinstance(item, tuple) else
              tf.strings.join(['tfds:', item['tfds_id']]))
    one = tf.data.Dataset.from_tensors((position, item)).map(
        example_map).ignore_errors()
    fallback = tf.data.Dataset.from_tensors(
        ({'images': tf.zeros([image_size, image_size, 3], tf.uint8),
          'labels': tf.constant(-1, tf.int32)}, source,
         tf.constant(checks.DECODE_FAILED, tf.int32)))
    return one.concatenate(fallback).take(1)

  return guarded_map


def map_train_records(records: tf.data.Dataset, example_map,
                      data_cfg: DataConfig, image_size: int,
                      skipped: Optional[checks.SkippedRecords]
                     ) -> tf.data.Dataset:
  """Applies the training record map (`train_example`) to the stream.

  Strict (`skipped` None): the examples. skip_corrupt: `(example, valid)`
  pairs, each record guarded (`guard_example`) and counted by the
  pipeline's sequential scan (`checks.skip_rate_check`) into new counts of
  `skipped`, created here on this pipeline's device (the strategy calls
  the input function under it); invalid ones are filtered out.
  """
  if skipped is None:
    return records.map(example_map, num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=data_cfg.deterministic)
  # Each sub-dataset yields exactly one element: block_length 1 keeps the
  # stream's order.
  ds = records.interleave(guard_example(example_map, image_size),
                          cycle_length=16, block_length=1,
                          num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=data_cfg.deterministic)
  initial, check = checks.skip_rate_check(data_cfg.max_corrupt_fraction,
                                          skipped.new_pipeline())
  ds = ds.scan(initial, check)
  return ds.filter(lambda example, valid: valid)


def batch_train(examples: tf.data.Dataset, batch: int,
                skip: bool) -> tf.data.Dataset:
  """Training batches of `batch` (per replica), the remainder dropped;
  skip_corrupt's `valid` flags are dropped after batching (one call per
  batch, not per example)."""
  ds = examples.batch(batch, drop_remainder=True)
  if skip:
    ds = ds.map(lambda example, valid: example)  # Once per batch.
  return ds


def eval_example(data_cfg: DataConfig, decode, image_size: int,
                 num_classes: Optional[int] = None):
  """The eval record map: `fn(*item)` -> `{'images', 'labels'}` of one
  record, checked (a bad record stops the eval with an error naming its
  file: the eval never skips) and center-cropped."""
  is_tfds = data_cfg.source.startswith('tfds:')

  def eval_map(*record):
    image_bytes, label, source = decode(*record)
    with tf.control_dependencies(checks.check_payload(
        image_bytes, label, source, is_tfds, num_classes,
        data_cfg.max_image_pixels)):
      image = preprocessing.preprocess_for_eval(
          image_bytes, image_size, data_cfg.resize_method,
          allow_non_jpeg=is_tfds, crop_fraction=data_cfg.eval_crop_fraction)
    return {'images': image, 'labels': label}

  return eval_map


def batch_eval(examples: tf.data.Dataset, ctx: tf.distribute.InputContext,
               batch: int, steps: int, expected_real: int,
               data_cfg: DataConfig) -> tf.data.Dataset:
  """Pads with masked examples and batches exactly `steps` times per replica
  (`contract.batch_eval_examples`); `expected_real`: this pipeline's share
  of the examples, which must all be there (padding starting early means
  the split holds fewer records than counted: an error)."""
  replicas_per_pipeline = (ctx.num_replicas_in_sync //
                           ctx.num_input_pipelines)
  ds = contract.batch_eval_examples(examples, batch, replicas_per_pipeline,
                                    steps)
  is_tfds = data_cfg.source.startswith('tfds:')
  where = data_cfg.data_dir if not is_tfds else data_cfg.source
  message = (f'Eval split in {where!r} has fewer records than '
             f'num_eval_images={data_cfg.num_eval_images}'
             + ('' if is_tfds else
                f' (counted from its {dataset_info.FILENAME} or the '
                f'cached {tfrecord.COUNTS_FILE}): describe the files '
                f'again (efficientnet-tpu-make-tfrecords --index={where}) '
                'or delete the cache from model_dir'))

  def check_count(position, example):
    # Real examples come first: padding must not start before this
    # pipeline's share is exhausted.
    expected = tf.clip_by_value(expected_real - position * batch, 0, batch)
    ok = tf.reduce_sum(example['mask']) >= tf.cast(expected, tf.float32)
    with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
      return {k: tf.identity(v) for k, v in example.items()}

  return ds.enumerate().map(check_count)


def _finish(ds: tf.data.Dataset, is_training: bool,
            private_threadpool_size: int,
            deterministic: bool) -> tf.data.Dataset:
  """Prefetches and sets the pipeline's options (`_options`)."""
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options(is_training, private_threadpool_size,
                                  deterministic))


def _options(is_training: bool, private_threadpool_size: int,
             deterministic: bool = False) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic or not is_training
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.parallel_batch = True
  if private_threadpool_size:
    options.threading.private_threadpool_size = private_threadpool_size
  return options
