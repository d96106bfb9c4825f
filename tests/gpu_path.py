"""Forces TensorFlow's all-GPU MirroredStrategy code path on CPU devices.

On GPUs, MirroredStrategy and MultiWorkerMirroredStrategy take a different
code path than on CPUs: replicas run in threads without merge_call inside
XLA-compiled functions, and cross-device reductions use collective ops.
Patching TF's (and our) device-type checks to call every device a GPU runs
that path on logical CPU devices, so it is tested without a GPU.

Run as a script, it patches and then runs `efficientnet_tpu.main` with the
given flags (for multi-process runs).
"""

import contextlib
import sys
from unittest import mock

from tensorflow.python.distribute import collective_all_reduce_strategy
from tensorflow.python.distribute import mirrored_run
from tensorflow.python.distribute import mirrored_strategy

from efficientnet_tpu import distribute


@contextlib.contextmanager
def forced_gpu_path():
  """Every device counts as a GPU for TF's strategies and for ours."""
  everything_is_a_gpu = lambda device: True
  with contextlib.ExitStack() as stack:
    for module in (mirrored_run, mirrored_strategy,
                   collective_all_reduce_strategy, distribute):
      stack.enter_context(mock.patch.object(module, '_is_gpu_device',
                                            everything_is_a_gpu))
    yield


if __name__ == '__main__':
  from efficientnet_tpu import main  # pylint: disable=g-import-not-at-top
  with forced_gpu_path():
    sys.argv[0] = 'efficientnet-tpu-train'
    main.run()
