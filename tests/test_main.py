"""Entry point: flags become a config; bad input fails early on one line."""

import json
import os

from absl import flags
import pytest

from efficientnet_tpu import main as main_lib
from efficientnet_tpu import presets

FLAGS = flags.FLAGS
SMOKE = presets.path('cpu_smoke')


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
    # The smoke preset sets --data=synthetic: a later --data_dir is not
    # silently ignored, nor is a --tpu that the strategy would not use.
    (['--data_dir=/data/imagenet'],
     '--data_dir: /data/imagenet is given but --data=synthetic'),
    (['--tpu=local', '--strategy=cpu'],
     "--tpu: 'local' is given but --strategy=cpu does not use a TPU"),
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
  assert "holds a run with model_name='efficientnet-b3'" in out.err
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
  assert json.loads(out.out[:out.out.index('\nModel: ')])['model'][
      'image_size'] == 32
  assert 'bn_group_size: 2' in out.out  # Smoke preset: 4 replicas, groups.
  assert (tmp_path / 'lr_schedule.png').stat().st_size > 1000
  assert not (tmp_path / 'checkpoint').exists()


def test_tpu_flag_implies_tpu_strategy():
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', '--tpu=local', '--model_dir=/tmp/x'])
  cfg = main_lib.config_from_flags(FLAGS)
  assert cfg.distribute.strategy == 'tpu' and cfg.distribute.tpu == 'local'


def test_data_defaults_to_tfrecord_with_data_dir(tmp_path):
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train', f'--data_dir={tmp_path}',
         '--model_dir=/tmp/x', '--num_label_classes=1001'])
  cfg = main_lib.config_from_flags(FLAGS)
  assert cfg.data.source == 'tfrecord'
  assert cfg.data.include_background_label


PRESETS = presets.DIRECTORY


def _parse_preset(name, *extra):
  """Parses a preset like the command line (synthetic data, no TPU yet)."""
  FLAGS.unparse_flags()
  FLAGS(['efficientnet-tpu-train',
         f'--flagfile={os.path.join(PRESETS, name)}', '--model_dir=/tmp/x',
         '--data=synthetic', '--tpu=local', *extra])


def _preset_config(name, *extra):
  _parse_preset(name, *extra)
  return main_lib.config_from_flags(FLAGS)


@pytest.mark.parametrize('name', sorted(
    n for n in os.listdir(PRESETS) if n.startswith('efficientnet')))
