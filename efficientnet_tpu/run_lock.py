"""One training run per model_dir: a lock taken before training starts.

Two runs training into one model_dir would both write ckpt-N, config.json and
summaries, each overwriting the other's. The lock is `model_dir/.lock`:

* Local (and NFS) paths: `fcntl.flock` on that file. The OS releases it when
  the process ends however it ends (kill -9 included), so a rerun after a
  crash never needs manual cleanup. The file holds the holder's host, pid and
  start time, for the error message of a refused run. A filesystem without
  flock gets the marker below.
* gs:// and other non-local `tf.io.gfile` paths: a marker file holding the
  same plus a heartbeat that a background thread rewrites every
  `heartbeat_s`. A marker whose heartbeat is older than `stale_s` is taken
  over (its run was killed), as is one left on this host by a process that no
  longer exists once its heartbeat has missed two beats. Best effort: GCS has
  no atomic create-if-absent through `tf.io.gfile`, so two runs started
  within the same second may both win; each re-reads the marker after
  writing it, which narrows that window but cannot close it.

Usage:

  with run_lock.ModelDirLock(model_dir):
    trainer.train()
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from absl import logging

from efficientnet_tpu.config import ConfigError

LOCK_FILENAME = '.lock'
MODES = ('auto', 'flock', 'marker')
# Marker mode: the heartbeat period and the age at which a marker is taken to
# be left by a killed run. The gap leaves room for slow GCS writes, a paused
# VM and clock skew between hosts.
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_STALE_S = 300.0
# Marker mode: the wait between writing the marker and reading it back, so
# that of two runs starting together the later writer sees it won.
_SETTLE_S = 1.0


class _NoFlock(Exception):
  """The filesystem of model_dir does not support flock."""


def is_local_path(path: str) -> bool:
  """True for plain local paths (no URL scheme such as gs://)."""
  return '://' not in path


def _holder_info() -> dict:
  return {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
  }


def _describe(holder: Optional[dict]) -> str:
  if not holder:
    return 'holder unknown'
  return (f'host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, '
          f'started {holder.get("started", "?")}')


def _pid_exists(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError, OverflowError):
    return True  # Exists but not ours, or not a pid: do not assume dead.
  return True


class ModelDirLock:
  """Exclusive lock of a model_dir for one training run.

  Attributes:
    path: the lock file, `model_dir/.lock`.
    mode: 'flock' or 'marker' (resolved from 'auto' by the path).
  """

  def __init__(self, model_dir: str, mode: str = 'auto',
               heartbeat_s: float = DEFAULT_HEARTBEAT_S,
               stale_s: float = DEFAULT_STALE_S):
    """Creates the lock (not yet taken).

    Args:
      model_dir: the run's directory; created if missing.
      mode: 'auto' (flock for local paths, marker otherwise), or 'flock' /
        'marker' to force one (tests use 'marker' on a local path).
      heartbeat_s: marker mode: seconds between heartbeats.
      stale_s: marker mode: a heartbeat older than this is a dead run's.
    """
    if mode not in MODES:
      raise ValueError(f'mode: expected one of {MODES}, got {mode!r}')
    if not 0 < heartbeat_s < stale_s:
      raise ValueError(f'heartbeat_s: expected 0 < heartbeat_s < stale_s '
                       f'({stale_s}), got {heartbeat_s}')
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILENAME)
    if mode == 'auto':
      mode = 'flock' if is_local_path(model_dir) else 'marker'
    self.mode = mode
    self.heartbeat_s = heartbeat_s
    self.stale_s = stale_s
    self._fd = None
    self._token = None
    self._stop = threading.Event()
    self._thread = None

  @property
  def held(self) -> bool:
    return self._fd is not None or self._token is not None

  def acquire(self) -> 'ModelDirLock':
    """Takes the lock.

    Raises:
      ConfigError: another live run holds it (the message names it).
    """
    if self.held:
      raise RuntimeError(f'{self.path} is already held by this object')
    if self.mode == 'flock':
      try:
        self._acquire_flock()
      except _NoFlock as e:
        # A filesystem without flock (NFS without lockd, ...): a marker.
        logging.warning('flock of %s failed (%s); using a marker file.',
                        self.path, e)
        self.mode = 'marker'
        self._acquire_marker()
      except OSError as e:
        raise ConfigError('model_dir', f'cannot lock {self.path} ({e}); '
                          'check the permissions of model_dir') from None
    else:
      self._acquire_marker()
    logging.info('Locked %s (%s).', self.model_dir, self.mode)
    return self

  def release(self) -> None:
    """Releases the lock if held; never raises for a failed cleanup."""
    if self._fd is not None:
      fd, self._fd = self._fd, None
      import fcntl  # pylint: disable=g-import-not-at-top
      try:
        # Emptied, not deleted: deleting would let a run that opened the
        # old file lock it while a third run locks a new one.
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
      except OSError as e:
        logging.warning('Releasing %s: %s', self.path, e)
      finally:
        os.close(fd)
    if self._token is not None:
      self._stop.set()
      if self._thread is not None:
        self._thread.join()
        self._thread = None
      try:
        if self._read_marker().get('token') == self._token:
          import tensorflow as tf  # pylint: disable=g-import-not-at-top
          tf.io.gfile.remove(self.path)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Releasing %s: %s', self.path, e)
      self._token = None

  def __enter__(self) -> 'ModelDirLock':
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()

  def _in_use(self, holder: Optional[dict], extra: str = '') -> ConfigError:
    return ConfigError(
        'model_dir', f'{self.model_dir} is in use by another training run '
        f'({_describe(holder)}{extra}); wait for it to finish or stop it, '
        'or use another `model_dir`')

  # ---- flock (local paths) -----------------------------------------------
  def _acquire_flock(self) -> None:
    import fcntl  # pylint: disable=g-import-not-at-top
    os.makedirs(self.model_dir, exist_ok=True)
    # O_CLOEXEC (Python's default): exec'd children do not inherit the lock.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = None
      # The holder writes its info just after locking: give it a moment.
      for _ in range(20):
        try:
          holder = json.loads(os.pread(fd, 4096, 0).decode() or 'null')
        except ValueError:
          holder = None
        if holder:
          break
        time.sleep(0.05)
      os.close(fd)
      raise self._in_use(holder) from None
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                     errno.EINVAL):
        raise _NoFlock(e) from None
      raise
    except BaseException:
      os.close(fd)
      raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  # ---- marker + heartbeat (gs:// and other non-local paths) --------------
  def _read_marker(self) -> dict:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      with tf.io.gfile.GFile(self.path) as f:
        text = f.read()
    except tf.errors.NotFoundError:
      return {}
    try:
      marker = json.loads(text) if text.strip() else {}
    except ValueError:
      return {}  # Torn or foreign content: nobody's live heartbeat.
    return marker if isinstance(marker, dict) else {}

  def _write_marker(self, marker: dict) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    text = json.dumps(marker)
    if not is_local_path(self.path):
      # One object write: a GCS reader sees the old or the new marker.
      with tf.io.gfile.GFile(self.path, 'w') as f:
        f.write(text)
      return
    # A local write truncates first: a reader could see an empty marker
    # (a free lock). A rename is atomic.
    from efficientnet_tpu import fileio  # pylint: disable=g-import-not-at-top
    fileio.write_atomically(self.path, text)

  def _acquire_marker(self) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.io.gfile.makedirs(self.model_dir)
    marker = self._read_marker()
    if marker.get('token'):
      age = time.time() - float(marker.get('heartbeat', 0))
      # A dead pid on this host is only trusted after two missed beats: a
      # container with its own pid namespace may share the host name.
      dead_here = (marker.get('host') == socket.gethostname()
                   and not _pid_exists(marker.get('pid')))
      limit = 2 * self.heartbeat_s if dead_here else self.stale_s
      if age <= limit:
        raise self._in_use(
            marker, f', heartbeat {max(age, 0):.0f} s ago; if that run was '
            f'killed, its marker {self.path} is taken over in '
            f'{limit - age:.0f} s')
      logging.warning('Taking over %s from a run that stopped (%s, '
                      'heartbeat %.0f s ago).', self.path, _describe(marker),
                      age)
    token = uuid.uuid4().hex
    mine = dict(_holder_info(), token=token, heartbeat=time.time())
    self._write_marker(mine)
    time.sleep(min(_SETTLE_S, self.heartbeat_s))
    now = self._read_marker()
    if now.get('token') != token:
      raise self._in_use(now, ', started at the same time as this run')
    self._token = token
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat, args=(mine,),
                                    name='model_dir_lock_heartbeat',
                                    daemon=True)
    self._thread.start()

  def _heartbeat(self, mine: dict) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        current = self._read_marker()
        # A missing marker (deleted by hand) is written again; another
        # run's marker means this run was taken for dead.
        if current.get('token') not in (None, self._token):
          logging.error('%s was taken over by %s (this run missed its '
                        'heartbeats for over %.0f s); two runs may now '
                        'write to %s.', self.path, _describe(current),
                        self.stale_s, self.model_dir)
          return
        mine['heartbeat'] = time.time()
        self._write_marker(mine)
      except Exception as e:  # pylint: disable=broad-except
        # A transient storage error: the next beat tries again.
        logging.warning('Heartbeat of %s failed: %s', self.path, e)
