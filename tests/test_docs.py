"""Every `--flag` the docs mention exists.

A flag in README.md, docs/*.md or benchmarks/README.md must be a flag of the
trainer (efficientnet_tpu/main.py, plus absl's own such as --flagfile), or of
the other command-line tools of this repository, read here from their
sources: the launch/*.sh scripts, efficientnet_tpu/tools/*.py and the
benchmarks/*.py scripts. A few flags of third-party commands (gcloud,
tensorboard) that the docs quote are listed by hand. Hyphenated flags
(`--no-deps`, `--accelerator-type`) belong to pip and gcloud and are not
checked. A flag that exists nowhere (a renamed or removed one) fails.
"""

import pathlib
import re

from absl import flags
import pytest

from efficientnet_tpu import main as main_lib  # pylint: disable=unused-import

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / 'README.md', REPO / 'benchmarks' / 'README.md',
               *(REPO / 'docs').glob('*.md')])
# `--name` not followed by a word character or a hyphen.
FLAG_RE = re.compile(r'(?<![\w-])--([a-z][a-z0-9_]*)(?![\w-])')
THIRD_PARTY = {
    # gcloud compute tpus tpu-vm / queued-resources, gcloud storage.
    'zone', 'project', 'worker', 'version', 'command', 'region', 'args',
    'force',
    # tensorboard.
    'logdir',
    # pytest-xdist (the README's test command).
    'dist',
}
# absl's flags that FLAGS does not list, and the docs' `--flag=value`.
ABSL_SPECIAL = {'flagfile', 'undefok', 'help', 'helpshort', 'helpfull',
                'helpxml', 'only_check_args'}
PLACEHOLDERS = {'flag'}
# Flags of the paper's code (tensorflow/tpu models/official/efficientnet
# main.py) that the recipe docs compare ours with.
PAPER_CODE = {'batch_norm_batch_size', 'lars_weight_decay'}
PAPER_DOCS = {'recipes.md', 'reproducing_the_paper.md'}


def _main_flags():
  """main's flags and absl's (logging flags, --flagfile, ...)."""
  return set(flags.FLAGS) | ABSL_SPECIAL


def _launch_flags():
  """The `--name)` / `--name=*)` patterns of the scripts' option parsing."""
  names = set()
  for script in (REPO / 'launch').glob('*.sh'):
    for pattern in re.findall(r'^\s*([-\w|=*]+)\)', script.read_text(),
                              flags=re.M):
      names.update(re.findall(r'--([a-z][a-z0-9_]*)', pattern))
  return names


def _argparse_flags(paths):
  names = set()
  for path in paths:
    # argparse's, and pytest's options of tests/conftest.py.
    names.update(re.findall(
        r"add_?(?:argument|option)\(\s*'--([a-z][a-z0-9_]*)'",
        path.read_text()))
  return names


def _mentioned(path):
  return sorted(set(FLAG_RE.findall(path.read_text())))


def test_the_sources_are_read():
  assert {'train_batch_size', 'preset', 'flagfile'} <= _main_flags()
  assert {'accelerator_type', 'preset', 'bucket', 'dry_run'} <= (
      _launch_flags())
  assert {'input_dir', 'check'} <= _argparse_flags(
      (REPO / 'efficientnet_tpu' / 'tools').glob('*.py'))
  assert {'reverse_order'} <= _argparse_flags([REPO / 'tests' /
                                               'conftest.py'])


