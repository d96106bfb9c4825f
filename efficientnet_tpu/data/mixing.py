"""Mixup and CutMix of a replica's batch, on device, with stateless draws.

Mixup (Zhang et al. 2017, arXiv 1710.09412) blends each image with a
partner: lam * x_a + (1 - lam) * x_b. CutMix (Yun et al. 2019,
arXiv 1905.04899) pastes a box of the partner into each image, the box
covering about 1 - lam of the area; lam is then corrected to the box's
actual area. Both draw lam from Beta(alpha, alpha) and train on the soft
labels lam * y_a + (1 - lam) * y_b.

As in timm's `Mixup` in its default 'batch' mode
(github.com/huggingface/pytorch-image-models, timm/data/mixup.py): one lam
and one mixup-or-CutMix choice per batch, CutMix with probability
`switch_prob` when both are enabled, each image paired with the one at the
mirrored position of the flipped batch, label smoothing applied to the
one-hots before they are mixed.

`mix_batch` runs inside the replica step on that replica's local batch,
after `preprocessing.normalize`. Its draws are stateless (a [2] int seed
argument), so they are reproducible and compile under XLA (TPU): core TF
ops only, and Beta from two Gamma draws sampled here by Marsaglia-Tsang,
since TF's `stateless_gamma` has no XLA kernel. A seed draws the same
values every time in one execution mode; XLA-compiled and uncompiled steps
draw different ones (TF's XLA kernels map Philox bits to floats
differently), so a run and its resume must keep the jit_compile setting to
repeat their draws (the distribution is the same either way).
"""

from __future__ import annotations

import math

import tensorflow as tf

from efficientnet_tpu import losses

# Marsaglia-Tsang proposals drawn at once; each is accepted with probability
# > 0.95 (alpha + 1 >= 1), so all 16 fail with probability < 1e-20.
_GAMMA_CANDIDATES = 16
# Keeps mixing draws apart from other users of (seed, step).
_MIXING_SALT = 0x6d6978
# Named rather than 'auto_select', which may pick another per device.
_ALG = 'philox'


def _split(seed: tf.Tensor, num: int):
  return tf.unstack(
      tf.random.experimental.stateless_split(seed, num, alg=_ALG))


def _check(ok: bool, name: str, expected: str, value) -> None:
  if not ok:
    raise ValueError(f'{name}: expected {expected}, got {value!r}')


def replica_seed(seed: int, step, replica_id) -> tf.Tensor:
  """The stateless seed of one replica's mixing at one step.

  Derived from (seed, step, replica id) only, so a run resumed at a step
  draws what an uninterrupted one drew, and each replica mixes its batch
  differently. In the train step: `replica_seed(cfg_seed,
  optimizer.iterations, tf.distribute.get_replica_context()
  .replica_id_in_sync_group)`.

  Args:
    seed: the run's seed (a Python int).
    step: the global step (an int scalar or tensor).
    replica_id: the replica's index in the sync group (an int or tensor).

  Returns:
    A [2] int64 tensor for `mix_batch(seed=...)`.
  """
  base = tf.constant([seed, _MIXING_SALT], tf.int64)
  fold_in = tf.random.experimental.stateless_fold_in
  with_step = fold_in(base, tf.cast(step, tf.int64), alg=_ALG)
  return fold_in(with_step, tf.cast(replica_id, tf.int64), alg=_ALG)


