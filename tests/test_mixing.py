"""Tests of data.mixing (mixup, CutMix) and losses.soft_cross_entropy,
against numpy formulas and numpy's Beta sampler."""

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_tpu import losses
from efficientnet_tpu.data import mixing
from tests.helpers import cpu_replicas, local_values

B, H, W, C, K = 6, 16, 40, 3, 10


def _batch(seed=0, batch=B, dtype=np.float32):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, H, W, C)).astype(dtype)
  # Distinct labels: partners never share a class, so lam is readable.
  labels = rng.permutation(K)[:batch].astype(np.int32)
  return images, labels


def _mix(images, labels, seed, **kw):
  kw.setdefault('mixup_alpha', 0.0)
  kw.setdefault('cutmix_alpha', 0.0)
  out, soft = mixing.mix_batch(tf.constant(images), tf.constant(labels), K,
                               seed=tf.constant(seed, tf.int64), **kw)
  return out.numpy(), soft.numpy()


def _np_smoothed(labels, smoothing):
  y = np.full((len(labels), K), smoothing / K)
  y[np.arange(len(labels)), labels] += 1.0 - smoothing
  return y


def _lam_from_labels(soft, labels):
  """lam per row: the weight on the row's own (smoothing-free) class."""
  lam = soft[np.arange(len(labels)), labels]
  np.testing.assert_allclose(soft[np.arange(len(labels)), labels[::-1]],
                             1.0 - lam, atol=1e-6)
  return lam


def _cutmix_share(out, images):
  """Per image: mask of pixels taken from the partner, and its share."""
  partner = images[::-1]
  own = np.all(out == images, axis=-1)
  taken = np.all(out == partner, axis=-1)
  assert np.all(own | taken)   # Every pixel is copied, none blended.
  return taken, taken.mean(axis=(1, 2))


# ---- Beta sampler ------------------------------------------------------------
@pytest.mark.parametrize('alpha', [0.2, 1.0])
def test_sample_beta_matches_numpy_beta(alpha):
  n = 100_000
  got = mixing.sample_beta(tf.constant([3, 4]), alpha, [n]).numpy()
  assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
  ref = np.random.default_rng(0).beta(alpha, alpha, n)
  # Two-sample Kolmogorov-Smirnov distance on (0, 1) inside float32's
  # resolution at 1 (float32 rounds draws within 6e-8 of 1 to 1).
  grid = np.concatenate([np.geomspace(1e-6, 0.5, 200),
                         1 - np.geomspace(1e-6, 0.5, 200)])
  cdf_got = np.searchsorted(np.sort(got), grid, 'right') / n
  cdf_ref = np.searchsorted(np.sort(ref), grid, 'right') / n
  assert np.abs(cdf_got - cdf_ref).max() < 1.95 * np.sqrt(2 / n)  # p=0.001
  var = 1 / (4 * (2 * alpha + 1))
  assert abs(got.mean() - 0.5) < 4 * np.sqrt(var / n)
  assert abs(got.var() - var) < 0.02 * var


# ---- mixup -------------------------------------------------------------------
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_mixup_blends_each_image_with_its_flipped_partner(smoothing):
  images, labels = _batch()
  lams = []
  for seed in range(4):
    out, soft = _mix(images, labels, [seed, 1], mixup_alpha=0.4,
                     label_smoothing=smoothing)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    own = soft[np.arange(B), labels] - smoothing / K
    lam = own / (1.0 - smoothing)
    np.testing.assert_allclose(lam, lam[0], atol=1e-6)   # one lam per batch
    lam = float(lam[0])
    want_y = (lam * _np_smoothed(labels, smoothing) +
              (1 - lam) * _np_smoothed(labels[::-1], smoothing))
    np.testing.assert_allclose(soft, want_y, atol=1e-6)
    want_x = lam * images + (1 - lam) * images[::-1]
    np.testing.assert_allclose(out, want_x, rtol=1e-5, atol=1e-5)
    lams.append(lam)
  assert len(set(np.round(lams, 6))) == 4   # seeds draw different lams
  assert 0 < min(lams) and max(lams) < 1


# ---- CutMix ------------------------------------------------------------------
def test_cutmix_label_weight_equals_the_pixel_share_taken():
  images, labels = _batch(1)
  shares = []
  for seed in range(12):
    out, soft = _mix(images, labels, [seed, 2], cutmix_alpha=1.0)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    lam = _lam_from_labels(soft, labels)
    taken, share = _cutmix_share(out, images)
    np.testing.assert_allclose(1.0 - lam, share, atol=1e-6)
    # One box, the same for the whole batch, and a filled rectangle.
    assert np.all(taken == taken[0])
    rows = np.flatnonzero(taken[0].any(1))
    cols = np.flatnonzero(taken[0].any(0))
    if rows.size:
      assert taken[0].sum() == rows.size * cols.size
      assert rows.size == rows[-1] - rows[0] + 1
      assert cols.size == cols[-1] - cols[0] + 1
      # Unclipped boxes keep the image's aspect: sides 2 * (int(S * r) // 2)
      # for S = H, W and one r = sqrt(1 - lam_drawn).
      if rows[0] > 0 and cols[0] > 0 and rows[-1] < H - 1 and (
          cols[-1] < W - 1):
        assert abs(rows.size / H - cols.size / W) <= 2 / H + 1e-9
    shares.append(share[0])
  assert 0 < max(shares) < 1 and len(set(shares)) > 3


