"""What every input source yields: the typed inputs, the element spec, and
eval padding.

Every source returns a `TrainInput` or an `EvalInput`. Each carries an
`InputFn`, `fn(tf.distribute.InputContext) -> tf.data.Dataset` for
`strategy.distribute_datasets_from_function` (called with None, it builds
the single pipeline of a default InputContext), and what its reader needs
to know besides the batches: the skip counts of a training input
(`TrainInput.skipped`), the eval steps of an eval input
(`EvalInput.steps`). One pipeline runs per host (`input_pipeline_id` of
`num_input_pipelines`) and yields per-replica batches of
`b = ctx.get_per_replica_batch_size(global)`:

* training: `{'images': [b, s, s, 3] uint8, 'labels': [b] int32}`, batched
  with `drop_remainder=True` and repeated forever;
* eval: the same plus `'mask': [b] float32` (1 real, 0 padding), exactly
  `EvalInput.steps(num_input_pipelines)` batches per replica
  (`num_eval_steps`, or more when eval is sharded by file: see
  `eval_shards`), so that across all pipelines every eval example is seen
  exactly once with mask 1 (`batch_eval_examples`).

Images are RGB 0..255, cropped, resized, flipped and augmented, but not
normalized: the train / eval step applies `preprocessing.normalize` (the
ImageNet mean / stddev and the cast to the compute dtype) on device. uint8
batches are 4x smaller than float32 on the host and on the host-to-device
link.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple

import tensorflow as tf

from efficientnet_tpu.data import checks
from efficientnet_tpu.data import eval_shards

InputFn = Callable[[Optional[tf.distribute.InputContext]], tf.data.Dataset]


def num_eval_steps(num_eval_images: int, global_batch_size: int) -> int:
  """Eval batches per replica so that the global eval covers every image."""
  return math.ceil(num_eval_images / global_batch_size)


@dataclasses.dataclass(frozen=True)
class TrainInput:
  """A training input: batches repeated forever.

  Attributes:
    fn: the input function (one pipeline per call).
    skipped: with skip_corrupt, the records its pipelines skipped, counted
      in TF lookup tables each call creates on its device (the host reads
      them, `checks.SkippedRecords.report`); None for a strict input, which
      fails on a bad record instead.
  """
  fn: InputFn
  skipped: Optional[checks.SkippedRecords] = None


@dataclasses.dataclass(frozen=True)
class EvalInput:
  """An eval input: padded, masked batches, each eval image once.

  Attributes:
    fn: the input function (one pipeline per call).
    num_eval_images: images evaluated over all pipelines.
    global_batch_size: eval batch over all replicas.
    file_counts: when eval is sharded by file, the record count of each eval
      file in file order (`eval_shards.plan` assigns the files to
      pipelines); None when sharded by record (pipeline i of k keeps records
      i, i + k, ...).
  """
  fn: InputFn
  num_eval_images: int
  global_batch_size: int
  file_counts: Optional[Tuple[int, ...]] = None

  def plan(self, num_input_pipelines: int
          ) -> Optional[eval_shards.EvalShardPlan]:
    """Which files each of `num_input_pipelines` reads; None when sharded
    by record."""
    if self.file_counts is None:
      return None
    return eval_shards.plan(self.file_counts, self.num_eval_images,
                            num_input_pipelines, self.global_batch_size)

  def steps(self, num_input_pipelines: int) -> int:
    """Eval batches per replica that `fn` yields on this many pipelines.

    The same on every pipeline: sharded by file, the fullest pipeline's
    (`eval_shards.plan`), else `num_eval_steps`.
    """
    plan = self.plan(num_input_pipelines)
    if plan is None:
      return num_eval_steps(self.num_eval_images, self.global_batch_size)
    return plan.steps


def batch_eval_examples(examples: tf.data.Dataset, per_replica_batch: int,
                        replicas_per_pipeline: int,
                        steps: int) -> tf.data.Dataset:
  """Pads one pipeline's examples to `steps` fixed-shape masked batches.

  Args:
    examples: unbatched `{'images', 'labels'}` elements, this pipeline's share
      of the eval set; at most `steps * per_replica_batch *
      replicas_per_pipeline` of them.
    per_replica_batch: batch size of each element produced.
    replicas_per_pipeline: replicas fed by this pipeline.
    steps: eval steps every replica runs.

  Returns:
    Exactly `steps * replicas_per_pipeline` batches; real examples carry mask 1
    and the zero padding after them mask 0.
  """
  capacity = steps * per_replica_batch * replicas_per_pipeline
  real = examples.map(lambda e: dict(e, mask=tf.constant(1.0)))
  spec = real.element_spec
  pad = tf.data.Dataset.from_tensors(
      {k: tf.zeros(s.shape, s.dtype) for k, s in spec.items()}).repeat()
  return (real.concatenate(pad).take(capacity)
          .batch(per_replica_batch, drop_remainder=True))
