"""Weight import: timm golden outputs (tiny models of every family, made by
tools/timm_parity.py --golden) in the default suite; full-size parity with
timm under the `parity` marker when torch and timm are installed."""
import ast
import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from conftest import load_script
from vitret_jax import models
from vitret_jax import weights
from vitret_jax.errors import UserError
from vitret_jax.models import vit

GOLDEN = sorted(glob.glob(os.path.join(REPO, "tests", "golden", "*.npz")))


def load_golden(path):
  with np.load(path) as f:
    data = dict(f)
  arch = ast.literal_eval(str(data.pop("arch")))
  sd = {k[3:]: v for k, v in data.items() if k.startswith("sd/")}
  size = arch.pop("image_size")
  distilled = arch.pop("distilled")
  model = models.PooledEncoder(vit.VisionTransformer(
      **arch, image_size=size, distilled=distilled, name="encoder"))
  return model, sd, size, data["input_nhwc"], data["output"]


def test_golden_files_cover_every_family():
  names = {os.path.basename(p)[:-4] for p in GOLDEN}
  assert names == {"vit_tiny", "deit_tiny_distilled", "hybrid_tiny"}


@pytest.mark.parametrize("path", GOLDEN, ids=os.path.basename)
def test_timm_golden(path):
  model, sd, size, x, want = load_golden(path)
  variables = weights.convert_timm(model, sd, size)
  got = np.asarray(model.apply(variables, jnp.asarray(x)))
  assert np.max(np.abs(got - want)) < 1e-5


@pytest.mark.parametrize("path", GOLDEN[:1], ids=os.path.basename)
def test_bad_state_dict_lists_names(path):
  model, sd, size, _, _ = load_golden(path)
  broken = dict(sd)
  del broken["blocks.1.norm1.weight"]
  broken["blocks.0.mlp.fc1.weight"] = broken["blocks.0.mlp.fc1.weight"][:5]
  broken["extra.thing"] = np.zeros(3)
  with pytest.raises(UserError) as e:
    weights.convert_timm(model, broken, size)
  msg = str(e.value)
  block = "encoder/Transformer/encoderblock_"
  assert f"missing (1): {block}1/LayerNorm_0/scale" in msg
  assert "unexpected (1): (timm) extra.thing" in msg
  assert f"misshaped (1): {block}0/MlpBlock_3/Dense_0/kernel" in msg
  with pytest.raises(UserError, match="supported"):
    weights.from_timm("resnet50", sd)


def test_npz_roundtrip_google_names(tmp_path):
  """A checkpoint in the Google naming (posemb under Transformer/, ResNet at
  the top level, a classifier head) loads, and resamples to another size."""
  model, sd, size, x, want = load_golden(
      os.path.join(REPO, "tests", "golden", "hybrid_tiny.npz"))
  params = weights.convert_timm(model, sd, size)["params"]["encoder"]
  flat = {}
  for path, v in jax.tree_util.tree_leaves_with_path(params):
    name = "/".join(k.key for k in path)
    if name == "pos_embedding":
      name = "Transformer/posembed_input/pos_embedding"
    name = name.replace("backbone/", "")
    flat[name] = np.asarray(v)
  flat["head/kernel"] = np.zeros((32, 10))
  np.savez(tmp_path / "ckpt.npz", **flat)
  arch = dict(width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=1,
              resnet=(1, 1))
  orig = vit.decode_variant
  vit.decode_variant = lambda v: dict(arch)  # the tiny arch has no name
  try:
    m, v = weights.from_npz(str(tmp_path / "ckpt.npz"), "tiny", image_size=32)
    m48, v48 = weights.from_npz(str(tmp_path / "ckpt.npz"), "tiny",
                                image_size=48)
  finally:
    vit.decode_variant = orig
  got = np.asarray(m.apply(v, jnp.asarray(x)))
  assert np.max(np.abs(got - want)) < 1e-5
  assert v48["params"]["encoder"]["pos_embedding"].shape == (1, 1 + 36, 32)


def _timm_available():
  return (importlib.util.find_spec("torch") is not None
          and importlib.util.find_spec("timm") is not None)


@pytest.mark.parity
@pytest.mark.skipif(not _timm_available(),
                    reason="full-size parity needs torch and timm: run "
                           "`make parity` (see README)")
@pytest.mark.parametrize("name", sorted(weights.TIMM_MODELS))
def test_full_size_parity_with_timm(name):
  timm_parity = load_script("tools/timm_parity.py")
  (_, _, err32, rel16, amp16), = timm_parity.full_size_parity([name])
  assert timm_parity.parity_ok(err32, rel16, amp16), (err32, rel16, amp16)


def test_parity_bound_is_relative_to_timms_own_bf16_error():
  """tools/timm_parity.parity_ok (no torch needed): bf16 within twice timm's
  autocast error passes, a bf16 path far off or an fp32 mismatch fails."""
  timm_parity = load_script("tools/timm_parity.py")
  nan = float("nan")
  assert timm_parity.parity_ok(3.6e-6, 1.03e-2, 7.13e-3)  # vit_tiny, measured
  assert not timm_parity.parity_ok(3.6e-6, 1.5e-2, 7.13e-3)
  assert not timm_parity.parity_ok(2e-4, 1.03e-2, 7.13e-3)
  assert not timm_parity.parity_ok(3.6e-6, nan, 7.13e-3)  # bf16 output NaN
  assert timm_parity.parity_ok(3.6e-6, nan, nan)  # bf16 not compared