def test_both_alphas_zero_is_identity():
  images, labels = _batch(2)
  for smoothing in (0.0, 0.1):
    out, soft = _mix(images, labels, [5, 5], label_smoothing=smoothing)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(soft, _np_smoothed(labels, smoothing),
                               atol=1e-7)


def _is_cutmix(out, images):
  partner = images[::-1]
  return bool(np.all((out == images) | (out == partner)))


def test_switch_prob_picks_mixup_or_cutmix():
  images, labels = _batch(3)
  kinds = {0.0: set(), 1.0: set(), 0.5: set()}
  for switch_prob in kinds:
    for seed in range(16):
      out, soft = _mix(images, labels, [seed, 3], mixup_alpha=1.0,
                       cutmix_alpha=1.0, switch_prob=switch_prob)
      lam = float(_lam_from_labels(soft, labels)[0])
      if _is_cutmix(out, images):
        kinds[switch_prob].add('cutmix')
        np.testing.assert_allclose(1.0 - lam, _cutmix_share(out, images)[1],
                                   atol=1e-6)
      else:
        kinds[switch_prob].add('mixup')
        np.testing.assert_allclose(out, lam * images + (1 - lam) *
                                   images[::-1], rtol=1e-5, atol=1e-5)
  assert kinds == {0.0: {'mixup'}, 1.0: {'cutmix'}, 0.5: {'mixup', 'cutmix'}}


def test_same_seed_same_result_other_seed_other_result():
  images, labels = _batch(4)
  kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0)
  a = _mix(images, labels, [7, 8], **kw)
  b = _mix(images, labels, [7, 8], **kw)
  c = _mix(images, labels, [7, 9], **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[1], c[1])


def test_bfloat16_images():
  images, labels = _batch(5)
  images16 = tf.cast(images, tf.bfloat16).numpy()
  x = images16.astype(np.float32)
  out, soft = _mix(images16, labels, [1, 1], mixup_alpha=1.0)
  assert out.dtype == images16.dtype
  lam = float(_lam_from_labels(soft, labels)[0])
  np.testing.assert_allclose(out.astype(np.float32),
                             lam * x + (1 - lam) * x[::-1],
                             rtol=2 ** -8, atol=1e-6)
  out, soft = _mix(images16, labels, [2, 1], cutmix_alpha=1.0)
  assert out.dtype == images16.dtype
  lam = _lam_from_labels(soft, labels)
  np.testing.assert_allclose(1.0 - lam, _cutmix_share(out, images16)[1],
                             atol=1e-6)


def test_compiles_under_xla():
  # TPUs compile the whole step. XLA maps Philox bits to floats otherwise
  # than TF's CPU kernels, so the draws differ: check what they make.
  images, labels = _batch(6)
  compiled = tf.function(
      lambda x, y, s: mixing.mix_batch(x, y, K, 0.4, 1.0, 0.5, seed=s),
      jit_compile=True)
  kinds = set()
  for seed in range(6):
    out, soft = (t.numpy() for t in compiled(
        tf.constant(images), tf.constant(labels),
        tf.constant([seed, 6], tf.int64)))
    lam = _lam_from_labels(soft, labels)
    if _is_cutmix(out, images):
      kinds.add('cutmix')
      np.testing.assert_allclose(1.0 - lam, _cutmix_share(out, images)[1],
                                 atol=1e-6)
    else:
      kinds.add('mixup')
      np.testing.assert_allclose(out, lam[0] * images + (1 - lam[0]) *
                                 images[::-1], rtol=1e-5, atol=1e-5)
  assert kinds == {'mixup', 'cutmix'}


def test_each_replica_mixes_its_own_batch_with_its_own_seed():
  strategy = cpu_replicas(2)
  images, labels = _batch(7, batch=8)
  shards = [(images[:4], labels[:4]), (images[4:], labels[4:])]
  step = tf.constant(3, tf.int64)

  @tf.function
  def run(x, y):
    def replica_fn(x, y):
      rid = tf.distribute.get_replica_context().replica_id_in_sync_group
      return mixing.mix_batch(
          x, y, K, mixup_alpha=1.0,
          seed=mixing.replica_seed(0, step, rid))
    return strategy.run(replica_fn, args=(x, y))

  dx = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group][0]))
  dy = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group][1]))
  outs, softs = run(dx, dy)
  lams = []
  for (x, y), out, soft in zip(shards, local_values(strategy, outs),
                               local_values(strategy, softs)):
    lam = float(_lam_from_labels(soft, y)[0])
    # Partners come from the replica's own batch of 4, flipped.
    np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1],
                               rtol=1e-5, atol=1e-5)
    lams.append(lam)
  assert lams[0] != lams[1]


