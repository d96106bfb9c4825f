"""The typed input contract (data/contract.py): what an input carries besides
its batches, checked against the batches its function yields."""

import math

import numpy as np
import pytest

from efficientnet_tpu.config import DataConfig
from efficientnet_tpu.data import checks
from efficientnet_tpu.data import contract
from efficientnet_tpu.data import pipeline as data_pipeline
from tests.helpers import input_context
from tests.test_input_pipeline import write_split

SIZE = 8
GLOBAL_BATCH = 4
# 15 eval records in 4 uneven files, 14 of them evaluated.
EVAL_SIZES = [5, 1, 3, 6]
NUM_EVAL = 14




@pytest.fixture(scope='module')
def eval_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('contract_eval')
  write_split(str(d), 'validation', EVAL_SIZES)
  return d


@pytest.mark.parametrize('by_file', [True, False], ids=['by_file',
                                                        'by_record'])
def test_eval_steps_are_the_fullest_hosts_batches(eval_dir, tmp_path,
                                                  by_file):
  """`EvalInput.steps(hosts)` for several host counts: every host yields
  exactly that many batches per replica, which is ceil(real examples of
  the fullest host / its examples per step), the real examples counted
  from the batches' masks."""
  cfg = DataConfig(source='tfrecord', data_dir=str(eval_dir),
                   num_eval_images=NUM_EVAL)
  eval_input = data_pipeline.build_input(
      cfg, SIZE, False, GLOBAL_BATCH,
      count_cache_dir=str(tmp_path) if by_file else None)
  assert isinstance(eval_input, contract.EvalInput)
  if by_file:
    assert eval_input.file_counts == tuple(EVAL_SIZES)
  else:
    assert eval_input.file_counts is None and eval_input.plan(2) is None
  steps_seen = set()
  for hosts, replicas in ((1, 1), (1, 2), (2, 2), (2, 4), (4, 4)):
    steps = eval_input.steps(hosts)
    real = []
    for host in range(hosts):
      batches = list(eval_input.fn(input_context(hosts, host, replicas)))
      assert len(batches) == steps * replicas // hosts, (hosts, host)
      real.append(int(sum(b['mask'].numpy().sum() for b in batches)))
    assert sum(real) == NUM_EVAL
    assert steps == math.ceil(max(real) / (GLOBAL_BATCH // hosts)), (
        hosts, real)
    steps_seen.add((hosts, steps))
  # By file, 4 hosts read one file each: 5 records of the fullest at 1 a
  # step, one step more than sharding by record.
  assert (4, 5 if by_file else math.ceil(NUM_EVAL / GLOBAL_BATCH)) in (
      steps_seen)


def test_synthetic_eval_steps_cover_the_set_once():
  cfg = DataConfig(num_eval_images=9)
  eval_input = data_pipeline.make_input(cfg, 5, SIZE, False, GLOBAL_BATCH)
  assert isinstance(eval_input, contract.EvalInput)
  for hosts in (1, 2, 4):
    batches = [list(eval_input.fn(input_context(hosts, h, hosts)))
               for h in range(hosts)]
    assert {len(b) for b in batches} == {eval_input.steps(hosts)}
    assert sum(float(x['mask'].numpy().sum())
               for b in batches for x in b) == 9
    assert eval_input.steps(hosts) == 3  # ceil(9 / 4), whatever the hosts.


def test_train_input_carries_its_skip_counts_or_none(tmp_path):
  """A skip_corrupt input exposes the counts of what its pipelines
  skipped (here every record of label 0, outside classes 1..5, all in file
  1); a strict one, and the synthetic one, carry none."""
  labels = iter([1, 2, 3, 4, 0, 0, 0, 0])
  write_split(str(tmp_path), 'train', [4, 4],
              label_fn=lambda f, j: next(labels))
  bad_file = str(tmp_path / 'train-00001-of-00002')
  cfg = dict(source='tfrecord', data_dir=str(tmp_path), shuffle_buffer=4)
  strict = data_pipeline.build_input(DataConfig(**cfg), SIZE, True, 2,
                                     num_classes=5)
  assert isinstance(strict, contract.TrainInput) and strict.skipped is None
  skipping = data_pipeline.build_input(
      DataConfig(**cfg, skip_corrupt=True, max_corrupt_fraction=0.9), SIZE,
      True, 2, num_classes=5)
  assert isinstance(skipping.skipped, checks.SkippedRecords)
  assert skipping.skipped.total == 0  # No pipeline built yet.
  seen = np.concatenate([b['labels'].numpy() for b in
                         skipping.fn(None).take(6)])
  assert set(seen) <= {0, 1, 2, 3}  # Labels 1..4, read 0-based.
  # 12 good records read, so at least 2 epochs: 4 bad records each.
  assert skipping.skipped.per_file.keys() == {bad_file}
  assert skipping.skipped.total >= 8
  synthetic = data_pipeline.make_input(
      DataConfig(skip_corrupt=True), 5, SIZE, True, GLOBAL_BATCH)
  assert isinstance(synthetic, contract.TrainInput)
  assert synthetic.skipped is None
