"""Pretrained weights from timm and from Google's ViT / R50+ViT checkpoints.

`from_timm(name, state_dict)` -> (model, variables) with `model.apply(
variables, images_nhwc)` equal to timm's pre-logits pooled features for the
models in `TIMM_MODELS`. `state_dict` maps timm's parameter names to NumPy
arrays, as `safetensors.numpy.load_file` reads a timm `.safetensors` file
(`load_state_dict(path)` reads that, or a `.pth` when torch is installed).
`from_npz(path_or_dict, variant)` loads the Google checkpoints' naming.
The conversion is done once, here; a missing, unexpected or misshaped
parameter is an error that lists the names.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors import numpy as st_numpy

from vitret_jax import models
from vitret_jax import params_tree
from vitret_jax.errors import UserError
from vitret_jax.models import hybrid
from vitret_jax.models import vit

# timm model name -> (variant, image size, distilled)
TIMM_MODELS = {
    "vit_tiny_patch16_224": ("Ti/16", 224, False),
    "vit_small_patch16_224": ("S/16", 224, False),
    "vit_base_patch16_224": ("B/16", 224, False),
    "deit_small_patch16_224": ("S/16", 224, False),
    "deit_base_patch16_224": ("B/16", 224, False),
    "deit_small_distilled_patch16_224": ("S/16", 224, True),
    "deit_base_distilled_patch16_384": ("B/16", 384, True),
    "vit_base_r50_s16_224": ("R50+B/16", 224, False),
    "vit_base_r50_s16_384": ("R50+B/16", 384, False),
    "vit_small_r26_s32_224": ("R26+S/32", 224, False),
}


def build_encoder(variant, image_size, distilled=False, dtype=jnp.float32,
                  backbone_dtype=jnp.float32):
  """The PooledEncoder of a variant (what parity is checked on)."""
  arch = vit.decode_variant(variant)
  return models.PooledEncoder(vit.VisionTransformer(
      **arch, image_size=image_size, distilled=distilled, dtype=dtype,
      backbone_dtype=backbone_dtype, name="encoder"))


def template(model, image_size):
  """{flat name: shape} of the model's parameters (no initialisation)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))["params"]
  return params_tree.shapes(shapes)


def check_fit(have, want, source):
  """Raises UserError listing the missing, unexpected and misshaped names
  when `have` ({name: shape} loaded) does not fit `want` (the model's)."""
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  misshaped = sorted(k for k in set(want) & set(have) if have[k] != want[k])
  if missing or unexpected or misshaped:
    lines = [f"{source} does not fit the model:"]
    for name, keys in (("missing", missing), ("unexpected", unexpected)):
      if keys:
        lines.append(f"  {name} ({len(keys)}): {', '.join(keys[:10])}")
    if misshaped:
      lines.append(f"  misshaped ({len(misshaped)}): " + ", ".join(
          f"{k} {have[k]} vs {want[k]}" for k in misshaped[:10]))
    raise UserError("\n".join(lines))


def _check_and_nest(flat, tmpl, source):
  check_fit({k: tuple(v.shape) for k, v in flat.items()}, tmpl, source)
  return {"params": params_tree.unflatten(
      {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})}


