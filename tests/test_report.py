"""The run history (history.jsonl, eval_results.jsonl) and the report tool."""

import json
import subprocess
import sys

import numpy as np
import pytest

from efficientnet_tpu import experiment
from efficientnet_tpu import history
from efficientnet_tpu import run_dir
from efficientnet_tpu.tools import report
from tests.helpers import small_config

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _lines(path):
  return [json.loads(l) for l in path.read_text().splitlines()]


def _check_pngs(directory):
  for name in report.PLOTS:
    data = (directory / f'report_{name}.png').read_bytes()
    assert data.startswith(PNG_MAGIC), name
    assert len(data) > 5000, (name, len(data))  # Axes, lines and labels.


def test_report_of_a_resumed_train_and_eval_run(tmp_path, capsys,
                                                monkeypatch):
  model_dir = tmp_path / 'run'
  cfg = small_config(model_dir, train=dict(
      mode='train_and_eval', train_steps=4, iterations_per_loop=2,
      eval_every_steps=2))
  experiment.run_experiment(cfg)
  first = _lines(model_dir / history.FILENAME)
  assert [(r['kind'], r['step'], r['total_steps']) for r in first] == [
      ('train', 2, 4), ('train', 4, 4)]
  # A resumed run with a longer schedule appends (training only: eval
  # results are appended the same way, `fileio.append_line`).
  cfg = cfg.with_settings(train_steps=6, mode='train')
  experiment.run_experiment(cfg)
  train = _lines(model_dir / history.FILENAME)
  evals = _lines(model_dir / run_dir.RESULTS_FILENAME)
  assert train[:2] == first
  assert [(r['start_step'], r['step']) for r in train] == [(0, 2), (2, 4),
                                                           (4, 6)]
  assert train[0]['session_start'] == train[1]['session_start'] < train[2][
      'session_start']
  assert [r['step'] for r in evals] == [2, 4]
  steps_per_epoch = cfg.data.num_train_images / cfg.train.train_batch_size
  for r in train + evals:
    assert r['epoch'] == pytest.approx(r['step'] / steps_per_epoch)
  assert train[0]['wall_time'] < evals[0]['wall_time'] < train[1][
      'wall_time']

  assert report.main([str(model_dir)]) == 0
  out = capsys.readouterr().out
  summary = report.summarize(str(model_dir))
  last = train[-1]['metrics']
  assert summary['model'] == cfg.model.name
  assert (summary['step'], summary['total_steps']) == (6, 6)
  assert summary['last_train']['loss'] == last['loss']
  assert summary['last_train']['top_1_accuracy'] == last['top_1_accuracy']
  assert summary['last_eval']['step'] == 4
  assert summary['last_eval']['top_1_accuracy'] == evals[-1][
      'top_1_accuracy']
  tops = [r['top_1_accuracy'] for r in evals]
  best = evals[int(np.argmax(tops))]  # The first of equal bests.
  assert summary['best_eval']['step'] == best['step']
  assert summary['best_eval']['top_1_accuracy'] == best['top_1_accuracy']
  assert summary['images_per_second_median'] == pytest.approx(
      np.median([r['metrics']['images_per_second'] for r in train]))
  # Two processes trained: each one's last elapsed time, summed.
  assert summary['sessions'] == 2
  assert summary['wall_time_s'] == pytest.approx(
      train[1]['metrics']['elapsed_s'] + train[2]['metrics']['elapsed_s'])
  assert 'Steps: 6 / 6 (100.0%)' in out
  assert f'top-1 {last["top_1_accuracy"]:.4g}' in out
  assert (f'Best eval (step {best["step"]}, epoch '
          f'{best["epoch"]:.2f}): top-1 {best["top_1_accuracy"]:.4g}') in out
  assert 'in 2 process(es)' in out
  _check_pngs(model_dir)

  # --output_dir: the plots go there; the summary and the plots share one
  # read of the latest config and one parse of it.
  reads, parses = [], []
  for name in ('read_config', 'read_config_file'):
    real = getattr(run_dir, name)
    monkeypatch.setattr(run_dir, name,
                        lambda *a, _real=real, **k: reads.append(a) or
                        _real(*a, **k))
  from_dict = report.ExperimentConfig.from_dict.__func__
  monkeypatch.setattr(report.ExperimentConfig, 'from_dict', classmethod(
      lambda cls, d: parses.append(d) or from_dict(cls, d)))
  assert report.main([str(model_dir), '--output_dir',
                      str(tmp_path / 'plots')]) == 0
  _check_pngs(tmp_path / 'plots')
  assert len(reads) == 1 and len(parses) == 1, (reads, len(parses))


def _train(start_step, step, loss, elapsed, session):
  return {'kind': 'train', 'step': step, 'start_step': start_step,
          'epoch': step / 4, 'wall_time': session + elapsed,
          'session_start': session, 'total_steps': 8,
          'metrics': {'loss': loss, 'images_per_second': 10.0 * step,
                      'learning_rate': 0.1,
                      'elapsed_s': elapsed}}


