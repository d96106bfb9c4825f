"""Eval sharded by file: which pipeline reads which eval files.

With the record count of every eval file known (`dataset_info.json`, or
`tfrecord.record_counts`), each input pipeline (host) reads only its own
files instead of reading the whole split and keeping every k-th record.
Hosts then hold different numbers of records, but every replica must run
the same number of eval steps (the metrics are summed by collectives that
all replicas join): the steps are those of the fullest host, and the other
hosts pad with masked examples (`contract.batch_eval_examples`).

The plan is a pure function of the counts, `num_eval_images`, the host
count and the global batch, so every host computes the same one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class EvalShardPlan:
  """Which records each eval pipeline reads.

  Attributes:
    files: per pipeline, (file index, records to take from its start)
      pairs in file order. Only the first `num_eval_images` records of the
      split, in file order, are used: the last file used may be taken in
      part, and files after it (and empty files) are read by no pipeline.
    steps: eval batches per replica, the same on every pipeline: enough for
      the fullest pipeline.
  """
  files: Tuple[Tuple[Tuple[int, int], ...], ...]
  steps: int

  def records(self, pipeline: int) -> int:
    """Real (mask 1) examples pipeline `pipeline` yields."""
    return sum(n for _, n in self.files[pipeline])


def plan(counts: Sequence[int], num_eval_images: int, num_pipelines: int,
         global_batch_size: int) -> EvalShardPlan:
  """Assigns eval files to pipelines, balanced by records.

  Each pipeline gets at most ceil(files / pipelines) files (files: those
  with records to take), and within that bound the records are balanced
  greedily: the largest file goes first, each to the pipeline holding the
  fewest records so far (ties: the lower pipeline index).

  Args:
    counts: record count of each eval file, in the split's file order.
    num_eval_images: records to evaluate: the first ones in file order.
    num_pipelines: input pipelines (hosts).
    global_batch_size: eval batch over all replicas; a multiple of
      num_pipelines.

  Returns:
    The plan; its `steps` are at least `contract.num_eval_steps`.

  Raises:
    ValueError: the files hold fewer than num_eval_images records, or the
      batch does not split evenly over the pipelines.
  """
  if num_pipelines < 1 or global_batch_size % num_pipelines:
    raise ValueError(f'global_batch_size ({global_batch_size}) must be a '
                     f'multiple of num_pipelines ({num_pipelines}), >= 1')
  if num_eval_images < 0 or sum(counts) < num_eval_images:
    raise ValueError(f'num_eval_images: {num_eval_images} requested but '
                     f'the eval files hold {sum(counts)} records')
  takes, left = [], num_eval_images
  for i, n in enumerate(counts):
    take = min(n, left)
    left -= take
    if take:
      takes.append((i, take))
  cap = max(1, math.ceil(len(takes) / num_pipelines))
  loads = [0] * num_pipelines
  assigned: List[List[Tuple[int, int]]] = [[] for _ in range(num_pipelines)]
  # Stable: equal files keep file order.
  for i, take in sorted(takes, key=lambda t: -t[1]):
    host = min((p for p in range(num_pipelines) if len(assigned[p]) < cap),
               key=lambda p: (loads[p], p))
    assigned[host].append((i, take))
    loads[host] += take
  per_pipeline_batch = global_batch_size // num_pipelines
  steps = max(1, math.ceil(max(loads) / per_pipeline_batch))
  return EvalShardPlan(
      files=tuple(tuple(sorted(a)) for a in assigned), steps=steps)
