"""The run directory (`--model_dir`): what lives there and its rules.

  config.json            the first run's resolved config (never replaced;
                         a resumed run with other settings writes
                         config-stepN.json beside it)
  ckpt-N.*, checkpoint   training checkpoints (tf.train.CheckpointManager;
                         a ckpt-N_temp/ left by a killed save is removed
                         at the next start, an unreadable latest one is
                         passed over for the one before)
  train/, eval/          TensorBoard event files
  eval_results.jsonl     one line per evaluation (the eval writer)
  history.jsonl          one line per training loop (the train writer;
                         `history` reads both files)
  best/, best_eval.json  the checkpoint with the best eval top-1
  record_counts.json     cached TFRecord counts (data.tfrecord)
  .lock                  the training run's lock (run_lock)

Every rewritten file is written atomically (`fileio.write_atomically`).
model_dir is a name, never a pattern: TF's own checkpoint helpers
(tf.train.latest_checkpoint, CheckpointManager's pruning,
checkpoints_iterator) glob `model_dir/ckpt-N.*`, which for a model_dir such
as `/runs/a[1]` or `/runs/b*` misses the run's own checkpoints or deletes a
sibling run's; the run uses the literal ones below (`latest_checkpoint`,
`CheckpointManager`, `checkpoints_iterator`).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Iterator, List, Optional
import uuid

from absl import logging

import tensorflow as tf

from efficientnet_tpu import fileio
from efficientnet_tpu import run_lock
from efficientnet_tpu.config import (ConfigError, ExperimentConfig, ModelConfig,
                                     settings_from_dict)

CONFIG_FILENAME = 'config.json'
RESULTS_FILENAME = 'eval_results.jsonl'
BEST_DIRNAME = 'best'
BEST_FILENAME = 'best_eval.json'
# The training checkpoints' prefix: model_dir/ckpt-STEP.
CHECKPOINT_NAME = 'ckpt'
# The CheckpointManager's list of checkpoints, the latest first.
CHECKPOINT_STATE_FILENAME = 'checkpoint'

# Model fields that may change on resume: they change no variable (a
# fine-tune resumed without --init_checkpoint turns batch_norm_warmup off).
_RESUMABLE_MODEL_FIELDS = ('use_bfloat16', 'use_float16', 'bn_group_size',
                           'bn_group_batch_size', 'batch_norm_warmup')


def latest_checkpoint(directory: str) -> Optional[str]:
  """The latest checkpoint the `checkpoint` file of `directory` names, if
  its .index file exists; else None.

  tf.train.latest_checkpoint, but taking `directory` literally (TF's globs
  the prefix: a directory named with `[`, `*` or `?` finds nothing, or
  another directory's files).
  """
  state = tf.train.get_checkpoint_state(directory)
  if not (state and state.model_checkpoint_path):
    return None
  path = state.model_checkpoint_path
  if tf.io.gfile.exists(path + '.index'):
    return path
  logging.error("Couldn't find the files of checkpoint %s", path)
  return None


def checkpoint_files(prefix: str) -> List[str]:
  """The files of checkpoint `prefix` on disk: PREFIX.index and its
  PREFIX.data-NNNNN-of-NNNNN shards, found by name (no glob)."""
  directory, name = os.path.split(prefix)
  shard = re.compile(re.escape(name) + r'\.data-\d{5}-of-\d{5}')
  return fileio.list_entries(
      directory,
      lambda entry: entry == name + '.index' or bool(shard.fullmatch(entry)))


class CheckpointManager(tf.train.CheckpointManager):
  """tf.train.CheckpointManager whose pruning deletes by name.

  TF's deletes the files matching the glob `PREFIX.data-?????-of-?????`:
  with model_dir `/runs/b*` that includes `/runs/b_other/ckpt-1.*`, another
  run's checkpoint; with `/runs/a[1]` none of the run's own. This one
  deletes exactly the old checkpoint's files (`checkpoint_files`); the
  rest (which to keep, `keep_checkpoint_every_n_hours`) is TF's
  `_sweep`, unchanged since TF 2.x.
  """

  def _sweep(self):
    if not self._max_to_keep:
      return
    while len(self._maybe_delete) > self._max_to_keep:
      filename, timestamp = self._maybe_delete.popitem(last=False)
      if (self._keep_checkpoint_every_n_hours
          and (timestamp - self._keep_checkpoint_every_n_hours * 3600.
               >= self._last_preserved_timestamp)):
        self._last_preserved_timestamp = timestamp
        continue
      for path in checkpoint_files(filename):
        try:
          tf.io.gfile.remove(path)
        except tf.errors.NotFoundError:
          pass  # Another process deleted it first.


def checkpoints_iterator(directory: str,
                         timeout: Optional[float] = None,
                         seconds_to_sleep: float = 1.0) -> Iterator[str]:
  """Each new latest checkpoint of `directory` (`latest_checkpoint`), until
  none appears for `timeout` seconds (None: forever).

  tf.train.checkpoints_iterator without a timeout_fn, taking `directory`
  literally.
  """
  last = None
  while True:
    stop = time.time() + timeout if timeout is not None else None
    while True:
      path = latest_checkpoint(directory)
      if path is not None and path != last:
        break
      if stop is not None and time.time() + seconds_to_sleep > stop:
        logging.info('Timed out waiting for a checkpoint in %s.', directory)
        return
      time.sleep(seconds_to_sleep)
    last = path
    yield path


def check_writable(model_dir: str) -> None:
  """Creates model_dir and writes a probe file there.

  Every mode writes to model_dir (checkpoints, summaries, eval results), so
  a read-only one fails now, not after an hour of training or evaluation.

  Raises:
    ConfigError: model_dir cannot be created or written.
  """
  # Unique: every worker of a multi-host run probes the same model_dir.
  probe = os.path.join(model_dir, f'.write_probe-{uuid.uuid4().hex}')
  try:
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(probe, 'w') as f:
      f.write('probe')
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    reason = (getattr(e, 'message', None) or str(e)).strip()
    reason = reason.splitlines()[0] if reason else type(e).__name__
    raise ConfigError(
        'model_dir', f'{model_dir} is not writable ({reason}); every mode '
        'writes checkpoints, summaries or eval results there: fix its '
        'permissions or use another `model_dir`') from None


def write_error(path: str, e: BaseException, kept: str = '') -> ConfigError:
  """A failed write of `path` (disk full, permissions) as one line.

  Args:
    path: the file (or checkpoint prefix) that could not be written.
    e: the tf.errors.OpError or OSError.
    kept: what stays as it was (e.g. the latest checkpoint), if anything.
  """
  kept = f'; {kept}' if kept else ''
  return ConfigError(
      'model_dir', f'could not write {path} ({fileio.error_reason(e)})'
      f'{kept}. Free space where model_dir is (or fix its permissions), '
      'then rerun the same command: it resumes from the latest checkpoint')


def check_export_dir(export_dir: str) -> None:
  """Exports never overwrite: the directory must be new or empty.

  Raises:
    ConfigError: it holds files.
  """
  if tf.io.gfile.exists(export_dir) and tf.io.gfile.listdir(export_dir):
    raise ConfigError('export_dir', f'expected a new or empty directory, '
                      f'{export_dir} is not empty (exports never overwrite)')


def read_config(model_dir: str) -> Optional[dict]:
  """model_dir/config.json as a dict; None if absent.

  Raises:
    ConfigError: the file is not valid JSON (e.g. truncated), or a value
      has the wrong type or is out of range (`check_config_record`).
  """
  path = os.path.join(model_dir, CONFIG_FILENAME)
  if not tf.io.gfile.exists(path):
    return None
  return read_config_file(path)


def read_config_file(path: str) -> dict:
  """A config.json (or config-stepN.json) file, checked.

  Raises:
    ConfigError: as `read_config`.
  """
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    data = json.loads(text)
  except ValueError as e:
    raise ConfigError('model_dir', f'{path} is not valid JSON ({e}); '
                      'restore the file or use a new `model_dir`') from None
  check_config_record(data, path)
  return data


def check_config_record(data, path: str) -> None:
  """Checks a parsed config file: its settings (`settings_from_dict`) and
  the numbers under "resolved" that a later run takes from it.

  Raises:
    ConfigError: one line naming `path` and the key; nothing is coerced.
  """
  settings_from_dict(data, where=path)
  resolved = data.get('resolved') or {}
  value = resolved.get('per_replica_eval_batch')
  if value is not None and (not isinstance(value, int) or
                            isinstance(value, bool) or value < 1):
    raise ConfigError(
        'model_dir', f'{path}: "resolved.per_replica_eval_batch" must be a '
        f'positive whole number, got {json.dumps(value)}; restore the file '
        '(or use a new `model_dir`)')


def check_resumable(cfg: ExperimentConfig) -> None:
  """Refuses a run whose architecture differs from the one in model_dir.

  Raises:
    ConfigError: naming the first architecture field that differs.
  """
  previous = read_config(cfg.train.model_dir)
  if previous is None:
    return
  old = settings_from_dict(previous)
  new = cfg.to_settings()
  # In declaration order (model_name first).
  changed = [s.name for s in ModelConfig.settings()
             if s.name in old and s.name not in _RESUMABLE_MODEL_FIELDS
             and old[s.name] != new[s.name]]
  if changed:
    k = changed[0]
    raise ConfigError(
        'model_dir', f'{cfg.train.model_dir} holds a run with '
        f'{k}={old[k]!r}, this run asks for {new[k]!r}; use a new '
        '`model_dir` (existing runs are resumed, never overwritten)')


def write_config(cfg: ExperimentConfig, step: int,
                 resolved: Optional[dict] = None) -> str:
  """Writes the config, never replacing a different one.

  The settings as given, and under "resolved" what they came to on this
  run's devices (`train.resolved_values`: total steps, replicas, BN group,
  peak LR, XLA, ...). The first run's config stays in config.json; a
  resumed run with other settings (or on another slice) is recorded as
  config-step{step}.json. Returns the path.
  """
  model_dir = cfg.train.model_dir
  tf.io.gfile.makedirs(model_dir)
  path = os.path.join(model_dir, CONFIG_FILENAME)
  record = cfg.to_dict()
  if resolved is not None:
    record['resolved'] = resolved
  text = json.dumps(record, indent=2, sort_keys=True)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      if f.read() == text:
        return path
    path = os.path.join(model_dir, f'config-step{step}.json')
  try:
    fileio.write_atomically(path, text)
  except (tf.errors.OpError, OSError) as e:
    raise write_error(path, e, 'the checkpoints are as they were') from None
  return path


def worker_dir(task, model_dir: str, is_writer: bool) -> str:
  """The writer writes to model_dir; other workers to a private scratch dir.

  MultiWorkerMirroredStrategy needs every worker to take part in a save, but
  only the writer's copy may land in model_dir.
  """
  if is_writer:
    return model_dir
  task_type, task_id = task
  return os.path.join(model_dir, f'.{task_type or "worker"}_{task_id}_tmp')


def checkpoint_step(path: str,
                    name: str = CHECKPOINT_NAME) -> Optional[int]:
  """N of a checkpoint prefix `.../NAME-N`; None for any other path."""
  match = re.fullmatch(rf'{re.escape(name)}-(\d+)',
                       os.path.basename(path.rstrip('/')))
  return int(match.group(1)) if match else None


def remove_orphaned_temp_dirs(directory: str,
                              name: str = CHECKPOINT_NAME) -> List[str]:
  """Deletes the `NAME-N_temp/` directories in `directory`; returns them.

  TF writes a checkpoint's shards to NAME-N_temp/, then moves them to
  NAME-N.* and deletes the directory: one that is left was being written
  when the process was killed (or its disk filled up), and no checkpoint
  refers to it. Nothing else is touched. Only the directory's owner calls
  this (the train writer, holding the lock; a worker, its scratch dir).
  """
  if not tf.io.gfile.isdir(directory):
    return []
  pattern = re.compile(rf'{re.escape(name)}-\d+_temp')
  removed = []
  for entry in sorted(tf.io.gfile.listdir(directory)):
    entry = entry.rstrip('/')  # gs:// lists directories with a slash.
    path = os.path.join(directory, entry)
    if pattern.fullmatch(entry) and tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
      removed.append(path)
  return removed


def checkpoint_candidates(directory: str,
                          name: str = CHECKPOINT_NAME) -> List[str]:
  """The checkpoints a run may resume from, in the order to try them.

  First the latest one the `checkpoint` file names (even if its files are
  gone: restoring it then fails and says so), then the older NAME-N on disk
  (an .index or .data file), newest first. Newer ones on disk that the
  file does not name are not candidates: TF had not finished writing them,
  or they were passed over as unreadable. Without a readable `checkpoint`
  file, every NAME-N on disk is one.
  """
  state = tf.train.get_checkpoint_state(directory)
  latest = (checkpoint_step(state.model_checkpoint_path, name)
            if state and state.model_checkpoint_path else None)
  on_disk = set()
  if tf.io.gfile.isdir(directory):
    for entry in tf.io.gfile.listdir(directory):
      stem, _, suffix = entry.partition('.')
      step = checkpoint_step(stem, name)
      if step is not None and (suffix == 'index' or
                               suffix.startswith('data-')):
        on_disk.add(step)
  steps = sorted((s for s in on_disk if latest is None or s < latest),
                 reverse=True)
  if latest is not None:
    steps.insert(0, latest)
  return [os.path.join(directory, f'{name}-{s}') for s in steps]


def record_latest_checkpoint(path: str) -> None:
  """Makes checkpoint `path` the latest in its directory's `checkpoint` file.

  The older checkpoints the file lists stay listed (kept or deleted by
  `keep_checkpoint_max` as before); newer ones leave the list, their files
  stay in place. Written atomically, in the file's text format.
  """
  directory, step = os.path.dirname(path), checkpoint_step(path)
  state = tf.train.get_checkpoint_state(directory)
  paths = list(state.all_model_checkpoint_paths) if state else []
  stamps = list(state.all_model_checkpoint_timestamps) if state else []
  if len(stamps) != len(paths):
    stamps = [None] * len(paths)
  listed = [(os.path.basename(p), t) for p, t in zip(paths, stamps)
            if (checkpoint_step(p) or 0) < step]
  stamp = dict(zip(map(os.path.basename, paths), stamps)).get(
      os.path.basename(path))
  listed.append((os.path.basename(path), stamp))
  lines = [f'model_checkpoint_path: "{os.path.basename(path)}"']
  lines += [f'all_model_checkpoint_paths: "{p}"' for p, _ in listed]
  # Only keep_checkpoint_every_n_hours reads them; all or none.
  if all(t is not None for _, t in listed):
    lines += [f'all_model_checkpoint_timestamps: {t!r}' for _, t in listed]
  if state is not None and state.last_preserved_timestamp:
    lines.append(
        f'last_preserved_timestamp: {state.last_preserved_timestamp!r}')
  fileio.write_atomically(
      os.path.join(directory, CHECKPOINT_STATE_FILENAME),
      '\n'.join(lines) + '\n')


def append_eval_result(model_dir: str, record: dict) -> None:
  """Adds one line to eval_results.jsonl (only the eval writer appends:
  see `fileio.append_line`)."""
  fileio.append_line(os.path.join(model_dir, RESULTS_FILENAME),
                     json.dumps(record, sort_keys=True))


def resolve_checkpoint(model_dir: str,
                       checkpoint_path: Optional[str]) -> Optional[str]:
  """The checkpoint `checkpoint_path` names: None -> the latest (None if
  there is none), 'best' -> the archived best, else a checkpoint prefix.

  Raises:
    ConfigError: 'best' without an archive, or a prefix that is no
      checkpoint.
  """
  if not checkpoint_path:
    return latest_checkpoint(model_dir)
  if checkpoint_path == 'best':
    path = latest_checkpoint(os.path.join(model_dir, BEST_DIRNAME))
    if path is None:
      raise ConfigError('checkpoint_path', f'best: no {BEST_DIRNAME}/ '
                        f'checkpoint in {model_dir} (it is kept by '
                        '`mode=train_and_eval` evaluations)')
    return path
  if not tf.io.gfile.exists(checkpoint_path + '.index'):
    raise ConfigError('checkpoint_path', f'{checkpoint_path} is no '
                      'checkpoint (expected a prefix like model_dir/ckpt-100 '
                      'whose .index file exists, or best)')
  return checkpoint_path


def best_top_1(model_dir: str) -> float:
  """The top-1 of the archived best checkpoint; -1 if there is none."""
  path = os.path.join(model_dir, BEST_DIRNAME, BEST_FILENAME)
  if not tf.io.gfile.exists(path):
    return -1.0
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)['top_1_accuracy']


def write_best(model_dir: str, record: dict) -> None:
  """Describes the archived best checkpoint in best/best_eval.json."""
  fileio.write_atomically(
      os.path.join(model_dir, BEST_DIRNAME, BEST_FILENAME),
      json.dumps(record, indent=2))


def training_lock(model_dir: str) -> run_lock.ModelDirLock:
  """The lock a training run holds on model_dir (see `run_lock`)."""
  return run_lock.ModelDirLock(model_dir)
