"""The client of the emulated pod (tests/test_pod_emulation.py).

Run as `python tests/pod_client.py CLUSTER_JSON DATA_DIR BAD_DATA_DIR OUT_DIR`
(BAD_DATA_DIR: TFRecords with bad records, for `skip_corrupt`) in its own
working directory, with the hosts (tests/pod_host.py) already serving. Like a
TPU pod's client it connects to every host's TensorFlow server and places
work there; it writes what it saw into OUT_DIR (results.json, arrays.npz)
for the test to check against the same work run locally, in this process.

A separate process because `tf.config.experimental_connect_to_cluster`
cannot be undone: it would rename the devices of every later test.
"""

import json
import os
import sys
import time
import traceback

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
from tensorflow.python.ops import script_ops  # pylint: disable=g-import-not-at-top

# Two local CPUs: the reference runs over two local replicas.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices('CPU')[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)

from efficientnet_tpu import experiment  # pylint: disable=g-import-not-at-top
from efficientnet_tpu.config import DataConfig  # pylint: disable=g-import-not-at-top
from efficientnet_tpu.data import pipeline  # pylint: disable=g-import-not-at-top
from efficientnet_tpu.testing import small_config  # pylint: disable=g-import-not-at-top

SIZE = 16
CLASSES = 5
GLOBAL_BATCH = 8
REPLICAS = 4  # Two hosts of two cores.
BATCHES = 2

# Every option of the input functions (mixing runs in the train step:
# see `train` below).
INPUTS = {
    'train': dict(deterministic=True),
    'train_randaugment': dict(augment_name='randaugment'),
    'train_autoaugment': dict(augment_name='autoaugment'),
    'train_skip_corrupt': dict(skip_corrupt=True, deterministic=True),
    'eval': dict(),
}


# Python callbacks (tf.py_function) this process ran for graphs: a host's
# input pipeline must run none (a pod's hosts have no route to the client's
# Python, and per record it would be a round trip; issue 27 item 2).
CALLBACKS = [0]
_call = script_ops.EagerFunc.__call__


def _counting_call(self, *args, **kwargs):
  CALLBACKS[0] += 1
  return _call(self, *args, **kwargs)


script_ops.EagerFunc.__call__ = _counting_call


def host(i, core=0):
  return f'/job:worker/replica:0/task:{i}/device:CPU:{core}'


def _first_line(e):
  return f'{type(e).__name__}: ' + (str(e).strip().splitlines() or [''])[0]


def _batches(input_fn, ctx, device):
  """BATCHES batches of `input_fn(ctx)`, built and iterated on `device`
  (None: here) as TPUStrategy's input workers do."""
  if device is None:
    it = iter(input_fn(ctx))
    return [next(it) for _ in range(BATCHES)], None
  with tf.device(device):
    it = iter(input_fn(ctx))
  batches = [next(it) for _ in range(BATCHES)]
  return batches, batches[0]['images'].device


def run_inputs(data_dir, bad_data_dir, results, arrays):
  for name, options in INPUTS.items():
    training = name != 'eval'
    cfg = DataConfig(
        source='tfrecord', shuffle_buffer=16, num_train_images=64,
        num_eval_images=20, max_corrupt_fraction=0.5, **options,
        data_dir=bad_data_dir if options.get('skip_corrupt') else data_dir)
    # Augmentations are per-image maps: one host is enough.
    for i in (1,) if 'augment' in name else (0, 1):
      ctx = tf.distribute.InputContext(num_input_pipelines=2,
                                       input_pipeline_id=i,
                                       num_replicas_in_sync=REPLICAS)
      for where in ('remote', 'local'):
        key = f'{name}/{i}/{where}'
        # A new input per run: skip_corrupt counts per input.
        input_fn = pipeline.build_input(cfg, SIZE, training, GLOBAL_BATCH,
                                        num_classes=CLASSES).fn
        callbacks = CALLBACKS[0]
        try:
          batches, device = _batches(input_fn, ctx,
                                     host(i) if where == 'remote' else None)
        except Exception as e:  # pylint: disable=broad-except
          results[key] = {'error': _first_line(e)}
          continue
        results[key] = {'device': device,
                        'client_callbacks': CALLBACKS[0] - callbacks}
        for field in batches[0]:
          arrays[f'{key}/{field}'] = np.stack([b[field].numpy()
                                               for b in batches])


