"""Test set-up: split the CPU into 8 logical devices before TF initializes.

Every test can then build a MirroredStrategy over 1..8 of them, which is how
the pod code path (replica groups, per-host input, sharded eval) is tested.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # pylint: disable=g-import-not-at-top

NUM_TEST_CPUS = 8

_cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_TEST_CPUS)
# Initialize the devices now: a later configure_cpu_devices(n) (a test that
# builds a 1-replica strategy first) must find them fixed, not re-split them.
assert len(tf.config.list_logical_devices('CPU')) == NUM_TEST_CPUS
