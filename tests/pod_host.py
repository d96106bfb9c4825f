"""One host of the emulated pod: a TensorFlow server that blocks.

Run as `python tests/pod_host.py CLUSTER_JSON INDEX CORES`: task INDEX of job
'worker' in CLUSTER_JSON, with CORES CPU devices, serving until killed. A
client connects with `tf.config.experimental_connect_to_cluster` and places
ops on `/job:worker/replica:0/task:INDEX`, as a TPU pod's client drives each
host's TensorFlow server (tests/test_pod_emulation.py).
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # pylint: disable=g-import-not-at-top


def main(argv):
  cluster, index, cores = json.loads(argv[1]), int(argv[2]), int(argv[3])
  server = tf.distribute.Server(
      tf.train.ClusterSpec(cluster), job_name='worker', task_index=index,
      protocol='grpc', start=True,
      config=tf.compat.v1.ConfigProto(device_count={'CPU': cores}))
  print('serving', flush=True)
  server.join()


if __name__ == '__main__':
  main(sys.argv)