@pytest.mark.parametrize('path', DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_flag_in_the_docs_exists(path):
  known = (_main_flags() | _launch_flags() | THIRD_PARTY | PLACEHOLDERS
           | (PAPER_CODE if path.name in PAPER_DOCS else set())
           | _argparse_flags((REPO / 'efficientnet_tpu' / 'tools').glob('*.py'))
           | _argparse_flags((REPO / 'benchmarks').glob('*.py'))
           | _argparse_flags([REPO / 'tests' / 'conftest.py']))
  unknown = [f'--{name}' for name in _mentioned(path) if name not in known]
  assert not unknown, f'{path.relative_to(REPO)} mentions unknown flags: {unknown}'


def test_trainer_docs_name_only_trainer_flags():
  """recipes.md and flags.md are about the trainer: no other tool's flags."""
  trainer = _main_flags() | PLACEHOLDERS | PAPER_CODE
  for name in ('recipes.md', 'flags.md'):
    path = REPO / 'docs' / name
    unknown = [f'--{n}' for n in _mentioned(path) if n not in trainer]
    assert not unknown, f'docs/{name}: {unknown}'


# `module.name` in backquotes, the module one of this repository's: the
# package's modules (`replica_plan.make`, `data.stream.epoch_order`,
# `efficientnet_tpu.stack`) and `benchmarks.*`. File names (`config.json`,
# `train.py`) are files.
CODE_RE = re.compile(r'`([^`\n]+)`')
NAME_RE = re.compile(r'(?<![\w./-])((?:efficientnet_tpu\.)?[a-z_]\w*'
                     r'(?:\.[A-Za-z_]\w*)+)')
FILE_SUFFIXES = ('.py', '.json', '.jsonl', '.cfg', '.md', '.sh', '.png',
                 '.txt', '.ini')


def _package_modules():
  import pkgutil  # pylint: disable=g-import-not-at-top
  import efficientnet_tpu  # pylint: disable=g-import-not-at-top
  found = {}
  for info in pkgutil.walk_packages(efficientnet_tpu.__path__,
                                    'efficientnet_tpu.'):
    # `pipeline` and `data.pipeline` both name data/pipeline.py.
    parts = info.name.split('.')[1:]
    for i in range(len(parts)):
      found.setdefault('.'.join(parts[i:]), info.name)
  return found


def _cited_names(path):
  text = re.sub(r'```.*?```', '', path.read_text(), flags=re.S)
  for code in CODE_RE.findall(text):
    for name in NAME_RE.findall(code):
      if not name.endswith(FILE_SUFFIXES):
        yield name


def _resolves(name, modules):
  """Whether `name` is a module, or an attribute path of one, here."""
  import importlib  # pylint: disable=g-import-not-at-top
  parts = name.split('.')
  if parts[0] == 'efficientnet_tpu':
    parts = parts[1:]
  for split in range(len(parts), 0, -1):
    module = modules.get('.'.join(parts[:split]))
    if parts[0] == 'benchmarks' and split > 1:
      module = '.'.join(parts[:split])
    if module is None:
      continue
    try:
      obj = importlib.import_module(module)
    except ImportError:
      return False
    for attr in parts[split:]:
      if not hasattr(obj, attr):
        return False
      obj = getattr(obj, attr)
    return True
  return None  # Not one of this repository's modules.


@pytest.mark.parametrize('path', DOCS, ids=lambda p: p.name)
def test_every_module_name_the_docs_cite_exists(path):
  modules = _package_modules()
  missing = sorted({n for n in _cited_names(path)
                    if _resolves(n, modules) is False})
  assert not missing, f'{path.name} cites names that do not exist: {missing}'


def test_the_name_check_tells_a_missing_name():
  modules = _package_modules()
  assert _resolves('train.Trainer', modules) is True
  assert _resolves('data.stream.epoch_order', modules) is True
  assert _resolves('efficientnet_tpu.stack', modules) is True
  assert _resolves('benchmarks.ema_swap', modules) is True
  assert _resolves('collectives.no_such_function', modules) is False
  assert _resolves('benchmarks.no_such_script', modules) is False
  assert _resolves('tf.io.gfile', modules) is None


def test_ci_runs_exactly_the_readmes_test_command():
  """.ci/run runs the README's test command, character for character (CI
  checks what a user is told to run)."""
  blocks = re.findall(r'```bash\n(.*?)```', (REPO / 'README.md').read_text(),
                      flags=re.S)
  commands = [line for block in blocks for line in block.splitlines()
              if 'python -m pytest' in line and line.startswith('pip ')]
  assert len(commands) == 1, commands
  ci = (REPO / '.ci' / 'run').read_text().splitlines()
  assert commands[0] in ci
