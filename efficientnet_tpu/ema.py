"""Exponential moving average of model weights, distribution-aware.

Averages every floating-point model variable: the trainable weights and the
batch-norm moving statistics (as TPU-EN does). The decay warms up as
`min(decay, (1 + step) / (10 + step))`, so early averages are not dominated
by the random initialization.

Updates run inside the replicated train step: each device updates its own
copy of the averages from its own (identical) weights, with no communication
and no `merge_call` (which cost 4x in trace time and 2x in step time on a
4-replica CPU run of a tiny model, with an `extended.update` per variable).
On logical CPU replicas of one host (`distribute.on_host_cpus`) the update
is one `merge_call` instead: the averages of the trainable weights, the same
on every device, are computed on the first device and copied to the others,
and the replica-local ones (BN moving statistics) per device as before; the
same bits with fewer ops to trace and run.
"""

from __future__ import annotations

import tensorflow as tf

from efficientnet_tpu import distribute


def _tf_variable(v):
  """The tf.Variable behind a Keras 3 variable (or `v` itself)."""
  return getattr(v, 'value', v) if not isinstance(v, tf.Variable) else v


class ExponentialMovingAverage(tf.Module):
  """Shadow copies of model variables, updated every train step.

  Create it inside `strategy.scope()`, so the averages are mirrored like the
  weights they follow. Track it in the checkpoint.
  """

  def __init__(self, variables, decay: float, name: str = 'ema'):
    super().__init__(name=name)
    self.decay = float(decay)
    # The averages live where the weights do: remember whose they are, since
    # swap() may be called outside the strategy's scope.
    self._strategy = tf.distribute.get_strategy()
    self._model_variables = [
        v for v in variables if tf.as_dtype(v.dtype).is_floating]
    self._swap_fn = None
    with tf.name_scope(name):
      self.averages = [
          tf.Variable(_tf_variable(v).read_value(), trainable=False,
                      aggregation=tf.VariableAggregation.NONE,
                      name=_tf_variable(v).name.split(':')[0]
                      .replace('/', '_'))
          for v in self._model_variables
      ]

  @property
  def model_variables(self):
    return self._model_variables

  def decay_at(self, step) -> tf.Tensor:
    """The warmed-up decay used at (0-based) `step`."""
    step = tf.cast(step, tf.float32)
    return tf.minimum(self.decay, (1.0 + step) / (10.0 + step))

  def update(self, step) -> None:
    """Moves the averages towards the current weights.

    Call from replica context (inside `strategy.run`) or with no strategy.
    The averages have aggregation NONE, so each replica updates its own copy
    from its own weights, with no cross-replica call: the weights are
    identical on all replicas after the all-reduced update, so the averages
    stay identical too.
    """
    strategy = tf.distribute.get_strategy()
    if (self.averages and not tf.distribute.in_cross_replica_context() and
        distribute.on_host_cpus(strategy)):
      tf.distribute.get_replica_context().merge_call(
          lambda _: self._update_copies(strategy, step))
      return
    # One (1 - decay) for all variables: two ops fewer per variable.
    rate = 1.0 - self.decay_at(step)
    for average, var in zip(self.averages, self._model_variables):
      value = tf.cast(_tf_variable(var), average.dtype)
      average.assign_sub(rate * (average - value))

  def _update_copies(self, strategy, step) -> None:
    """`update` in cross-replica context, device copy by device copy: the
    first device's average of a trainable (mirrored) weight is copied to
    the others; the others compute their own."""
    rate = 1.0 - self.decay_at(step)
    for average, var in zip(self.averages, self._model_variables):
      averages = distribute.host_cpu_copies(strategy, average)
      values = distribute.host_cpu_copies(strategy, var)
      for i, (copy, value) in enumerate(zip(averages, values)):
        if i and var.trainable:
          first = distribute.read_on_its_device(averages[0])
          with tf.device(copy.device):
            copy.assign(first)
          continue
        with tf.device(copy.device):
          value = tf.cast(tf.convert_to_tensor(value), copy.dtype)
          copy.assign_sub(rate * (copy - value))

  def shadow_of(self, variable):
    """The average that follows `variable` (a model variable), or None."""
    for average, var in zip(self.averages, self._model_variables):
      if var is variable:
        return average
    return None

  def swap(self) -> None:
    """Exchanges model weights and averages (call twice to undo).

    Call in cross-replica context (outside `strategy.run`), e.g. before and
    after evaluation; training state is restored exactly. The whole swap is
    one compiled, replicated call in which every replica exchanges its own
    copies with local assigns: an eager swap goes variable by variable and
    device by device (TPUStrategy loops over the devices of every variable
    from the host), several remote calls per variable and replica (see
    benchmarks/ema_swap.py).
    """
    if self._swap_fn is None:
      pairs = list(zip(self.averages, self._model_variables))

      def replica_swap():
        for average, var in pairs:
          tmp = tf.identity(average)
          average.assign(tf.cast(tf.convert_to_tensor(var), average.dtype))
          var.assign(tf.cast(tmp, var.dtype))

      strategy = self._strategy
      self._swap_fn = tf.function(lambda: strategy.run(replica_swap))
    self._swap_fn()
