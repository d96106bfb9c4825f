"""Shared test helpers: CPU-replica strategies and small experiment configs
(`small_config`, from efficientnet_tpu.testing, which the benchmarks use
too)."""

import socket

import keras
import numpy as np
import tensorflow as tf

from efficientnet_tpu import distribute
# Re-exported: the tests build their configs with it.
from efficientnet_tpu.testing import small_config  # pylint: disable=unused-import


def cpu_replicas(n):
  """A MirroredStrategy over the first n of conftest's logical CPUs."""
  return tf.distribute.MirroredStrategy(
      [f'/cpu:{i}' for i in range(n)],
      cross_device_ops=tf.distribute.ReductionToOneDevice())


def input_context(hosts, host, replicas):
  """The InputContext of input pipeline `host` of `hosts`, feeding
  `replicas` replicas in all (as the strategy hands each host's input
  function)."""
  return tf.distribute.InputContext(num_input_pipelines=hosts,
                                    input_pipeline_id=host,
                                    num_replicas_in_sync=replicas)


def per_replica(strategy, arrays):
  """A distributed value holding arrays[i] on replica i."""
  return strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(arrays[ctx.replica_id_in_sync_group]))


def split_batch(strategy, array):
  """A global batch split evenly over the replicas, in replica order."""
  n = strategy.num_replicas_in_sync
  size = len(array) // n
  return per_replica(strategy, [array[i * size:(i + 1) * size]
                                for i in range(n)])


def local_values(strategy, value):
  """The per-replica components of a distributed value, as numpy arrays."""
  return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def free_ports(n):
  """n free TCP ports on 127.0.0.1 (for multi-process runs on localhost)."""
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def strategy_for(cfg):
  return distribute.build_strategy(cfg.distribute)


def run_main(capsys, *args):
  """Parses `args` as the command line would and runs the trainer's main.

  Returns:
    (exit status, capsys's captured stdout and stderr).
  """
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from efficientnet_tpu import main as main_lib
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(['efficientnet-tpu-train', *args])
    rc = main_lib.main(['efficientnet-tpu-train'])
  finally:
    flags.FLAGS.unparse_flags()
  return rc, capsys.readouterr()


def file_digests(directory, with_mtime: bool = False) -> dict:
  """{relative path: sha256 (and mtime in ns)} of every file under
  `directory` ({} if there is none): what a test compares to show that
  nothing there was written."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, directory)] = (
          (digest, os.stat(path).st_mtime_ns) if with_mtime else digest)
  return out


def train_custom_loop(strategy, model, optimizer, xs, ys, global_batch,
                      extra_loss=None):
  """The custom loop an integrator writes, on the global batches `xs`, `ys`
  split over the replicas: each replica's summed cross entropy over the
  global batch (plus `extra_loss(model)` divided by the replicas), the
  gradients applied by Keras (all-reduced with SUM)."""

  @tf.function
  def train_step(x, y):
    def step_fn(x, y):
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
        per_example = keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True)
        loss = tf.reduce_sum(per_example) / global_batch
        if extra_loss is not None:
          loss += extra_loss(model) / strategy.num_replicas_in_sync
      grads = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))
    strategy.run(step_fn, args=(x, y))

  for x, y in zip(xs, ys):
    train_step(split_batch(strategy, x), split_batch(strategy, y))
