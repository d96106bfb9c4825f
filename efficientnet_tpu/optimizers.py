"""Optimizers: LARS and LAMB for large batches, TF1-style RMSProp, momentum
and SGD.

Weight decay is applied exactly once:

* LARS and LAMB apply it themselves (inside the trust ratio and the update),
  so `optimizer_applies_weight_decay` is True and `l2_loss` returns 0.
* For rmsprop / momentum / sgd the training loop adds `l2_loss` to the loss
  (the TPU-EN convention `weight_decay * sum(tf.nn.l2_loss(w))`).

TPU-EN's paper code added its L2 loss term on top of LARS's own decay, so
decay was applied twice; `l2_loss` prevents that by construction.

All optimizers here are Keras 3 optimizers on the TensorFlow backend. Inside
`strategy.run` (MirroredStrategy / TPUStrategy) Keras all-reduces the
gradients with SUM and then calls `update_step(gradient, variable, lr)` once
per variable through `distribution.extended.update`; `variable` may then be
the per-device `tf.Variable`, which is why per-variable settings are looked up
with `_get_variable_index` (which maps per-device copies back to the index
given in `build`).

On logical CPU replicas of one host, LARS and LAMB compute each update once,
on the first device, and the other devices copy its result
(`first_device_copy`): the same bits with 1/R of the traced ops.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from efficientnet_tpu import distribute
from efficientnet_tpu.config import DEFAULT_WEIGHT_DECAY_EXCLUDE, OptimizerConfig

_PACKAGE = 'efficientnet_tpu'


def variable_path(variable) -> str:
  """Layer path of a variable, e.g. "block1a_bn/gamma".

  Keras 3 variables carry it in `.path` (their `.name` is only "gamma");
  plain tf.Variables fall back to `.name` without the ":0" suffix.
  """
  path = getattr(variable, 'path', None)
  if path:
    return path
  return variable.name.split(':')[0]


def _compile_patterns(patterns: Iterable[str], name: str):
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except (re.error, TypeError) as e:
      raise ValueError(f'{name}: expected valid regular expressions, got '
                       f'{pattern!r} ({e})') from None
  return compiled


def adaptation_mask(var_list, exclude_res) -> Tuple[bool, ...]:
  """Per variable of `var_list`: True unless a regex matches its path.

  LARS and LAMB adapt (trust ratio, weight decay) only these.
  """
  return tuple(not any(p.search(variable_path(v)) for p in exclude_res)
               for v in var_list)


def first_device_copy(container, component):
  """The first device's copy of `container` when `component` (another
  device's copy) may take the first's update instead of computing its own;
  None when it must compute it.

  Inside `extended.update` MirroredStrategy calls the update once per device,
  first device first. All copies of a mirrored variable hold the same bits,
  and its (all-reduced) gradient is the same on every device, so the update
  is the same on every device too. Where the devices are logical CPU devices
  of one host (`--strategy=cpu`), the others copy the first device's result
  instead of tracing and running the update again
  (`distribute.host_cpu_copies`): the same bits, 1/R of the update's ops.
  GPUs keep their own updates (a copy would cross the interconnect every
  step).

  Args:
    container: the optimizer's variable or slot (Keras or tf, mirrored).
    component: the copy `update_step` was called with.
  """
  copies = distribute.host_cpu_copies(tf.distribute.get_strategy(),
                                      container)
  if copies is None or component is copies[0]:
    return None
  return copies[0]


def _copy_from_first_device(optimizer, index, variable, slots) -> bool:
  """Sets `variable` (a device's copy of trainable variable `index`) and its
  `slots` to the first device's values when `first_device_copy` allows it;
  returns whether it did (else the caller computes the update)."""
  # pylint: disable=protected-access
  first = first_device_copy(optimizer._trainable_variables[index], variable)
  if first is None:
    return False
  strategy = tf.distribute.get_strategy()
  for slot in slots:
    slot_first = distribute.host_cpu_copies(strategy, slot)[0]
    optimizer.assign(slot, distribute.read_on_its_device(slot_first))
  optimizer.assign(variable, distribute.read_on_its_device(first))
  return True


def excluded_paths(variables, mask) -> List[str]:
  """The paths of the variables `mask` leaves out (for logging)."""
  return [variable_path(v) for v, a in zip(variables, mask) if not a]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LARS(keras.optimizers.Optimizer):
  """Layer-wise Adaptive Rate Scaling (You et al. 2017) with momentum.

  For each variable `w` with (all-reduced) gradient `g` and learning rate
  `lr`:

      trust_ratio = eeta * ||w|| / (||g|| + weight_decay * ||w|| + epsilon)
                    (1.0 where ||w|| == 0 or ||g|| == 0)
      scaled = (g + weight_decay * w) * lr * trust_ratio
      v = momentum * v + scaled
      w -= v                          (nesterov: w -= momentum * v + scaled)

  Variables whose path matches any regex in `exclude_from_adaptation` get
  neither trust ratio nor weight decay: `scaled = g * lr` (plain momentum
  SGD). Norms and the update are computed in float32 whatever the variable
  dtype (with the mixed_bfloat16 policy the variables are float32 anyway).

  This matches the LARS used by the paper's code (tensorflow/tpu
  `efficientnet/lars_optimizer.py`, classic momentum as in ApplyMomentum).
  The Keras base-class `weight_decay` (decoupled decay) is deliberately left
  None so decay is not applied a second time; `get_config` still reports it.
  """

  def __init__(self,
               learning_rate=0.1,
               momentum: float = 0.9,
               nesterov: bool = False,
               eeta: float = 0.001,
               weight_decay: float = 0.0,
               epsilon: float = 0.0,
               exclude_from_adaptation: Optional[Sequence[str]] = (
                   DEFAULT_WEIGHT_DECAY_EXCLUDE),
               name: str = 'lars',
               **kwargs):
    super().__init__(learning_rate=learning_rate, weight_decay=None,
                     name=name, **kwargs)
    # Plain argument names: this is a Keras optimizer; the config layer
    # checks the flags (OptimizerConfig) before any optimizer exists.
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f'momentum: expected a value in [0, 1), got '
                       f'{momentum!r}')
    if not eeta > 0:
      raise ValueError(f'eeta: expected a value > 0, got {eeta!r}')
    if not weight_decay >= 0:
      raise ValueError(f'weight_decay: expected a value >= 0, got '
                       f'{weight_decay!r}')
    if not epsilon >= 0:
      raise ValueError(f'epsilon: expected a value >= 0, got {epsilon!r}')
    self.momentum = float(momentum)
    self.nesterov = bool(nesterov)
    self.eeta = float(eeta)
    self.lars_weight_decay = float(weight_decay)
    self.epsilon = float(epsilon)
    self.exclude_from_adaptation = tuple(exclude_from_adaptation or ())
    self._exclude_res = _compile_patterns(self.exclude_from_adaptation,
                                          'exclude_from_adaptation')

  def build(self, var_list):
    """Creates momentum slots and records, per variable, whether to adapt."""
    if self.built:
      return
    super().build(var_list)
    self._momentums = self.add_optimizer_variables(var_list, 'momentum')
    # Indexed like var_list, which is how _get_variable_index numbers them.
    self._adapt = adaptation_mask(var_list, self._exclude_res)

  def excluded_paths(self):
    """Paths of the variables that get plain momentum SGD (for logging)."""
    return excluded_paths(self._trainable_variables, self._adapt)

  def update_step(self, gradient, variable, learning_rate):
    index = self._get_variable_index(variable)
    slots = [self._momentums[index]] if self.momentum else []
    if _copy_from_first_device(self, index, variable, slots):
      return
    if isinstance(gradient, tf.IndexedSlices):
      gradient = tf.convert_to_tensor(gradient)
    w = tf.cast(tf.convert_to_tensor(variable), tf.float32)
    g = tf.cast(gradient, tf.float32)
    lr = tf.cast(learning_rate, tf.float32)

    if self._adapt[index]:
      wd = self.lars_weight_decay
      w_norm = tf.norm(w)
      g_norm = tf.norm(g)
      denom = g_norm + wd * w_norm + self.epsilon
      safe_denom = tf.where(denom > 0.0, denom, 1.0)
      ratio = tf.where(
          tf.logical_and(w_norm > 0.0, g_norm > 0.0),
          self.eeta * w_norm / safe_denom, 1.0)
      scaled = (g + wd * w) * (lr * ratio)
    else:
      scaled = g * lr

    if self.momentum == 0.0:
      self.assign_sub(variable, scaled)
      return
    m = self._momentums[index]
    v = self.momentum * tf.cast(tf.convert_to_tensor(m), tf.float32) + scaled
    self.assign(m, v)
    if self.nesterov:
      self.assign_sub(variable, self.momentum * v + scaled)
    else:
      self.assign_sub(variable, v)

  def get_config(self):
    config = super().get_config()
    config.update({
        'momentum': self.momentum,
        'nesterov': self.nesterov,
        'eeta': self.eeta,
        'weight_decay': self.lars_weight_decay,
        'epsilon': self.epsilon,
        'exclude_from_adaptation': list(self.exclude_from_adaptation),
    })
    return config


def _bias_correction(beta: float, t: tf.Tensor) -> tf.Tensor:
  """1 - beta**t in float32, accurate where beta is close to 1.

  As -expm1(t * log(beta)): in float32, 1 - 0.999**t loses ~4 digits to
  cancellation (a 6e-5 relative error in v_hat at t = 1).
  """
  if beta == 0.0:
    return tf.ones_like(t)
  return -tf.math.expm1(t * math.log(beta))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LAMB(keras.optimizers.Optimizer):
  """Layer-wise Adaptive Moments for Batch training (You et al. 2019).

  Algorithm 2 of "Large Batch Optimization for Deep Learning: Training BERT
  in 76 minutes" (arXiv 1904.00962), with bias correction and phi(x) = x.
  For each variable `w` with (all-reduced) gradient `g`, learning rate `lr`
  and step t = 1, 2, ...:

      m = beta_1 * m + (1 - beta_1) * g
      v = beta_2 * v + (1 - beta_2) * g**2
      r = (m / (1 - beta_1**t)) / (sqrt(v / (1 - beta_2**t)) + epsilon)
      r += weight_decay * w
      trust_ratio = ||w|| / ||r||     (1.0 where ||w|| == 0 or ||r|| == 0)
      w -= lr * trust_ratio * r

  Variables whose path matches any regex in `exclude_from_adaptation` (by
  default BN gamma / beta and biases, as for LARS and in the paper's
  practice) get neither weight decay nor the trust ratio: `w -= lr * r`
  without the decay term (plain Adam). Moments, norms and the update are
  computed in float32 whatever the variable dtype.

  Why not `keras.optimizers.Lamb` (Keras 3.15): its `weight_decay` is the
  base class's decoupled decay, `w -= lr * weight_decay * w` applied by
  `Optimizer._apply_weight_decay` BEFORE `update_step` and outside the trust
  ratio, whose ||r|| then lacks the decay term; its exclusions
  (`exclude_from_weight_decay`) match `variable.name` ("gamma", not the
  layer path) and only turn the decay off, never the trust ratio. Here the
  decay is applied once, inside `r`, as in the paper; the base-class
  `weight_decay` stays None (`get_config` still reports this one).
  """

  def __init__(self,
               learning_rate=0.001,
               beta_1: float = 0.9,
               beta_2: float = 0.999,
               epsilon: float = 1e-6,
               weight_decay: float = 0.0,
               exclude_from_adaptation: Optional[Sequence[str]] = (
                   DEFAULT_WEIGHT_DECAY_EXCLUDE),
               name: str = 'lamb',
               **kwargs):
    """Takes the paper's hyperparameters.

    Args:
      learning_rate: a float or a LearningRateSchedule.
      beta_1: decay of the first moment, in [0, 1).
      beta_2: decay of the second moment, in [0, 1).
      epsilon: added to sqrt(v_hat), > 0 (the paper's BERT runs: 1e-6).
      weight_decay: decay added to the update before the trust ratio, >= 0.
      exclude_from_adaptation: regexes searched in variable paths
        (`variable_path`); matching variables get no decay and no trust
        ratio.
      name: the optimizer's name.
      **kwargs: further `keras.optimizers.Optimizer` arguments (not
        `weight_decay`, which this class applies itself).
    """
    super().__init__(learning_rate=learning_rate, weight_decay=None,
                     name=name, **kwargs)
    for value, arg in ((beta_1, 'beta_1'), (beta_2, 'beta_2')):
      if not 0.0 <= value < 1.0:
        raise ValueError(f'{arg}: expected a value in [0, 1), got {value!r}')
    if not epsilon > 0:
      raise ValueError(f'epsilon: expected a value > 0, got {epsilon!r}')
    if not weight_decay >= 0:
      raise ValueError(f'weight_decay: expected a value >= 0, got '
                       f'{weight_decay!r}')
    self.beta_1 = float(beta_1)
    self.beta_2 = float(beta_2)
    self.epsilon = float(epsilon)
    self.lamb_weight_decay = float(weight_decay)
    self.exclude_from_adaptation = tuple(exclude_from_adaptation or ())
    self._exclude_res = _compile_patterns(self.exclude_from_adaptation,
                                          'exclude_from_adaptation')

  def build(self, var_list):
    """Creates the moment slots and records, per variable, whether to adapt."""
    if self.built:
      return
    super().build(var_list)
    self._momentums, self._velocities = self.add_optimizer_variables(
        var_list, ['momentum', 'velocity'])
    self._adapt = adaptation_mask(var_list, self._exclude_res)

  def excluded_paths(self):
    """Paths of the variables that get plain Adam (for logging)."""
    return excluded_paths(self._trainable_variables, self._adapt)

  def update_step(self, gradient, variable, learning_rate):
    index = self._get_variable_index(variable)
    if _copy_from_first_device(
        self, index, variable,
        [self._momentums[index], self._velocities[index]]):
      return
    if isinstance(gradient, tf.IndexedSlices):
      gradient = tf.convert_to_tensor(gradient)
    w = tf.cast(tf.convert_to_tensor(variable), tf.float32)
    g = tf.cast(gradient, tf.float32)
    lr = tf.cast(learning_rate, tf.float32)
    # `iterations` is incremented after all updates of a step.
    t = tf.cast(self.iterations + 1, tf.float32)

    m_slot = self._momentums[index]
    v_slot = self._velocities[index]
    m = (self.beta_1 * tf.cast(tf.convert_to_tensor(m_slot), tf.float32) +
         (1.0 - self.beta_1) * g)
    v = (self.beta_2 * tf.cast(tf.convert_to_tensor(v_slot), tf.float32) +
         (1.0 - self.beta_2) * tf.square(g))
    self.assign(m_slot, m)
    self.assign(v_slot, v)
    m_hat = m / _bias_correction(self.beta_1, t)
    v_hat = v / _bias_correction(self.beta_2, t)
    r = m_hat / (tf.sqrt(v_hat) + self.epsilon)

    if self._adapt[index]:
      if self.lamb_weight_decay:
        r += self.lamb_weight_decay * w
      w_norm = tf.norm(w)
      r_norm = tf.norm(r)
      ratio = tf.where(
          tf.logical_and(w_norm > 0.0, r_norm > 0.0),
          w_norm / tf.where(r_norm > 0.0, r_norm, 1.0), 1.0)
      self.assign_sub(variable, (lr * ratio) * r)
    else:
      self.assign_sub(variable, lr * r)

  def get_config(self):
    config = super().get_config()
    config.update({
        'beta_1': self.beta_1,
        'beta_2': self.beta_2,
        'epsilon': self.epsilon,
        'weight_decay': self.lamb_weight_decay,
        'exclude_from_adaptation': list(self.exclude_from_adaptation),
    })
    return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RMSpropTF1(keras.optimizers.RMSprop):
  """Keras RMSprop with the TF1 `tf.train.RMSPropOptimizer` initial state.

  The update is the same in both (epsilon INSIDE the square root):

      ms = rho * ms + (1 - rho) * g**2
      mom = momentum * mom + lr * g / sqrt(ms + epsilon)
      w -= mom

  but TF1 (which TPU-EN's recipe was tuned with) initializes `ms` to ONES,
  while Keras initializes it to zeros; with zeros the first updates are
  ~1/sqrt(1 - rho) = 3.2x larger. (PyTorch's RMSprop differs more: epsilon
  outside the sqrt.) This subclass only changes the initial `ms`.
  """

  def build(self, var_list):
    if self.built:
      return
    keras.optimizers.Optimizer.build(self, var_list)
    self._velocities = self.add_optimizer_variables(
        var_list, 'velocity', initializer='ones')
    self._momentums = []
    if self.momentum > 0:
      self._momentums = self.add_optimizer_variables(var_list, 'momentum')
    self._average_gradients = []
    if self.centered:
      self._average_gradients = self.add_optimizer_variables(
          var_list, 'average_gradient')


def build_optimizer(opt_cfg: OptimizerConfig,
                    learning_rate) -> keras.optimizers.Optimizer:
  """The optimizer `opt_cfg.name` names.

  Args:
    opt_cfg: optimizer section of the config.
    learning_rate: a float or a LearningRateSchedule (see schedules.py).

  Returns:
    lars: `LARS` (momentum, nesterov, lars_eeta, weight_decay, lars_epsilon,
      weight_decay_exclude); lamb: `LAMB` (lamb_beta_1, lamb_beta_2,
      lamb_epsilon, weight_decay, weight_decay_exclude); rmsprop: `RMSpropTF1` (rho=rmsprop_decay,
      momentum, epsilon=rmsprop_epsilon; TPU-EN: 0.9 / 0.9 / 1e-3);
      momentum: Keras SGD with momentum (and nesterov); sgd: plain SGD.
    Build it under `strategy.scope()` and call `.build(trainable_variables)`
    there before the first `strategy.run`.
  """
  name = opt_cfg.name
  if name == 'lars':
    return LARS(learning_rate, momentum=opt_cfg.momentum,
                nesterov=opt_cfg.nesterov, eeta=opt_cfg.lars.eeta,
                weight_decay=opt_cfg.weight_decay,
                epsilon=opt_cfg.lars.epsilon,
                exclude_from_adaptation=opt_cfg.weight_decay_exclude)
  if name == 'lamb':
    lamb = opt_cfg.lamb
    return build_lamb(learning_rate, beta_1=lamb.beta_1,
                      beta_2=lamb.beta_2, epsilon=lamb.epsilon,
                      weight_decay=opt_cfg.weight_decay,
                      exclude=opt_cfg.weight_decay_exclude)
  if name == 'rmsprop':
    return RMSpropTF1(learning_rate, rho=float(opt_cfg.rmsprop.decay),
                      momentum=float(opt_cfg.momentum),
                      epsilon=float(opt_cfg.rmsprop.epsilon),
                      name='rmsprop')
  if name == 'momentum':
    return keras.optimizers.SGD(learning_rate,
                                momentum=float(opt_cfg.momentum),
                                nesterov=bool(opt_cfg.nesterov),
                                name='momentum')
  if name == 'sgd':
    return keras.optimizers.SGD(learning_rate, momentum=0.0, name='sgd')
  raise ValueError(f'optimizer: expected one of lars, lamb, rmsprop, '
                   f'momentum, sgd, got {name!r}')


def build_lamb(learning_rate,
               *,
               beta_1: float = 0.9,
               beta_2: float = 0.999,
               epsilon: float = 1e-6,
               weight_decay: float = 0.0,
               exclude: Sequence[str] = DEFAULT_WEIGHT_DECAY_EXCLUDE
              ) -> LAMB:
  """The `LAMB` optimizer of a run.

  Args:
    learning_rate: a float or a LearningRateSchedule (see schedules.py).
    beta_1: first-moment decay (the paper: 0.9).
    beta_2: second-moment decay (the paper: 0.999).
    epsilon: added to sqrt(v_hat) (the paper's BERT runs: 1e-6).
    weight_decay: decay inside the update, before the trust ratio (the
      paper's BERT runs: 0.01); `l2_loss` must then add nothing, which
      `optimizer_applies_weight_decay` ensures for optimizer 'lamb'.
    exclude: regexes on variable paths that get neither decay nor trust
      ratio (the weight_decay_exclude setting).

  Returns:
    The optimizer; build it under `strategy.scope()` and call
    `.build(trainable_variables)` there before the first `strategy.run`.
  """
  return LAMB(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
              weight_decay=weight_decay, exclude_from_adaptation=exclude)


def optimizer_applies_weight_decay(opt_cfg: OptimizerConfig) -> bool:
  """True when the optimizer itself decays weights (LARS, LAMB): no L2 loss
  term."""
  return opt_cfg.name in ('lars', 'lamb')


def l2_loss(opt_cfg: OptimizerConfig, variables) -> tf.Tensor:
  """The L2 regularization term to add to the loss, or 0.0 (float32 scalar).

  Returns `weight_decay * sum(||w||^2) / 2` over `variables` (pass the
  model's trainable variables) whose path matches none of
  `opt_cfg.weight_decay_exclude` (TPU-EN: `wd * sum(tf.nn.l2_loss(w))`),
  computed in float32; 0.0 when the optimizer applies decay itself (LARS,
  LAMB) or weight_decay is 0.

  Distributed convention: Keras all-reduces gradients with SUM over replicas,
  so in `strategy.run` each replica must minimize

      sum(per_example_loss) / global_batch_size + l2_loss(...) / num_replicas

  (num_replicas = strategy.num_replicas_in_sync). The summed gradient is then
  grad(mean cross-entropy over the global batch) + grad(l2_loss), exactly as
  one device would compute on the whole batch. Adding the full l2_loss on
  every replica would apply the decay num_replicas times.
  """
  if optimizer_applies_weight_decay(opt_cfg):
    return tf.constant(0.0, tf.float32)
  return l2_penalty(opt_cfg.weight_decay, opt_cfg.weight_decay_exclude,
                    variables)


def l2_penalty(weight_decay: float, exclude: Sequence[str],
               variables) -> tf.Tensor:
  """`weight_decay * sum(||w||^2) / 2` over `variables` whose path matches
  none of the `exclude` regexes, in float32; 0.0 if `weight_decay` is 0.

  `l2_loss` without the config: what the train step (`step.StepSpec`)
  holds of it.
  """
  zero = tf.constant(0.0, tf.float32)
  if weight_decay == 0:
    return zero
  patterns = _compile_patterns(exclude, 'weight_decay_exclude')
  terms = [
      tf.nn.l2_loss(tf.cast(tf.convert_to_tensor(v), tf.float32))
      for v in variables
      if not any(p.search(variable_path(v)) for p in patterns)
  ]
  if not terms:
    return zero
  return weight_decay * tf.add_n(terms)
