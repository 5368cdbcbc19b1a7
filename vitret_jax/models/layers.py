"""Transformer building blocks shared by the ViT and hybrid encoders.

Submodule names (`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3`, `encoderblock_{i}`, `encoder_norm`) follow the Google ViT / big_vision
checkpoints so that their `.npz` files map onto these modules by name.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# timm and the Google checkpoints both use LayerNorm eps 1e-6 and exact GELU;
# the tanh approximation moves pooled features by ~1e-3, far above parity.
LN_EPS = 1e-6


def gelu(x):
  return nn.gelu(x, approximate=False)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example.

  Attributes:
    rate: probability of dropping the branch; kept branches are scaled by
      1 / (1 - rate) so the expectation is unchanged.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense, `[B, N, D] -> [B, N, D]`.

  Attributes:
    mlp_dim: hidden width.
    dropout: dropout rate after each Dense.
    dtype: compute dtype (parameters stay float32).
  """
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
    x = gelu(x)
    x = nn.Dropout(self.dropout)(x, deterministic)
    x = nn.Dense(d, dtype=self.dtype, name="Dense_1")(x)
    return nn.Dropout(self.dropout)(x, deterministic)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)).

  Attributes:
    mlp_dim: MLP hidden width.
    num_heads: attention heads.
    dropout: dropout rate (MLP and after attention).
    drop_path: stochastic-depth rate of this block.
    dtype: compute dtype.
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        name="MultiHeadDotProductAttention_1")(y, y, deterministic=True)
    y = nn.Dropout(self.dropout)(y, deterministic)
    x = x + DropPath(self.drop_path)(y, deterministic)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="LayerNorm_2")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="MlpBlock_3")(
        y, deterministic)
    return x + DropPath(self.drop_path)(y, deterministic)


class Encoder(nn.Module):
  """A stack of `EncoderBlock`s and the final LayerNorm, `[B, N, D] -> [B, N, D]`.

  Attributes:
    depth: number of blocks.
    mlp_dim, num_heads, dropout, dtype: as in `EncoderBlock`.
    drop_path_rate: stochastic depth of the last block; it grows linearly from
      0 at the first block (the DeiT / timm schedule).
    remat: recompute each block's activations in the backward pass.
    return_all: also return every block's output (for multi-layer heads).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool):
    block_cls = EncoderBlock
    if self.remat:
      block_cls = nn.remat(EncoderBlock, static_argnums=(2,))
    hidden = []
    for i in range(self.depth):
      rate = self.drop_path_rate * i / max(1, self.depth - 1)
      x = block_cls(self.mlp_dim, self.num_heads, self.dropout, rate,
                    self.dtype, name=f"encoderblock_{i}")(x, deterministic)
      hidden.append(x)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="encoder_norm")(x)
    return x, hidden
