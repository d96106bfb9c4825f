"""Summarizes a run directory and plots its history.

Reads model_dir's config (config.json, or the config-stepN.json of the
latest resume) and its history (`efficientnet_tpu.history`: history.jsonl
and eval_results.jsonl), prints where the run stands and writes PNG plots:

  report_loss.png           total loss and cross entropy (train, eval)
  report_accuracy.png       top-1 (train, eval) and top-5 (eval)
  report_learning_rate.png  the run's schedule (from its config) and the
                            learning rate each loop logged
  report_throughput.png     images/s of each loop
  report_eval_accuracy.png  eval top-1 and top-5 against epoch

all against the step unless said otherwise, each titled with the run's
name. A resumed run's redone steps count once (`history.latest`).

Example:
  efficientnet-tpu-report gs://BUCKET/runs/b0 --output_dir=/tmp/b0-plots
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Union

# A console tool: TF's C++ start-up lines would bury its one-line errors.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf

from efficientnet_tpu import fileio
from efficientnet_tpu import history
from efficientnet_tpu import run_dir
from efficientnet_tpu.config import ConfigError, ExperimentConfig
# pylint: enable=g-import-not-at-top,wrong-import-position

PLOTS = ('loss', 'accuracy', 'learning_rate', 'throughput', 'eval_accuracy')


class ReportError(ValueError):
  """A single-line, user-facing error of this tool."""


def plot_path(output_dir: str, name: str) -> str:
  """Where the plot `name` (one of PLOTS) goes."""
  return os.path.join(output_dir, f'report_{name}.png')


def _latest_config(model_dir: str) -> Optional[dict]:
  """The config of the latest (resumed) run; None if there is none."""
  resumed = []
  for path in fileio.list_matching(model_dir, 'config-step*.json'):
    match = re.fullmatch(r'config-step(\d+)\.json', os.path.basename(path))
    if match:
      resumed.append((int(match.group(1)), path))
  if not resumed:
    return run_dir.read_config(model_dir)
  return run_dir.read_config_file(max(resumed)[1])


def _parse_config(config: Optional[dict]) -> Optional[ExperimentConfig]:
  """The ExperimentConfig of a config dict; None where the file is missing
  or from a version this one cannot read."""
  if config is None:
    return None
  try:
    return ExperimentConfig.from_dict(config)
  except (TypeError, KeyError, ValueError):
    return None


class RunFiles:
  """A run directory's history and latest config, each read and parsed once
  (the summary and the plots share them)."""

  def __init__(self, model_dir: str):
    """Reads them.

    Raises:
      ReportError: model_dir does not exist or holds an unreadable file.
    """
    if not tf.io.gfile.isdir(model_dir):
      raise ReportError(f'{model_dir}: no such directory')
    self.model_dir = model_dir
    try:
      self.raw = history.read(model_dir)
      self.config = _latest_config(model_dir)
    except ValueError as e:  # ConfigError too.
      raise ReportError(str(e).splitlines()[0]) from None
    self.cfg = _parse_config(self.config)


def _describe_model(config: Optional[dict],
                    cfg: Optional[ExperimentConfig]) -> Dict[str, object]:
  """Model name, image size and total steps of a config (None where the
  file is missing or from a version this one cannot read: `cfg` None)."""
  if cfg is None:
    model = (config or {}).get('model', {})
    return {'model': model.get('name', model.get('model_name')),
            'image_size': model.get('image_size'), 'total_steps': None}
  return {'model': cfg.model.name, 'image_size': cfg.model.image_size,
          'total_steps': cfg.total_train_steps}


def _wall_time(train_records: List[dict]) -> Dict[str, float]:
  """Seconds of training summed over the processes that trained: each
  process's last `elapsed_s` (its records share a `session_start`)."""
  last: Dict[float, float] = {}
  for record in train_records:
    elapsed = record['metrics'].get('elapsed_s')
    if elapsed is not None:
      last[record.get('session_start')] = elapsed
  return {'wall_time_s': sum(last.values()), 'sessions': len(last)}


def _eval_point(record: dict) -> Dict[str, object]:
  m = record['metrics']
  return {'step': record['step'], 'epoch': record['epoch'],
          'top_1_accuracy': m.get('top_1_accuracy'),
          'top_5_accuracy': m.get('top_5_accuracy'),
          'cross_entropy': m.get('loss')}


