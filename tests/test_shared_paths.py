"""Paths every host can reach: local paths refused on several hosts.

A multi-host TPU slice (simulated: a TPUStrategy object whose `extended`
reports the host count, as `TPUStrategyExtended.num_hosts` does) and a
multi-worker TF_CONFIG cluster read and write model_dir, export_dir and
data_dir from every host; a local path is then one host's disk. The
two-process case of workers that see different model_dirs is in
test_multi_worker.py.
"""

import json
import types

from absl import flags
import pytest
import tensorflow as tf

from efficientnet_tpu import distribute
from efficientnet_tpu import main as main_lib
from efficientnet_tpu import presets
from efficientnet_tpu.config import ConfigError
from tests.helpers import small_config

FLAGS = flags.FLAGS


def _tpu_slice(num_hosts):
  """A TPUStrategy as the code sees one: its type and its host count (a
  real one needs TPU hardware)."""
  tpu = object.__new__(tf.distribute.TPUStrategy)
  tpu._extended = types.SimpleNamespace(num_hosts=num_hosts)  # pylint: disable=protected-access
  return tpu


def _cfg(tmp_path, model_dir, export_dir=None, data_dir=None, shared=False,
         strategy='cpu'):
  data = dict(data='tfrecord', data_dir=data_dir) if data_dir else {}
  return small_config(
      model_dir, data=data,
      train=dict(export_dir=export_dir) if export_dir else {},
      distribute=dict(shared_filesystem=shared, strategy=strategy))


def test_multi_host_tpu_slice_refuses_local_paths(tmp_path):
  local = str(tmp_path / 'run')
  tpu = _tpu_slice(4)
  assert distribute.num_input_pipelines(tpu) == 4
  with pytest.raises(ConfigError) as e:
    distribute.check_shared_paths(_cfg(tmp_path, local), tpu)
  line = main_lib.flag_error_line(e.value)
  assert line.startswith(f"--model_dir: '{local}' is a local path, but this "
                         'TPU slice has 4 hosts'), line
  assert '--shared_filesystem' in line and '\n' not in line
  # Each path is checked: the first local one is named.
  cases = [
      (dict(export_dir='/tmp/export'), 'export_dir'),
      (dict(data_dir='/data/imagenet'), 'data_dir'),
      (dict(export_dir='gs://b/export', data_dir='/data/imagenet'),
       'data_dir'),
  ]
  for paths, name in cases:
    with pytest.raises(ConfigError) as e:
      distribute.check_shared_paths(_cfg(tmp_path, 'gs://b/run', **paths),
                                    tpu)
    assert e.value.setting == name, (paths, e.value)


def test_remote_or_declared_shared_paths_and_single_hosts_are_accepted(
    tmp_path):
  local = str(tmp_path / 'run')
  tpu = _tpu_slice(4)
  for cfg in (
      _cfg(tmp_path, 'gs://b/run', 'gs://b/export', 'gs://b/imagenet'),
      _cfg(tmp_path, 's3://b/run', data_dir='hdfs://nn/imagenet'),
      # Declared shared (NFS, Filestore).
      _cfg(tmp_path, local, '/nfs/export', '/nfs/imagenet', shared=True),
      # Synthetic data reads no data_dir.
      _cfg(tmp_path, 'gs://b/run')):
    distribute.check_shared_paths(cfg, tpu)
  # One host (a single TPU VM, one process): local paths are its own.
  distribute.check_shared_paths(_cfg(tmp_path, local), _tpu_slice(1))
  distribute.check_shared_paths(_cfg(tmp_path, local))


def _tf_config(monkeypatch, cluster, task_type='worker', index=0):
  monkeypatch.setenv('TF_CONFIG', json.dumps(
      {'cluster': cluster, 'task': {'type': task_type, 'index': index}}))


def test_multi_worker_cluster_refuses_local_paths_before_its_strategy(
    tmp_path, monkeypatch):
  """From TF_CONFIG alone (no strategy yet): every process counts, the
  side-car evaluator too."""
  local = str(tmp_path / 'run')
  cfg = _cfg(tmp_path, local, strategy='multi_worker')
  _tf_config(monkeypatch, {'worker': ['127.0.0.1:1', '127.0.0.1:2']})
  with pytest.raises(ConfigError, match="^.*TF_CONFIG's cluster has 2 "
                     'processes'):
    distribute.check_shared_paths(cfg)
  _tf_config(monkeypatch, {'worker': ['127.0.0.1:1'],
                           'evaluator': ['127.0.0.1:2']}, 'evaluator')
  with pytest.raises(ConfigError):
    distribute.check_shared_paths(cfg)
  distribute.check_shared_paths(
      _cfg(tmp_path, local, shared=True, strategy='multi_worker'))
  distribute.check_shared_paths(
      _cfg(tmp_path, 'gs://b/run', strategy='multi_worker'))
  _tf_config(monkeypatch, {'worker': ['127.0.0.1:1']})  # One process.
  distribute.check_shared_paths(cfg)


def test_cli_refuses_a_local_model_dir_on_a_cluster_before_any_work(
    tmp_path, monkeypatch, capsys):
  """One line naming the flag and the way out; model_dir is not created."""
  _tf_config(monkeypatch, {'chief': ['127.0.0.1:1'],
                           'worker': ['127.0.0.1:2']}, 'chief')
  model_dir = tmp_path / 'run'
  FLAGS.unparse_flags()
  try:
    FLAGS(['efficientnet-tpu-train', f'--flagfile={presets.path("cpu_smoke")}',
           '--strategy=multi_worker', f'--model_dir={model_dir}'])
    rc = main_lib.main(['efficientnet-tpu-train'])
  finally:
    FLAGS.unparse_flags()
  err = capsys.readouterr().err
  assert rc == 2
  assert err.startswith(f"error: --model_dir: '{model_dir}' is a local "
                        "path, but TF_CONFIG's cluster has 2 processes"), err
  assert err.count('\n') == 1 and '--shared_filesystem' in err
  assert not model_dir.exists()
