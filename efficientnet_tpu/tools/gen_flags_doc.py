r"""Generates docs/flags.md from the settings that define the flags.

The reference is rendered from the definitions in config.py (name, type,
default, allowed values, help, section) that main.py turns into absl flags,
in definition order, so it cannot drift from the code:
tests/test_flags_doc.py compares the committed file with this output.

  python -m efficientnet_tpu.tools.gen_flags_doc          # rewrite the file
  python -m efficientnet_tpu.tools.gen_flags_doc --check  # exit 1 if stale
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Dict, List, Optional, Sequence


HEADER = """\
# Flags of `efficientnet-tpu-train`

<!-- Generated from the settings of efficientnet_tpu/config.py by
     `python -m efficientnet_tpu.tools.gen_flags_doc`; do not edit by hand.
     tests/test_flags_doc.py fails when this file and the flags differ. -->

`efficientnet-tpu-train` (or `python -m efficientnet_tpu.main`) takes the
flags below; `--help` lists them by section. `--preset=NAME` reads flags from
a preset shipped with the package (`--preset=list` shows them) and
`--flagfile=FILE` from your own file (one `--flag=value` per line); flags
given on the command line override both. Every run writes the resolved
config to `model_dir/config.json` (keys are the flag names), and `--dry_run`
prints it with the learning-rate schedule without training. absl's own flags
(`--flagfile`, `--helpfull`, logging flags such as `--v`) work as usual.
"""


def _type_name(s) -> str:
  if s.choices:
    return 'enum: ' + ', '.join(f'`{v}`' for v in s.choices)
  return {bool: 'bool', int: 'int', float: 'float', tuple: 'list',
          str: 'string'}[s.type]


def _default(s) -> str:
  value = s.default
  if value is None:
    return '*unset*'
  if isinstance(value, bool):
    return '`true`' if value else '`false`'
  if isinstance(value, tuple):
    return '`' + ','.join(str(v) for v in value) + '`'
  return f'`{value}`'


def _cell(text: str) -> str:
  """One table cell: a single line, pipes escaped (also in code spans)."""
  return ' '.join(str(text).split()).replace('|', r'\|')


def _row(s) -> str:
  cells = [f'`--{s.name}`', _type_name(s), _default(s), s.help]
  return '| ' + ' | '.join(_cell(c) for c in cells) + ' |'


def render() -> str:
  """The markdown reference of every flag, one table per section."""
  from efficientnet_tpu import main as main_lib  # pylint: disable=g-import-not-at-top
  order: List[str] = []
  grouped: Dict[str, list] = {}
  for s in main_lib.all_flags():
    if s.title not in grouped:
      order.append(s.title)
      grouped[s.title] = []
    grouped[s.title].append(s)
  lines = [HEADER]
  for title in order:
    lines.append(f'## {title}\n')
    lines.append('| flag | type | default | description |')
    lines.append('| --- | --- | --- | --- |')
    lines.extend(_row(s) for s in grouped[title])
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
      print(f'{args.output}: out of date with the settings of '
            'efficientnet_tpu/config.py; '
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
