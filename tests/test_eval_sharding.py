"""Eval sharded by file (data/eval_shards.py through data/pipeline.py):
each host reads only its own eval files and every image counts once."""

import math
import os

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu.config import ConfigError, DataConfig
from efficientnet_tpu.data import contract
from efficientnet_tpu.data import dataset_info
from efficientnet_tpu.data import eval_shards
from efficientnet_tpu.data import pipeline as data_pipeline
from efficientnet_tpu.data import tfrecord
from tests.helpers import input_context
from tests.test_input_pipeline import write_split

SIZE = 8


def _label(f, j):
  """Record j of file f: its label names it (j < 100)."""
  return f * 100 + j + 1




def _write_info(data_dir, sizes):
  """dataset_info.json from the sizes written (not from any counting)."""
  names = sorted(n for n in os.listdir(data_dir)
                 if n.startswith('validation-'))
  files = {n: dataset_info.FileInfo(
      records=n_records, bytes=os.path.getsize(os.path.join(data_dir, n)))
           for n, n_records in zip(names, sizes)}
  dataset_info.write(str(data_dir), dataset_info.DatasetInfo(
      splits={'validation': dataset_info.SplitInfo(files=files)},
      classes=[]))


def _seen(batches):
  """(file, record) of every mask-1 example, and the files they come from."""
  seen = []
  for b in batches:
    mask = b['mask'].numpy()
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert np.all(b['images'].numpy()[mask == 0] == 0)
    for label in b['labels'].numpy()[mask == 1] + 1:  # Records are 1-based.
      seen.append((int(label) // 100, int(label) % 100 - 1))
  return seen


@pytest.fixture(scope='module')
def pod_dir(tmp_path_factory):
  """300 validation files of 0..7 tiny JPEG records, described."""
  d = tmp_path_factory.mktemp('pod_eval')
  sizes = np.random.RandomState(0).randint(0, 8, 300).tolist()
  write_split(str(d), 'validation', sizes, _label)
  _write_info(d, sizes)
  return d, sizes


def test_128_hosts_1024_replicas_count_every_image_once(pod_dir):
  """Each host's records (read by file, labels parsed, padded and masked by
  `contract.batch_eval_examples`), without decoding: 128 input pipelines
  through the full eval map take minutes on 2 cores; the few-host test
  below runs the whole eval input function."""
  data_dir, sizes = pod_dir
  total = sum(sizes)
  hosts, replicas, global_batch = 128, 1024, 1024
  cfg = DataConfig(source='tfrecord', data_dir=str(data_dir),
                   num_eval_images=total)
  files = tfrecord.list_files(str(data_dir), is_training=False)
  counts = tfrecord.described_counts(files)
  assert [counts[f] for f in files] == sizes
  plan = eval_shards.plan([counts[f] for f in files], total, hosts,
                          global_batch)
  # The steps that the real eval input reports for this slice.
  eval_input = data_pipeline.build_input(cfg, SIZE, False, global_batch)
  assert eval_input.steps(hosts) == plan.steps
  per_host = []
  for host in range(hosts):
    ctx = input_context(hosts, host, replicas)
    records = tfrecord.read_records(cfg, files, False, ctx, eval_plan=plan)
    examples = records.map(lambda r, f: {
        'images': tf.zeros([1, 1, 3], tf.uint8),
        'labels': tfrecord.parse_record(r, f, False)[1]})
    batches = contract.batch_eval_examples(
        examples, ctx.get_per_replica_batch_size(global_batch),
        replicas // hosts, plan.steps)
    # Iterated below all at once: one eager step per host, not per batch.
    per_host.append(batches.batch(10_000))
  everything = per_host[0]
  for ds in per_host[1:]:
    everything = everything.concatenate(ds)
  seen, mask_sum, max_files = [], 0.0, math.ceil(len(sizes) / hosts)
  lengths = set()
  for host, stacked in enumerate(everything):
    # Every replica (8 per host) steps the same number of times.
    lengths.add(int(stacked['mask'].shape[0]))
    mine = _seen([stacked])
    assert len({f for f, _ in mine}) <= max_files, host
    assert len(plan.files[host]) <= max_files
    seen.extend(mine)
    mask_sum += float(stacked['mask'].numpy().sum())
  assert lengths == {plan.steps * replicas // hosts}
  assert mask_sum == total
  split = {(f, j) for f, n in enumerate(sizes) for j in range(n)}
  assert len(seen) == total and set(seen) == split
  # The fullest host sets the steps; never fewer than by-record sharding.
  assert plan.steps >= contract.num_eval_steps(total, global_batch)
  assert plan.steps == math.ceil(max(plan.records(h) for h in range(hosts))
                                 / (global_batch // hosts))


@pytest.mark.parametrize('hosts,replicas,global_batch,num_eval_images', [
    (3, 6, 12, 37), (3, 3, 6, 30), (2, 4, 8, 37), (4, 8, 8, 21)])
def test_few_hosts_through_the_eval_input_function(
    tmp_path, hosts, replicas, global_batch, num_eval_images):
  """Counts from the count cache (no dataset_info.json); num_eval_images
  below the split takes the first records in file order."""
  sizes = [1, 7, 3, 0, 6, 2, 5, 4, 8, 1]
  write_split(str(tmp_path / 'data'), 'validation', sizes, _label)
  cfg = DataConfig(source='tfrecord', data_dir=str(tmp_path / 'data'),
                   num_eval_images=num_eval_images)
  eval_input = data_pipeline.build_input(cfg, SIZE, False, global_batch,
                                         count_cache_dir=str(tmp_path))
  assert os.path.exists(tmp_path / tfrecord.COUNTS_FILE)
  steps = eval_input.steps(hosts)
  seen, files_per_host = [], []
  for host in range(hosts):
    batches = list(eval_input.fn(input_context(hosts, host, replicas)))
    assert len(batches) == steps * replicas // hosts
    mine = _seen(batches)
    files_per_host.append({f for f, _ in mine})
    seen.extend(mine)
  first = [(f, j) for f, n in enumerate(sizes) for j in range(n)]
  assert sorted(seen) == first[:num_eval_images]
  # Disjoint files: each file is read by one host.
  assert sum(len(s) for s in files_per_host) == len(set().union(
      *files_per_host))
  nonempty = len({f for f, _ in first[:num_eval_images]})
  assert max(len(s) for s in files_per_host) <= math.ceil(nonempty / hosts)


def test_by_record_when_counts_are_unknown(tmp_path):
  """No dataset_info.json and no count cache dir: every host reads every
  file and keeps every k-th record (files shared between hosts)."""
  sizes = [5, 5, 5]
  write_split(str(tmp_path), 'validation', sizes, _label)
  cfg = DataConfig(source='tfrecord', data_dir=str(tmp_path),
                   num_eval_images=15)
  eval_input = data_pipeline.build_input(cfg, SIZE, False, 4)
  assert eval_input.file_counts is None
  assert eval_input.steps(2) == contract.num_eval_steps(15, 4)
  per_host = [_seen(eval_input.fn(input_context(2, h, 2))) for h in range(2)]
  assert {f for f, _ in per_host[0]} == {f for f, _ in per_host[1]} == {
      0, 1, 2}
  assert sorted(per_host[0] + per_host[1]) == [
      (f, j) for f in range(3) for j in range(5)]


def test_stale_dataset_info_is_not_trusted(tmp_path):
  """A shard rewritten after indexing (other size): by record, and a
  count cache counts it again."""
  write_split(str(tmp_path / 'd'), 'validation', [3, 4], _label)
  _write_info(tmp_path / 'd', [3, 4])
  files = tfrecord.list_files(str(tmp_path / 'd'), is_training=False)
  assert tfrecord.described_counts(files) == {files[0]: 3, files[1]: 4}
  write_split(str(tmp_path / 'd'), 'validation', [3, 2], _label)
  assert tfrecord.described_counts(files) == {files[0]: 3}
  assert tfrecord.record_counts(files, str(tmp_path)) == {files[0]: 3,
                                                          files[1]: 2}
  cfg = DataConfig(source='tfrecord', data_dir=str(tmp_path / 'd'),
                   num_eval_images=5)
  eval_input = data_pipeline.build_input(cfg, SIZE, False, 4)
  assert eval_input.file_counts is None
  assert eval_input.steps(2) == contract.num_eval_steps(5, 4)


def test_known_counts_below_num_eval_images_fail_up_front(pod_dir):
  data_dir, sizes = pod_dir
  cfg = DataConfig(source='tfrecord', data_dir=str(data_dir),
                   num_eval_images=sum(sizes) + 1)
  with pytest.raises(ConfigError, match=rf'^num_eval_images: '
                     rf'{sum(sizes) + 1} requested but the eval split has '
                     rf'{sum(sizes)} records'):
    data_pipeline.build_input(cfg, SIZE, False, 8)


@pytest.mark.parametrize('seed', range(20))
def test_plan_covers_the_first_records_once_and_balances(seed):
  rng = np.random.RandomState(seed)
  counts = rng.randint(0, 12, rng.randint(1, 60)).tolist()
  hosts = int(rng.randint(1, 20))
  batch = hosts * int(rng.randint(1, 5))
  num = int(rng.randint(0, sum(counts) + 1))
  plan = eval_shards.plan(counts, num, hosts, batch)
  taken = np.zeros(len(counts), int)
  for files in plan.files:
    assert [f for f, _ in files] == sorted(f for f, _ in files)
    for f, n in files:
      assert n > 0 and taken[f] == 0
      taken[f] = n
  # The first `num` records in file order, each file from its start.
  want = np.minimum(counts, np.maximum(0, num - np.cumsum([0] + counts[:-1])))
  np.testing.assert_array_equal(taken, want)
  used = int(np.count_nonzero(want))
  assert max(len(f) for f in plan.files) <= max(1, math.ceil(used / hosts))
  loads = [sum(n for _, n in files) for files in plan.files]
  assert plan.steps == math.ceil(max(loads) / (batch // hosts))
  assert plan.steps >= contract.num_eval_steps(num, batch)


def test_plan_rejects_what_it_cannot_cover():
  with pytest.raises(ValueError, match='num_eval_images: 8 requested but '
                     'the eval files hold 7 records'):
    eval_shards.plan([3, 4], 8, 2, 4)
  with pytest.raises(ValueError, match='multiple of num_pipelines'):
    eval_shards.plan([3, 4], 7, 3, 4)
