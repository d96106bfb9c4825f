"""Shared timing helpers for the throughput benchmarks.

Every benchmark compares variants inside ONE process: each variant is warmed
up (trace + a few untimed steps), then timed rounds alternate between the
variants (the order rotates every round, so no variant always runs first or
last after a context switch), and the median round is reported. On a shared
machine the absolute numbers drift with the load; the ratios of medians taken
this way are what the benchmarks claim.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, 'benchmarks', 'results')


def timed(fn: Callable[[], object]) -> float:
  """Seconds one call of `fn` takes (fn must block until its work is done)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def alternating_rounds(variants: Mapping[str, Callable[[], object]],
                       rounds: int,
                       log: Optional[Callable[[str], None]] = print
                       ) -> Dict[str, List[float]]:
  """Times `rounds` calls of every variant, alternating between variants.

  Args:
    variants: name -> a blocking callable that runs one timed unit (e.g.
      `steps` training steps followed by a device->host read).
    rounds: timed calls per variant.
    log: called with a one-line progress message per round (None: silent).

  Returns:
    name -> list of `rounds` wall-clock durations in seconds.
  """
  names = list(variants)
  times = {name: [] for name in names}
  for r in range(rounds):
    k = r % len(names)
    order = names[k:] + names[:k]
    for name in order:
      times[name].append(timed(variants[name]))
    if log is not None:
      log(f'  round {r + 1}/{rounds}: ' + ', '.join(
          f'{n} {times[n][-1]:.3f}s' for n in names))
  return times


def summarize(durations: Sequence[float], images_per_call: float) -> dict:
  """Median / min / max of per-call durations, as images/s and ms."""
  med = statistics.median(durations)
  return {
      'images_per_second': images_per_call / med,
      'images_per_second_best': images_per_call / min(durations),
      'images_per_second_worst': images_per_call / max(durations),
      'median_seconds_per_call': med,
      'spread': (max(durations) - min(durations)) / med,
      'durations': list(durations),
  }


def format_table(rows: Sequence[Sequence[object]],
                 header: Sequence[str]) -> str:
  """A plain fixed-width table (first column left-aligned, others right)."""
  cells = [[str(h) for h in header]] + [
      [f'{c:.3g}' if isinstance(c, float) and abs(c) < 10 else
       f'{c:.1f}' if isinstance(c, float) else str(c) for c in row]
      for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

  def line(r):
    return '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths)))

  out = [line(cells[0]), '  '.join('-' * w for w in widths)]
  out += [line(r) for r in cells[1:]]
  return '\n'.join(out)


def _cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True,
                         check=False).stdout
    for row in out.splitlines():
      if row.startswith('Model name:'):
        return row.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def machine_info() -> dict:
  """What the numbers were measured on (call after importing TF/Keras)."""
  info = {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'cpu_model': _cpu_model(),
      'cpu_count': os.cpu_count(),
      'python': platform.python_version(),
      'platform': platform.platform(),
  }
  try:
    info['load_average_1_5_15'] = [round(x, 2) for x in os.getloadavg()]
  except OSError:
    pass
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
    info['tensorflow'] = tf.__version__
    info['keras'] = keras.__version__
    gpus = tf.config.list_physical_devices('GPU')
    info['gpus'] = [tf.config.experimental.get_device_details(g).get(
        'device_name', g.name) for g in gpus]
  except ImportError:
    pass
  return info


def describe_machine(info: dict) -> str:
  gpus = ', '.join(info.get('gpus') or []) or 'none'
  load = info.get('load_average_1_5_15')
  return (f'{info["cpu_model"]}, {info["cpu_count"]} cores, GPUs: {gpus}; '
          f'TF {info.get("tensorflow")}, Keras {info.get("keras")}'
          + (f'; load average at start {load[0]}' if load else ''))


