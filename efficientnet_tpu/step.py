"""One replica's train and eval steps, as functions of a frozen `StepSpec`.

`StepSpec.from_config` is the one adapter from the config: it is made once
per run, and the step functions take it with the state and the batch, never
the `ExperimentConfig`. `train.Trainer` and `evaluation.Evaluator` keep the
host loop and the I/O around them (`replicated.stoppable_loop` /
`replicated.replicated_loop` run these per replica); the tests and the
benchmarks call the same functions.

* `normalize`: uint8 images from the host -> the model's compute dtype.
* `forward_backward`: the loss (divided by the *global* batch: gradients
  are summed across replicas; plus the L2 term / replicas), float32 logits
  and gradients; `compile_forward_backward` wraps it in XLA when on, or,
  on logical CPU replicas, traces it once for all of them
  (`TracedOnceForwardBackward`).
* `train_step`: forward and backward, the optimizer update (through the
  loss scale with float16), the EMA update and the metric sums
  (`TRAIN_SUMS`).
* `eval_step`: masked loss, top-1, top-5 and count sums (`EVAL_SUMS`).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Mapping, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from efficientnet_tpu import collectives
from efficientnet_tpu import distribute
from efficientnet_tpu import layers
from efficientnet_tpu import losses
from efficientnet_tpu import optimizers
from efficientnet_tpu.config import ExperimentConfig
from efficientnet_tpu.data import mixing
from efficientnet_tpu.data import preprocessing
from efficientnet_tpu.state import ModelState

# The per-replica sums each step adds to (`replicated.Accumulators` names).
TRAIN_SUMS = ('loss', 'cross_entropy', 'correct', 'examples')
EVAL_SUMS = ('loss', 'top_1', 'top_5', 'count')

Sums = Mapping[str, tf.Variable]


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the replica steps need of a run, resolved once.

  Attributes:
    global_batch: training images per step over all replicas (the loss's
      divisor).
    num_replicas: replicas in sync (the L2 term's divisor).
    num_classes: label classes (logits per image).
    label_smoothing: of the training targets.
    mixup_alpha: Mixup's Beta parameter (0: off).
    cutmix_alpha: CutMix's Beta parameter (0: off).
    mixup_switch_prob: with both on, the chance of CutMix per step.
    data_seed: the run's seed; the mixing draws derive from it.
    input_dtype: the model's compute dtype, which `normalize` feeds.
    on_tpu: normalize with the plain broadcast (`preprocessing.normalize`).
    weight_decay: of the L2 term added to the loss; 0.0 when the optimizer
      decays the weights itself (LARS, LAMB).
    weight_decay_exclude: regexes on variable paths the L2 term leaves out.
    jit_compile: XLA for the forward and backward pass and eval's logits
      (`distribute.resolve_jit_compile`; TPUStrategy compiles everything).
    trace_once_devices: the replicas' devices where the forward and backward
      pass is traced once for all of them (`TracedOnceForwardBackward`:
      MirroredStrategy over several CPU devices); () traces it per replica.
  """
  global_batch: int
  num_replicas: int
  num_classes: int
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mixup_switch_prob: float = 0.5
  data_seed: int = 0
  input_dtype: tf.DType = tf.float32
  on_tpu: bool = False
  weight_decay: float = 0.0
  weight_decay_exclude: Tuple[str, ...] = ()
  jit_compile: bool = False
  trace_once_devices: Tuple[str, ...] = ()

  @property
  def mixes(self) -> bool:
    """Mixup or CutMix is on (soft targets)."""
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  @classmethod
  def from_config(cls, cfg: ExperimentConfig,
                  strategy: tf.distribute.Strategy) -> StepSpec:
    """The spec of `cfg` on `strategy`'s replicas.

    Raises:
      ConfigError: `jit_compile` cannot be honoured on `strategy`.
    """
    opt = cfg.optimizer
    decays_itself = optimizers.optimizer_applies_weight_decay(opt)
    jit_compile = distribute.resolve_jit_compile(strategy,
                                                 cfg.train.jit_compile)
    return cls(
        global_batch=cfg.train.train_batch_size,
        num_replicas=strategy.num_replicas_in_sync,
        num_classes=cfg.model.num_label_classes,
        label_smoothing=opt.label_smoothing,
        mixup_alpha=opt.mixup_alpha, cutmix_alpha=opt.cutmix_alpha,
        mixup_switch_prob=opt.mixup_switch_prob, data_seed=cfg.data.seed,
        input_dtype=compute_dtype(cfg.model.use_bfloat16,
                                  cfg.model.use_float16),
        on_tpu=distribute.is_tpu(strategy),
        weight_decay=0.0 if decays_itself else opt.weight_decay,
        weight_decay_exclude=tuple(opt.weight_decay_exclude),
        jit_compile=jit_compile,
        trace_once_devices=(() if jit_compile else
                            distribute.trace_once_devices(strategy)))


