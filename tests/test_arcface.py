"""ArcFace: the unsharded loss against a float64 numpy transcription of the
formula, and the class-sharded loss and gradients against the unsharded
ones on 8 simulated devices."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vitret_jax import arcface
from vitret_jax import sharding


def numpy_arcface(z, y, w, num_classes, m, s):
  z = z.astype(np.float64)
  w = w[:num_classes].astype(np.float64)
  w = w / np.linalg.norm(w, axis=1, keepdims=True)
  cos = np.clip(z @ w.T, -1 + 1e-7, 1 - 1e-7)
  theta = np.arccos(cos)
  tgt = np.where(cos > math.cos(math.pi - m), np.cos(theta + m),
                 cos - m * math.sin(m))
  logits = s * cos
  rows = np.arange(len(y))
  logits[rows, y] = s * tgt[rows, y]
  top = logits.max(1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
  return float(np.mean(lse - logits[rows, y]))


def _data(n=24, e=16, c=37, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, e)).astype(np.float32)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  y = rng.integers(0, c, n).astype(np.int32)
  w = np.asarray(arcface.init_class_weights(jax.random.key(seed), c, e, 8))
  return z, y, w


def test_unsharded_equals_the_formula():
  z, y, w = _data()
  # One row pushed past pi - m: the continuation branch is exercised too.
  z[0] = -w[y[0]] / np.linalg.norm(w[y[0]])
  for m, s in ((0.3, 30.0), (0.5, 64.0), (0.1, 1.0)):
    got, metrics = arcface.arcface_loss(jnp.asarray(z), jnp.asarray(y),
                                        jnp.asarray(w), num_classes=37,
                                        margin=m, scale=s)
    want = numpy_arcface(z, y, w, 37, m, s)
    assert abs(float(got) - want) <= 1e-5 * max(1.0, abs(want)), (m, s)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_padding_rows_are_inert():
  assert arcface.padded_classes(81_313, 8) == 81_920
  assert arcface.padded_classes(81_313, 1) == 81_920  # same on 1 device
  assert arcface.padded_classes(10, 6) % 6 == 0
  z, y, w = _data()
  w2 = w.copy()
  w2[37:] = 1e3 * np.random.default_rng(1).normal(size=w2[37:].shape)
  a = arcface.arcface_loss(z, y, w, num_classes=37)[0]
  b = arcface.arcface_loss(z, y, w2, num_classes=37)[0]
  assert float(a) == float(b)


@pytest.mark.parametrize("n,koleo", [(2, 0.0), (8, 0.0), (8, 0.7)])
def test_sharded_equals_unsharded_with_gradients(n, koleo):
  z, y, w = _data()
  mesh = sharding.make_mesh(n)
  loss_fn = arcface.make_sharded_arcface(mesh, num_classes=37, margin=0.3,
                                         scale=30.0, entropy_weight=koleo)
  ref = lambda z_, w_: arcface.arcface_loss(z_, y, w_, num_classes=37,
                                            entropy_weight=koleo)[0]
  (l1, g1) = jax.value_and_grad(ref, argnums=(0, 1))(z, w)
  zs = jax.device_put(z, sharding.batch_sharding(mesh))
  ys = jax.device_put(y, sharding.batch_sharding(mesh))
  ws = jax.device_put(w, NamedSharding(mesh, P(sharding.BATCH_AXES, None)))
  assert ws.addressable_shards[0].data.shape == (w.shape[0] // n, 16)

  @jax.jit
  def sharded(z_, w_):
    return jax.value_and_grad(
        lambda a, b: loss_fn(a, ys, {"class_weights": b})[0],
                              argnums=(0, 1))(z_, w_)
  l8, g8 = sharded(zs, ws)
  errs = [abs(float(l1) - float(l8))] + [
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(g1, g8)]
  print(f"{n} devices: |loss| err {errs[0]:.2e}, grad z {errs[1]:.2e}, "
        f"grad W {errs[2]:.2e}")
  # Absolute 1e-6 (the loss itself relative to its size: with KoLeo it is
  # ~30 and float32 sums in another order differ in the 7th digit).
  errs[0] /= max(1.0, abs(float(l1)))
  assert max(errs) <= 1e-6
  assert float(np.abs(np.asarray(g1[1])).max()) > 1e-4  # not trivially 0
  acc1 = arcface.arcface_loss(z, y, w, num_classes=37)[1]["accuracy"]
  acc8 = jax.jit(lambda a, b: loss_fn(a, ys, {"class_weights": b})[1])(
      zs, ws)["accuracy"]
  assert float(acc1) == float(acc8)


def test_train_step_with_class_centres_split_over_8_devices():
  """The whole train step with ArcFace: the centres and their optimizer
  state are split along the classes, and 2 steps on 8 devices move the
  parameters as on 1 device."""
  import optax  # pylint: disable=g-import-not-at-top
  from vitret_jax import config_checks  # pylint: disable=g-import-not-at-top
  from vitret_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  from test_train import tiny_model  # pylint: disable=g-import-not-at-top
  from vitret_jax import config_common  # pylint: disable=g-import-not-at-top
  loss_cfg = config_common.base_config().loss
  loss_cfg.kind, loss_cfg.xbm.ratio = "arcface", 0.0
  rng = np.random.default_rng(3)
  batch = {"image": rng.normal(size=(24, 16, 16, 3)).astype(np.float32),
           "label": rng.integers(0, 37, 24).astype(np.int32)}
  out = {}
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    loss_fn, init = config_checks.build_loss(loss_cfg, mesh, 37)
    model, tx = tiny_model(), optax.sgd(0.5, momentum=0.9)
    state, shard = ts.create_train_state(model, tx, jax.random.key(0),
                                         (16, 16, 3), mesh,
                                         init_loss_params=init)
    w = state.loss_params["class_weights"]
    assert w.shape == (1024, 32)
    assert w.addressable_shards[0].data.shape == (1024 // n, 32)
    trace = state.opt_state[0].trace[1]["class_weights"]  # SGD momentum
    assert trace.sharding.spec == shard.loss_params["class_weights"].spec
    assert trace.addressable_shards[0].data.shape == (1024 // n, 32)
    init_values = jax.device_get((state.params, state.loss_params))
    step = ts.make_train_step(model, tx, loss_fn, mesh, shard)
    losses_seen = []
    for _ in range(3):
      state, metrics = step(state, sharding.to_global_batch(batch, mesh))
      losses_seen.append(float(metrics["loss"]))
    assert set(metrics) >= {"arcface", "accuracy", "loss", "grad_norm"}
    assert losses_seen[-1] < losses_seen[0]
    out[n] = jax.device_get((state.params, state.loss_params))
  err = max(float(np.max(np.abs(a - b))) for a, b in
            zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[8])))
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(out[1]), jax.tree.leaves(init_values)))
  print(f"params after 3 steps, 8 vs 1 device: max abs diff {err:.2e}, "
        f"largest move {moved:.2e}")
  # Relative to the move, as tests/test_train.py's 8-vs-1 step test.
  assert err <= 1e-5 * moved
