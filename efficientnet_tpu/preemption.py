"""SIGTERM stops training at the next step, with a checkpoint there.

Cloud TPU maintenance events, Spot and preemptible VMs, and Vertex AI
preemption send SIGTERM, then kill the process after a grace period. A host
loop is one `tf.function` call of up to `--iterations_per_loop` steps, and
Python runs signal handlers only between bytecodes, so a handler alone would
act after the loop: up to a whole loop late, past the grace period.

`StopRequest` therefore sets a host variable from a thread: CPython's C-level
signal handler writes the signal number to a wakeup pipe at once, a thread
reading the pipe assigns the variable, and the replicated loop
(`replicated.stoppable_loop`) reads it before each step. No Python runs per
step and the device is never waited on: the read is of a host (CPU)
variable. Processes that each run their own copy of the loop
(MultiWorkerMirroredStrategy workers) agree instead: each step all-reduces
the flags, so every worker stops after the same step, the first whose
all-reduce saw a signal anywhere.

`tf.distribute.experimental.PreemptionCheckpointHandler` does not fit: it
decides between calls of its `run`, i.e. between host loops, and on Cloud
TPU VMs (and GCE CPU VMs) its `run` and `save_checkpoint_if_preempted` do
nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator, Optional, Sequence

from absl import logging
import tensorflow as tf

# What a shell reports for a process ended by SIGTERM (128 + 15); the run
# ends with it after saving the checkpoint.
EXIT_CODE = 128 + signal.SIGTERM
SIGNALS = (signal.SIGTERM,)


class Preempted(Exception):
  """Training stopped on a signal; the checkpoint at `step` is saved."""

  def __init__(self, step: int, checkpoint: str, signum: Optional[int]):
    """Describes the stop.

    Args:
      step: the step the run stopped after.
      checkpoint: the checkpoint saved there (its prefix).
      signum: the signal this process received; None when another worker
        received it (multi-worker runs stop together).
    """
    self.step = step
    self.checkpoint = checkpoint
    self.signum = signum
    self.exit_code = EXIT_CODE
    cause = (signal.Signals(signum).name if signum is not None else
             'SIGTERM to another worker')
    super().__init__(
        f'preempted ({cause}) at step {step}; checkpoint '
        f'{os.path.basename(checkpoint)} saved: rerun the same command to '
        'resume')


class StopRequest:
  """A stop flag the training loop reads before each step.

  `watch()` sets it on SIGTERM; `request()` sets it directly (tests, or a
  caller with its own notice of a coming preemption). Create it outside any
  strategy scope: the flag is one plain variable on this host's CPU.
  """

  def __init__(self):
    # On the CPU: a read on an accelerator would make the host wait for the
    # device at every step. Within a remote TPU cluster's default device
    # scope this is the CPU of the host that runs the loop.
    with tf.device('/device:CPU:0'):
      self.flag = tf.Variable(0.0, trainable=False, name='stop_requested')
    self.signum: Optional[int] = None
    self.received_at: Optional[float] = None
    self._lock = threading.Lock()

  @property
  def requested(self) -> bool:
    """Whether this process received a stop request."""
    return self.signum is not None

  def request(self, signum: int = signal.SIGTERM) -> None:
    """Asks the loop to stop before its next step (any thread)."""
    with self._lock:
      first = self.signum is None
      if first:
        self.signum, self.received_at = signum, time.time()
    if first:
      self.flag.assign(1.0)
      logging.warning('%s received: stopping at the next step to save a '
                      'checkpoint there.', signal.Signals(signum).name)

  @contextlib.contextmanager
  def watch(self, signals: Sequence[int] = SIGNALS) -> Iterator[None]:
    """Within: `signals` call `request` (main thread only; elsewhere a no-op).

    The previous handlers and wakeup fd are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {s: signal.signal(s, self._handle) for s in signals}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    thread = threading.Thread(target=self._read_wakeups,
                              args=(read_fd, frozenset(signals)),
                              name='StopRequestWatcher', daemon=True)
    thread.start()
    try:
      yield
    finally:
      signal.set_wakeup_fd(previous_fd)
      for s, handler in previous.items():
        signal.signal(s, handler)
      os.close(write_fd)  # Ends the thread's read.
      thread.join()
      os.close(read_fd)

  def _handle(self, signum, frame) -> None:
    # Runs once the main thread is back in Python: the thread acted already.
    del frame
    self.request(signum)

  def _read_wakeups(self, fd: int, signals: frozenset) -> None:
    # The wakeup fd carries every signal with a Python handler (SIGINT too).
    while True:
      try:
        data = os.read(fd, 64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum in signals:
          self.request(signum)