def _heads_split(w, b, heads):
  """timm's fused qkv [3D, D] (+ [3D]) -> query/key/value DenseGeneral
  kernels [D, H, D/H] and biases [H, D/H]."""
  d = w.shape[1]
  out = {}
  for i, name in enumerate(("query", "key", "value")):
    wi, bi = w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]
    out[name] = (wi.T.reshape(d, heads, d // heads),
                 bi.reshape(heads, d // heads))
  return out


def _conv(w):
  return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _timm_block(i, rest, name, take, heads, t):
  """Our flat names of timm's `blocks.<i>.<rest>` entry `name`."""
  blk = f"{t}encoderblock_{i}/"
  attn = blk + "MultiHeadDotProductAttention_1/"
  simple = {"norm1.weight": "LayerNorm_0/scale", "norm1.bias":
            "LayerNorm_0/bias", "norm2.weight": "LayerNorm_2/scale",
            "norm2.bias": "LayerNorm_2/bias"}
  if rest in simple:
    return {blk + simple[rest]: take(name)}
  if rest.startswith(("mlp.fc1.", "mlp.fc2.")):
    dense = f"MlpBlock_3/Dense_{0 if 'fc1' in rest else 1}/"
    value = take(name)
    if rest.endswith("weight"):
      return {blk + dense + "kernel": value.T}
    return {blk + dense + "bias": value}
  if rest == "attn.qkv.weight":
    parts = _heads_split(take(name), take(f"blocks.{i}.attn.qkv.bias"), heads)
    out = {}
    for k, (w, b) in parts.items():
      out[attn + f"{k}/kernel"], out[attn + f"{k}/bias"] = w, b
    return out
  if rest == "attn.proj.weight":
    w = take(name)
    d = w.shape[0]
    return {attn + "out/kernel": w.T.reshape(heads, d // heads, d)}
  if rest == "attn.proj.bias":
    return {attn + "out/bias": take(name)}
  return {}  # e.g. attn.qkv.bias, taken with the weight


def fit_posemb(pe, grid, num_prefix=1):
  """A position embedding [1, P + s*s, D] made for an s x s grid, at the
  model's grid x grid: as it is when s == grid, else resampled
  (vit.resample_posemb) and logged. What every loader of weights made for
  another resolution uses (timm and npz files, runs and artifacts)."""
  side = int(round((pe.shape[1] - num_prefix) ** 0.5))
  if side == grid:
    return pe
  logging.info("Position embedding resampled from the weights' %dx%d grid "
               "to %dx%d (model.image_size / patch size).", side, side, grid,
               grid)
  return np.asarray(vit.resample_posemb(jnp.asarray(pe), (grid, grid),
                                        num_prefix))


def _timm_to_flat(sd, heads, grid, num_prefix):
  """timm names -> our flat names ("encoder/Transformer/...")."""
  e = "encoder/"
  t = e + "Transformer/"
  flat = {}
  used = set()

  def take(name):
    used.add(name)
    return np.asarray(sd[name], np.float32)

  for name in sd:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
      flat.update(_timm_block(*m.groups(), name, take, heads, t))
      continue
    m = re.fullmatch(r"patch_embed\.backbone\.(.+)", name)
    if m:
      flat.update(_timm_resnet_name(m.group(1), take(name)))
      continue
    direct = {"norm.weight": t + "encoder_norm/scale",
              "norm.bias": t + "encoder_norm/bias",
              "patch_embed.proj.bias": e + "embedding/bias"}
    if name in direct:
      flat[direct[name]] = take(name)
    elif name == "patch_embed.proj.weight":
      flat[e + "embedding/kernel"] = _conv(take(name))
    elif name == "cls_token":
      flat[e + "cls"] = take(name)
    elif name == "dist_token":
      flat[e + "dist"] = take(name)
    elif name == "pos_embed":  # made for another resolution: resampled
      flat[e + "pos_embedding"] = fit_posemb(take(name), grid, num_prefix)
  # Classifier heads (head, head_dist, pre_logits) are not part of the
  # encoder; anything else unused is reported as unexpected.
  for name in sd:
    if name not in used and not re.match(r"(head|head_dist|pre_logits)\.",
                                         name):
      flat["(timm) " + name] = np.asarray(sd[name])
  return flat


def _timm_resnet_name(rest, value):
  b = "encoder/backbone/"
  if rest == "stem.conv.weight":
    return {b + "conv_root/kernel": _conv(value)}
  if rest in ("stem.norm.weight", "stem.norm.bias"):
    return {b + "gn_root/" + ("scale" if rest.endswith("weight") else "bias"):
            value}
  m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(\w+)\.(\w+)(?:\.(\w+))?",
                   rest)
  if m:
    s, u, layer, p1, p2 = m.groups()
    unit = f"{b}block{int(s) + 1}/unit{int(u) + 1}/"
    if layer == "downsample":
      layer, p1 = ("conv_proj" if p1 == "conv" else "gn_proj"), p2
    else:
      layer = layer.replace("norm", "gn")
    if layer.startswith("conv"):
      return {unit + layer + "/kernel": _conv(value)}
    return {unit + layer + "/" + ("scale" if p1 == "weight" else "bias"):
            value}
  return {"(timm) patch_embed.backbone." + rest: value}


def from_timm(model_name, state_dict, dtype=jnp.float32,
              backbone_dtype=jnp.float32):
  """(model, variables) of a timm model from its state dict (see module doc).
  `dtype` is the transformer's compute dtype, `backbone_dtype` a hybrid
  CNN's (float32 by default, see vit.VisionTransformer)."""
  if model_name not in TIMM_MODELS:
    raise UserError(f"timm model {model_name!r} is not supported; supported: "
                    f"{sorted(TIMM_MODELS)}.")
  variant, size, distilled = TIMM_MODELS[model_name]
  model = build_encoder(variant, size, distilled, dtype, backbone_dtype)
  return model, convert_timm(model, state_dict, size, model_name)


def convert_timm(model, state_dict, image_size, source="timm state dict"):
  """Variables of `model` (a PooledEncoder) from a timm state dict; works for
  any size of the supported families (the golden tests use tiny ones)."""
  enc = model.encoder
  flat = _timm_to_flat(state_dict, enc.num_heads, image_size // enc.stride,
                       enc.num_prefix)
  return _check_and_nest(flat, template(model, image_size), source)


def from_npz(checkpoint, variant, image_size=224, dtype=jnp.float32):
  """(model, variables) from a Google ViT / R50+ViT `.npz` (a path or the
  loaded mapping): names as google-research/vision_transformer writes them."""
  if isinstance(checkpoint, str):
    with np.load(checkpoint) as f:
      checkpoint = dict(f)
  model = build_encoder(variant, image_size, dtype=dtype)
  enc = model.encoder
  flat = {}
  for name, value in checkpoint.items():
    if re.match(r"(head|pre_logits)/", name):
      continue
    value = np.asarray(value, np.float32)
    if name == "Transformer/posembed_input/pos_embedding":
      flat["encoder/pos_embedding"] = fit_posemb(
          value, image_size // enc.stride, enc.num_prefix)
    elif re.match(r"(conv_root|gn_root|block\d+)/", name):
      flat["encoder/backbone/" + name] = value
    else:
      flat["encoder/" + name] = value
  return model, _check_and_nest(flat, template(model, image_size),
                                f"npz checkpoint for {variant}")


def load_state_dict(path):
  """A timm checkpoint file as {name: np.ndarray}: .safetensors with the
  safetensors package alone; .pth / .bin need torch."""
  if path.endswith(".safetensors"):
    return st_numpy.load_file(path)
  try:
    # torch is optional (only .pth files need it) and heavy.
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"{path}: reading .pth files needs torch (pip install "
                    f"torch==2.13.0); .safetensors files need no torch.") from e
  sd = torch.load(path, map_location="cpu", weights_only=True)
  sd = sd.get("state_dict", sd.get("model", sd))
  return {k: v.float().numpy() for k, v in sd.items()}


def _size_name(width, depth):
  for name, arch in vit.VARIANTS.items():
    if (arch["width"], arch["depth"]) == (width, depth):
      return name
  return None


def _cnn_name(units):
  for name, known in hybrid.RESNETS.items():
    if tuple(known) == tuple(units):
      return name
  return None


def _variant_of(width, depth, patch, units):
  """"S/16" / "R50+B/16" from a checkpoint's sizes; None when they are not
  one of the variant table's."""
  size = _size_name(width, depth)
  if size is None:
    return None
  if not units:
    return f"{size}/{patch}"
  cnn = _cnn_name(units)
  return cnn and f"{cnn}+{size}/{hybrid.stride_of(units) * patch}"


def _units(names, pattern):
  """Units per stage of a ResNet from parameter names matching `pattern`
  (groups: stage, unit)."""
  per_stage = {}
  for name in names:
    m = re.match(pattern, name)
    if m:
      stage, unit = int(m.group(1)), int(m.group(2))
      per_stage[stage] = max(per_stage.get(stage, 0), unit)
  return tuple(per_stage[k] for k in sorted(per_stage))


def timm_variant(sd):
  """(variant, distilled) of a timm ViT / hybrid state dict, or None."""
  w = sd.get("patch_embed.proj.weight")
  if w is None:
    return None
  depth = len({n.split(".")[1] for n in sd if n.startswith("blocks.")})
  units = _units(sd, r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.")
  units = tuple(u + 1 for u in units)  # timm counts blocks from 0
  variant = _variant_of(w.shape[0], depth, w.shape[-1], units)
  return variant and (variant, "dist_token" in sd)


def npz_variant(ckpt):
  """(variant, False) of a Google ViT / R50+ViT npz mapping, or None."""
  w = ckpt.get("embedding/kernel")
  if w is None:
    return None
  depth = len({n.split("/")[1] for n in ckpt
               if n.startswith("Transformer/encoderblock_")})
  units = _units(ckpt, r"block(\d+)/unit(\d+)/")
  variant = _variant_of(w.shape[-1], depth, w.shape[0], units)
  return variant and (variant, False)
