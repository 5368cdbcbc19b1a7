"""Model zoo: `build_model(model_cfg)` = encoder + retrieval head.

Dispatch goes through the explicit `ENCODERS` / `HEADS` dicts; an unknown name
is an error that lists the valid ones.
"""
import flax.linen as nn
import jax.numpy as jnp

from vitret_jax.errors import UserError
from vitret_jax.models import heads
from vitret_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class RetrievalModel(nn.Module):
  """Encoder then head: `images [B, H, W, 3] -> descriptors [B, E]`."""
  encoder: nn.Module
  head: nn.Module

  def __call__(self, images, train: bool = False):
    return self.head(self.encoder(images, train=train))


class PooledEncoder(nn.Module):
  """The encoder alone, returning its pooled features [B, D] (timm's
  pre-logits features; what weight-import parity is checked on)."""
  encoder: nn.Module

  def __call__(self, images, train: bool = False):
    return self.encoder(images, train=train)["pooled"]


def _build_vit(cfg, dtype):
  arch = vit.decode_variant(cfg.variant)
  return vit.VisionTransformer(
      **arch, image_size=cfg.image_size, dropout=cfg.dropout,
      drop_path_rate=cfg.drop_path_rate, dtype=dtype, remat=cfg.remat,
      distilled=cfg.get("distilled", False),
      backbone_dtype=DTYPES[cfg.get("backbone_dtype", "float32")],
      locality_blocks=tuple(cfg.get("locality_blocks", ())),
      # A run saved before `locality_form` existed used "inverted".
      locality_form=cfg.get("locality_form", "inverted"),
      scan=cfg.get("scan", False), name="encoder")


def _build_irt_head(cfg, dtype):
  return heads.IrtHead(proj_dim=cfg.proj_dim or None, dtype=dtype, name="head")


def _build_dtop_head(cfg, dtype):
  d = cfg.get("dtop", {})
  return heads.DToPHead(num_layers=d.get("num_layers", 4),
                        out_dim=cfg.proj_dim or 512, gem_p=d.get("gem_p", 3.0),
                        # Runs saved before `gem_input` existed clamped.
                        gem_input=d.get("gem_input", "clamp"),
                        layer_norm=d.get("layer_norm", True), dtype=dtype,
                        name="head")


ENCODERS = {"vit": _build_vit}
HEADS = {"irt": _build_irt_head, "dtop": _build_dtop_head}


def _choose(table, kind, what):
  if kind not in table:
    raise UserError(f"Unknown {what} {kind!r}; valid choices: {sorted(table)}.")
  return table[kind]


def input_stride(model) -> int:
  """Input pixels per token side of a model's encoder (image sides must be
  multiples of it); 1 for a model without one."""
  return getattr(getattr(model, "encoder", None), "stride", 1)


def build_model(cfg) -> RetrievalModel:
  """Builds the model from the `config.model` section."""
  if cfg.dtype not in DTYPES:
    raise UserError(f"model.dtype={cfg.dtype!r}; valid: {sorted(DTYPES)}.")
  dtype = DTYPES[cfg.dtype]
  encoder = _choose(ENCODERS, cfg.encoder, "model.encoder")(cfg, dtype)
  head = _choose(HEADS, cfg.head, "model.head")(cfg, dtype)
  return RetrievalModel(encoder=encoder, head=head)
