"""The momentum (key) encoder of IRT's In-Shop recipe: an EMA copy of the
parameters, sharded like them, whose descriptors fill the cross-batch
memory; saved and resumed with the state."""
import json
import os

import jax
import numpy as np
import optax
import pytest

from vitret_jax import checkpoint
from vitret_jax import losses
from vitret_jax import sharding
from vitret_jax import train
from vitret_jax import train_step as ts
from vitret_jax.errors import UserError
from conftest import small_config
from test_train import tiny_model


def _batch(rng):
  return {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
          "label": np.repeat(np.arange(8), 2).astype(np.int32)}


@pytest.mark.parametrize("n", [1, 8])
def test_memory_holds_the_key_encoder_descriptors(n):
  mesh = sharding.make_mesh(n)
  model, tx = tiny_model(), optax.adamw(1e-2)
  state, shard = ts.create_train_state(model, tx, jax.random.key(0),
                                       (16, 16, 3), mesh, 48,
                                       momentum_encoder=True)
  # Sharded like the parameters.
  assert jax.tree.map(lambda a, b: a.sharding == b.sharding,
                      state.ema_params, state.params)
  step = ts.make_train_step(model, tx, losses.make_sharded_loss(mesh), mesh,
                            shard, momentum=0.9)
  rng = np.random.default_rng(0)
  for i in range(2):
    batch = _batch(rng)
    ema_before = jax.device_get(state.ema_params)
    ptr = int(state.mem_ptr)
    state, metrics = step(state, sharding.to_global_batch(batch, mesh))
    assert np.isfinite(float(metrics["xbm"]))
    keys = np.asarray(model.apply({"params": ema_before}, batch["image"]))
    online = np.asarray(model.apply({"params": jax.device_get(state.params)},
                                    batch["image"]))
    mem = np.asarray(state.memory["emb"])[ptr:ptr + 16]
    np.testing.assert_allclose(mem, keys, atol=1e-6)
    if i:  # the encoders have parted: the memory is not the online one's
      assert np.max(np.abs(mem - online)) > 1e-4
    want = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema_before,
                        jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(want),
                    jax.tree.leaves(jax.device_get(state.ema_params))):
      np.testing.assert_allclose(a, b, atol=1e-6)


def _config(steps):
  c = small_config(steps)
  with c.unlocked():
    c.loss.xbm.ratio = 1.0
    c.loss.xbm.momentum = 0.9
    c.eval_untrained = False
    c.evals.test.every = 0
    # The learning rate must not depend on total_steps (2 vs 4 here).
    c.schedule.kind, c.schedule.warmup_steps = "constant", 0
  return c


@pytest.mark.slow(19)  # seconds, cold, 2 cores
def test_momentum_encoder_saved_and_resumed(tmp_path):
  """2 steps, stop, 2 more: the same parameters and key encoder as 4 steps
  in one go; the checkpoint holds the EMA copy."""
  train.train_and_evaluate(_config(4), str(tmp_path / "once"))
  train.train_and_evaluate(_config(2), str(tmp_path / "twice"))
  ck = os.path.join(tmp_path, "twice", "checkpoints", "2")
  assert os.path.isdir(ck)
  train.train_and_evaluate(_config(4), str(tmp_path / "twice"))
  states = []
  for run in ("once", "twice"):
    c = checkpoint.Checkpointer(str(tmp_path / run), read_only=True)
    try:
      st = c.manager.restore(4).state
    finally:
      c.close()
    states.append(st)
  a, b = states
  assert "ema_params" in a and a["ema_params"] is not None
  err = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for x, y in zip(jax.tree.leaves(a["ema_params"]),
                            jax.tree.leaves(b["ema_params"])))
  assert err <= 1e-6
  moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(jax.tree.leaves(a["ema_params"]),
                              jax.tree.leaves(a["params"])))
  assert moved > 0  # the key encoder lags the trained one
  # A config without the momentum encoder cannot resume this run silently.
  c = _config(6)
  with c.unlocked():
    c.loss.xbm.momentum = 0.0
  with pytest.raises(UserError, match="momentum encoder"):
    train.train_and_evaluate(c, str(tmp_path / "twice"))
  with open(tmp_path / "twice" / "config.json") as f:
    assert json.load(f)["loss"]["xbm"]["momentum"] == 0.9


def test_momentum_config_errors(tmp_path):
  for ratio, momentum, match in ((0.0, 0.999, "no memory"),
                                 (1.0, 1.0, r"\[0, 1\)")):
    c = _config(2)
    with c.unlocked():
      c.loss.xbm.ratio, c.loss.xbm.momentum = ratio, momentum
    with pytest.raises(UserError, match=match):
      train.train_and_evaluate(c, str(tmp_path / "run"))