def summarize(model_dir: str,
              run: Optional[RunFiles] = None) -> Dict[str, object]:
  """Where the run in `model_dir` stands, as numbers.

  Args:
    model_dir: the run directory.
    run: its files, when already read (`RunFiles(model_dir)`).

  Returns:
    A dict: model, image_size, step (the last train loop's), total_steps,
    epoch, last_train (step, loss, cross_entropy, top_1_accuracy,
    learning_rate), last_eval and best_eval (step, epoch, top_1_accuracy,
    top_5_accuracy, cross_entropy; best: the first highest top-1),
    images_per_second_median and images_per_second_per_replica_median
    (over the train loops), num_loops, wall_time_s and sessions (training
    time summed over the processes that trained); None where unknown.

  Raises:
    ReportError: model_dir does not exist, holds no history or an
      unreadable file.
  """
  run = run or RunFiles(model_dir)
  raw = run.raw
  described = _describe_model(run.config, run.cfg)
  if not raw:
    raise ReportError(
        f'{model_dir}: no {history.FILENAME} or {run_dir.RESULTS_FILENAME} '
        'there: not a run directory, or no training loop or evaluation '
        'has finished yet')
  records = history.latest(raw)
  train = [r for r in records if r['kind'] == history.TRAIN]
  evals = [r for r in records if r['kind'] == history.EVAL]
  summary: Dict[str, object] = dict(described)
  summary.update(model_dir=model_dir, step=None, epoch=None, last_train=None,
                 last_eval=None, best_eval=None,
                 images_per_second_median=None,
                 images_per_second_per_replica_median=None,
                 num_loops=len(train))
  if train:
    last = train[-1]
    m = last['metrics']
    summary.update(
        step=last['step'], epoch=last['epoch'],
        total_steps=last.get('total_steps', summary['total_steps']),
        last_train={'step': last['step'], 'loss': m.get('loss'),
                    'cross_entropy': m.get('cross_entropy'),
                    'top_1_accuracy': m.get('top_1_accuracy'),
                    'learning_rate': m.get('learning_rate')})
    for key in ('images_per_second', 'images_per_second_per_replica'):
      values = [r['metrics'][key] for r in train if key in r['metrics']]
      if values:
        summary[f'{key}_median'] = statistics.median(values)
  summary.update(_wall_time([r for r in raw if r['kind'] == history.TRAIN]))
  if evals:
    summary['last_eval'] = _eval_point(evals[-1])
    best = max(evals, key=lambda r: r['metrics'].get('top_1_accuracy', -1))
    summary['best_eval'] = _eval_point(best)
  return summary


