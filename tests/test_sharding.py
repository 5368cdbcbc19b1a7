"""Mesh and FSDP shardings, gradient accumulation, bf16 and remat switches."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitret_jax import losses
from vitret_jax import models
from vitret_jax import sharding
from vitret_jax import train_step as ts
from vitret_jax.errors import UserError

from conftest import model_config


def model(**kw):
  cfg = dict(variant="mu/8", image_size=16, drop_path_rate=0.0,
             dtype="float32")
  cfg.update(kw)
  return models.build_model(model_config(**cfg))


def batch(n=32, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 16, 16, 3)).astype(np.float32),
          "label": np.repeat(np.arange(n // 4), 4).astype(np.int32)}


def run_steps(mesh, data, steps=2, accum=1, memory=0, tx=None, **model_kw):
  m, tx = model(**model_kw), tx or optax.sgd(0.5, momentum=0.9)
  state, shard = ts.create_train_state(m, tx, jax.random.key(0), (16, 16, 3),
                                       mesh, memory)
  step = ts.make_train_step(m, tx, losses.make_sharded_loss(mesh), mesh,
                            shard, accum_steps=accum)
  for _ in range(steps):
    state, metrics = step(state, sharding.to_global_batch(data, mesh))
  return state, metrics


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_mesh_shapes_and_errors():
  mesh = sharding.make_mesh(8, fsdp=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert sharding.batch_size_on(mesh) == 8
  with pytest.raises(UserError, match="does not divide"):
    sharding.make_mesh(8, fsdp=3)
  with pytest.raises(UserError, match="only 8 exist"):
    sharding.make_mesh(16)


def test_fsdp_rule():
  assert sharding.param_spec((384, 1536), 2) == jax.sharding.PartitionSpec(
      None, "fsdp")
  assert sharding.param_spec((1536, 384), 4) == jax.sharding.PartitionSpec(
      "fsdp", None)
  assert sharding.param_spec((384,), 2) == jax.sharding.PartitionSpec()
  assert sharding.param_spec((999, 999), 2) == jax.sharding.PartitionSpec()


def test_fsdp_step_equals_single_device(monkeypatch):
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 0)  # split even tiny kernels
  data = batch()
  ref, _ = run_steps(sharding.make_mesh(1), data, steps=1, memory=64)
  got, _ = run_steps(sharding.make_mesh(8, fsdp=4), data, steps=1, memory=64)
  kernel = got.params["encoder"]["Transformer"]["encoderblock_0"][
      "MlpBlock_3"]["Dense_0"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)
  assert kernel.addressable_shards[0].data.shape == (32, 32)  # 128 / 4
  assert max_diff(ref.params, got.params) < 1e-5


def test_accumulation_averages_micro_batch_gradients():
  data = batch(16)
  mesh = sharding.make_mesh(1)
  got, _ = run_steps(mesh, data, steps=1, accum=2, tx=optax.sgd(1.0))
  m = model()
  state, _ = ts.create_train_state(m, optax.sgd(1.0), jax.random.key(0),
                                   (16, 16, 3), mesh)
  loss_fn = losses.make_sharded_loss(mesh)

  @jax.jit  # one program, not one per operation (~600 compiles eagerly)
  def grad(images, labels):
    def f(p):
      emb = m.apply({"params": p}, images, train=True,
                    rngs={"dropout": jax.random.key(0)})
      return loss_fn(emb, labels)[0]
    return jax.grad(f)(state.params)

  halves = [grad(data["image"][r], jnp.asarray(data["label"][r]))
            for r in (slice(0, 8), slice(8, 16))]
  want = jax.jit(lambda p, a, b: jax.tree.map(
      lambda p, a, b: p - (a + b) / 2, p, a, b))(state.params, *halves)
  assert max_diff(want, got.params) < 1e-5


def test_accumulation_on_8_devices_matches_1_device():
  data = batch(32)
  # On 8 devices micro-batch j holds the j-th half of every device's rows;
  # lay the batch out so that those are the rows micro-batch j has on 1 device.
  order = np.asarray(ts._micro_batches(jnp.arange(32), 2, 8)).reshape(-1)
  data8 = {k: np.empty_like(v) for k, v in data.items()}
  for k in data:
    data8[k][order] = data[k]
  ref, _ = run_steps(sharding.make_mesh(1), data, accum=2, memory=64)
  got, m = run_steps(sharding.make_mesh(8), data8, accum=2, memory=64)
  assert np.isfinite(float(m["loss"]))
  assert max_diff(ref.params, got.params) < 1e-5


def test_bf16_compute_keeps_fp32_params():
  state, metrics = run_steps(sharding.make_mesh(8), batch(), dtype="bfloat16",
                             tx=optax.adamw(1e-3))
  assert np.isfinite(float(metrics["loss"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state)
             if hasattr(x, "dtype") and x.ndim)


def test_remat_changes_nothing_but_memory():
  data = batch()
  a, _ = run_steps(sharding.make_mesh(8), data)
  b, _ = run_steps(sharding.make_mesh(8), data, remat=True)
  assert max_diff(a.params, b.params) < 1e-5  # fusion order only
