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


def _build_vit(cfg, dtype):
  arch = vit.decode_variant(cfg.variant)
  return vit.VisionTransformer(
      **arch, image_size=cfg.image_size, dropout=cfg.dropout,
      drop_path_rate=cfg.drop_path_rate, dtype=dtype, remat=cfg.remat,
      name="encoder")


def _build_irt_head(cfg, dtype):
  return heads.IrtHead(proj_dim=cfg.proj_dim or None, dtype=dtype, name="head")


ENCODERS = {"vit": _build_vit}
HEADS = {"irt": _build_irt_head}


def _choose(table, kind, what):
  if kind not in table:
    raise UserError(f"Unknown {what} {kind!r}; valid choices: {sorted(table)}.")
  return table[kind]


def build_model(cfg) -> RetrievalModel:
  """Builds the model from the `config.model` section."""
  if cfg.dtype not in DTYPES:
    raise UserError(f"model.dtype={cfg.dtype!r}; valid: {sorted(DTYPES)}.")
  dtype = DTYPES[cfg.dtype]
  encoder = _choose(ENCODERS, cfg.encoder, "model.encoder")(cfg, dtype)
  head = _choose(HEADS, cfg.head, "model.head")(cfg, dtype)
  return RetrievalModel(encoder=encoder, head=head)
