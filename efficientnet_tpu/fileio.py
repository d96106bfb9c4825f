"""Atomic file writes and literal file listing, local or on any
tf.io.gfile filesystem (gs://...).

Paths are names, never patterns: a directory the user names may hold any
character its filesystem allows (spaces, quotes, `*?[]{}`), so nothing here
hands one to a glob. `list_matching` lists the directory and matches only
the file *names* against the project's own patterns (`train-*`).
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Callable, List, Union
import uuid

import tensorflow as tf


def write_atomically(path: str, content: Union[str, bytes]) -> None:
  """Writes `path` through a temporary file and a rename.

  A reader (or a run killed mid-write) sees the old file or the new one,
  never a partial one. The temporary name is unique, so hosts writing the
  same file at once do not write into each other's temporary file; the
  last rename wins. A failed write leaves no temporary file behind.
  """
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  try:
    with tf.io.gfile.GFile(tmp, 'wb' if isinstance(content, bytes) else 'w'
                           ) as f:
      f.write(content)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except BaseException:
    try:
      if tf.io.gfile.exists(tmp):
        tf.io.gfile.remove(tmp)
    except tf.errors.OpError:
      pass
    raise


def append_line(path: str, line: str) -> None:
  """Adds `line` (and a newline) at the end of `path`, creating it.

  gfile has no append mode on every filesystem (gs:// has none), so the
  file is read and rewritten atomically: a reader sees it with or without
  the line, never half of it. One process may append to a file: two
  appending at once can lose a line (the last rename wins).
  """
  old = ''
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      old = f.read()
  if old and not old.endswith('\n'):
    old += '\n'
  write_atomically(path, old + line + '\n')


def error_reason(e: BaseException) -> str:
  """The first line of an I/O error's message (TF's or the OS's), without
  TF's `{{function_node ...}}` prefix and `[Op:...]` suffix."""
  reason = (getattr(e, 'message', None) or getattr(e, 'strerror', None) or
            str(e)).strip()
  reason = reason.splitlines()[0] if reason else ''
  reason = re.sub(r'^\{\{function_node [^}]*\}\}\s*', '', reason)
  reason = re.sub(r'\s*\[Op:\w+\]$', '', reason)
  return reason or type(e).__name__


def check_path_encoding(path: str) -> None:
  """Raises ValueError if TensorFlow's file layer cannot take `path`.

  TF passes paths to its filesystems as UTF-8; a name given as bytes that
  do not decode (Python holds them as surrogate escapes) cannot be encoded
  back, and every tf.io.gfile call on it would raise UnicodeEncodeError.
  """
  try:
    path.encode('utf-8')
  except UnicodeEncodeError:
    shown = path.encode('utf-8', 'backslashreplace').decode('ascii',
                                                              'replace')
    raise ValueError(f'{shown} is not valid UTF-8, which TensorFlow\'s file '
                     'system layer requires: rename it, or link to it '
                     'under a UTF-8 name') from None


def list_entries(directory: str, keep: Callable[[str], bool]) -> List[str]:
  """Sorted paths of the entries of `directory` whose name `keep` accepts.

  `directory` is taken literally, whatever characters it holds (unlike
  tf.io.gfile.glob, which would read `[1]` or `*` in it as a pattern and
  list other directories); `keep` sees each entry's name (a directory's
  without the trailing `/` that some file systems add). A missing directory
  has no entries.

  Raises:
    tf.errors.OpError: the directory exists but cannot be listed.
  """
  if not tf.io.gfile.isdir(directory):
    return []
  names = (n.rstrip('/') for n in tf.io.gfile.listdir(directory))
  return sorted(os.path.join(directory, n) for n in names if keep(n))


def list_matching(directory: str, name_pattern: str) -> List[str]:
  """`list_entries` of the names that match `name_pattern`, the caller's own
  fixed pattern (fnmatch syntax, case-sensitive)."""
  return list_entries(directory,
                      lambda name: fnmatch.fnmatchcase(name, name_pattern))