def write_json(name: str, payload: dict, results_dir: str = RESULTS_DIR
               ) -> str:
  """Writes `payload` (plus `machine`, if absent) to results_dir/name.json."""
  os.makedirs(results_dir, exist_ok=True)
  payload = dict(payload)
  payload.setdefault('machine', machine_info())
  path = os.path.join(results_dir, name + '.json')
  with open(path, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write('\n')
  return path


def command_line() -> str:
  """How this benchmark was started: `python -m benchmarks.<name> <args>`."""
  # Under `python -m`, argv[0] is the module's file path.
  name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
  return ' '.join(['python', '-m', f'benchmarks.{name}'] + sys.argv[1:])


def parse_int_list(text: str, flag: str) -> List[int]:
  """'1,2,4' -> [1, 2, 4], with a one-line error naming the flag."""
  try:
    values = [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise SystemExit(f'{flag}: expected comma-separated integers, got '
                     f'{text!r}') from None
  if not values or min(values) < 1:
    raise SystemExit(f'{flag}: expected integers >= 1, got {text!r}')
  return values


# ---- Trainer-level helpers (scaling.py, host_loop.py) -----------------------


def experiment_config(model_dir: str, *, num_replicas: int, batch: int,
                      width: float, depth: float, image_size: int,
                      num_classes: int, bn_group_size: int,
                      optimizer: str = 'lars', ema: bool = True,
                      dropout: float = 0.2, stochastic_depth: float = 0.2):
  """An ExperimentConfig for a scaled-down EfficientNet on synthetic data.

  `testing.small_config` with the loop settings of the paper's recipe (LARS,
  label smoothing 0.1, EMA) so the timed step is the production step, only
  smaller. The settings that small_config scales down for the tests (BN
  momentum, dataset sizes, label smoothing, steps per loop) keep their
  production defaults here.
  """
  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import config as config_lib
  from efficientnet_tpu import testing
  # pylint: enable=g-import-not-at-top
  return testing.small_config(
      model_dir, num_replicas=num_replicas,
      model=dict(
          _defaults(config_lib.ModelConfig, 'batch_norm_momentum'),
          width_coefficient=width, depth_coefficient=depth,
          image_size=image_size, num_label_classes=num_classes,
          dropout_rate=dropout, stochastic_depth_rate=stochastic_depth,
          bn_group_size=bn_group_size),
      data=dict(
          _defaults(config_lib.DataConfig, 'num_train_images',
                    'num_eval_images'),
          data='synthetic'),
      optimizer=dict(
          _defaults(config_lib.OptimizerConfig, 'label_smoothing'),
          optimizer=optimizer, base_learning_rate=0.1, lr_scaling='none',
          lr_schedule='poly', lr_warmup_epochs=1.0,
          moving_average_decay=0.9999 if ema else 0.0),
      train=dict(
          _defaults(config_lib.TrainConfig, 'iterations_per_loop'),
          train_batch_size=batch, eval_batch_size=batch, train_steps=10**6))


def _defaults(cls, *names: str) -> dict:
  """The defaults of the settings `names` of the config section `cls`."""
  values = {s.name: s.default for s in cls.settings() if s.name in names}
  assert len(values) == len(names), (cls, names)
  return values


def cached_train_input(cfg):
  """The configured training input cut to ONE cached batch per replica.

  Returns `start step -> contract.TrainInput` for
  `experiment.build_trainer`: each input pipeline's first batch,
  `.take(1).cache().repeat()` (no skip counts), so the timed
  loop is the real replicated step and host loop, without synthetic image
  generation competing for the 2 cores.
  """
  from efficientnet_tpu import experiment  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu.data import contract  # pylint: disable=g-import-not-at-top
  real = experiment.train_input(cfg)
  return lambda step: contract.TrainInput(
      lambda ctx: real(step).fn(ctx).take(1).cache().repeat())


def exit_now(code: int = 0) -> None:
  """Flushes and exits without interpreter shutdown.

  After several multi-replica Trainers with live input iterators, TF 2.21's
  interpreter shutdown hung (0% CPU, never returned) once the results had
  been written; nothing is left to clean up at this point.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
