"""Entry point: flags become a config; bad input fails early on one line."""

import json
import os

from absl import flags
import pytest

from efficientnet_tpu import main as main_lib

FLAGS = flags.FLAGS
SMOKE = os.path.join(os.path.dirname(__file__), '..', 'launch', 'presets',
                     'cpu_smoke.cfg')


def _run(capsys, *args):
  """Parses flags like the command line would and runs main; returns rc, err."""
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', f'--flagfile={SMOKE}', *args])
  rc = main_lib.main(['efficientnet-tpu-train'])
  return rc, capsys.readouterr()


@pytest.fixture(autouse=True)
def _reset_flags():
  yield
  FLAGS.unparse_flags()


@pytest.mark.parametrize('args,start', [
    (['--model_name=efficientnet-b9'], None),  # absl enum rejects at parse.
    (['--train_batch_size=66'],
     '--train_batch_size: expected a multiple of the number of replicas (4)'),
    (['--data=tfrecord'], '--data_dir: expected TFRecord files matching'),
    (['--base_learning_rate=-0.1'], '--base_learning_rate: expected a value'),
    (['--lr_warmup_epochs=50'], '--lr_warmup_epochs: expected fewer than'),
    (['--weight_decay_exclude=gamma,(bad'], '--weight_decay_exclude:'),
    (['--bn_group_size=3'], '--bn_group_size:'),
    (['--strategy=tpu'], '--tpu:'),
    (['--strategy=tpu', '--tpu=no-such-tpu', '--tpu_zone=us-central1-a'],
     "--tpu: could not reach TPU 'no-such-tpu'"),
])
def test_bad_flags_fail_before_any_work_on_one_line(tmp_path, capsys, args,
                                                    start):
  model_dir = tmp_path / 'run'
  all_args = [f'--model_dir={model_dir}', f'--data_dir={tmp_path}', *args]
  if '--data=tfrecord' not in args:
    all_args.remove(f'--data_dir={tmp_path}')
  if start is None:
    with pytest.raises(flags.IllegalFlagValueError, match='model_name'):
      FLAGS.unparse_flags()
      FLAGS(['efficientnet-tpu-train', f'--flagfile={SMOKE}', *all_args])
    return
  rc, out = _run(capsys, *all_args)
  assert rc == 2
  lines = out.err.strip().splitlines()
  assert len(lines) == 1, out.err
  assert lines[0].startswith('error: ' + start), lines[0]
  # Nothing was trained or written.
  assert not (model_dir / 'checkpoint').exists()


def test_model_dir_is_required(capsys):
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', f'--flagfile={SMOKE}'])
  rc = main_lib.main(['efficientnet-tpu-train'])
  assert rc == 2
  assert capsys.readouterr().err.startswith('error: --model_dir:')


def test_existing_run_of_another_model_is_never_overwritten(tmp_path, capsys):
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  old = {'model': {'name': 'efficientnet-b3'}}
  (model_dir / 'config.json').write_text(json.dumps(old))
  rc, out = _run(capsys, f'--model_dir={model_dir}')
  assert rc == 2
  assert "holds a run with model name='efficientnet-b3'" in out.err
  assert json.loads((model_dir / 'config.json').read_text()) == old


def test_export_dir_must_be_new(tmp_path, capsys):
  export_dir = tmp_path / 'export'
  export_dir.mkdir()
  (export_dir / 'keep.txt').write_text('mine')
  rc, out = _run(capsys, f'--model_dir={tmp_path / "run"}',
                 f'--export_dir={export_dir}')
  assert rc == 2 and out.err.startswith('error: --export_dir:')
  assert (export_dir / 'keep.txt').read_text() == 'mine'


def test_dry_run_prints_schedule_and_plots(tmp_path, capsys):
  rc, out = _run(capsys, f'--model_dir={tmp_path}', '--dry_run')
  assert rc == 0
  assert 'Learning-rate schedule:' in out.out
  assert json.loads(out.out[:out.out.index('Learning-rate')])['model'][
      'image_size'] == 32
  assert (tmp_path / 'lr_schedule.png').stat().st_size > 1000
  assert not (tmp_path / 'checkpoint').exists()


def test_tpu_flag_implies_tpu_strategy():
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', '--tpu=local', '--model_dir=/tmp/x'])
  cfg = main_lib.config_from_flags(FLAGS)
  assert cfg.distribute.strategy == 'tpu' and cfg.distribute.tpu == 'local'


def test_data_defaults_to_tfrecord_with_data_dir():
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', '--data_dir=gs://b/imagenet',
         '--model_dir=/tmp/x', '--num_label_classes=1001'])
  cfg = main_lib.config_from_flags(FLAGS)
  assert cfg.data.source == 'tfrecord'
  assert cfg.data.include_background_label