def test_a_killed_runs_redone_steps_count_once(tmp_path):
  # The killed run logged steps 2, 4 and 6 but checkpointed only at 4; the
  # resumed run redid 4..8 in loops of 4 (step 6 was never logged again).
  killed = [_train(0, 2, 3.0, 10.0, 1000.0), _train(2, 4, 2.0, 20.0, 1000.0),
            _train(4, 6, 1.5, 30.0, 1000.0)]
  resumed = [_train(4, 8, 1.0, 12.0, 2000.0)]
  (tmp_path / history.FILENAME).write_text(
      ''.join(json.dumps(r) + '\n' for r in killed + resumed))
  evals = [dict(step=4, top_1_accuracy=0.5, loss=1.0),
           dict(step=4, top_1_accuracy=0.25, loss=1.2),  # Redone: kept.
           dict(step=8, top_1_accuracy=0.4, loss=0.9)]
  (tmp_path / run_dir.RESULTS_FILENAME).write_text(
      ''.join(json.dumps(r) + '\n' for r in evals))
  (tmp_path / run_dir.CONFIG_FILENAME).write_text(small_config(
      tmp_path).to_json())

  records = history.latest(history.read(str(tmp_path)))
  assert [(r['kind'], r['step']) for r in records] == [
      ('train', 2), ('train', 4), ('train', 8), ('eval', 4), ('eval', 8)]
  assert records[3]['metrics']['top_1_accuracy'] == 0.25
  summary = report.summarize(str(tmp_path))
  assert summary['step'] == 8 and summary['total_steps'] == 8
  assert summary['last_train']['loss'] == 1.0
  assert summary['best_eval']['step'] == 8  # 0.4 > the redone 0.25.
  assert summary['images_per_second_median'] == np.median([20.0, 40.0,
                                                            80.0])
  # Wall time counts the killed process too: 30 s, then 12 s.
  assert summary['sessions'] == 2 and summary['wall_time_s'] == 42.0
  assert summary['model'] == 'efficientnet-b0'
  # The same loops redone: the last record of each step is kept.
  redone = killed + [_train(4, 6, 1.4, 9.0, 2000.0),
                     _train(6, 8, 1.0, 18.0, 2000.0)]
  assert [(r['step'], r['metrics']['loss'])
          for r in history.latest(redone)] == [(2, 3.0), (4, 2.0), (6, 1.4),
                                               (8, 1.0)]
  # Eval lines of older versions (no epoch): no eval-against-epoch plot.
  paths = report.write_plots(records, str(tmp_path / 'plots'))
  assert sorted(paths) == sorted(
      report.plot_path(str(tmp_path / 'plots'), n)
      for n in report.PLOTS if n != 'eval_accuracy')


def test_history_read_names_a_bad_line(tmp_path):
  (tmp_path / history.FILENAME).write_text(
      json.dumps(_train(0, 2, 1.0, 1.0, 0.0)) + '\n{"step": 4, "ki\n')
  with pytest.raises(ValueError, match=rf'{history.FILENAME}:2: expected'):
    history.read(str(tmp_path))


@pytest.mark.parametrize('make', ['missing', 'empty', 'bad_json'])
def test_bad_model_dir_is_one_line_on_stderr_and_exit_2(tmp_path, capsys,
                                                        make):
  model_dir = tmp_path / 'run'
  if make != 'missing':
    model_dir.mkdir()
  if make == 'bad_json':
    (model_dir / history.FILENAME).write_text('{"step": 2,\n')
  assert report.main([str(model_dir)]) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert len(captured.err.splitlines()) == 1
  assert captured.err.startswith('error: ') and str(model_dir) in captured.err


def test_console_entry_point_exits_2_without_a_traceback(tmp_path):
  done = subprocess.run(
      [sys.executable, '-m', 'efficientnet_tpu.tools.report',
       str(tmp_path / 'missing')], capture_output=True, text=True,
      check=False, timeout=120)
  assert done.returncode == 2
  # Not the whole stream: TensorFlow prints its own start-up lines (oneDNN,
  # CPU features) to stderr on some CPUs, before any of ours.
  errors = [l for l in done.stderr.splitlines() if l.startswith('error:')]
  assert errors == [f'error: {tmp_path / "missing"}: no such directory'], (
      done.stderr)
  assert 'Traceback' not in done.stderr


def test_lr_plot_is_the_schedule_and_plots_carry_the_run_name(tmp_path):
  """The learning-rate plot draws the run's schedule at every step (from
  its config; numpy's warmup + cosine is the reference), not a line
  through the loop ends; every PNG is titled with the run's name."""
  cfg = small_config(tmp_path, optimizer=dict(
      lr_schedule='cosine', lr_warmup_epochs=1.0, lr_scaling='none',
      base_learning_rate=2.0, end_learning_rate=0.2),
      data=dict(num_train_images=320), train=dict(train_steps=110))
  assert cfg.steps_per_epoch == 10  # 320 images in batches of 32.
  steps, lr = report.learning_rate_curve(json.loads(json.dumps(
      cfg.to_dict())))
  np.testing.assert_array_equal(steps, np.arange(111))
  want = np.where(steps < 10, 2.0 * steps / 10,
                  0.2 + 1.8 * 0.5 * (1 + np.cos(np.pi * (steps - 10) / 100)))
  np.testing.assert_allclose(lr, want, rtol=1e-5, atol=1e-6)
  assert report.learning_rate_curve(None) is None
  assert report.learning_rate_curve({'model': 'garbage'}) is None

  from PIL import Image  # pylint: disable=g-import-not-at-top
  records = [{'kind': history.TRAIN, 'step': 55, 'epoch': 5.5,
              'metrics': {'learning_rate': float(lr[55]), 'loss': 1.0}}]
  model_dir = str(tmp_path / 'b0_lars-4096') + '/'
  assert report.run_name(model_dir) == 'b0_lars-4096'
  paths = report.write_plots(records, str(tmp_path / 'plots'),
                             report.run_name(model_dir), (steps, lr))
  titles = {p: Image.open(p).text['Title'] for p in paths}
  assert titles[report.plot_path(str(tmp_path / 'plots'),
                                 'learning_rate')] == (
                                     'b0_lars-4096: learning rate')
  assert all(t.startswith('b0_lars-4096: ') for t in titles.values())
