"""Fine-tuning initialization: model weights from a checkpoint or Keras file.

`load_initial_weights` assigns the weights of a built model (under its
strategy's scope or not; the variables are assigned, never rebuilt) from
one of these:

* one of our training checkpoints (`state.ModelState.checkpoint`: a
  tf.train.Checkpoint prefix, or a directory for its latest checkpoint).
  Only the model's float variables are read, matched by variable path; the
  optimizer slots, step, EMA and RNG state stay as they are. With
  `use_ema_weights` the checkpoint's EMA averages are read instead.
* a keras.applications EfficientNet weights file: `.weights.h5`
  (Keras 3 `save_weights`) or a legacy Keras 2 `.h5` (the published
  `efficientnetb0.h5` / `efficientnetb0_notop.h5`, or a legacy full-model
  `.h5`). keras.applications names every layer as this model does (stem,
  blockNx_..., top); the SE convolutions `blockNx_se_reduce` /
  `blockNx_se_expand` are our `blockNx_se/reduce` / `blockNx_se/expand`,
  and `predictions` is our `logits`. A legacy file is matched by layer and
  weight name; a Keras 3 file keys layers by class and position
  (`conv2d_3`), which are rebuilt from this model's layer order.

The source must hold every variable of the model with the same shape, and
nothing the model does not have (which would mean another model_name);
otherwise a one-line ValueError names the first variable that differs. Two
things are allowed to differ:

* the classifier head (`logits`): when the source has none (a "notop"
  file) or another class count, the head keeps its fresh initialization;
* variables matched by an `exclude` regex keep their initialization.

keras.applications puts the input normalization in the model (Rescaling
and Normalization layers, which have no counterpart here): the file's
Normalization statistics are skipped, and compared with the ImageNet mean
and standard deviation that our input pipeline uses
(`data.preprocessing.normalize`); a mismatch is logged and reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from efficientnet_tpu import run_dir
from efficientnet_tpu.data import preprocessing

HEAD_LAYER = 'logits'
# keras.applications' name for the classifier head.
KERAS_HEAD_LAYER = 'predictions'
# keras.applications' input normalization layer (mean, variance, count).
KERAS_NORMALIZATION_LAYER = 'normalization'

FORMAT_CHECKPOINT = 'checkpoint'
FORMAT_KERAS_H5 = 'keras_weights_h5'
FORMAT_LEGACY_H5 = 'keras_legacy_h5'

_HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'
# Keras 2 named a depthwise kernel `depthwise_kernel`; Keras 3 `kernel`.
_WEIGHT_ALIASES = {'depthwise_kernel': 'kernel'}


@dataclasses.dataclass(frozen=True)
class InitReport:
  """What `load_initial_weights` did.

  Attributes:
    path: the checkpoint prefix or file read.
    source_format: FORMAT_CHECKPOINT, FORMAT_KERAS_H5 or FORMAT_LEGACY_H5.
    loaded: paths of the model variables assigned from the source.
    excluded: paths of the variables that `exclude` left as initialized.
    head_reinitialized: the `logits` layer kept its fresh initialization
      because the source has no head or another class count.
    head_reason: why (None when the head was loaded or excluded).
    preprocessing: for Keras files, how the source's input normalization
      compares with ours; None for checkpoints.
    ema_reset: the EMA shadows were set to the loaded weights.
  """
  path: str
  source_format: str
  loaded: Tuple[str, ...]
  excluded: Tuple[str, ...]
  head_reinitialized: bool
  head_reason: Optional[str]
  preprocessing: Optional[str]
  ema_reset: bool


@dataclasses.dataclass
class _Entry:
  """One layer of the model and its variables, in creation order."""
  path: str          # our layer path: 'stem_bn', 'block1a_se/reduce'
  keras_name: str    # keras.applications' layer name
  keras_class: str   # keras' snake-case class name (Keras 3 file keys)
  variables: list


def _model_entries(model) -> List[_Entry]:
  """The model's float variables grouped by layer, in layer order."""
  entries: Dict[str, _Entry] = {}
  for v in model.variables:
    if not tf.as_dtype(v.dtype).is_floating:
      continue  # Seed generator state: RNG, never loaded.
    layer_path, _, _ = v.path.rpartition('/')
    if layer_path not in entries:
      keras_name = layer_path.replace('se/', 'se_')
      if keras_name == HEAD_LAYER:
        keras_name = KERAS_HEAD_LAYER
      entries[layer_path] = _Entry(layer_path, keras_name, '', [])
    entries[layer_path].variables.append(v)
  layers = {}
  for layer in model.layers:
    layers[layer.name] = layer
    for sub in ('reduce', 'expand'):
      if hasattr(layer, sub):  # SqueezeExcite
        layers[f'{layer.name}/{sub}'] = getattr(layer, sub)
  for entry in entries.values():
    entry.keras_class = _keras_class_key(layers.get(entry.path), entry)
  return list(entries.values())


