"""The run's history: one JSON record per training loop and per evaluation.

Two JSON-lines files in model_dir, each appended by one process:

  history.jsonl        one line per training loop, by the train writer:
                       {"kind": "train", "step", "start_step", "epoch",
                        "wall_time", "session_start", "total_steps",
                        "metrics": {...}}
  eval_results.jsonl   one line per evaluation, by the eval writer
                       (`run_dir.append_eval_result`): the eval metrics
                       with "step", "epoch", "wall_time" and "checkpoint"

One file per writer because gfile cannot append (`fileio.append_line`
rewrites the file), so two processes appending to one file could lose
lines, and a `--mode=eval` process beside a training run, or TF_CONFIG's
evaluator task, writes the evaluations while the chief trains.

`read` returns both as records of one shape, {"kind", "step", "epoch",
"wall_time", "metrics"}; `latest` keeps what a resumed run did not redo.
Both files survive a resume: a resumed run appends to them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

import tensorflow as tf

from efficientnet_tpu import fileio
from efficientnet_tpu import run_dir

FILENAME = 'history.jsonl'
TRAIN = 'train'
EVAL = 'eval'

# Keys of an eval_results.jsonl line that are not metrics.
_EVAL_FIELDS = ('step', 'epoch', 'wall_time', 'checkpoint')


def append_train(model_dir: str, step: int, epoch: float,
                 metrics: Dict[str, float], *, start_step: int,
                 total_steps: int, session_start: float,
                 wall_time: Optional[float] = None) -> dict:
  """Appends one training loop's record to model_dir/history.jsonl.

  Only the train writer may call it (see `fileio.append_line`).

  Args:
    model_dir: the run directory.
    step: the global step after the loop.
    epoch: step / steps per epoch.
    metrics: the loop's metrics (`train.Trainer.train_loop`).
    start_step: the global step before the loop (`latest` drops what a
      resumed run redoes from there).
    total_steps: the run's last step, for the progress in a report.
    session_start: when this process started training (seconds since the
      Unix epoch): the same in all its records, so a report can tell the
      processes of a resumed run apart.
    wall_time: seconds since the Unix epoch; None: now.

  Returns:
    The record written.
  """
  record = {
      'kind': TRAIN,
      'step': int(step),
      'start_step': int(start_step),
      'epoch': float(epoch),
      'wall_time': time.time() if wall_time is None else float(wall_time),
      'session_start': float(session_start),
      'total_steps': int(total_steps),
      'metrics': {k: float(v) for k, v in metrics.items()},
  }
  fileio.append_line(os.path.join(model_dir, FILENAME),
                     json.dumps(record, sort_keys=True))
  return record


def _read_json_lines(path: str) -> List[dict]:
  """The records of a JSON-lines file; [] if it does not exist."""
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path) as f:
    lines = f.read().splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      raise ValueError(f'{path}:{number}: expected a JSON record, got '
                       f'{line[:40]!r} ({e})') from None
    if not isinstance(record, dict) or not isinstance(record.get('step'),
                                                      int):
      raise ValueError(f'{path}:{number}: expected a JSON object with an '
                       f'integer "step", got {line[:40]!r}')
    records.append(record)
  return records


def _eval_record(line: dict) -> dict:
  return {
      'kind': EVAL,
      'step': line['step'],
      # None in files written before epoch and wall time were recorded.
      'epoch': line.get('epoch'),
      'wall_time': line.get('wall_time'),
      'checkpoint': line.get('checkpoint'),
      'metrics': {k: v for k, v in line.items() if k not in _EVAL_FIELDS},
  }


def recorded_eval(model_dir: str, step: int, num_examples: int,
                  checkpoint: Optional[str]) -> Optional[Dict[str, float]]:
  """The metrics eval_results.jsonl holds for this evaluation, or None.

  The last line at `step` over `num_examples` images of the checkpoint
  named like `checkpoint` (by file name: the run directory may have moved).
  An unreadable file holds none.
  """
  try:
    lines = _read_json_lines(os.path.join(model_dir,
                                          run_dir.RESULTS_FILENAME))
  except (ValueError, tf.errors.OpError):
    return None
  name = os.path.basename(checkpoint or '')
  for line in reversed(lines):
    if (line['step'] == step and line.get('num_examples') == num_examples
        and isinstance(line.get('top_1_accuracy'), float)
        and os.path.basename(line.get('checkpoint') or '') == name):
      return {k: v for k, v in line.items() if k not in _EVAL_FIELDS}
  return None


def read(model_dir: str) -> List[dict]:
  """Every record of the run: the training loops, then the evaluations.

  Each kind is in the order written, repeats and abandoned steps of killed
  runs included (`latest` drops them).

  Raises:
    ValueError: a line is not a JSON object with an integer "step".
  """
  train = _read_json_lines(os.path.join(model_dir, FILENAME))
  evals = _read_json_lines(os.path.join(model_dir, run_dir.RESULTS_FILENAME))
  return ([r for r in train if r.get('kind', TRAIN) == TRAIN] +
          [_eval_record(r) for r in evals])


def latest(records: List[dict]) -> List[dict]:
  """The records that describe the run as it stands, in order.

  A killed run resumes at its last checkpoint and redoes the steps after
  it, logging them again (perhaps at other steps, with another
  iterations_per_loop). So a training loop's record supersedes every
  earlier one after its `start_step`, and an evaluation's every earlier
  one at the same or a later step: the last record per (kind, step) is
  kept, and steps that only the killed run reached are dropped.
  """
  kept: Dict[str, List[dict]] = {}
  for record in records:
    of_kind = kept.setdefault(record['kind'], [])
    redone_after = record.get('start_step', record['step'] - 1)
    while of_kind and of_kind[-1]['step'] > redone_after:
      of_kind.pop()
    of_kind.append(record)
  order = {id(r): i for i, r in enumerate(records)}
  return sorted((r for rs in kept.values() for r in rs),
                key=lambda r: order[id(r)])