def compute_dtype(use_bfloat16: bool = False,
                  use_float16: bool = False) -> tf.DType:
  """The compute dtype of the model's layers (`layers.dtype_policy`): the
  dtype its input is normalized to, in training and eval alike."""
  policy = keras.DTypePolicy(layers.dtype_policy(use_bfloat16, use_float16))
  return tf.as_dtype(policy.compute_dtype)


def normalize(spec: StepSpec, images: tf.Tensor) -> tf.Tensor:
  """uint8 images from the host -> normalized `spec.input_dtype`, on device.

  The host pipeline ships uint8 (4x fewer bytes than float32 over the
  host-to-device link, and no per-image float work on the host CPU).
  """
  return preprocessing.normalize(images, spec.input_dtype, spec.on_tpu)


def _loss_and_logits(spec: StepSpec, model: keras.Model, images: tf.Tensor,
                     labels: tf.Tensor, seed: tf.Tensor,
                     variables: Sequence[tf.Variable]):
  """This replica's share of the loss, and the model's logits (the part of
  `forward_backward` under the gradient tape)."""
  x = normalize(spec, images)
  if spec.mixes:
    x, targets = mixing.mix_batch(
        x, labels, spec.num_classes, spec.mixup_alpha, spec.cutmix_alpha,
        spec.mixup_switch_prob, spec.label_smoothing, seed=seed)
  logits = model(x, training=True)
  if spec.mixes:
    per_example = losses.soft_cross_entropy(targets, logits)
  else:
    per_example = losses.smoothed_cross_entropy(
        labels, logits, spec.num_classes, spec.label_smoothing)
  loss = tf.reduce_sum(per_example) / spec.global_batch
  # Gradients are summed over replicas: each adds 1/R of the L2 term.
  loss += optimizers.l2_penalty(spec.weight_decay, spec.weight_decay_exclude,
                                variables) / spec.num_replicas
  return loss, logits


def _scaled(loss: tf.Tensor, scale: Optional[tf.Tensor]) -> tf.Tensor:
  return loss if scale is None else loss * scale


def _unscaled_gradients(tape: tf.GradientTape, scaled: tf.Tensor, variables,
                        scale: Optional[tf.Tensor]):
  """The gradients of `scaled` (taken under `tape`), divided by `scale`."""
  # The optimizer all-reduces these; TF's differentiable all_reduce then
  # walks the whole multi-replica graph at trace time, once per call. The
  # gradients need no gradient of their own: stopping it cuts the trace of
  # a tiny model on 8 CPU replicas from ~2 minutes to under one.
  grads = [tf.stop_gradient(g) for g in tape.gradient(scaled, variables)]
  if scale is not None:
    grads = [g / scale for g in grads]
  return grads


def forward_backward(spec: StepSpec, model: keras.Model, images: tf.Tensor,
                     labels: tf.Tensor, seed: tf.Tensor,
                     scale: Optional[tf.Tensor] = None):
  """One replica's loss, float32 logits and gradients.

  Args:
    spec: the run's step settings.
    model: the model; gradients are of its trainable variables.
    images: uint8 [B, S, S, 3], this replica's batch.
    labels: int32 [B].
    seed: [2] int64, per replica and step: draws Mixup / CutMix.
    scale: float16 only: the loss scale; the gradients returned are
      unscaled.

  Returns:
    (loss, logits, grads): the loss is this replica's share of the global
    one (cross entropy summed over the batch / `global_batch`, plus the L2
    term / `num_replicas`).
  """
  variables = model.trainable_variables
  with tf.GradientTape() as tape:
    loss, logits = _loss_and_logits(spec, model, images, labels, seed,
                                    variables)
    scaled = _scaled(loss, scale)
  grads = _unscaled_gradients(tape, scaled, variables, scale)
  return loss, tf.cast(logits, tf.float32), grads


