r"""Generates docs/flags.md from the flags that efficientnet_tpu/main.py defines.

The reference is rendered from absl's flag registry (name, type, default,
allowed values, help), grouped by the `# ---- section ----` comments of
main.py in definition order, so it cannot drift from the code:
tests/test_flags_doc.py compares the committed file with this output.

  python -m efficientnet_tpu.tools.gen_flags_doc          # rewrite the file
  python -m efficientnet_tpu.tools.gen_flags_doc --check  # exit 1 if stale
"""

from __future__ import annotations

import argparse
import inspect
import pathlib
import re
import sys
from typing import Dict, List, Optional, Sequence

from absl import flags

MAIN_MODULE = 'efficientnet_tpu.main'
OTHER_SECTION = 'other'

_SECTION_RE = re.compile(r'^#\s*-{2,}\s*(?P<name>[A-Za-z][\w ]*?)\s*-{2,}\s*$')
_DEFINE_RE = re.compile(r"flags\.DEFINE_\w+\(\s*['\"](?P<name>\w+)['\"]")

HEADER = """\
# Flags of `efficientnet-tpu-train`

<!-- Generated from efficientnet_tpu/main.py by
     `python -m efficientnet_tpu.tools.gen_flags_doc`; do not edit by hand.
     tests/test_flags_doc.py fails when this file and the flags differ. -->

`efficientnet-tpu-train` (or `python -m efficientnet_tpu.main`) takes the
flags below. `--preset=NAME` reads flags from a preset shipped with the
package (`--preset=list` shows them) and `--flagfile=FILE` from your own
file (one `--flag=value` per line); flags given on the command line override
both. Every
run writes the resolved config to `model_dir/config.json`, and `--dry_run`
prints it with the learning-rate schedule without training. absl's own flags
(`--flagfile`, `--helpfull`, logging flags such as `--v`) work as usual.
"""


def flag_sections(source: str) -> Dict[str, str]:
  """Maps each flag defined in `source` to its `# ---- name ----` section."""
  sections = {}
  current = OTHER_SECTION
  for line in source.splitlines():
    match = _SECTION_RE.match(line.strip())
    if match:
      current = match.group('name')
      continue
    for define in _DEFINE_RE.finditer(line):
      sections.setdefault(define.group('name'), current)
  return sections


def _type_name(flag) -> str:
  if isinstance(flag.parser, flags.EnumParser):
    return 'enum'
  if flag.boolean:
    return 'bool'
  if isinstance(flag.parser, flags.ListParser):
    return 'list'
  if isinstance(flag.parser, flags.IntegerParser):
    return 'int'
  if isinstance(flag.parser, flags.FloatParser):
    return 'float'
  return 'string'


def _default(flag) -> str:
  value = flag.default
  if value is None:
    return '*unset*'
  if flag.boolean:
    return '`true`' if value else '`false`'
  if isinstance(value, (list, tuple)):
    return '`' + ','.join(str(v) for v in value) + '`'
  return f'`{value}`'


def _cell(text: str) -> str:
  """One table cell: a single line, pipes escaped (also in code spans)."""
  return ' '.join(str(text).split()).replace('|', r'\|')


def _row(flag) -> str:
  kind = _type_name(flag)
  text = flag.help or ''
  if kind == 'enum':
    values = flag.parser.enum_values
    kind += ': ' + ', '.join(f'`{v}`' for v in values)
    # absl prefixes enum help with "<a|b|c>: "; the type column lists them.
    prefix = '<' + '|'.join(values) + '>: '
    if text.startswith(prefix):
      text = text[len(prefix):]
  cells = [f'`--{flag.name}`', kind, _default(flag), text]
  return '| ' + ' | '.join(_cell(c) for c in cells) + ' |'


def render(module=None) -> str:
  """The markdown reference for the flags of `module` (main.py)."""
  if module is None:
    import importlib  # pylint: disable=g-import-not-at-top
    module = importlib.import_module(MAIN_MODULE)
  defined = flags.FLAGS.get_flags_for_module(module.__name__)
  sections = flag_sections(inspect.getsource(module))
  order: List[str] = []
  grouped: Dict[str, list] = {}
  for flag in defined:
    section = sections.get(flag.name, OTHER_SECTION)
    if section not in grouped:
      order.append(section)
      grouped[section] = []
    grouped[section].append(flag)
  lines = [HEADER]
  for section in order:
    lines.append(f'## {section.capitalize()}\n')
    lines.append('| flag | type | default | description |')
    lines.append('| --- | --- | --- | --- |')
    lines.extend(_row(flag) for flag in grouped[section])
    lines.append('')
  return '\n'.join(lines)


def default_output_path() -> pathlib.Path:
  """docs/flags.md of the source tree this module belongs to."""
  return pathlib.Path(__file__).resolve().parents[2] / 'docs' / 'flags.md'


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m efficientnet_tpu.tools.gen_flags_doc',
      description='Writes (or with --check, verifies) docs/flags.md.')
  parser.add_argument('--check', action='store_true',
                      help='exit 1 if the file differs from the flags')
  parser.add_argument('--output', type=pathlib.Path,
                      default=default_output_path(),
                      help='markdown file (default: %(default)s)')
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    current = (args.output.read_text(encoding='utf-8')
               if args.output.exists() else None)
    if current != text:
      print(f'{args.output}: out of date with efficientnet_tpu/main.py; '
            'run python -m efficientnet_tpu.tools.gen_flags_doc',
            file=sys.stderr)
      return 1
    print(f'{args.output}: up to date')
    return 0
  args.output.parent.mkdir(parents=True, exist_ok=True)
  args.output.write_text(text, encoding='utf-8')
  print(f'wrote {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