@pytest.mark.parametrize('replicas', [8, 32, 1024])
def test_every_preset_resolves_on_8_32_and_1024_replicas(name, replicas):
  from efficientnet_tpu import replica_plan  # pylint: disable=g-import-not-at-top
  cfg = _preset_config(name)
  batch, eval_batch = cfg.train.train_batch_size, cfg.train.eval_batch_size
  if batch % replicas or eval_batch % replicas:
    with pytest.raises(main_lib.config_lib.ConfigError,
                       match='^(eval|train)_batch_size: expected a '
                             'multiple of the number of replicas'):
      replica_plan.make(cfg, replicas)
    return
  plan = replica_plan.make(cfg, replicas)
  per_replica = batch // replicas
  assert plan.per_replica_train_batch == per_replica
  g = plan.bn_group_size
  assert replicas % g == 0 and plan.bn_groups == replicas // g
  target = cfg.model.bn_group_batch_size
  if target:  # Groups never exceed the target; local BN at or above it.
    assert g == 1 if per_replica >= target else g * per_replica <= target
    if target % per_replica == 0 and replicas % (target // per_replica) == 0:
      assert g * per_replica == target
  elif cfg.model.bn_group_size:
    assert g == cfg.model.bn_group_size


def test_dry_run_for_a_slice_prints_its_plan_or_the_runs_error(tmp_path,
                                                                capsys):
  preset = 'efficientnet-b5-lars-65536.cfg'
  _parse_preset(preset, f'--model_dir={tmp_path}', '--dry_run',
                '--num_replicas=1024')
  assert main_lib.main(['efficientnet-tpu-train']) == 0
  out = capsys.readouterr().out
  for line in ('per_replica_train_batch: 64', 'bn_group_size: 2',
               'bn_groups: 512', 'bn_group_batch: 128', 'total_steps: 6842'):
    assert line in out, out[-1500:]
  _parse_preset(preset, f'--model_dir={tmp_path}', '--dry_run',
                '--num_replicas=48')
  assert main_lib.main(['efficientnet-tpu-train']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --train_batch_size: expected a multiple of '
                        'the number of replicas (48)') and err.count('\n') == 1


def test_truncated_config_json_is_a_one_line_error(tmp_path, capsys):
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  (model_dir / 'config.json').write_text('{"model": {"name": "efficie')
  rc, out = _run(capsys, f'--model_dir={model_dir}')
  assert rc == 2
  assert out.err.startswith(f'error: --model_dir: {model_dir}/config.json is '
                            'not valid JSON') and out.err.count('\n') == 1
  assert (model_dir / 'config.json').read_text() == '{"model": {"name": "efficie'


def test_eval_without_a_checkpoint_fails_and_exports_nothing(tmp_path,
                                                             capsys):
  rc, out = _run(capsys, f'--model_dir={tmp_path / "typo"}', '--mode=eval',
                 f'--export_dir={tmp_path / "export"}', '--num_cpu_replicas=1',
                 '--bn_group_size=1')
  assert rc == 2
  assert out.err.startswith('error: --model_dir: no checkpoint in ')
  assert out.err.count('\n') == 1
  assert not (tmp_path / 'export').exists()
  assert not (tmp_path / 'typo' / 'eval_results.jsonl').exists()


@pytest.mark.parametrize('bad', ['label', 'payload'])
def test_bad_records_end_in_one_line_naming_the_file(tmp_path, capsys, bad):
  """Out-of-range labels (6 with 5 classes) and non-JPEG payloads found
  while running: exit 2, one line that names the file, no traceback."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tests.test_input_pipeline import _example, _jpeg, write_split  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  for prefix in ('train', 'validation'):
    write_split(str(data_dir), prefix, [4],
                label_fn=lambda f, j: j % 5 + 1)
  bad_file = data_dir / 'validation-00001-of-00002'
  (data_dir / 'validation-00000-of-00001').rename(
      data_dir / 'validation-00000-of-00002')
  with tf.io.TFRecordWriter(str(bad_file)) as w:
    w.write(_example(_jpeg((1, 2, 3)) if bad == 'label' else b'GIF89a..', 6))
  rc, out = _run(capsys, f'--model_dir={tmp_path / "run"}', '--data=tfrecord',
                 f'--data_dir={data_dir}', '--num_label_classes=5',
                 '--num_train_images=4', '--num_eval_images=5',
                 '--train_batch_size=4', '--eval_batch_size=4',
                 '--train_steps=2', '--iterations_per_loop=2',
                 '--num_cpu_replicas=1', '--bn_group_size=1',
                 '--lr_warmup_epochs=0', '--mode=train_and_eval',
                 f'--export_dir={tmp_path / "export"}')
  assert rc == 2
  lines = [l for l in out.err.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and str(bad_file) in lines[0], out.err[-2000:]
  want = 'Label out of range' if bad == 'label' else 'non-JPEG image'
  assert want in lines[0] and 'Traceback' not in out.err
  assert not (tmp_path / 'export').exists()


def test_tf_info_noise_is_dropped_but_warnings_and_other_info_stay(caplog):
  """The per-trace all-reduce placement and per-save sharding INFO lines of
  TF's Python code are filtered; anything else from TF still logs."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  main_lib.quiet_tf_info_noise()
  main_lib.quiet_tf_info_noise()  # Idempotent: one filter.
  tf_logger = logging.getLogger('tensorflow')
  assert sum(isinstance(f, main_lib._DropTfInfoNoise)  # pylint: disable=protected-access
             for f in tf_logger.filters) == 1
  with caplog.at_level(logging.INFO):
    tf_logger.info('Reduce to /job:localhost/replica:0/task:0/device:CPU:0 '
                   'then broadcast to (...)')
    # functional_saver logs through absl.
    absl_logging.info('Sharding callback duration: 230 microseconds')
    tf_logger.info('Restoring checkpoint')
    tf_logger.warning('Reduce to /job:localhost placement failed')
  messages = [r.getMessage() for r in caplog.records]
  assert messages == ['Restoring checkpoint',
                      'Reduce to /job:localhost placement failed']
