"""The supported software stack, and a one-line refusal of any other.

The support matrix (reasons and sources in docs/design_decisions.md):

  Python       3.10 and newer (Cloud TPU VM images run Ubuntu 22.04: 3.10)
  TensorFlow   2.18 and newer (the oldest TF TPU VM runtime and
               `tensorflow-tpu` release we support; 2.20 is the newest TPU
               build, 2.21 the newest CPU/GPU one)
  Keras        3.10 and newer (what TF 2.20 itself requires; TF 2.18 and 2.19
               accept it, and launch/tpu_install.sh puts it in place on their
               runtimes)

Keras 3.10 is the floor because the optimizers build their slots with
`Optimizer.add_optimizer_variables` (new in 3.10), and because from Keras 3.8
on `add_weight` and `SeedGenerator` state default to aggregation "none",
which replica-local state relies on (our own variables also say it
explicitly).

`check()` runs at start-up, before any work: an older stack is one line that
names the package, the version found, the version needed and the pip
command that fixes it, never an AttributeError deep inside a traced step.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Optional, Tuple

MIN_PYTHON = (3, 10)
MIN_TENSORFLOW = (2, 18)
MIN_KERAS = (3, 10)

# TensorFlow's distributions, in the order a machine most likely has them;
# the first one installed names the package in the fix.
_TF_DISTRIBUTIONS = ('tensorflow-cpu', 'tensorflow', 'tensorflow-tpu',
                     'tensorflow-gpu', 'tf-nightly', 'tf-nightly-cpu',
                     'intel-tensorflow', 'tensorflow-intel',
                     'tensorflow-macos', 'tensorflow-aarch64')


class UnsupportedStack(RuntimeError):
  """A package of the stack is missing or older than the floor."""


def parse_version(text: str) -> Tuple[int, ...]:
  """The leading release numbers of a version string.

  '2.18.1' -> (2, 18, 1); '2.21.0-rc1', '2.19.0+nv25.02' and '3.10.0.dev2025'
  keep only their release part.

  Raises:
    ValueError: `text` does not start with a number.
  """
  match = re.match(r'\s*v?(\d+(?:\.\d+)*)', str(text))
  if not match:
    raise ValueError(f'not a version: {text!r}')
  return tuple(int(p) for p in match.group(1).split('.'))


def _dotted(version: Tuple[int, ...]) -> str:
  return '.'.join(str(p) for p in version)


def _installed_distribution(names) -> Optional[str]:
  """The first of `names` that pip has installed, or None."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  for name in names:
    try:
      metadata.version(name)
      return name
    except metadata.PackageNotFoundError:
      continue
  return None


def _tf_fix(found_dist: Optional[str]) -> str:
  spec = f'>={_dotted(MIN_TENSORFLOW)}'
  if found_dist == 'tensorflow-tpu':
    return (f'use a TPU VM runtime tpu-vm-tf-{_dotted(MIN_TENSORFLOW)}.0-pjrt '
            'or newer (docs/quickstart.md section 11)')
  dist = found_dist or 'tensorflow-cpu'
  return (f"pip install -U '{dist}{spec}' (or 'tensorflow[and-cuda]{spec}' "
          'on a GPU machine)')


def check_versions(python: Tuple[int, ...], tensorflow: Optional[str],
                   keras: Optional[str],
                   tf_distribution: Optional[str] = None) -> None:
  """Raises UnsupportedStack for the first package below its floor.

  Args:
    python: the interpreter's version tuple.
    tensorflow: TensorFlow's `__version__`, or None when it cannot be
      imported.
    keras: Keras' `__version__`, or None to skip Keras (tools that use
      TensorFlow only), or '' when it cannot be imported.
    tf_distribution: the pip distribution TensorFlow came from, if known.
  """
  if tuple(python[:2]) < MIN_PYTHON:
    raise UnsupportedStack(
        f'Python {_dotted(tuple(python[:3]))} found, efficientnet_tpu needs '
        f'Python >= {_dotted(MIN_PYTHON)}: run it with a newer python3')
  if tensorflow is None:
    raise UnsupportedStack(
        'TensorFlow cannot be imported, efficientnet_tpu needs tensorflow >= '
        f'{_dotted(MIN_TENSORFLOW)}: {_tf_fix(tf_distribution)}')
  if parse_version(tensorflow)[:2] < MIN_TENSORFLOW:
    raise UnsupportedStack(
        f'tensorflow {tensorflow} found, efficientnet_tpu needs tensorflow >= '
        f'{_dotted(MIN_TENSORFLOW)}: {_tf_fix(tf_distribution)}')
  if keras is None:
    return
  fix = f"pip install -U 'keras>={_dotted(MIN_KERAS)}'"
  if not keras:
    raise UnsupportedStack(
        f'Keras cannot be imported, efficientnet_tpu needs keras >= '
        f'{_dotted(MIN_KERAS)}: {fix}')
  if parse_version(keras)[:2] < MIN_KERAS:
    raise UnsupportedStack(
        f'keras {keras} found, efficientnet_tpu needs keras >= '
        f'{_dotted(MIN_KERAS)} (TensorFlow {tensorflow} accepts it): {fix}')


def _import_version(module: str,
                    importer: Callable[[str], object]) -> Optional[str]:
  try:
    return str(importer(module).__version__)
  except Exception:  # pylint: disable=broad-except
    # Any import failure (missing, a broken build, a protobuf clash) is the
    # same answer for the user: this package cannot be used as installed.
    return None


def installed() -> dict:
  """The versions of the stack on this machine (imports TF and Keras)."""
  import importlib  # pylint: disable=g-import-not-at-top
  tensorflow = _import_version('tensorflow', importlib.import_module)
  keras = _import_version('keras', importlib.import_module)
  return {
      'python': '.'.join(str(p) for p in sys.version_info[:3]),
      'tensorflow': tensorflow,
      'keras': keras,
      'tf_distribution': _installed_distribution(_TF_DISTRIBUTIONS),
  }


def check(keras: bool = True) -> dict:
  """Checks the installed stack; returns its versions.

  Args:
    keras: also require Keras (False for tools that use TensorFlow only).

  Raises:
    UnsupportedStack: with the one line to show the user.
  """
  found = installed()
  check_versions(sys.version_info[:3], found['tensorflow'],
                 (found['keras'] or '') if keras else None,
                 found['tf_distribution'])
  return found


def describe(found: dict) -> str:
  """'Python 3.10.13, TensorFlow 2.18.1 (tensorflow-cpu), Keras 3.10.0'."""
  dist = f" ({found['tf_distribution']})" if found.get('tf_distribution') else ''
  return (f"Python {found['python']}, TensorFlow {found['tensorflow']}{dist}, "
          f"Keras {found['keras']}")


def main() -> int:
  """`python -m efficientnet_tpu.stack`: the versions, or the one line."""
  try:
    found = check()
  except UnsupportedStack as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  from efficientnet_tpu import __version__  # pylint: disable=g-import-not-at-top
  print(f'efficientnet_tpu {__version__} on {describe(found)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