class TracedOnceForwardBackward:
  """`forward_backward` traced once and run on every replica's device.

  MirroredStrategy traces the replica step once per replica (one thread
  each, a copy of the model's forward and backward pass per device). Here
  the pass is a function of the variables' values, traced once (in
  Keras' `StatelessScope`, as `Layer.stateless_call` does) and called by
  every replica with its own copies: the batch-norm group sums inside it are
  TF's collective ops (`collectives.traced_replica`), which find their group
  at run time from the replica id passed in. The replicas' calls are the
  only per-replica part of the trace. The moving statistics and random
  states it updates are assigned to the replica's copies after the call.

  Called in replica context (`strategy.run`), like `forward_backward`.
  """

  def __init__(self, spec: StepSpec, model: keras.Model):
    self._spec = spec
    self._model = model
    self._devices = tuple(spec.trace_once_devices)
    self._lock = threading.Lock()
    # {argument specs: (concrete function, indices of the non-trainable
    # variables it updates)}
    self._traced = {}

  def _body(self, trainable, non_trainable, images, labels, seed, scale,
            replica_handle):
    model = self._model
    mapping = (list(zip(model.trainable_variables, trainable)) +
               list(zip(model.non_trainable_variables, non_trainable)))
    replica = collectives.TracedReplica(replica_handle, self._devices)
    with collectives.traced_replica(replica):
      with tf.GradientTape() as tape:
        tape.watch(trainable)
        with keras.StatelessScope(state_mapping=mapping) as scope:
          before = [scope.get_current_value(v)
                    for v in model.non_trainable_variables]
          loss, logits = _loss_and_logits(self._spec, model, images, labels,
                                          seed, model.trainable_variables)
          after = [scope.get_current_value(v)
                   for v in model.non_trainable_variables]
        scaled = _scaled(loss, scale)
      grads = _unscaled_gradients(tape, scaled, trainable, scale)
    updated = [i for i, (b, a) in enumerate(zip(before, after)) if a is not b]
    return ((loss, tf.cast(logits, tf.float32), grads,
             [after[i] for i in updated]), updated)

  def _concrete(self, args, replica: int):
    """The function for `args`' shapes and dtypes, traced at its first
    call (by the first replica), and the indices of the non-trainable
    variables it updates.

    Raises:
      ValueError: replica `replica` (not the first) finds no trace for its
        arguments: its batch's shape differs from the first replica's, and
        a trace of its own would wait forever in collectives no other
        replica joins.
    """
    # Shapes and dtypes only: every replica must get the one trace (its
    # collectives' instance keys are the others'), and a spec made with
    # `from_tensor` would carry the replica's tensor name.
    specs = tf.nest.map_structure(
        lambda t: None if t is None else tf.TensorSpec(t.shape, t.dtype), args)
    key = tuple(tf.nest.flatten(specs))
    with self._lock:
      if key not in self._traced:
        if replica != 0:
          raise ValueError(
              f'TracedOnceForwardBackward: replica {replica} was given '
              f'arguments of other shapes or dtypes than the first replica '
              f'(its images: {specs[2]}); every replica needs the same '
              'per-replica batch shape')
        updated = []

        def fn(*fn_args):
          outputs, indices = self._body(*fn_args)
          updated.extend(indices)
          return outputs

        concrete = collectives.trace_for_every_replica(fn, *specs)
        self._traced[key] = (concrete, tuple(updated))
      return self._traced[key]

  def __call__(self, images, labels, seed, scale=None):
    model = self._model
    replica_id, _ = collectives.replica_index()
    index = tf.get_static_value(replica_id)
    if index is None:
      raise ValueError('TracedOnceForwardBackward: the replica id must be '
                       'known when tracing (MirroredStrategy)')
    trainable = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    non_trainable = [tf.convert_to_tensor(v)
                     for v in model.non_trainable_variables]
    args = (trainable, non_trainable, images, labels, seed, scale,
            collectives.replica_handle(self._devices[int(index)], index))
    concrete, updated = self._concrete(args, int(index))
    loss, logits, grads, new_values = concrete(*args)
    variables = model.non_trainable_variables
    for i, value in zip(updated, new_values):
      variables[i].assign(value)
    return loss, logits, grads


def _compiled(spec: StepSpec, fn: Callable) -> Callable:
  # Not autograph-converted (no tensor-dependent Python control flow):
  # TF 2.18's conversion cache could hand a later trainer's jitted function
  # the conversion of another one ("tf__normalize() takes from 1 to 2
  # positional arguments but 5 were given").
  fn = tf.autograph.experimental.do_not_convert(fn)
  return tf.function(fn, jit_compile=True) if spec.jit_compile else fn


def compile_forward_backward(spec: StepSpec, model: keras.Model) -> Callable:
  """`forward_backward` of `model`, `(images, labels, seed, scale=None) ->
  (loss, logits, grads)`, XLA-compiled when `spec.jit_compile`, traced
  once for all replicas when `spec.trace_once_devices`
  (`TracedOnceForwardBackward`), else traced by each replica.

  Make it once per model and hand it to `train_step`.
  """

  if spec.trace_once_devices:
    return TracedOnceForwardBackward(spec, model)

  def fn(images, labels, seed, scale=None):
    return forward_backward(spec, model, images, labels, seed, scale)

  return _compiled(spec, fn)


