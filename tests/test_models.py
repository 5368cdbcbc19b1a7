"""ViT encoder + IRT head: forward passes, normalisation, pinned sizes."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitret_jax import models
from vitret_jax.errors import UserError
from vitret_jax.models import vit

from conftest import model_config

# Parameter counts at 224 px without classifier, as timm 1.0.31 counts
# vit_*_patch*_224 with num_classes=0 (tools/timm_parity.py); "mu" is ours.
PINNED = {
    "mu": {8: 56_800},
    "Ti": {16: 5_524_416},
    "S": {16: 21_665_664, 32: 22_493_952},
    "B": {16: 85_798_656, 32: 87_455_232},
    "L": {16: 303_301_632, 32: 305_510_400},
}


def model_cfg(**kw):
  base = dict(variant="mu/8", image_size=32, dtype="float32")
  base.update(kw)
  return model_config(**base)


def count(model, size):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return sum(x.size for x in jax.tree.leaves(shapes))


# Hybrids and the distilled DeiT, against timm's counts (tools/timm_parity.py
# table): (variant, image size, distilled) -> parameters without classifier.
PINNED_TIMM = {
    ("R50+B/16", 224, False): 97_890_112,   # vit_base_r50_s16_224
    ("R50+B/16", 384, False): 98_181_952,   # vit_base_r50_s16_384
    ("R26+S/32", 224, False): 36_046_912,   # vit_small_r26_s32_224
    ("S/16", 224, True): 21_666_432,        # deit_small_distilled_patch16_224
}


# Our test-size backbone (no timm counterpart): the count recorded when it
# was added (R26+mu/32 at 96 px has 14,037,568), so a change of structure
# shows here.
PINNED_OURS = {("Rmu+mu/32", 96): 2_069_792}


def test_every_variant_has_a_pinned_count():
  assert set(PINNED) == set(vit.VARIANTS)
  from vitret_jax.models import hybrid  # pylint: disable=g-import-not-at-top
  pinned = {v.split("+")[0] for v, _, _ in PINNED_TIMM if "+" in v}
  pinned |= {v.split("+")[0] for v, _ in PINNED_OURS}
  assert pinned == set(hybrid.RESNETS)


def test_test_size_hybrid():
  """Rmu+mu/32: R26's four stages and stride (32), one unit per stage,
  stem width 32."""
  (variant, size), want = next(iter(PINNED_OURS.items()))
  model = models.build_model(model_cfg(variant=variant, image_size=size))
  assert count(model, size) == want
  assert models.input_stride(model) == 32
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  backbone = shapes["params"]["encoder"]["backbone"]
  assert backbone["conv_root"]["kernel"].shape == (7, 7, 3, 32)
  assert sorted(backbone) == ["block1", "block2", "block3", "block4",
                              "conv_root", "gn_root"]
  assert backbone["block4"]["unit1"]["conv3"]["kernel"].shape == (
      1, 1, 256, 1024)


@pytest.mark.parametrize("key", sorted(PINNED_TIMM))
def test_pinned_timm_counts(key):
  variant, size, distilled = key
  model = models.build_model(model_cfg(variant=variant, image_size=size,
                                       distilled=distilled))
  assert count(model, size) == PINNED_TIMM[key]


@pytest.mark.parametrize("size,patch", [(s, p) for s in PINNED
                                        for p in PINNED[s]])
def test_pinned_param_counts(size, patch):
  model = models.build_model(model_cfg(variant=f"{size}/{patch}",
                                       image_size=224))
  assert count(model, 224) == PINNED[size][patch]


@pytest.mark.parametrize("kw", [{}, {"proj_dim": 16}, {"dtype": "bfloat16"},
                                {"remat": True}])
def test_forward_train_and_eval(kw):
  model = models.build_model(model_cfg(**kw))
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init({"params": jax.random.key(0)}, x)
  for train in (False, True):
    out = model.apply(variables, x, train=train,
                      rngs={"dropout": jax.random.key(2)})
    assert out.shape == (4, kw.get("proj_dim") or 32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_drop_path_is_stochastic_only_in_training():
  model = models.build_model(model_cfg(drop_path_rate=0.5))
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  v = model.init({"params": jax.random.key(0)}, x)
  a = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
  b = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(model.apply(v, x), model.apply(v, x))


def test_bad_model_config_names_the_choices():
  with pytest.raises(UserError, match="'S/16'"):
    vit.decode_variant("S16")
  with pytest.raises(UserError, match="valid choices"):
    models.build_model(model_cfg(head="arcface"))


def test_any_input_resolution_and_aspect():
  model = models.build_model(model_cfg())  # made for 32 x 32
  v = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))
  for shape in [(2, 48, 32, 3), (1, 64, 64, 3), (3, 16, 40, 3)]:
    out = model.apply(v, jnp.ones(shape))
    assert out.shape == (shape[0], 32) and np.all(np.isfinite(out))
  grid = vit.resample_posemb(jnp.arange(17.0).reshape(1, 17, 1), (4, 4))
  np.testing.assert_array_equal(grid, jnp.arange(17.0).reshape(1, 17, 1))


def test_dtop_model_size_and_descriptor():
  """configs/dtop.py: R50+B/16 at 384 px + locality blocks + DToP head;
  the sum is worked out in docs/dtop.md."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "dtop_cfg", os.path.join(REPO, "configs", "dtop.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config().model
  model = models.build_model(cfg)
  assert count(model, 384) == 101_457_220
  out = jax.eval_shape(lambda: model.apply(
      model.init(jax.random.key(0), jnp.zeros((1, 384, 384, 3))),
      jnp.zeros((2, 384, 384, 3))))
  assert out.shape == (2, 512)


