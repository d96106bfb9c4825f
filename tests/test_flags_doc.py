"""Tests for efficientnet_tpu/tools/gen_flags_doc.py and docs/flags.md.

The committed docs/flags.md must equal the generated text, so the flag
reference never drifts from the settings. Its content is checked against
absl's own registry of the flags main.py defined (name, default, enum values,
help) and against the sections of the config dataclasses.
"""

import dataclasses
import pathlib
import re
import subprocess
import sys

from absl import flags
import pytest

from efficientnet_tpu import config as config_lib
from efficientnet_tpu import main as main_lib
from efficientnet_tpu.tools import gen_flags_doc

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / 'docs' / 'flags.md'


def _registered():
  """{name: absl Flag} of the flags efficientnet_tpu.main defined."""
  return {f.name: f for f in
          flags.FLAGS.get_flags_for_module('efficientnet_tpu.main')}


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
  assert set(rows) == set(_registered())
  for _, cells in rows.values():
    assert len(cells) == 4, cells  # flag, type, default, description


def _section_titles(cls):
  """Section titles in field order, walking the dataclasses directly."""
  titles = [cls.TITLE] if cls.TITLE else []
  for f in dataclasses.fields(cls):
    sub = f.metadata.get('section')
    if sub is not None:
      titles += [t for t in _section_titles(sub) if t not in titles]
  return titles


def test_flags_are_grouped_by_the_config_section_they_belong_to():
  headings = [l[3:] for l in DOC.read_text().splitlines()
              if l.startswith('## ')]
  assert headings == _section_titles(config_lib.ExperimentConfig) + ['Run']
  rows = _doc_rows()
  for title, cls in [('Model', config_lib.ModelConfig),
                     ('Optimizer: LARS', config_lib.LarsConfig),
                     ('Learning-rate schedule', config_lib.ScheduleConfig)]:
    names = [f.metadata['name'] or f.name for f in dataclasses.fields(cls)
             if f.metadata['flag']]
    assert names and all(rows[n][0] == title for n in names), title
  # Settings that code alone sets have no flag.
  assert 'synthetic_learnable' not in rows and 'depth_divisor' not in rows


def test_defaults_enum_values_and_help_match_absl():
  rows = _doc_rows()
  for name, flag in _registered().items():
    cells = rows[name][1]
    value = flag.default
    if value is None:
      expected = '*unset*'
    elif isinstance(value, bool):
      expected = f'`{str(value).lower()}`'
    elif isinstance(value, list):
      expected = '`' + ','.join(value) + '`'
    else:
      expected = f'`{value}`'
    assert cells[2] == expected, name
    if isinstance(flag.parser, flags.EnumParser):
      assert cells[1] == 'enum: ' + ', '.join(
          f'`{v}`' for v in flag.parser.enum_values), name
    assert ' '.join(flag.help.split()).endswith(cells[3].split('>: ')[-1])
  assert rows['model_name'][1][1] == 'enum: ' + ', '.join(
      f'`{m}`' for m in config_lib.MODEL_TABLE)
  # A list default with regex pipes survives the table escaping.
  assert rows['weight_decay_exclude'][1][2] == (
      '`' + ','.join(config_lib.DEFAULT_WEIGHT_DECAY_EXCLUDE) + '`')
  assert rows['use_bfloat16'][1][1] == 'bool'
  assert rows['train_batch_size'][1][1] == 'int'


def test_help_lists_the_projects_flags_by_section(capsys, monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['efficientnet-tpu-train', '--helpshort'])
  with pytest.raises(SystemExit) as e:
    main_lib.run()
  assert e.value.code == 0
  out = capsys.readouterr().out
  listed = re.findall(r'^  --(\w+):', out, flags=re.M)
  assert listed == [n for n in _doc_rows()]  # Every flag, docs' order.
  titles = re.findall(r'^(\S.*):$', out, flags=re.M)
  assert titles == _section_titles(config_lib.ExperimentConfig) + ['Run']
  assert '--logtostderr' not in out and 'absl' not in out.split('Also')[0]


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
