"""What every input source yields: the element spec, and eval padding.

Every source returns an `InputFn`, `fn(tf.distribute.InputContext) ->
tf.data.Dataset` for `strategy.distribute_datasets_from_function` (called
with None, it builds the single pipeline of a default InputContext). One
pipeline runs per host (`input_pipeline_id` of `num_input_pipelines`) and
yields per-replica batches of `b = ctx.get_per_replica_batch_size(global)`:

* training: `{'images': [b, s, s, 3] uint8, 'labels': [b] int32}`, batched
  with `drop_remainder=True` and repeated forever;
* eval: the same plus `'mask': [b] float32` (1 real, 0 padding), exactly
  `eval_steps(input_fn, ...)` batches per replica (`num_eval_steps`, or more
  when eval is sharded by file: see `eval_shards`), so that across all
  pipelines every eval example is seen exactly once with mask 1
  (`batch_eval_examples`).

Images are RGB 0..255, cropped, resized, flipped and augmented, but not
normalized: the train / eval step applies `preprocessing.normalize` (the
ImageNet mean / stddev and the cast to the compute dtype) on device. uint8
batches are 4x smaller than float32 on the host and on the host-to-device
link.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import tensorflow as tf

InputFn = Callable[[Optional[tf.distribute.InputContext]], tf.data.Dataset]


def num_eval_steps(num_eval_images: int, global_batch_size: int) -> int:
  """Eval batches per replica so that the global eval covers every image."""
  return math.ceil(num_eval_images / global_batch_size)


def eval_steps(input_fn: InputFn, num_input_pipelines: int,
               num_eval_images: int, global_batch_size: int) -> int:
  """Eval batches per replica that `input_fn` yields on this many hosts.

  An eval input function sharded by file carries its own count (the
  fullest host's, see `eval_shards.plan`) as `input_fn.eval_steps(hosts)`;
  for any other it is `num_eval_steps`.
  """
  steps_fn = getattr(input_fn, 'eval_steps', None)
  if steps_fn is not None:
    return steps_fn(num_input_pipelines)
  return num_eval_steps(num_eval_images, global_batch_size)


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
