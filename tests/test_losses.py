"""IRT loss: NumPy reference loops, hand-built cases, sharded == unsharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitret_jax import losses
from vitret_jax import sharding
from vitret_jax import train_step as ts


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_loss(z, y, beta, lam, reduction, mem=None, mem_y=None, slots=None,
               eps=1e-8):
  """Straight loops over the paper's formulas (docs/irt.md) (float64)."""
  z = z.astype(np.float64)
  n = len(z)

  def contr(refs, ref_y, self_col):
    pos, neg = [], []
    total = 0.0
    for i in range(n):
      for j in range(len(refs)):
        if j == self_col[i] or ref_y[j] < 0:
          continue
        s = float(z[i] @ refs[j])
        if ref_y[j] == y[i]:
          c = 1.0 - s
          pos.append(c)
        else:
          c = max(0.0, s - beta)
          neg.append(c)
        total += c
    if reduction == "anchor_mean":
      return total / n
    nz = lambda v: sum(v) / max(1, sum(1 for c in v if c > 0))
    return nz(pos) + nz(neg)

  loss = contr(z, y, list(range(n)))
  kl = 0.0
  for i in range(n):
    rho = min(np.linalg.norm(z[i] - z[j]) for j in range(n) if j != i)
    kl -= np.log(rho + eps)
  loss += lam * kl / n
  if mem is not None:
    loss += contr(mem.astype(np.float64), mem_y, slots)
  return loss


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
def test_matches_numpy_loop(reduction):
  rng = np.random.default_rng(0)
  z = unit(rng.normal(size=(12, 6))).astype(np.float32)
  y = rng.integers(0, 4, size=12)
  got, metrics = losses.irt_loss(jnp.asarray(z), jnp.asarray(y), margin=0.3,
                                 entropy_weight=0.7, reduction=reduction)
  want = numpy_loss(z, y, 0.3, 0.7, reduction)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
def test_memory_term_matches_numpy_loop(reduction):
  rng = np.random.default_rng(1)
  z = unit(rng.normal(size=(6, 5))).astype(np.float32)
  y = rng.integers(0, 3, size=6)
  mem = {"emb": jnp.asarray(unit(rng.normal(size=(10, 5))), jnp.float32),
         "labels": jnp.asarray([0, 1, 2, 1, -1, -1, -1, -1, -1, -1])}
  ptr = 8  # the batch wraps around the end of the memory
  mem, _ = losses.enqueue(mem, jnp.asarray(z), jnp.asarray(y), ptr)
  got, m = losses.irt_loss(jnp.asarray(z), jnp.asarray(y), margin=0.5,
                           entropy_weight=0.0, reduction=reduction,
                           memory=mem, mem_ptr=ptr)
  slots = [(ptr + i) % 10 for i in range(6)]
  want = numpy_loss(z, y, 0.5, 0.0, reduction, np.asarray(mem["emb"]),
                    np.asarray(mem["labels"]), slots)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(m["xbm"]) > 0


def test_hand_built_values():
  # Two classes on the unit circle: a = (1, 0), a' = (0.6, 0.8) same class;
  # b = (0, 1) other class. s(a, a') = 0.6, s(a, b) = 0, s(a', b) = 0.8.
  z = jnp.asarray([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
  y = jnp.asarray([0, 0, 1])
  _, m = losses.irt_loss(z, y, margin=0.5, entropy_weight=0.0)
  # anchor a: pos 0.4, neg max(0, 0 - .5) = 0; a': pos 0.4, neg 0.3;
  # b: neg (a) 0, neg (a') 0.3. Sum 1.4 over 3 anchors.
  np.testing.assert_allclose(float(m["contrastive"]), 1.4 / 3, rtol=1e-6)
  _, m = losses.irt_loss(z, y, margin=0.5, entropy_weight=0.0,
                         reduction="nonzero_mean")
  # positives 0.4, 0.4 (both > 0); negatives 0.3, 0.3 non-zero of 4.
  np.testing.assert_allclose(float(m["contrastive"]), 0.4 + 0.3, rtol=1e-6)
  # KoLeo: nearest distances |a-a'| = sqrt(.8), |a'-b| = sqrt(.4) for a' and b.
  rho = np.sqrt([0.8, 0.4, 0.4])
  np.testing.assert_allclose(float(m["koleo"]), -np.mean(np.log(rho + 1e-8)),
                             rtol=1e-6)


def test_self_pair_excluded_and_identical_positive_costs_nothing():
  z = jnp.asarray([[1.0, 0.0], [1.0, 0.0]])
  _, m = losses.irt_loss(z, jnp.asarray([3, 3]), entropy_weight=0.0)
  assert float(m["contrastive"]) == pytest.approx(0.0, abs=1e-7)


def test_gradients_finite_when_embeddings_coincide():
  z = jnp.asarray([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
  y = jnp.asarray([0, 1, 0, 1])
  for reduction in losses.REDUCTIONS:
    loss, grad = jax.value_and_grad(
        lambda e: losses.irt_loss(e, y, reduction=reduction)[0])(z)
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(grad)))
  # The coinciding pair's KoLeo term is -log(eps): large but finite.
  _, m = losses.irt_loss(z, y, entropy_weight=1.0)
  assert float(m["koleo"]) > 4.0


@pytest.mark.parametrize("batch", [16, 24])  # 2 and 3 rows per device
@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
@pytest.mark.parametrize("with_memory", [False, True])
def test_sharded_equals_unsharded(batch, reduction, with_memory):
  assert jax.device_count() == 8
  rng = np.random.default_rng(batch)
  z = unit(rng.normal(size=(batch, 8))).astype(np.float32)
  y = rng.integers(0, 5, size=batch).astype(np.int32)  # uneven over devices
  mem, ptr = None, 0
  if with_memory:
    mem = ts.init_memory(40, 8)
    mem = {"emb": mem["emb"].at[:20].set(unit(rng.normal(size=(20, 8)))),
           "labels": mem["labels"].at[:20].set(rng.integers(0, 5, 20))}
    ptr = 30
    mem, _ = losses.enqueue(mem, jnp.asarray(z), jnp.asarray(y), ptr)

  def single(e):
    return losses.irt_loss(e, jnp.asarray(y), reduction=reduction,
                           memory=mem, mem_ptr=ptr)[0]

  mesh = sharding.make_mesh()
  fn = losses.make_sharded_loss(mesh, reduction=reduction)
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))

  @jax.jit
  def sharded(e, labels):
    return jax.value_and_grad(lambda e: fn(e, labels, mem, ptr)[0])(e)

  l0, g0 = jax.value_and_grad(single)(jnp.asarray(z))
  l1, g1 = sharded(put(z), put(y))
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-6,
                             atol=1e-7)
