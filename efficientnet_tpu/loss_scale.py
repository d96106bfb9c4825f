"""Dynamic loss scaling for float16 mixed precision (GPUs without bfloat16).

float16 has 5 exponent bits: small gradients of float16 activations flush
to zero. The loss is multiplied by a scale S before differentiation and the
gradients divided by S after (Micikevicius et al. 2018, arXiv 1710.03740).
S adapts: a step whose gradients hold inf or NaN on any replica is skipped
(no weight or optimizer-slot change) and halves S; `growth_interval` good
steps in a row double it.

Why not `keras.optimizers.LossScaleOptimizer` (Keras 3.15):

* under MirroredStrategy it decides finiteness from the first replica's
  gradients, assuming they are already all-reduced; our optimizers
  all-reduce inside `apply_gradients`, so an overflow on another replica
  would reach the weights (and with strategies that skip merge_call each
  replica would branch on its own gradients and the all-reduce could hang);
* a skipped step does not advance `optimizer.iterations`, which indexes the
  resumable input stream, the LR schedule, Mixup seeds and checkpoint
  numbers: after a skip they would drift from the batches consumed;
* wrapping changes the optimizer's checkpoint layout (its slots move under
  `inner_optimizer`), so float32 and float16 checkpoints would not mix.

Here every replica checks its own gradients, one scalar all-reduce makes
the decision global, the cond around `apply_gradients` runs in
cross-replica context (a replica-context cond cannot contain the
optimizer's merge_call), and a skipped step still advances `iterations`.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf


class DynamicLossScale(tf.Module):
  """The loss scale and its good-step counter, as checkpointable variables.

  Create under the strategy's scope. The variables are mirrored (every
  replica holds the same value) and belong in the run's checkpoint, so a
  resumed run continues with the scale it had reached.
  """

  def __init__(self, initial_scale: float = 2.0 ** 15,
               growth_interval: int = 2000, name: str = 'loss_scale'):
    """Creates the variables.

    Args:
      initial_scale: S at the first step (Keras' default, 2^15).
      growth_interval: good steps in a row after which S doubles.
      name: module name.
    """
    super().__init__(name=name)
    if not initial_scale > 0:
      raise ValueError(f'initial_scale: expected a value > 0, got '
                       f'{initial_scale!r}')
    if growth_interval < 1:
      raise ValueError(f'growth_interval: expected an integer >= 1, got '
                       f'{growth_interval!r}')
    self.growth_interval = int(growth_interval)
    aggregation = tf.VariableAggregation.ONLY_FIRST_REPLICA
    self.scale = tf.Variable(float(initial_scale), dtype=tf.float32,
                             trainable=False, name='scale',
                             aggregation=aggregation)
    self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name='good_steps', aggregation=aggregation)

  def apply_gradients(self, optimizer, grads: Sequence[tf.Tensor],
                      variables: Sequence[tf.Variable]) -> tf.Tensor:
    """Applies unscaled `grads` if every replica's are finite; updates S.

    Call in a replica context (inside `strategy.run`) with this replica's
    gradients of `loss * scale`, divided by `scale` and not yet
    all-reduced. A skipped step still adds one to `optimizer.iterations`.

    Returns:
      bool scalar: the step was applied (the same on every replica).
    """
    ctx = tf.distribute.get_replica_context()
    local_bad = tf.logical_not(tf.reduce_all(tf.stack(
        [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])))
    bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                         tf.cast(local_bad, tf.float32))
    finite = tf.equal(bad, 0.0)
    grads_and_vars = list(zip(grads, variables))

    def cross_replica(strategy, finite, grads_and_vars):
      # Every replica computed the same `finite`: take the first.
      ok = strategy.experimental_local_results(finite)[0]

      def replica_apply(gv):
        # tf.identity places each gradient on its replica's device: with one
        # replica the captured tensors have none, and the optimizer's
        # all-reduce takes its destination from them.
        optimizer.apply_gradients([(tf.identity(g), v) for g, v in gv])

      def apply():
        strategy.extended.call_for_each_replica(replica_apply,
                                                args=(grads_and_vars,))
        return tf.constant(True)

      def skip():
        optimizer.iterations.assign_add(1)
        return tf.constant(False)

      return tf.cond(ok, apply, skip)

    ctx.merge_call(cross_replica, args=(finite, grads_and_vars))
    good = tf.where(finite, self.good_steps + 1, 0)
    grow = good >= self.growth_interval
    scale = tf.where(finite, tf.where(grow, self.scale * 2.0, self.scale),
                     self.scale * 0.5)
    self.scale.assign(scale)
    self.good_steps.assign(tf.where(grow, tf.zeros_like(good), good))
    return finite