def _hms(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _g(value) -> str:
  return 'n/a' if value is None else f'{value:.4g}'


def format_summary(summary: Dict[str, object]) -> str:
  """The summary as lines for a person."""
  model = summary['model'] or 'unknown model'
  if summary['image_size']:
    model += f', {summary["image_size"]} px'
  lines = [f'Run: {summary["model_dir"]} ({model})']
  total = summary['total_steps']
  if summary['step'] is None:
    lines.append('Steps: no training loop recorded')
  else:
    done = f'Steps: {summary["step"]}'
    if total:
      done += f' / {total} ({100.0 * summary["step"] / total:.1f}%)'
    lines.append(f'{done}, epoch {summary["epoch"]:.2f}')
    t = summary['last_train']
    lines.append(f'Last train loop (step {t["step"]}): total loss '
                 f'{_g(t["loss"])}, cross entropy {_g(t["cross_entropy"])}, '
                 f'top-1 {_g(t["top_1_accuracy"])}, '
                 f'LR {_g(t["learning_rate"])}')
  for name in ('last_eval', 'best_eval'):
    e = summary[name]
    label = 'Last eval' if name == 'last_eval' else 'Best eval'
    if e is None:
      lines.append(f'{label}: none recorded')
      continue
    epoch = '' if e['epoch'] is None else f', epoch {e["epoch"]:.2f}'
    lines.append(f'{label} (step {e["step"]}{epoch}): top-1 '
                 f'{_g(e["top_1_accuracy"])}, top-5 '
                 f'{_g(e["top_5_accuracy"])}, cross entropy '
                 f'{_g(e["cross_entropy"])}')
  if summary['images_per_second_median'] is not None:
    lines.append(
        f'Throughput: median {_g(summary["images_per_second_median"])} '
        f'images/s ({_g(summary["images_per_second_per_replica_median"])} '
        f'per replica) over {summary["num_loops"]} loops')
  if summary['sessions']:
    lines.append(f'Training wall time: {_hms(summary["wall_time_s"])} in '
                 f'{summary["sessions"]} process(es)')
  return '\n'.join(lines)


def _series(records: List[dict], kind: str, key: str, x: str = 'step'):
  points = [(r[x], r['metrics'][key]) for r in records
            if r['kind'] == kind and r[x] is not None and key in r['metrics']]
  return [p[0] for p in points], [p[1] for p in points]


def run_name(model_dir: str) -> str:
  """The run's name: the last component of its directory."""
  return os.path.basename(model_dir.rstrip('/')) or model_dir


def learning_rate_curve(config: Union[None, dict, ExperimentConfig]):
  """(steps, lr) of the run's schedule over its whole length, from its
  config (a dict as config.json holds it, or parsed); None where the config
  is missing or cannot be read."""
  cfg = (config if isinstance(config, ExperimentConfig) else
         _parse_config(config))
  if cfg is None:
    return None
  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import schedules
  try:
    return schedules.curve(schedules.for_experiment(cfg),
                           cfg.total_train_steps)
  except (TypeError, KeyError, ValueError):
    return None


def write_plots(records: List[dict], output_dir: str, name: str = '',
                lr_curve=None) -> List[str]:
  """Writes the PLOTS of `records` (`history.latest`'s) as PNGs.

  A plot with nothing to show (eval accuracy of a run never evaluated) is
  not written.

  Args:
    records: the run's records.
    output_dir: where the PNGs go.
    name: the run's name, in each plot's title and PNG metadata.
    lr_curve: (steps, lr) of the schedule (`learning_rate_curve`), drawn
      under the loops' logged values; without it only those (one point a
      loop).

  Returns:
    The paths written.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  train, evl = history.TRAIN, history.EVAL
  # name -> (x label, y label, [(label, kind, metric, x, marker)]).
  specs = {
      'loss': ('step', 'loss', [
          ('train total loss', train, 'loss', 'step', ''),
          ('train cross entropy', train, 'cross_entropy', 'step', ''),
          ('eval cross entropy', evl, 'loss', 'step', 'o')]),
      'accuracy': ('step', 'accuracy', [
          ('train top-1', train, 'top_1_accuracy', 'step', ''),
          ('eval top-1', evl, 'top_1_accuracy', 'step', 'o'),
          ('eval top-5', evl, 'top_5_accuracy', 'step', 'o')]),
      'learning_rate': ('step', 'learning rate', [
          ('learning rate', train, 'learning_rate', 'step', '')]),
      'throughput': ('step', 'images / s', [
          ('images/s', train, 'images_per_second', 'step', '')]),
      'eval_accuracy': ('epoch', 'accuracy', [
          ('eval top-1', evl, 'top_1_accuracy', 'epoch', 'o'),
          ('eval top-5', evl, 'top_5_accuracy', 'epoch', 'o')]),
  }
  tf.io.gfile.makedirs(output_dir)
  written = []
  for plot in PLOTS:
    xlabel, ylabel, lines = specs[plot]
    series = [(label, marker, _series(records, kind, key, x))
              for label, kind, key, x, marker in lines]
    series = [s for s in series if s[2][0]]
    if plot == 'learning_rate' and lr_curve is not None:
      series = [('schedule', '', tuple(lr_curve))] + [
          ('at loop ends', 'o', xy) for _, _, xy in series]
    if not series:
      continue
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, marker, (xs, ys) in series:
      ax.plot(xs, ys, marker=marker or None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    title = f'{name}: {ylabel}' if name else ylabel
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format='png', metadata={'Title': title})
    plt.close(fig)
    path = plot_path(output_dir, plot)
    fileio.write_atomically(path, png.getvalue())
    written.append(path)
  return written


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='efficientnet-tpu-report',
      description='Summarizes a run directory and plots its history.')
  parser.add_argument('model_dir', help='the run directory (local or gs://)')
  parser.add_argument('--output_dir', default=None,
                      help='where the PNG plots go (default: model_dir)')
  parser.add_argument('--no_plots', action='store_true',
                      help='print the summary only')
  return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    for path in (args.model_dir, args.output_dir):
      try:
        if path:
          fileio.check_path_encoding(path)
      except ValueError as e:
        raise ReportError(str(e)) from None
    run = RunFiles(args.model_dir)
    summary = summarize(args.model_dir, run)
    paths = [] if args.no_plots else write_plots(
        history.latest(run.raw), args.output_dir or args.model_dir,
        run_name(args.model_dir), learning_rate_curve(run.cfg))
  except ReportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except ConfigError as e:  # config.json unreadable or mistyped.
    print(f'error: {e.message}', file=sys.stderr)
    return 2
  except (tf.errors.OpError, OSError) as e:  # Unwritable output_dir.
    reason = (getattr(e, 'message', None) or str(e)).strip()
    print(f'error: {reason.splitlines()[0] if reason else type(e).__name__}',
          file=sys.stderr)
    return 2
  print(format_summary(summary))
  for path in paths:
    print(f'Wrote {path}')
  return 0


def run() -> None:
  """Console entry point (efficientnet-tpu-report)."""
  sys.exit(main(sys.argv[1:]))


if __name__ == '__main__':
  run()
