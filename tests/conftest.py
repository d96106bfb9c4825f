"""Test set-up: split the CPU into 8 logical devices before TF initializes.

Every test can then build a MirroredStrategy over 1..8 of them, which is how
the pod code path (replica groups, per-host input, sharded eval) is tested.
"""

import gc
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from efficientnet_tpu import replicated  # pylint: disable=g-import-not-at-top

NUM_TEST_CPUS = 8

_cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_TEST_CPUS)
# Initialize the devices now: a later configure_cpu_devices(n) (a test that
# builds a 1-replica strategy first) must find them fixed, not re-split them.
assert len(tf.config.list_logical_devices('CPU')) == NUM_TEST_CPUS


# The tests CI also runs on the floor stack (.ci/floor.sh: Python 3.10, the
# oldest TensorFlow and Keras efficientnet_tpu supports; efficientnet_tpu/
# stack.py): whatever uses an API that changed across the support matrix,
# chosen among the cheapest tests that show it. A module path covers the
# module; `path::name` a test and all its parameters, `path::name[ids]` one
# parametrization. Run them with
# `python -m pytest -m floor`.
FLOOR = (
    'tests/test_stack.py',
    # Exact resume (the smoke run itself runs in .ci/floor.sh).
    'tests/test_resume.py::test_deterministic_resume_continues_the_exact_stream',
    # Group BN against the concatenated batch (Keras layer weights, the
    # replica-local moving statistics).
    'tests/test_layers.py::test_training_step_matches_concatenated_group_batch',
    'tests/test_layers.py::test_moving_stats_are_replica_local_until_synchronized',
    # LARS and LAMB against numpy, and on replicas against one device
    # (Keras optimizer internals: slots, iterations, serialization).
    'tests/test_optimizers.py',
    # Checkpoint pruning by name overrides CheckpointManager._sweep (TF
    # internals), in a model_dir a glob would misread.
    'tests/test_literal_paths.py::'
    'test_training_prunes_its_own_checkpoints_and_nothing_else',
    'tests/test_lamb.py',
    'tests/test_ema.py',
    'tests/test_float16.py::test_overflow_on_one_replica_skips_the_step_everywhere',
    'tests/test_float16.py::test_finite_step_applies_the_summed_gradient',
    # Multi-worker chief + worker on localhost, and the forced GPU path.
    'tests/test_accelerator_paths.py::test_chief_and_worker_on_localhost_only_the_chief_writes[xla]',
    # The forced GPU path: collectives with bfloat16 on 2 replicas, then XLA
    # (after a run without it in the same process, as found on TF 2.18).
    'tests/test_accelerator_paths.py::test_gpu_path_trains_evaluates_and_resumes_like_the_cpu_path[2-True-auto]',
    'tests/test_accelerator_paths.py::test_gpu_path_trains_evaluates_and_resumes_like_the_cpu_path[1-False-true]',
    # keras.applications weights into our model.
    'tests/test_init_checkpoint.py::test_b0_weights_h5_gives_keras_logits_on_every_replica',
    # Eval and export from model_dir; serving the export.
    'tests/test_run_modes.py',
    'tests/test_export.py::test_export_serves_mixed_formats_and_flags_bad_rows',
    'tests/test_export.py::test_export_all_invalid_and_empty_batches',
    # The per-device stages of distributed iterators, untuned by wrapping a
    # private function of TF's (replicated.iterate).
    'tests/test_input_pipeline.py::'
    'test_distributed_iterators_do_not_tune_the_per_device_stages',
    # The forward and backward pass traced once for all CPU replicas: Keras'
    # StatelessScope, TF's raw collective ops in a non-inlined function.
    'tests/test_step.py::test_traced_once_step_matches_the_per_replica_trace',
    'tests/test_step.py::'
    'test_traced_once_step_refuses_replicas_of_other_batch_shapes',
    'tests/test_collectives.py::'
    'test_grouped_sum_traced_once_for_every_replica',
)


def _without_autotuning(distribute_input):
  """`replicated.distribute_input` whose pipelines run without tf.data's
  autotuning.

  Deleting an iterator whose pipeline autotunes waits for the autotuning
  thread, which wakes at its next optimization: an interval that doubles
  while the iterator lives, up to a minute (TF 2.18-2.21). A test that drops
  a trainer or evaluator of 8 replicas waited 9 s for it with two CPU-bound
  processes beside it, 0.3 s alone, 137-201 s in a parallel run of the suite:
  most of such a run's time, with its cores idle. The batches are the same
  (the order is fixed, `deterministic`); only the parallelism of their
  production is no longer tuned. Runs of the application keep autotuning
  (tests/test_input_pipeline.py checks its options).
  """
  def without(strategy, input_fn):
    options = tf.data.Options()
    options.autotune.enabled = False
    return distribute_input(
        strategy, lambda ctx: input_fn(ctx).with_options(options))
  return without


replicated.distribute_input = _without_autotuning(
    replicated.distribute_input)


@pytest.fixture(autouse=True)
def _same_random_state_in_any_order():
  """Every test starts from the same global random state (Python, numpy,
  TF, Keras): weights a test initializes without a seed of its own are
  then the same whichever tests ran before it in the process (a CLI test
  that seeds the global state and builds a model used to decide whether a
  later test's model learned in 60 steps)."""
  keras.utils.set_random_seed(1234)


@pytest.fixture(autouse=True, scope='module')
def _collect_a_modules_garbage():
  """Tears down what a module's tests left (trainers, traced functions,
  iterators of many replicas) when the module ends. Left to Python's
  collector, that teardown lands inside a later test: the first float16
  test after tests/test_host_work.py's 8-replica trainers took 44-385 s
  instead of 3 s."""
  yield
  gc.collect()


def pytest_addoption(parser):
  parser.addoption('--reverse_order', action='store_true',
                   help='run the tests in the reverse of their collected '
                   'order (a check that no test depends on what ran '
                   'before it)')


def pytest_collection_modifyitems(config, items):
  for item in items:
    path, _, name = item.nodeid.partition('::')
    test = f'{path}::{name.split("[")[0]}'
    if path in FLOOR or test in FLOOR or item.nodeid in FLOOR:
      item.add_marker(pytest.mark.floor)
  if config.getoption('reverse_order'):
    items.reverse()