def test_replica_seed_depends_on_seed_step_and_replica():
  seeds = {tuple(mixing.replica_seed(s, t, r).numpy())
           for s in (0, 1) for t in (0, 1, 2**40) for r in (0, 1)}
  assert len(seeds) == 12
  assert np.array_equal(mixing.replica_seed(3, 5, 1).numpy(),
                        mixing.replica_seed(3, tf.constant(5), 1).numpy())


def test_bad_arguments_name_themselves():
  images, labels = _batch()
  for kwargs, name in ((dict(mixup_alpha=-1.0), 'mixup_alpha'),
                       (dict(cutmix_alpha=float('inf')), 'cutmix_alpha'),
                       (dict(switch_prob=1.5), 'switch_prob'),
                       (dict(label_smoothing=1.0), 'label_smoothing')):
    with pytest.raises(ValueError) as e:
      mixing.mix_batch(images, labels, K, seed=[0, 0], **kwargs)
    assert str(e.value).startswith(f'{name}: '), e.value
  with pytest.raises(ValueError, match='^images: '):
    mixing.mix_batch(images[0], labels, K, 1.0, seed=[0, 0])
  with pytest.raises(ValueError, match='^num_classes: '):
    mixing.mix_batch(images, labels, 0, 1.0, seed=[0, 0])
  with pytest.raises(ValueError, match='^alpha: '):
    mixing.sample_beta([0, 0], 0.0)


# ---- soft cross entropy ------------------------------------------------------
def _np_log_softmax(logits):
  z = logits - logits.max(1, keepdims=True)
  return z - np.log(np.exp(z).sum(1, keepdims=True))


@pytest.mark.parametrize('dtype', [tf.float32, tf.bfloat16])
def test_soft_cross_entropy_matches_numpy(dtype):
  rng = np.random.default_rng(8)
  logits = tf.cast(rng.normal(size=(5, K)) * 3, dtype)
  targets = rng.dirichlet(np.ones(K), size=5)
  got = losses.soft_cross_entropy(tf.constant(targets, tf.float32), logits)
  assert got.dtype == tf.float32 and got.shape == (5,)
  want = -(targets * _np_log_softmax(
      tf.cast(logits, tf.float32).numpy().astype(np.float64))).sum(1)
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_mixed_loss_is_the_lam_weighted_loss_of_both_labels():
  images, labels = _batch(9)
  _, soft = _mix(images, labels, [4, 4], mixup_alpha=1.0)
  lam = float(_lam_from_labels(soft, labels)[0])
  logits = np.random.default_rng(9).normal(size=(B, K))
  got = losses.soft_cross_entropy(tf.constant(soft),
                                  tf.constant(logits, tf.float32)).numpy()
  log_p = _np_log_softmax(logits)
  want = -(lam * log_p[np.arange(B), labels] +
           (1 - lam) * log_p[np.arange(B), labels[::-1]])
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ---- in the trainer: --mixup_alpha / --cutmix_alpha with --optimizer=lamb --
def _train_weights(tmp_path, name, **optimizer):
  from efficientnet_tpu import experiment  # pylint: disable=g-import-not-at-top
  from tests.helpers import small_config  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  cfg = small_config(tmp_path / name, num_replicas=1,
                     optimizer=dict(optimizer, optimizer='lamb',
                                    base_learning_rate=0.01,
                                    weight_decay=0.01),
                     train=dict(train_steps=2))
  keras.utils.set_random_seed(0)
  trainer = experiment.build_trainer(cfg, cpu_replicas(1))
  metrics = trainer.train_loop(2)
  return trainer, metrics, [v.numpy() for v in trainer.model.weights]


def test_trainer_mixes_and_steps_with_lamb(tmp_path):
  """The mixing is wired into the trainer's step. On one replica: the
  trainer seeds it with `replica_seed` of its replica id, whose per-replica
  draws test_each_replica_mixes_its_own_batch_with_its_own_seed checks on
  2 replicas (this test compares losses and weights only)."""
  from efficientnet_tpu import optimizers  # pylint: disable=g-import-not-at-top
  plain, m0, w0 = _train_weights(tmp_path, 'plain')
  assert isinstance(plain.optimizer, optimizers.LAMB)
  _, m1, w1 = _train_weights(tmp_path, 'mixed', mixup_alpha=0.4,
                             cutmix_alpha=1.0)
  for m in (m0, m1):
    assert np.isfinite(m['loss'])
  # Same seed and data, mixed images: other updates (the mixing is wired
  # into the step). Same seed, same draws: test_same_seed_same_result_...
  assert m1['loss'] != m0['loss']
  assert any(not np.array_equal(a, b) for a, b in zip(w0, w1))
  assert all(np.isfinite(w).all() for w in w1)
