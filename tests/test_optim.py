"""Optimizer: the weight-decay mask equals timm's parameter groups (DeiT's
recipe) number for number, on real timm state dicts of every family."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_script
from vitret_jax import models
from vitret_jax import optim
from vitret_jax import weights
from vitret_jax.models import heads
from tests.test_weights import GOLDEN, load_golden


def timm_decays(name, value, no_weight_decay=("pos_embed", "cls_token",
                                              "dist_token")):
  """timm's rule (param_groups_weight_decay with the model's
  no_weight_decay() set): no decay for rank <= 1, `.bias`, and the tokens."""
  return not (np.ndim(value) <= 1 or name.endswith(".bias")
              or name in no_weight_decay)


def _mask_of_converted(model, flags, size):
  """timm's per-number decay flags carried through our converter."""
  tree = weights.convert_timm(model, flags, size)["params"]
  return jax.tree.map(lambda x: np.asarray(x) > 0.5, tree)


@pytest.mark.parametrize("path", GOLDEN, ids=os.path.basename)
def test_decay_mask_equals_timm_param_groups(path):
  model, sd, size, _, _ = load_golden(path)
  sd = {k: v for k, v in sd.items()
        if not k.startswith(("head.", "head_dist."))}
  flags = {k: np.full(np.shape(v), float(timm_decays(k, v)), np.float32)
           for k, v in sd.items()}
  theirs = _mask_of_converted(model, flags, size)
  params = weights.convert_timm(model, sd, size)["params"]
  ours = optim.decay_mask(params)
  n_theirs = sum(int(np.sum(x)) for x in jax.tree.leaves(theirs))
  n_ours = sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(params),
                                               jax.tree.leaves(ours)) if m)
  assert n_ours == n_theirs > 0
  for (path_, t), m in zip(jax.tree_util.tree_leaves_with_path(theirs),
                           jax.tree.leaves(ours)):
    assert np.all(t == m), jax.tree_util.keystr(path_)
  # The audit's case: attention biases are [heads, head_dim] and not decayed.
  attn = params["encoder"]["Transformer"]["encoderblock_0"][
      "MultiHeadDotProductAttention_1"]
  assert attn["query"]["bias"].ndim == 2
  mask = ours["encoder"]["Transformer"]["encoderblock_0"][
      "MultiHeadDotProductAttention_1"]
  assert not mask["query"]["bias"] and mask["query"]["kernel"]


def test_decay_mask_of_the_dtop_parts():
  model = models.RetrievalModel(
      encoder=models.vit.VisionTransformer(
          patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2,
          image_size=32, locality_blocks=(-1,), name="encoder"),
      head=heads.DToPHead(num_layers=2, out_dim=16, name="head"))
  params = model.init(jax.random.PRNGKey(0),
                      jnp.zeros((1, 32, 32, 3)))["params"]
  mask = optim.decay_mask(params)
  blk = mask["encoder"]["Transformer"]["encoderblock_1"]["MlpBlock_3"]
  assert blk["dwconv"]["kernel"] and not blk["dwconv"]["bias"]
  assert not mask["head"]["gem_0"]["p"]
  assert not mask["head"]["norm_0"]["scale"]
  assert mask["head"]["projection"]["kernel"]


def test_decay_mask_names_a_parameter_of_unknown_role():
  with pytest.raises(ValueError, match=r"\['head'\]\['mystery'\]"):
    optim.decay_mask({"head": {"mystery": jnp.zeros((3, 3)),
                               "bias": jnp.zeros(3)}})


@pytest.mark.parity
@pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                    reason="needs torch and timm: `make parity`")
@pytest.mark.parametrize("name", sorted(weights.TIMM_MODELS))
def test_decay_mask_equals_timm_on_full_size_models(name):
  timm_parity = load_script("tools/timm_parity.py")
  _, timm = timm_parity.import_timm()  # torchvision's CPU shim first
  from timm.optim import _param_groups  # pylint: disable=g-import-not-at-top
  tmodel = timm.create_model(name, pretrained=False)
  groups = _param_groups.param_groups_weight_decay(
      tmodel, 0.05, no_weight_decay_list=tmodel.no_weight_decay())
  decayed = {id(p) for g in groups if g["weight_decay"] > 0
             for p in g["params"]}
  flags = {k: np.full(tuple(p.shape), float(id(p) in decayed), np.float32)
           for k, p in tmodel.named_parameters()
           if not k.startswith(("head.", "head_dist."))}
  variant, size, distilled = weights.TIMM_MODELS[name]
  model = weights.build_encoder(variant, size, distilled)
  theirs = _mask_of_converted(model, flags, size)
  sd = {k: np.zeros(v.shape, np.float32) for k, v in flags.items()}
  ours = optim.decay_mask(weights.convert_timm(model, sd, size)["params"])
  for t, m in zip(jax.tree.leaves(theirs), jax.tree.leaves(ours)):
    assert np.all(t == m)
