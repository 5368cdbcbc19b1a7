"""Vision Transformer (ViT / DeiT) encoder and its variant table.

Variants are strings "<size>/<patch>" ("Ti/16", "S/16", "B/32", ...) decoded by
`decode_variant` from the one `VARIANTS` table.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitret_jax.errors import UserError
from vitret_jax.models import layers

# width, depth, mlp_dim, num_heads (ViT paper / DeiT; "mu" is a test-size model).
VARIANTS = {
    "mu": dict(width=32, depth=2, mlp_dim=128, num_heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
}


def decode_variant(variant: str) -> dict:
  """"S/16" -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=16)."""
  size, sep, patch = variant.partition("/")
  if size not in VARIANTS or not sep or not patch.isdigit():
    raise UserError(
        f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' with size "
        f"one of {sorted(VARIANTS)} and an integer patch, e.g. 'S/16'.")
  return dict(VARIANTS[size], patch_size=int(patch))


def resample_posemb(posemb, grid_hw):
  """[1, 1 + g*g, D] -> [1, 1 + h*w, D]: the patch part resized (cubic) to an
  h x w grid, the class-token part kept. No-op when the grid already fits, so
  any input resolution and aspect ratio works (multi-scale evaluation,
  landmark images at their own aspect)."""
  h, w = grid_hw
  n = posemb.shape[1] - 1
  if n == h * w:
    return posemb
  g = int(round(n ** 0.5))
  tok, grid = posemb[:, :1], posemb[:, 1:].reshape(1, g, g, -1)
  grid = jax.image.resize(grid, (1, h, w, grid.shape[-1]), method="cubic")
  return jnp.concatenate([tok, grid.reshape(1, h * w, -1)], axis=1)


class VisionTransformer(nn.Module):
  """ViT encoder: patch embedding, class token, position embedding, blocks.

  Attributes:
    patch_size: side of the square patches.
    width, depth, mlp_dim, num_heads: transformer size.
    image_size: input side the position embedding is made for.
    dropout: dropout rate; drop_path_rate: stochastic depth of the last block.
    dtype: compute dtype (bfloat16 for mixed precision; parameters stay fp32).
    remat: rematerialise blocks in the backward pass.

  Returns, from `__call__(images [B, H, W, 3], train)`, a dict with
    "cls" [B, D] (class token after the final LayerNorm), "tokens" [B, N, D]
    (patch tokens after the final LayerNorm) and "hidden", the list of every
    block's raw output [B, 1 + N, D].
  """
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  image_size: int = 224
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
      raise ValueError(f"Image size {images.shape[1:3]} is not a multiple of "
                       f"the patch size {self.patch_size}.")
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=self.patch_size,
                padding="VALID", dtype=self.dtype, name="embedding")(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
    grid = self.image_size // self.patch_size
    posemb = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                        (1, 1 + grid * grid, d))
    x = x + resample_posemb(posemb, (h, w)).astype(x.dtype)
    x = nn.Dropout(self.dropout)(x, not train)
    x, hidden = layers.Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout=self.dropout, drop_path_rate=self.drop_path_rate,
        dtype=self.dtype, remat=self.remat, name="Transformer")(x, not train)
    return {"cls": x[:, 0], "tokens": x[:, 1:], "hidden": hidden}