def _keras_class_key(layer, entry: _Entry) -> str:
  """The snake-case class name Keras 3 files key keras.applications'
  layer by (our batch norm is their BatchNormalization)."""
  names = [v.path.rpartition('/')[2] for v in entry.variables]
  if 'moving_mean' in names:
    return 'batch_normalization'
  cls = type(layer).__name__ if layer is not None else ''
  return {'Conv2D': 'conv2d', 'DepthwiseConv2D': 'depthwise_conv2d',
          'Dense': 'dense'}.get(cls, re.sub(r'(?<!^)(?=[A-Z])', '_',
                                            cls).lower())


def _is_head(variable_path: str) -> bool:
  return variable_path.rpartition('/')[0] == HEAD_LAYER


def _mismatch(what: str, hint: str) -> ValueError:
  return ValueError(f'load_initial_weights: {what}; {hint}')


_HINT = ('check that model_name (and width/depth) match the source, or '
         'leave it as initialized with exclude')


def resolve_source(path: str) -> Tuple[str, str]:
  """(checkpoint prefix or file, format) for `path`.

  Raises:
    ValueError: `path` is no checkpoint (prefix or directory with one) and
      no HDF5 weights file.
  """
  if tf.io.gfile.isdir(path):
    latest = run_dir.latest_checkpoint(path)
    if latest is None:
      raise ValueError(f'load_initial_weights: path {path} is a directory '
                       f'without a checkpoint')
    return latest, FORMAT_CHECKPOINT
  if tf.io.gfile.exists(path + '.index'):
    return path, FORMAT_CHECKPOINT
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path, 'rb') as f:
      if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
        return path, FORMAT_KERAS_H5  # or legacy: told apart once open
  raise ValueError(
      f'load_initial_weights: path {path} is neither a checkpoint (prefix '
      f'or directory) nor a Keras .h5 / .weights.h5 weights file')


# --------------------------------------------------------------------------
# Sources: each gives {our variable path: array} for the model's entries,
# the source's own names left over, and the input normalization (Keras).


