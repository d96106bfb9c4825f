"""PNG charts from the benchmark JSON files in benchmarks/results/.

    python -m benchmarks.plot                       # every known results file
    python -m benchmarks.plot benchmarks/results/scaling.json

One PNG per JSON file, next to it (same stem). Bars show the median round;
the whiskers span the worst and best rounds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

COLORS = {'ours': '#1f77b4', 'keras': '#ff7f0e', 'local': '#2ca02c',
          'group2': '#9467bd', 'global': '#d62728'}


def _errors(rows):
  med = [r['images_per_second'] for r in rows]
  return [[m - r['images_per_second_worst'] for m, r in zip(med, rows)],
          [r['images_per_second_best'] - m for m, r in zip(med, rows)]]


def _footer(fig, data):
  m = data.get('machine', {})
  fig.text(0.01, 0.01, f'{m.get("cpu_model", "?")}, {m.get("cpu_count", "?")}'
           f' cores, TF {m.get("tensorflow", "?")}, Keras '
           f'{m.get("keras", "?")}; median of {data.get("rounds", "?")} '
           f'alternating rounds (whiskers: worst/best)', fontsize=7,
           color='0.4')


def plot_train_step(data, fig):
  """One panel per (resolution, batch, mirrored): scales differ ~20x."""
  rows = data['results']
  groups = []
  for r in rows:
    key = (r['resolution'], r['batch'], r['mirrored'])
    if key not in groups:
      groups.append(key)
  axes = fig.subplots(1, len(groups), squeeze=False)[0]
  for ax, (res, batch, mirrored) in zip(axes, groups):
    sel = [next(r for r in rows if (r['resolution'], r['batch'],
                                    r['mirrored']) == (res, batch, mirrored)
                and r['model'] == m) for m in ('ours', 'keras')]
    ax.bar([0, 1], [r['images_per_second'] for r in sel], 0.6,
           yerr=_errors(sel), capsize=4,
           color=[COLORS['ours'], COLORS['keras']])
    ax.set_xticks([0, 1])
    ax.set_xticklabels(['ours\n(GroupSyncBN)', 'keras.applications\nB0'])
    ax.set_title(f'{res}px, batch {batch}' +
                 (', 1-replica Mirrored' if mirrored else '') +
                 f'\nours / keras = {sel[0]["ours_over_keras"]:.2f}',
                 fontsize=10)
    ax.grid(axis='y', alpha=0.3)
  axes[0].set_ylabel('images / second')
  fig.suptitle(f'EfficientNet-B0 training step, {data["device"]} '
               f'{data["precision"]}, XLA {"on" if data["xla"] else "off"}, '
               f'{data["optimizer"]} optimizer')


def plot_scaling(data, fig):
  ax = fig.subplots()
  rows = data['results']
  for mode in ('local', 'group2', 'global'):
    sel = [r for r in rows if r['mode'] == mode or
           (r['replicas'] == 1 and mode != 'group2')]
    sel = sorted({r['replicas']: r for r in sel}.values(),
                 key=lambda r: r['replicas'])
    if not sel:
      continue
    ax.errorbar([r['replicas'] for r in sel],
                [r['images_per_second'] for r in sel], yerr=_errors(sel),
                marker='o', capsize=3, color=COLORS[mode],
                label={'local': 'local BN (group 1)',
                       'group2': 'group BN (group 2)',
                       'global': 'global BN (all replicas)'}[mode])
  ax.set_xscale('log', base=2)
  reps = sorted({r['replicas'] for r in rows})
  ax.set_xticks(reps)
  ax.set_xticklabels([str(r) for r in reps])
  ax.set_xlabel('CPU replicas (same global batch, same 2 cores)')
  ax.set_ylabel('images / second')
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.set_title(f'Trainer.train_loop, width {data["width"]} depth '
               f'{data["depth"]} {data["image_size"]}px, global batch '
               f'{data["global_batch"]}')
  ax.legend()


def plot_host_loop(data, fig):
  ax = fig.subplots()
  rows = data['results']
  reps = sorted({r['replicas'] for r in rows})
  ipls = sorted({r['iterations_per_loop'] for r in rows})
  width = 0.8 / len(ipls)
  cmap = plt.get_cmap('viridis')
  for i, k in enumerate(ipls):
    sel = [next(r for r in rows if r['replicas'] == rep and
                r['iterations_per_loop'] == k) for rep in reps]
    xs = [j + (i - (len(ipls) - 1) / 2) * width for j in range(len(reps))]
    ax.bar(xs, [r['images_per_second'] for r in sel], width,
           yerr=_errors(sel), capsize=3, color=cmap(i / max(1, len(ipls))),
           label=f'iterations_per_loop={k}')
  ax.set_xticks(range(len(reps)))
  ax.set_xticklabels([f'{r} replica' + ('s' if r > 1 else '') for r in reps])
  ax.set_ylabel('images / second')
  ax.set_title(f'Host loop, tiny EfficientNet (width {data["width"]}, '
               f'{data["image_size"]}px), global batch {data["global_batch"]}')
  ax.legend()
  ax.grid(axis='y', alpha=0.3)


PLOTTERS = {'train_step': plot_train_step, 'scaling': plot_scaling,
            'host_loop': plot_host_loop}


def plot_file(path: str) -> str:
  with open(path) as f:
    data = json.load(f)
  kind = data.get('benchmark')
  if kind not in PLOTTERS:
    raise SystemExit(f'{path}: expected a results file with "benchmark" in '
                     f'{sorted(PLOTTERS)}, got {kind!r}')
  fig = plt.figure(figsize=(8, 5))
  PLOTTERS[kind](data, fig)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  _footer(fig, data)
  out = os.path.splitext(path)[0] + '.png'
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('files', nargs='*',
                 help='results JSON files (default: all in benchmarks/results)')
  args = p.parse_args()
  files = args.files or sorted(glob.glob(os.path.join(common.RESULTS_DIR,
                                                      '*.json')))
  if not files:
    raise SystemExit(f'no results JSON files in {common.RESULTS_DIR}; run a '
                     'benchmark first')
  for path in files:
    if not args.files:  # Results without a chart (tables only) are skipped.
      with open(path) as f:
        if json.load(f).get('benchmark') not in PLOTTERS:
          print(f'{path}: table only, no chart')
          continue
    print(plot_file(path))


if __name__ == '__main__':
  main()
