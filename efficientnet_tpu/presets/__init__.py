"""Training presets: absl flagfiles installed with the package.

`efficientnet-tpu-train --preset=NAME` reads `NAME.cfg` from this directory
as a flagfile placed before every other command-line flag, so flags given on
the command line override the preset wherever they stand. `--preset=list`
prints the presets, each with the first line of its header comment.
`--flagfile=FILE` still reads any file of the same format (one
`--flag=value` per line, full-line `#` comments).

A preset's values are defaults: the data set's description
(dataset_info.json) replaces its image and class counts, and `--mode=eval`
/ `export` take the run's config.json over it (`main.explicit_settings`).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from efficientnet_tpu.config import ConfigError

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
LIST = 'list'
_SUFFIX = '.cfg'


def names() -> List[str]:
  """The preset names (file names without `.cfg`), sorted."""
  return sorted(n[:-len(_SUFFIX)] for n in os.listdir(DIRECTORY)
                if n.endswith(_SUFFIX))


def path(name: str) -> str:
  """The flagfile of preset `name` (`NAME` or `NAME.cfg`).

  Raises:
    ConfigError: one line naming `--preset` and the known presets.
  """
  stem = name[:-len(_SUFFIX)] if name.endswith(_SUFFIX) else name
  known = names()
  if stem not in known:
    raise ConfigError('preset', f"expected {LIST} or one of "
                      f"{', '.join(known)}, got {name!r}")
  return os.path.join(DIRECTORY, stem + _SUFFIX)


def description(name: str) -> str:
  """The first line of the preset's header comment."""
  with open(path(name)) as f:
    first = f.readline().strip()
  return first.lstrip('#').strip() if first.startswith('#') else ''


def flag_names(name: str) -> frozenset:
  """The flags preset `name` sets (`--flag=value` lines; `--noflag` too)."""
  names = set()
  with open(path(name)) as f:
    for line in f:
      line = line.strip()
      if not line.startswith('-'):
        continue
      flag = line.lstrip('-').split('=', 1)[0]
      names.add(flag)
      if '=' not in line and flag.startswith('no'):
        names.add(flag[2:])
  return frozenset(names)


def listing() -> str:
  """One line per preset: its name and description."""
  known = names()
  width = max(len(n) for n in known)
  return '\n'.join(f'{n:<{width}}  {description(n)}' for n in known)


def requested(argv: Sequence[str]) -> Optional[str]:
  """The value of the last `--preset` in `argv` (None if absent).

  Accepts absl's spellings `--preset=NAME`, `--preset NAME` and one leading
  dash; arguments after a bare `--` are not flags.
  """
  value = None
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == '--':
      break
    for prefix in ('--preset', '-preset'):
      if arg.startswith(prefix + '='):
        value = arg[len(prefix) + 1:]
      elif arg == prefix and i + 1 < len(args):
        value = args[i + 1]
  return value


def expand_argv(argv: Sequence[str]) -> Optional[List[str]]:
  """`argv` with the requested preset's flagfile first; None for `list`.

  absl applies flags in command-line order and a flagfile where it stands,
  so `--flagfile=PRESET` right after the program name lets every explicit
  flag (and a user's own `--flagfile`) override the preset. `--preset`
  itself stays in `argv`, so `FLAGS.preset` records the name.

  Raises:
    ConfigError: the name is not a preset (one line, listing the names).
  """
  name = requested(argv)
  if name is None:
    return list(argv)
  if name == LIST:
    return None
  return [argv[0], f'--flagfile={path(name)}', *argv[1:]]