def train_step(spec: StepSpec, state: ModelState, sums: Sums,
               batch: Mapping[str, tf.Tensor],
               forward_backward_fn: Optional[Callable] = None) -> None:
  """One replica's training step (inside `strategy.run`).

  Takes the forward and backward pass, applies the gradients (through the
  loss scale with float16: a non-finite step is skipped and counted),
  updates the EMA and adds to `sums` (`TRAIN_SUMS`).

  Not to be compiled whole: the optimizer's `iterations` update needs
  merge_call (see `distribute.resolve_jit_compile`); `forward_backward_fn`
  (`compile_forward_backward`; made here if not given) is.

  Args:
    spec: the run's step settings.
    state: model, optimizer, EMA and loss scale.
    sums: per-replica sum variables named `TRAIN_SUMS`.
    batch: {'images': uint8, 'labels': int32}.
    forward_backward_fn: `compile_forward_backward(spec, state.model)`.
  """
  if forward_backward_fn is None:
    forward_backward_fn = compile_forward_backward(spec, state.model)
  model, optimizer = state.model, state.optimizer
  labels = batch['labels']
  # Outside any compiled function: the optimizer's ONLY_FIRST_REPLICA
  # `iterations` update needs merge_call (see resolve_jit_compile).
  step = optimizer.iterations
  # Stateless draws per (seed, step, replica): a resumed run mixes as an
  # uninterrupted one would.
  seed = mixing.replica_seed(
      spec.data_seed, step,
      tf.distribute.get_replica_context().replica_id_in_sync_group)
  loss_scale = state.loss_scale
  scale = None if loss_scale is None else tf.identity(loss_scale.scale)
  loss, logits, grads = forward_backward_fn(batch['images'], labels, seed,
                                            scale)
  if loss_scale is None:
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
  else:  # Skips (and counts) a step with non-finite gradients.
    loss_scale.apply_gradients(optimizer, grads, model.trainable_variables)
  if state.ema is not None:
    state.ema.update(step)
  correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                             labels), tf.float32)
  # The plain cross entropy against the hard labels, from this step's
  # logits: comparable with eval's, unlike the loss (smoothing, L2).
  cross_entropy = losses.smoothed_cross_entropy(labels, logits,
                                                spec.num_classes, 0.0)
  sums['loss'].assign_add(loss)
  sums['cross_entropy'].assign_add(tf.reduce_sum(cross_entropy))
  sums['correct'].assign_add(tf.reduce_sum(correct))
  sums['examples'].assign_add(tf.cast(tf.size(labels), tf.float32))


def logits(spec: StepSpec, model: keras.Model,
           images: tf.Tensor) -> tf.Tensor:
  """Inference logits (float32) of uint8 `images`."""
  return tf.cast(model(normalize(spec, images), training=False), tf.float32)


def compile_logits(spec: StepSpec, model: keras.Model) -> Callable:
  """`logits` of `model`, `images -> logits`, XLA-compiled when
  `spec.jit_compile`; make it once and hand it to `eval_step`."""

  def fn(images):
    return logits(spec, model, images)

  return _compiled(spec, fn)


def eval_step(spec: StepSpec, model: keras.Model, sums: Sums,
              batch: Mapping[str, tf.Tensor],
              logits_fn: Optional[Callable] = None) -> None:
  """One replica's eval step: adds the `mask`-weighted loss, top-1 and
  top-5 hits, and the count of real images, to `sums` (`EVAL_SUMS`).

  Args:
    spec: the run's step settings.
    model: the model (the EMA weights swapped in by the caller).
    sums: per-replica sum variables named `EVAL_SUMS`.
    batch: {'images': uint8, 'labels': int32, 'mask': float32}; mask 0
      marks padding.
    logits_fn: `compile_logits(spec, model)` (made here if not given).
  """
  if logits_fn is None:
    logits_fn = compile_logits(spec, model)
  out = logits_fn(batch['images'])
  labels, mask = batch['labels'], batch['mask']
  loss = losses.smoothed_cross_entropy(labels, out, spec.num_classes, 0.0)
  top_1 = tf.cast(tf.math.in_top_k(labels, out, 1), tf.float32)
  top_5 = tf.cast(tf.math.in_top_k(labels, out, min(5, spec.num_classes)),
                  tf.float32)
  sums['loss'].assign_add(tf.reduce_sum(loss * mask))
  sums['top_1'].assign_add(tf.reduce_sum(top_1 * mask))
  sums['top_5'].assign_add(tf.reduce_sum(top_5 * mask))
  sums['count'].assign_add(tf.reduce_sum(mask))
