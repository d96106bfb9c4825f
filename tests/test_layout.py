"""Tests of the package layout: intra-package imports form no cycle.

Imports inside functions count too: a lazy import that goes back up the
dependency order still couples the modules both ways, which is what the
`efficientnet_tpu.data` package was split to avoid.
"""

import ast
import pathlib
from typing import Dict, List, Optional, Set

PACKAGE = 'efficientnet_tpu'
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE


def _modules(root: pathlib.Path) -> Dict[str, pathlib.Path]:
  """{dotted module name: file} of the package at `root`."""
  modules = {}
  for path in sorted(root.rglob('*.py')):
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts.pop()
    modules['.'.join(parts)] = path
  return modules


def _resolve(name: str, modules: Dict[str, pathlib.Path]) -> Optional[str]:
  """The longest known module that `name` (module or attribute) lies in."""
  while name and name not in modules:
    name = name.rpartition('.')[0]
  return name or None


def import_graph(root: pathlib.Path = ROOT) -> Dict[str, Set[str]]:
  """{module: modules of the same package it imports}, at any nesting level
  (inside functions too)."""
  modules = _modules(root)
  package = root.name
  graph = {}
  for module, path in modules.items():
    is_package = path.name == '__init__.py'
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      names: List[str] = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          # Relative: strip `level` components (one fewer in a package).
          anchor = module.split('.')
          anchor = anchor[:len(anchor) - node.level + is_package]
          base = '.'.join(anchor + ([base] if base else []))
        # `from pkg import name`: name may be a submodule or an attribute.
        names = [f'{base}.{a.name}' for a in node.names] + [base]
      for name in names:
        if name == package or name.startswith(package + '.'):
          target = _resolve(name, modules)
          # Importing a module runs its packages' __init__ first.
          while target:
            if target != module:
              edges.add(target)
            target = target.rpartition('.')[0]
    graph[module] = edges
  return graph


def find_cycle(graph: Dict[str, Set[str]],
               within: str = '') -> Optional[List[str]]:
  """One import cycle among `within` and its submodules (all modules if
  empty), or None."""
  nodes = {m for m in graph
           if not within or m == within or m.startswith(within + '.')}
  state: Dict[str, int] = {}  # 1: on the current path, 2: done.
  path: List[str] = []

  def visit(module):
    state[module] = 1
    path.append(module)
    for target in sorted(graph[module] & nodes):
      if state.get(target) == 1:
        return path[path.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    path.pop()
    state[module] = 2
    return None

  for module in sorted(nodes):
    if module not in state:
      cycle = visit(module)
      if cycle:
        return cycle
  return None


def test_a_lazy_import_up_the_order_is_a_cycle(tmp_path):
  """The check itself, on a package written here: `low` imports `high`
  only inside a function, as data.py once imported input_pipeline."""
  pkg = tmp_path / 'pkg'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'sub' / '__init__.py').write_text('')
  (pkg / 'sub' / 'low.py').write_text(
      'import os\n\ndef f():\n  from pkg.sub import high\n  return high\n')
  (pkg / 'sub' / 'high.py').write_text('from . import low\nX = 1\n')
  (pkg / 'top.py').write_text('from pkg.sub.high import X\n')
  graph = import_graph(pkg)
  assert graph['pkg.sub.low'] == {'pkg', 'pkg.sub', 'pkg.sub.high'}
  assert graph['pkg.sub.high'] == {'pkg', 'pkg.sub', 'pkg.sub.low'}
  assert graph['pkg.top'] == {'pkg', 'pkg.sub', 'pkg.sub.high'}
  assert find_cycle(graph) == ['pkg.sub.high', 'pkg.sub.low', 'pkg.sub.high']
  assert find_cycle(graph, within='pkg.top') is None
  (pkg / 'sub' / 'low.py').write_text('import os\n')
  assert find_cycle(import_graph(pkg)) is None


def test_data_package_has_no_import_cycle():
  cycle = find_cycle(import_graph(), within=f'{PACKAGE}.data')
  assert cycle is None, ' -> '.join(cycle)


def test_package_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, ' -> '.join(cycle)


def test_layers_take_arguments_not_the_config():
  """The layers module knows nothing of the config: `model.build_model` is
  the one adapter from a ModelConfig to layer arguments."""
  source = (ROOT / 'layers.py').read_text()
  imported = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom):
      imported.add(node.module or '')
      imported.update(f'{node.module}.{a.name}' for a in node.names)
    elif isinstance(node, ast.Import):
      imported.update(a.name for a in node.names)
  assert not {m for m in imported if 'config' in m.split('.')}, imported


def test_the_step_knows_neither_loop_nor_the_config():
  """step.py sits below the trainer and the evaluator (they import it, not
  the reverse), and its functions take a StepSpec: `StepSpec.from_config`
  is the one adapter from the config."""
  import inspect  # pylint: disable=g-import-not-at-top
  from efficientnet_tpu import step  # pylint: disable=g-import-not-at-top
  graph = import_graph()
  above = {f'{PACKAGE}.{m}' for m in ('train', 'evaluation', 'experiment',
                                      'main')}
  assert not graph[f'{PACKAGE}.step'] & above, graph[f'{PACKAGE}.step']
  assert f'{PACKAGE}.step' in graph[f'{PACKAGE}.train']
  assert f'{PACKAGE}.step' in graph[f'{PACKAGE}.evaluation']
  takes_config = [
      name for name, fn in inspect.getmembers(step, inspect.isfunction)
      if fn.__module__ == step.__name__ and any(
          'ExperimentConfig' in str(p.annotation)
          for p in inspect.signature(fn).parameters.values())]
  assert not takes_config, takes_config
  params = inspect.signature(step.StepSpec.from_config).parameters
  assert 'ExperimentConfig' in str(params['cfg'].annotation)
