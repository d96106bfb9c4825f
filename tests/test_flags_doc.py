"""Tests for efficientnet_tpu/tools/gen_flags_doc.py and docs/flags.md.

The committed docs/flags.md must equal the generated text, so the flag
reference never drifts from main.py. The content is checked against main.py's
source read independently here (with `ast`): every flag once, under its
section comment, with its literal default and enum values.
"""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

from efficientnet_tpu import config as config_lib
from efficientnet_tpu.tools import gen_flags_doc

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / 'docs' / 'flags.md'
MAIN = REPO / 'efficientnet_tpu' / 'main.py'


def _defines():
  """(name, line, default node) of every flags.DEFINE_* call in main.py."""
  tree = ast.parse(MAIN.read_text())
  out = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr.startswith('DEFINE_')):
      out.append((ast.literal_eval(node.args[0]), node.lineno, node.args[1]))
  return sorted(out, key=lambda d: d[1])


def _sections():
  """(line, title) of the '# ---- name ----' comments in main.py."""
  return [(i + 1, m.group(1))
          for i, line in enumerate(MAIN.read_text().splitlines())
          for m in [re.match(r'# -+ (\w[\w ]*?) -+$', line)] if m]


def _cells(row):
  """Splits a markdown table row on unescaped pipes."""
  return [c.strip().replace(r'\|', '|')
          for c in re.split(r'(?<!\\)\|', row.strip())[1:-1]]


def _doc_rows():
  """{flag name: (section heading, [cells])} from the committed doc."""
  rows, heading = {}, None
  for line in DOC.read_text().splitlines():
    if line.startswith('## '):
      heading = line[3:].strip()
    elif line.startswith('| `--'):
      cells = _cells(line)
      name = cells[0].strip('`')[2:]
      assert name not in rows, f'--{name} documented twice'
      rows[name] = (heading, cells)
  return rows


def test_committed_doc_matches_generated_text():
  assert DOC.read_text() == gen_flags_doc.render(), (
      'docs/flags.md is stale: run python -m '
      'efficientnet_tpu.tools.gen_flags_doc')


def test_every_flag_of_main_is_documented_once():
  rows = _doc_rows()
  assert set(rows) == {name for name, _, _ in _defines()}
  for _, cells in rows.values():
    assert len(cells) == 4, cells  # flag, type, default, description


def test_flags_are_grouped_under_their_section_comment():
  sections = _sections()
  assert [s for _, s in sections] == ['cluster', 'data', 'model',
                                      'optimization', 'loop']
  rows = _doc_rows()
  for name, line, _ in _defines():
    section = [title for start, title in sections if start < line][-1]
    assert rows[name][0] == section.capitalize(), name
  headings = [l[3:] for l in DOC.read_text().splitlines()
              if l.startswith('## ')]
  assert headings == [s.capitalize() for _, s in sections]


def test_literal_defaults_and_enum_values():
  rows = _doc_rows()
  checked = 0
  for name, _, node in _defines():
    try:
      value = ast.literal_eval(node)
    except ValueError:
      continue  # Defaults from config constants: checked below.
    if value is None:
      expected = '*unset*'
    elif isinstance(value, bool):
      expected = f'`{str(value).lower()}`'
    else:
      expected = f'`{value}`'
    assert rows[name][1][2] == expected, name
    checked += 1
  assert checked > 40
  model_type = rows['model_name'][1][1]
  assert model_type == 'enum: ' + ', '.join(
      f'`{m}`' for m in config_lib.MODEL_TABLE)
  assert rows['strategy'][1][1] == 'enum: ' + ', '.join(
      f'`{s}`' for s in config_lib.STRATEGIES)
  # A list default with regex pipes survives the table escaping.
  assert rows['weight_decay_exclude'][1][2] == (
      '`' + ','.join(config_lib.DEFAULT_WEIGHT_DECAY_EXCLUDE) + '`')
  assert rows['use_bfloat16'][1][1] == 'bool'
  assert rows['train_batch_size'][1][1] == 'int'


def _run_cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'efficientnet_tpu.tools.gen_flags_doc', *args],
      cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('edit', ['missing', 'changed'])
def test_check_fails_on_a_stale_file_and_passes_after_writing(tmp_path,
                                                              edit):
  out = tmp_path / 'flags.md'
  if edit == 'changed':
    out.write_text(DOC.read_text().replace('`2048`', '`4096`'))
  stale = _run_cli('--check', f'--output={out}')
  assert stale.returncode == 1
  assert str(out) in stale.stderr and 'out of date' in stale.stderr
  assert _run_cli(f'--output={out}').returncode == 0
  assert out.read_text() == DOC.read_text()
  fresh = _run_cli('--check', f'--output={out}')
  assert fresh.returncode == 0, fresh.stderr


def test_check_passes_on_the_committed_file():
  result = _run_cli('--check')
  assert result.returncode == 0, result.stderr