def _weights(model):
  return [v.numpy() for v in model.variables]


def _train(model_dir, strategy, overrides, initial=None):
  """2 replicated steps (mixing, EMA), summaries, checkpoint; given
  `initial` weights also eval and export."""
  cfg = small_config(model_dir, num_replicas=2, **overrides)
  trainer = experiment.build_trainer(cfg, strategy)
  if initial is not None:
    for v, w in zip(trainer.model.variables, initial):
      v.assign(w)
      trainer.ema.shadow_of(v).assign(w)
  start = _weights(trainer.model)
  if initial is None:  # The reference: training only.
    metrics = trainer.train()
  else:
    metrics = trainer.train(evaluator=experiment.evaluator_for(trainer))
    experiment.export_model(cfg, trainer.state, model_dir + '_export')
  devices = sorted({d for v in trainer.model.variables
                    for d in (x.device for x in v.value.values)})
  return trainer, start, metrics, devices


def run_train(data_dir, results, arrays):
  overrides = dict(
      data=dict(data='tfrecord', data_dir=data_dir, num_train_images=64,
                num_eval_images=20, deterministic=True, shuffle_buffer=16),
      optimizer=dict(mixup_alpha=0.2, moving_average_decay=0.9),
      train=dict(train_batch_size=8, eval_batch_size=8, train_steps=2))
  ops = tf.distribute.ReductionToOneDevice
  local = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'],
                                         cross_device_ops=ops())
  # The closest CPU analogue of TPUStrategy: the client drives a host's
  # cores (MirroredStrategy refuses devices of several remote tasks).
  remote = tf.distribute.MirroredStrategy([host(0, 0), host(0, 1)],
                                          cross_device_ops=ops())
  ref, initial, ref_metrics, _ = _train(os.path.abspath('local_run'), local,
                                        overrides)
  trainer, _, metrics, devices = _train(os.path.abspath('remote_run'),
                                        remote, overrides, initial)
  results['train'] = {'local': ref_metrics, 'remote': metrics,
                      'devices': devices}
  arrays['train/initial'] = np.concatenate([w.ravel() for w in initial])
  arrays['train/local'] = np.concatenate(
      [w.ravel() for w in _weights(ref.model)])
  arrays['train/remote'] = np.concatenate(
      [w.ravel() for w in _weights(trainer.model)])


def run_paths(results):
  """Local paths written by ops placed on a host: relative to whose cwd?"""
  with tf.device(host(1)):
    writer = tf.summary.create_file_writer('summaries')
    with writer.as_default():
      tf.summary.scalar('x', 1.0, step=0)
    writer.flush()
    variable = tf.Variable(1.0)
  try:
    tf.train.Checkpoint(v=variable).write('checkpoints/model')
    results['paths/checkpoint'] = {}
  except Exception as e:  # pylint: disable=broad-except
    results['paths/checkpoint'] = {'error': _first_line(e)}


def main(argv):
  cluster, data_dir, bad_data_dir, out_dir = argv[1:]
  tf.config.experimental_connect_to_cluster(
      tf.train.ClusterSpec(json.loads(cluster)))
  results, arrays = {'seconds': {}}, {}
  for run in (lambda: run_inputs(data_dir, bad_data_dir, results, arrays),
              lambda: run_train(data_dir, results, arrays),
              lambda: run_paths(results)):
    start = time.time()
    try:
      run()
    except Exception:  # pylint: disable=broad-except
      results.setdefault('crashed', []).append(traceback.format_exc())
    results['seconds'][len(results['seconds'])] = time.time() - start
  np.savez(os.path.join(out_dir, 'arrays.npz'), **arrays)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)


if __name__ == '__main__':
  main(sys.argv)
