"""The support matrix: an older stack is one line at start-up.

The real old stacks (Python 3.10 with TensorFlow 2.18 and the Keras 3.6 of
its runtime, then the Keras floor) run in CI's floor stage (.ci/floor.sh);
here the versions are fed in, and the CLI is run with Keras' reported
version lowered in the process, as an older install would report it.
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from efficientnet_tpu import stack

REPO = pathlib.Path(__file__).resolve().parents[1]
PY = (3, 11, 7)


@pytest.mark.parametrize('text,expected', [
    ('2.18.1', (2, 18, 1)),
    ('2.21.0-rc1', (2, 21, 0)),
    ('2.19.0+nv25.02', (2, 19, 0)),
    ('3.10.0.dev2025061703', (3, 10, 0)),
    ('v3.12', (3, 12)),
])
def test_versions_parse_their_release_part(text, expected):
  assert stack.parse_version(text) == expected


def test_parse_refuses_what_is_no_version():
  with pytest.raises(ValueError, match='not a version'):
    stack.parse_version('unknown')


@pytest.mark.parametrize('tf_version,keras_version', [
    ('2.18.0', '3.10.0'), ('2.18.1', '3.12.4'), ('2.20.0', '3.11.3'),
    ('2.21.0', '3.15.1'), ('2.22.0-rc0', '4.0.0')])
def test_the_matrix_and_newer_pass(tf_version, keras_version):
  stack.check_versions((3, 10, 13), tf_version, keras_version)
  stack.check_versions((3, 13, 0), tf_version, keras_version)


def _refusal(**kwargs) -> str:
  args = dict(python=PY, tensorflow='2.21.0', keras='3.15.1')
  args.update(kwargs)
  with pytest.raises(stack.UnsupportedStack) as info:
    stack.check_versions(**args)
  line = str(info.value)
  assert '\n' not in line
  return line


def test_old_keras_names_package_found_needed_and_fix():
  line = _refusal(tensorflow='2.18.1', keras='3.6.0')
  assert line.startswith('keras 3.6.0 found, efficientnet_tpu needs keras '
                         '>= 3.10')
  assert line.endswith("pip install -U 'keras>=3.10'")


def test_keras_2_is_refused_like_an_old_keras_3():
  assert _refusal(keras='2.15.0').startswith('keras 2.15.0 found')


def test_old_tensorflow_names_its_own_distribution():
  line = _refusal(tensorflow='2.17.1', tf_distribution='tensorflow')
  assert line.startswith('tensorflow 2.17.1 found, efficientnet_tpu needs '
                         'tensorflow >= 2.18')
  assert "pip install -U 'tensorflow>=2.18'" in line
  assert "'tensorflow[and-cuda]>=2.18' on a GPU machine" in line


def test_old_tpu_tensorflow_points_to_a_runtime_not_pip():
  line = _refusal(tensorflow='2.16.2', tf_distribution='tensorflow-tpu')
  assert 'tpu-vm-tf-2.18.0-pjrt or newer' in line
  assert 'pip install' not in line


def test_tensorflow_is_checked_before_keras():
  assert _refusal(tensorflow='2.15.0', keras='2.15.0').startswith(
      'tensorflow 2.15.0')


def test_missing_packages_and_old_python():
  assert _refusal(tensorflow=None).startswith('TensorFlow cannot be imported')
  assert _refusal(keras='').startswith('Keras cannot be imported')
  assert _refusal(python=(3, 9, 18)).startswith(
      'Python 3.9.18 found, efficientnet_tpu needs Python >= 3.10')


def test_tools_that_need_no_keras_skip_it():
  stack.check_versions(PY, '2.21.0', None)


def test_installed_reports_what_this_process_imports():
  found = stack.check()
  assert found['tensorflow'] == tf.__version__
  assert found['keras'] == keras.__version__
  assert found['python'] == '.'.join(map(str, sys.version_info[:3]))
  dist = found['tf_distribution']
  assert dist is None or importlib.metadata.version(dist) == tf.__version__


def test_setup_and_requirements_state_the_same_floors():
  setup = (REPO / 'setup.py').read_text()
  requirements = (REPO / 'requirements.txt').read_text()
  dotted = lambda v: '.'.join(map(str, v))
  assert f"python_requires='>={dotted(stack.MIN_PYTHON)}'" in setup
  assert f'>={dotted(stack.MIN_TENSORFLOW)}' in setup
  assert f'\nkeras>={dotted(stack.MIN_KERAS)}\n' in requirements


_LOWER_KERAS = """
import sys
import keras
keras.__version__ = '3.6.0'  # What the runtime of TF 2.18 carries.
from efficientnet_tpu import main
sys.argv = ['efficientnet-tpu-train', '--preset=cpu_smoke',
            '--model_dir=' + sys.argv[1]]
main.run()
"""


def test_cli_refuses_an_old_keras_in_one_line_before_any_work(tmp_path):
  model_dir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-c', _LOWER_KERAS, str(model_dir)],
      env=dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL='2'),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  ours = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert ours == ['error: keras 3.6.0 found, efficientnet_tpu needs keras >= '
                  f'3.10 (TensorFlow {tf.__version__} accepts it): '
                  "pip install -U 'keras>=3.10'"]
  assert not model_dir.exists()


def test_every_floor_entry_names_a_test_that_exists():
  """The floor subset (tests/conftest.py) cannot rot into names that match
  nothing, which would shrink what CI runs on the floor stack unseen."""
  from tests import conftest  # pylint: disable=g-import-not-at-top
  for entry in conftest.FLOOR:
    path, _, name = entry.partition('::')
    source = (REPO / path).read_text()
    assert not name or f'\ndef {name.split("[")[0]}(' in source, entry