def _log_gamma(seed: tf.Tensor, alpha: float, shape=()) -> tf.Tensor:
  """log of Gamma(alpha, 1) draws (float32, `shape`), for alpha > 0.

  Marsaglia and Tsang (2000), "A simple method for generating gamma
  variables", ACM TOMS 26(3): X ~ Gamma(alpha + 1) by rejection, then
  X * U**(1 / alpha) ~ Gamma(alpha), kept in logs so that small alphas
  (U**(1 / alpha) underflows) stay finite.
  """
  normal_seed, accept_seed, boost_seed = _split(seed, 3)
  shape = list(shape)
  d = alpha + 1.0 - 1.0 / 3.0
  c = 1.0 / math.sqrt(9.0 * d)
  x = tf.random.stateless_normal(shape + [_GAMMA_CANDIDATES], normal_seed,
                                 alg=_ALG)
  u = tf.random.stateless_uniform(shape + [_GAMMA_CANDIDATES], accept_seed,
                                  alg=_ALG)
  v = 1.0 + c * x
  positive = v > 0.0
  log_v3 = 3.0 * tf.math.log(tf.where(positive, v, 1.0))
  accept = tf.logical_and(
      positive,
      tf.math.log(u) < 0.5 * tf.square(x) + d - d * tf.exp(log_v3) +
      d * log_v3)
  # The first accepted proposal (v**3 = 1 if none was).
  first = tf.argmax(tf.cast(accept, tf.int32), axis=-1, output_type=tf.int32)
  chosen = tf.logical_and(
      accept, tf.range(_GAMMA_CANDIDATES) == first[..., None])
  log_g = math.log(d) + tf.reduce_sum(tf.where(chosen, log_v3, 0.0), -1)
  # U in (0, 1]: log U is finite.
  boost = 1.0 - tf.random.stateless_uniform(shape, boost_seed, alg=_ALG)
  return log_g + tf.math.log(boost) / alpha


def sample_beta(seed: tf.Tensor, alpha: float, shape=()) -> tf.Tensor:
  """Beta(alpha, alpha) draws as X / (X + Y) of two Gamma(alpha) draws;
  XLA-compatible.

  Args:
    seed: a [2] int32 / int64 stateless seed.
    alpha: the concentration, > 0.
    shape: the shape of the draws (default: one scalar).

  Returns:
    float32 draws in [0, 1] (float32 rounds draws within ~6e-8 of 1 to 1).
  """
  _check(alpha > 0 and math.isfinite(alpha), 'alpha', 'a finite value > 0',
         alpha)
  seed_x, seed_y = _split(seed, 2)
  # X / (X + Y) = sigmoid(log X - log Y).
  return tf.sigmoid(_log_gamma(seed_x, alpha, shape) -
                    _log_gamma(seed_y, alpha, shape))