def test_locality_blocks_only_where_asked():
  model = models.build_model(model_cfg(locality_blocks=[-1]))
  v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  blocks = v["encoder"]["Transformer"]
  assert "dwconv" in blocks["encoderblock_1"]["MlpBlock_3"]
  assert "dwconv" not in blocks["encoderblock_0"]["MlpBlock_3"]
  x = jax.random.normal(jax.random.key(1), (2, 48, 32, 3))  # 6 x 4 grid
  assert model.apply({"params": v}, x).shape == (2, 32)


def _golden_with_locality(form):
  """The vit_tiny golden (a real timm state dict) loaded into an encoder
  whose first block (of 2) is locality-enhanced, so that the class token
  output depends on it; its convolution freshly initialised (what
  model.init_fresh=("dwconv",) does)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from tests.test_weights import GOLDEN, load_golden  # pylint: disable=g-import-not-at-top
  from vitret_jax import weights  # pylint: disable=g-import-not-at-top
  plain, sd, size, x, want = load_golden(
      [p for p in GOLDEN if p.endswith("vit_tiny.npz")][0])
  loaded = weights.convert_timm(plain, sd, size)["params"]
  enc = plain.encoder.clone(locality_blocks=(0,), locality_form=form,
                            parent=None)
  model = models.PooledEncoder(enc)
  fresh = model.init(jax.random.key(3), jnp.asarray(x[:1]))["params"]
  flat = traverse_util.flatten_dict(fresh)
  flat.update({k: v for k, v in traverse_util.flatten_dict(loaded).items()})
  params = traverse_util.unflatten_dict(flat)
  return model, params, x, want


def test_locality_residual_form_leaves_a_pretrained_model_unchanged():
  """Step 0 of a DToP run from ImageNet weights computes the checkpoint's
  function: the zero-initialised depth-wise branch adds exactly nothing."""
  model, params, x, want = _golden_with_locality("residual")
  conv = params["encoder"]["Transformer"]["encoderblock_0"]["MlpBlock_3"][
      "dwconv"]
  assert not np.any(np.asarray(conv["kernel"]))
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
  assert np.max(np.abs(got - want)) <= 1e-6 + 1e-5  # golden's own tolerance
  no_blocks = models.PooledEncoder(model.encoder.clone(
      locality_blocks=(), parent=None))
  plain = dict(params)
  plain_enc = jax.tree.map(lambda a: a, params["encoder"])
  del plain_enc["Transformer"]["encoderblock_0"]["MlpBlock_3"]["dwconv"]
  plain["encoder"] = plain_enc
  ref = np.asarray(no_blocks.apply({"params": plain}, jnp.asarray(x)))
  assert np.max(np.abs(got - ref)) <= 1e-6
  enc = model.encoder.clone(parent=None)
  tokens = lambda e, p: e.apply({"params": p}, jnp.asarray(x))["tokens"]
  err = np.max(np.abs(np.asarray(tokens(enc, params["encoder"]))
                      - np.asarray(tokens(no_blocks.encoder.clone(
                          parent=None), plain["encoder"]))))
  assert err <= 1e-6
  # ... and the branch learns: its kernel gets a non-zero gradient.
  g = jax.grad(lambda p: jnp.sum(tokens(enc, p) ** 2))(params["encoder"])
  gk = g["Transformer"]["encoderblock_0"]["MlpBlock_3"]["dwconv"]
  assert np.abs(np.asarray(gk["kernel"])).max() > 0


def test_locality_inverted_form():
  """The LocalViT form changes a pretrained model at step 0 (the residual
  form, the default, does not); an unknown form is an error."""
  model, params, x, want = _golden_with_locality("inverted")
  got = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
  assert np.max(np.abs(got - want)) > 1e-3
  default = models.build_model(model_cfg(locality_blocks=[-1]))
  assert default.encoder.locality_form == "residual"
  with pytest.raises(ValueError, match="locality_form"):
    models.build_model(model_cfg(locality_blocks=[-1], locality_form="x")
                       ).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_gem_positive_mapping():
  """On LayerNorm-like inputs the clamp floors about half of the values (no
  gradient through them); softplus keeps a gradient for every value."""
  from vitret_jax.models import heads  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 196, 64))
  outs, grads = {}, {}
  for kind in heads.GEM_INPUTS:
    pool = heads.GeMPool(3.0, positive=kind)
    v = pool.init(jax.random.key(0), x)
    outs[kind] = pool.apply(v, x)
    grads[kind] = jax.grad(lambda x_: jnp.sum(pool.apply(v, x_)))(x)
  dead = float(np.mean(np.asarray(grads["clamp"]) == 0))
  assert 0.4 < dead < 0.6
  assert np.all(np.asarray(grads["softplus"]) > 0)
  assert np.all(np.isfinite(np.asarray(outs["softplus"])))
  sp = np.log1p(np.exp(np.asarray(x, np.float64)))
  want = np.mean(sp ** 3, axis=1) ** (1 / 3)
  assert np.max(np.abs(np.asarray(outs["softplus"]) - want)) < 1e-5
  # Very negative inputs: the floor keeps d/dp finite.
  v = heads.GeMPool(3.0).init(jax.random.key(0), x)
  gp = jax.grad(lambda v_: jnp.sum(heads.GeMPool(3.0).apply(
      v_, jnp.full((1, 4, 2), -200.0))))(v)
  assert np.isfinite(float(gp["params"]["p"]))
  cfg = model_cfg(head="dtop", locality_blocks=[-1])
  assert models.build_model(cfg).head.gem_input == "softplus"  # default


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6),
                                       (jnp.bfloat16, 2e-2)])
def test_attention_equals_flax_values_and_gradients(dtype, tol):
  """models/attention.py (heads-major matmuls, hand-written backward)
  against flax.linen.dot_product_attention with fp32 softmax: outputs and
  the gradients of all three inputs, at a ViT-S-like shape with a prime
  token count, in fp32 and bf16 (relative to the largest value)."""
  from vitret_jax.models import attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 197, 6, 64)) * s, dtype)
             for s in (1.0, 1.0, 2.0))
  ref = lambda q, k, v: nn.dot_product_attention(
      q, k, v, force_fp32_for_softmax=True)
  loss = lambda f: lambda q, k, v: jnp.sum(
      jnp.sin(f(q, k, v).astype(jnp.float32)))
  for got, want in [(attention.attention(q, k, v), ref(q, k, v))] + list(zip(
      jax.grad(loss(attention.attention), argnums=(0, 1, 2))(q, k, v),
      jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v))):
    assert got.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < tol, err
  with pytest.raises(NotImplementedError, match="mask"):
    attention.attention(q, k, v, mask=jnp.ones((3, 6, 197, 197), bool))


@pytest.mark.parametrize("head", ["irt", "dtop"])
def test_scan_over_blocks_same_parameters_values_and_gradients(head):
  """model.scan: the same parameter tree as the unrolled blocks (so every
  checkpoint and weight file loads either way), the same descriptors, the
  same gradients (drop-path off), also with remat, with a locality block
  and DToP's per-layer outputs; drop-path still draws masks."""
  def cfg(**kw):
    d = dict(variant="mu/8", image_size=32, head=head, drop_path_rate=0.0,
             dtype="float32", distilled=True, locality_blocks=(-1,),
             locality_form="residual", scan=False)
    d.update(kw)
    cfg = model_config(**d)
    cfg.dtop.num_layers = 2
    return cfg
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)),
                  jnp.float32)
  # Jitted: op by op, these models cost ~250 small compiles.
  init = lambda m: jax.jit(m.init)(jax.random.key(0), x)
  apply = lambda m, **kw: jax.jit(functools.partial(m.apply, **kw))
  plain = models.build_model(cfg())
  v = init(plain)
  assert (jax.tree.structure(v) == jax.tree.structure(
      init(models.build_model(cfg(scan=True)))))
  want = apply(plain)(v, x)
  w = jnp.arange(1.0, 1.0 + want.shape[-1])
  grad = lambda m: jax.jit(jax.grad(
      lambda v: jnp.sum(m.apply(v, x, train=True) * w)))(v)
  g_want = grad(plain)
  top = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_want))
  for kw in (dict(scan=True), dict(scan=True, remat=True)):
    m = models.build_model(cfg(**kw))
    np.testing.assert_allclose(apply(m)(v, x), want, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_want), jax.tree.leaves(grad(m))):
      assert float(jnp.abs(a - b).max()) < 1e-5 * top
  noisy = apply(models.build_model(cfg(scan=True, drop_path_rate=0.9)),
                train=True)
  outs = [noisy(v, x, rngs={"dropout": jax.random.key(s)}) for s in (1, 2)]
  assert float(jnp.abs(outs[0] - outs[1]).max()) > 0