class _CheckpointSource:
  """Model (or EMA) variables of a tf.train.Checkpoint written by
  state.ModelState, by variable path (the variables' full names)."""

  def __init__(self, prefix: str, use_ema_weights: bool):
    self._reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(
        self._reader.get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
    dtypes = self._reader.get_variable_to_dtype_map()
    root = {c.local_name: c.node_id for c in graph.nodes[0].children}
    if use_ema_weights:
      if 'ema' not in root:
        raise ValueError(f'load_initial_weights: use_ema_weights, but '
                         f'checkpoint {prefix} has no EMA')
      ema = {c.local_name: c.node_id
             for c in graph.nodes[root['ema']].children}
      names = [_variable_attr(graph, c.node_id).full_name
               for c in graph.nodes[ema['_model_variables']].children]
      keys = [_variable_attr(graph, c.node_id).checkpoint_key
              for c in graph.nodes[ema['averages']].children]
      self._keys = dict(zip(names, keys))
    else:
      if 'model' not in root:
        raise ValueError(f'load_initial_weights: checkpoint {prefix} has no '
                         f'model')
      self._keys = {}
      for attr in _subtree_variables(graph, root['model']):
        self._keys.setdefault(attr.full_name, attr.checkpoint_key)
    self._keys = {name: key for name, key in self._keys.items()
                  if dtypes[key].is_floating}
    self._used = set()

  def layer(self, entry: _Entry) -> Optional[List[Optional[np.ndarray]]]:
    """The values of the entry's variables (None where missing), or None
    when the source has none of them."""
    values = []
    for v in entry.variables:
      key = self._keys.get(v.path)
      if key is not None:
        self._used.add(v.path)
      values.append(None if key is None else self._reader.get_tensor(key))
    return None if all(x is None for x in values) else values

  def skip(self, entry: _Entry) -> None:
    self._used.update(v.path for v in entry.variables)

  def leftover(self) -> List[str]:
    return sorted(set(self._keys) - self._used)

  def normalization(self):
    return None


def _variable_attr(graph, node_id):
  for attr in graph.nodes[node_id].attributes:
    if attr.name == 'VARIABLE_VALUE':
      return attr
  raise ValueError('load_initial_weights: a checkpoint list entry that is '
                   'not a variable')


def _subtree_variables(graph, node_id):
  """The variable attributes reachable from node `node_id`."""
  seen, stack = set(), [node_id]
  while stack:
    nid = stack.pop()
    if nid in seen:
      continue
    seen.add(nid)
    node = graph.nodes[nid]
    for attr in node.attributes:
      if attr.name == 'VARIABLE_VALUE':
        yield attr
    stack.extend(c.node_id for c in node.children)


class _LegacyH5Source:
  """A Keras 2 style weights group: `layer_names`, and per layer its
  `weight_names` (e.g. 'stem_bn/gamma:0'), matched by name."""

  def __init__(self, group):
    self._group = group
    self._layers = {}
    for name in group.attrs['layer_names']:
      name = name.decode() if isinstance(name, bytes) else name
      weights = [w.decode() if isinstance(w, bytes) else w
                 for w in group[name].attrs['weight_names']]
      if weights:
        self._layers[name] = weights
    self._used = set()
    # Keras names the input normalization `normalization_N` when the model
    # that saved the file was not the first with such a layer in its
    # process.
    self._normalization = next(
        (n for n in sorted(self._layers)
         if re.fullmatch(KERAS_NORMALIZATION_LAYER + r'(_\d+)?', n)), None)

  def _weights(self, name):
    """{short weight name: array} of layer `name`."""
    out = {}
    for w in self._layers[name]:
      short = w.rpartition('/')[2].split(':')[0]
      out[_WEIGHT_ALIASES.get(short, short)] = np.asarray(self._group[name][w])
    return out

  def layer(self, entry: _Entry):
    if entry.keras_name not in self._layers:
      return None
    self._used.add(entry.keras_name)
    weights = self._weights(entry.keras_name)
    return [weights.get(v.path.rpartition('/')[2]) for v in entry.variables]

  def skip(self, entry: _Entry) -> None:
    self._used.add(entry.keras_name)

  def leftover(self) -> List[str]:
    return sorted(n for n in set(self._layers) - self._used
                  if n != self._normalization)

  def normalization(self):
    if self._normalization is None:
      return None
    weights = self._weights(self._normalization)
    return weights.get('mean'), weights.get('variance')


class _KerasH5Source:
  """A Keras 3 `.weights.h5`: `layers/<class>[_<n>]/vars/<i>`, the n-th
  layer of that class in the model's layer order, its variables in
  creation order."""

  def __init__(self, group):
    self._layers = group['layers']
    self._counts: Dict[str, int] = {}
    self._keys = {}
    self._used = set()

  def assign_keys(self, entries: Sequence[_Entry]) -> None:
    """Gives each entry the key keras.applications' model of the same
    architecture has for that layer."""
    for entry in entries:
      n = self._counts.get(entry.keras_class, 0)
      self._counts[entry.keras_class] = n + 1
      self._keys[entry.path] = (entry.keras_class if n == 0 else
                                f'{entry.keras_class}_{n}')

  def _vars(self, key):
    if key not in self._layers or 'vars' not in self._layers[key]:
      return None
    group = self._layers[key]['vars']
    return [np.asarray(group[str(i)]) for i in range(len(group))]

  def layer(self, entry: _Entry):
    key = self._keys[entry.path]
    values = self._vars(key)
    if not values:
      return None
    self._used.add(key)
    values += [None] * (len(entry.variables) - len(values))
    return values

  def skip(self, entry: _Entry) -> None:
    self._used.add(self._keys[entry.path])

  def leftover(self) -> List[str]:
    return sorted(k for k in self._layers
                  if k not in self._used and self._vars(k) and
                  not k.startswith(KERAS_NORMALIZATION_LAYER))

  def normalization(self):
    values = self._vars(KERAS_NORMALIZATION_LAYER)
    return (values[0], values[1]) if values else None


@contextlib.contextmanager
def _open_h5(path: str):
  import h5py  # pylint: disable=g-import-not-at-top
  if '://' in path:
    with tf.io.gfile.GFile(path, 'rb') as f, h5py.File(f, 'r') as h5:
      yield h5
  else:
    with h5py.File(path, 'r') as h5:
      yield h5


def _keras_source(h5, path):
  """The source of an open Keras weights file, and its format."""
  if 'layer_names' in h5.attrs:
    return _LegacyH5Source(h5), FORMAT_LEGACY_H5
  if 'model_weights' in h5 and 'layer_names' in h5['model_weights'].attrs:
    return _LegacyH5Source(h5['model_weights']), FORMAT_LEGACY_H5
  if 'layers' in h5:
    return _KerasH5Source(h5), FORMAT_KERAS_H5
  raise ValueError(f'load_initial_weights: path {path} is an HDF5 file but '
                   f'not Keras weights (no layer_names, model_weights or '
                   f'layers)')


def check_input_normalization(mean, variance) -> Tuple[bool, str]:
  """Compares a keras.applications Normalization layer with our input.

  Our pipeline feeds (pixel - 255 * m) / (255 * s) for the ImageNet mean m
  and standard deviation s (`data.preprocessing.MEAN_RGB`, `STDDEV_RGB`).
  keras.applications EfficientNet computes Normalization(Rescaling(1/255)):
  (pixel / 255 - mean) / sqrt(variance), which is ours when
  variance = s^2. The published ImageNet files store variance = s instead
  and keras.applications adds Rescaling(1 / sqrt(s)) when it builds the
  model with weights='imagenet' (tensorflow/tensorflow#49930), which is
  ours too.

  Args:
    mean: the layer's mean, 3 values (None if the file has no layer).
    variance: its variance, 3 values.

  Returns:
    (matches, a one-line note).
  """
  if mean is None or variance is None:
    return True, 'no input normalization in the source'
  m = np.asarray(preprocessing.MEAN_RGB, np.float64) / 255.0
  s = np.asarray(preprocessing.STDDEV_RGB, np.float64) / 255.0
  mean = np.asarray(mean, np.float64).reshape(-1)
  variance = np.asarray(variance, np.float64).reshape(-1)
  if mean.shape == (3,) and np.allclose(mean, m, atol=1e-4):
    if np.allclose(variance, s**2, atol=1e-4):
      return True, 'ImageNet mean/std, as our pipeline'
    if np.allclose(variance, s, atol=1e-4):
      return True, ('ImageNet mean/std (variance stored as std with '
                    'keras.applications\' extra rescaling), as our pipeline')
  return False, (f'the source normalized its input with mean '
                 f'{np.round(mean, 4).tolist()} and variance '
                 f'{np.round(variance, 4).tolist()} after scaling by 1/255; '
                 f'this pipeline uses the ImageNet mean '
                 f'{np.round(m, 4).tolist()} and std '
                 f'{np.round(s, 4).tolist()}')


# --------------------------------------------------------------------------


def load_initial_weights(model, path: str, exclude: Iterable[str] = (),
                         ema=None, use_ema_weights: bool = False
                         ) -> InitReport:
  """Initializes `model`'s weights for fine-tuning from `path`.

  Call after building the model (and its EMA) and before the first step;
  not when resuming from the run's own checkpoint, which restores
  everything. Works on a model built under a strategy's scope (every
  replica's copy is assigned) and on a bfloat16 model (float32 variables).

  Args:
    model: a model from `model.build_model`.
    path: our checkpoint prefix, a directory (its latest checkpoint), or a
      keras.applications EfficientNet `.weights.h5` / legacy `.h5` file.
    exclude: regexes, searched in each variable path (e.g. 'logits',
      'block7.*', 'bn/(gamma|beta)$'): matching variables keep their
      initialization, and need not exist in the source.
    ema: an `ema.ExponentialMovingAverage` of the model, whose averages are
      then set to the initialized weights; None if there is none.
    use_ema_weights: read a checkpoint's EMA averages instead of its
      weights (checkpoints only).

  Returns:
    An InitReport.

  Raises:
    ValueError: `path` is not a checkpoint or Keras weights file, or a
      variable is missing in the source, has another shape, or the source
      has layers the model has not (another model_name): one line naming
      the first such variable or layer.
  """
  patterns = [re.compile(p) for p in exclude]
  resolved, fmt = resolve_source(path)
  entries = _model_entries(model)
  if fmt == FORMAT_CHECKPOINT:
    source = _CheckpointSource(resolved, use_ema_weights)
    return _load(entries, source, resolved, fmt, patterns, ema)
  if use_ema_weights:
    raise ValueError(f'load_initial_weights: use_ema_weights applies to '
                     f'checkpoints, and path {path} is a Keras file')
  with _open_h5(resolved) as h5:
    source, fmt = _keras_source(h5, resolved)
    if isinstance(source, _KerasH5Source):
      source.assign_keys(entries)
    return _load(entries, source, resolved, fmt, patterns, ema)


def _load(entries, source, path, fmt, patterns, ema) -> InitReport:
  """Matches `entries` against `source`, then assigns."""
  assignments = []
  excluded, head_reason = [], None
  for entry in entries:
    keep = [any(p.search(v.path) for p in patterns) for v in entry.variables]
    excluded += [v.path for v, k in zip(entry.variables, keep) if k]
    if all(keep):
      source.skip(entry)
      continue
    values = source.layer(entry)
    is_head = entry.path == HEAD_LAYER
    if values is None:
      if is_head:
        head_reason = f'{path} has no classifier head'
        continue
      raise _mismatch(f'layer {entry.path} ({entry.keras_name} in '
                      f'keras.applications) is missing in {path}', _HINT)
    if is_head and _class_count(entry, values) is not None:
      head_reason = (f'{path} has {_class_count(entry, values)} classes, '
                     f'the model {entry.variables[0].shape[-1]}')
      continue
    for v, value, k in zip(entry.variables, values, keep):
      if k:
        continue
      if value is None:
        raise _mismatch(f'variable {v.path} is missing in {path}', _HINT)
      if tuple(value.shape) != tuple(v.shape):
        raise _mismatch(
            f'variable {v.path} has shape {tuple(value.shape)} in {path}, '
            f'the model {tuple(v.shape)}', _HINT)
      assignments.append((v, value))
  leftover = source.leftover()
  if leftover:
    raise _mismatch(f'{path} has {len(leftover)} layers or variables the '
                    f'model has not, first {leftover[0]}',
                    'check that model_name (and width/depth) match the '
                    'source')
  note = None
  normalization = source.normalization()
  if fmt != FORMAT_CHECKPOINT:
    matches, note = check_input_normalization(
        *(normalization or (None, None)))
    if not matches:
      logging.warning('init_checkpoint: %s', note)

  for v, value in assignments:
    v.assign(value)
  if head_reason:
    logging.info('init_checkpoint: %s left as initialized: %s', HEAD_LAYER,
                 head_reason)
  if excluded:
    logging.info('init_checkpoint: %d variables excluded, left as '
                 'initialized (first %s)', len(excluded), excluded[0])
  if ema is not None:
    for average, var in zip(ema.averages, ema.model_variables):
      average.assign(tf.cast(tf.convert_to_tensor(var), average.dtype))
  logging.info('init_checkpoint: %d variables loaded from %s (%s)',
               len(assignments), path, fmt)
  return InitReport(
      path=path, source_format=fmt,
      loaded=tuple(v.path for v, _ in assignments),
      excluded=tuple(excluded), head_reinitialized=head_reason is not None,
      head_reason=head_reason, preprocessing=note, ema_reset=ema is not None)


def _class_count(entry: _Entry, values) -> Optional[int]:
  """The source head's class count when it differs from the model's (the
  input width must still match), else None."""
  kernel = values[0]
  model_kernel = entry.variables[0]
  if kernel is None or kernel.ndim != 2 or model_kernel.shape[-1] == (
      kernel.shape[-1]):
    return None
  if kernel.shape[0] != model_kernel.shape[0]:
    return None  # Another width: the shape check names it.
  return int(kernel.shape[-1])