def cutmix_box(seed: tf.Tensor, lam: tf.Tensor, height, width):
  """The CutMix box for a drawn lam, as in the paper's code.

  The box has sides int(H * sqrt(1 - lam)) and int(W * sqrt(1 - lam)), a
  uniform centre, and is clipped to the image (so it may be smaller).

  Args:
    seed: a [2] int stateless seed (the centre).
    lam: the drawn lam, float32 scalar in [0, 1].
    height, width: the image size (ints or int32 scalars).

  Returns:
    (inside, lam): a [H, W] bool mask of the box, and lam corrected to
    1 - box area / (H * W).
  """
  seed_y, seed_x = _split(seed, 2)
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  ratio = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.cast(height, tf.float32) * ratio, tf.int32)
  cut_w = tf.cast(tf.cast(width, tf.float32) * ratio, tf.int32)
  cy = tf.random.stateless_uniform([], seed_y, 0, height, tf.int32,
                                   alg=_ALG)
  cx = tf.random.stateless_uniform([], seed_x, 0, width, tf.int32,
                                   alg=_ALG)
  y0 = tf.clip_by_value(cy - cut_h // 2, 0, height)
  y1 = tf.clip_by_value(cy + cut_h // 2, 0, height)
  x0 = tf.clip_by_value(cx - cut_w // 2, 0, width)
  x1 = tf.clip_by_value(cx + cut_w // 2, 0, width)
  rows = tf.range(height)
  cols = tf.range(width)
  inside = tf.logical_and(
      tf.logical_and(rows >= y0, rows < y1)[:, None],
      tf.logical_and(cols >= x0, cols < x1)[None, :])
  area = tf.cast((y1 - y0) * (x1 - x0), tf.float32)
  return inside, 1.0 - area / tf.cast(height * width, tf.float32)


def mix_batch(images: tf.Tensor,
              labels: tf.Tensor,
              num_classes: int,
              mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0,
              switch_prob: float = 0.5,
              label_smoothing: float = 0.0,
              *,
              seed: tf.Tensor):
  """Mixup or CutMix of one replica's batch, and its soft labels.

  Image i is mixed with image B - 1 - i (the flipped batch) using one lam
  for the whole batch. With both alphas > 0, CutMix is chosen with
  probability `switch_prob`, else mixup; with one alpha > 0 only that one
  runs; with both 0 the images are returned unchanged (and the labels as
  smoothed one-hots).

  Args:
    images: [B, H, W, C] normalized images, float32 or bfloat16.
    labels: [B] int class indices.
    num_classes: K, the width of the soft labels.
    mixup_alpha: Beta(alpha, alpha) of mixup's lam; 0 disables mixup.
    cutmix_alpha: Beta(alpha, alpha) of CutMix's lam; 0 disables CutMix.
    switch_prob: probability of CutMix when both are enabled.
    label_smoothing: applied to the one-hots before mixing (as in timm).
    seed: [2] int32 / int64 stateless seed; the same seed and batch give the
      same result. Use `replica_seed(seed, step, replica_id)` so replicas
      and steps differ and a resumed run repeats its draws.

  Returns:
    (mixed_images, soft_labels): images of the input dtype (mixed in
    float32), and [B, K] float32 targets lam * y_i + (1 - lam) * y_{B-1-i}
    (for CutMix lam is 1 - the box's share of the image), each row summing
    to one; train them with `losses.soft_cross_entropy`.
  """
  _check(isinstance(num_classes, int) and num_classes >= 1, 'num_classes',
         'an integer >= 1', num_classes)
  _check(mixup_alpha >= 0 and math.isfinite(mixup_alpha), 'mixup_alpha',
         'a finite value >= 0', mixup_alpha)
  _check(cutmix_alpha >= 0 and math.isfinite(cutmix_alpha), 'cutmix_alpha',
         'a finite value >= 0', cutmix_alpha)
  _check(0 <= switch_prob <= 1, 'switch_prob', 'a value in [0, 1]',
         switch_prob)
  _check(0 <= label_smoothing < 1, 'label_smoothing', 'a value in [0, 1)',
         label_smoothing)
  images = tf.convert_to_tensor(images)
  _check(images.shape.rank in (None, 4), 'images', 'a [B, H, W, C] batch',
         images.shape)
  onehot = losses.smoothed_one_hot(labels, num_classes, label_smoothing)
  if not mixup_alpha and not cutmix_alpha:
    return images, onehot

  seed = tf.convert_to_tensor(seed)
  mixup_seed, cutmix_seed, box_seed, switch_seed = _split(seed, 4)
  shape = tf.shape(images)
  height, width = shape[1], shape[2]
  # Both candidates are drawn (a few scalars) and one is selected, so the
  # step has no data-dependent branch.
  if mixup_alpha:
    mix_lam = sample_beta(mixup_seed, mixup_alpha)
    mix_weight = tf.fill([height, width], mix_lam)
  if cutmix_alpha:
    inside, cut_lam = cutmix_box(
        box_seed, sample_beta(cutmix_seed, cutmix_alpha), height, width)
    cut_weight = tf.where(inside, 0.0, 1.0)
  if not cutmix_alpha:
    lam, weight = mix_lam, mix_weight
  elif not mixup_alpha:
    lam, weight = cut_lam, cut_weight
  else:
    use_cutmix = tf.random.stateless_uniform(
        [], switch_seed, alg=_ALG) < switch_prob
    lam = tf.where(use_cutmix, cut_lam, mix_lam)
    weight = tf.where(use_cutmix, cut_weight, mix_weight)

  # weight: the share of image i per pixel (lam everywhere for mixup; 1
  # outside and 0 inside the box for CutMix, which then copies pixels
  # exactly).
  x = tf.cast(images, tf.float32)
  weight = weight[None, :, :, None]
  mixed = weight * x + (1.0 - weight) * tf.reverse(x, axis=[0])
  soft = lam * onehot + (1.0 - lam) * tf.reverse(onehot, axis=[0])
  return tf.cast(mixed, images.dtype), soft
