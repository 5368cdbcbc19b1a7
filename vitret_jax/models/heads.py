"""Retrieval heads: from encoder outputs to an L2-normalised descriptor."""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x, eps: float = 1e-12):
  """Rows of `x` [B, E] scaled to unit L2 norm (computed in float32)."""
  x = x.astype(jnp.float32)
  sq_norm = jnp.sum(x * x, axis=-1, keepdims=True)
  # The floor keeps a zero row (and its gradient) finite instead of NaN.
  return x / jnp.sqrt(jnp.maximum(sq_norm, eps * eps))


class IrtHead(nn.Module):
  """IRT head: the class token, an optional linear projection, L2 norm.

  Attributes:
    proj_dim: output dimension of a linear projection; None keeps the class
      token as it is (the IRT paper's choice).
    dtype: compute dtype of the projection.

  `__call__(features)` takes the encoder's dict and returns [B, E].
  """
  proj_dim: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    x = features["cls"]
    if self.proj_dim:
      x = nn.Dense(self.proj_dim, dtype=self.dtype, name="projection")(x)
    return l2_normalize(x)


GEM_INPUTS = ("softplus", "clamp")


class GeMPool(nn.Module):
  """Generalised mean over tokens: (mean(f(x)^p))^(1/p), `[B, N, D] ->
  [B, D]`; p is learnable (initial `p`), clamped at 1 from below.

  GeM needs non-negative inputs. `positive` chooses f:
    "softplus" (default): log(1 + e^x), floored at eps: smooth, every
      value keeps a gradient, large activations pass almost unchanged.
    "clamp": max(x, eps), GeM's usual form on post-ReLU CNN maps. On
      LayerNorm outputs (zero-mean per token) it sets about half of the
      values to eps, with no gradient through them.

  Attributes:
    p: initial exponent (3, the usual landmark-retrieval value).
    eps: floor that keeps the power and its gradient in p finite.
    positive: "softplus" or "clamp".
  """
  p: float = 3.0
  eps: float = 1e-6
  positive: str = "softplus"

  @nn.compact
  def __call__(self, x):
    if self.positive not in GEM_INPUTS:
      raise ValueError(f"model.dtop.gem_input={self.positive!r}; valid: "
                       f"{GEM_INPUTS}.")
    p = jnp.maximum(self.param("p", nn.initializers.constant(self.p), ()), 1.0)
    x = x.astype(jnp.float32)
    if self.positive == "softplus":
      x = jax.nn.softplus(x)
    x = jnp.maximum(x, self.eps)
    return jnp.mean(x ** p, axis=1) ** (1.0 / p)


class DToPHead(nn.Module):
  """DToP head: a global branch (class tokens) and a local branch (patch
  tokens, GeM-pooled), each collected from the last `num_layers` blocks,
  concatenated, projected and L2-normalised (docs/dtop.md lists which of
  these choices the paper states and which are defaults of ours).

  Attributes:
    num_layers: blocks collected per branch (default 4, the last four).
    out_dim: descriptor dimension.
    gem_p: initial GeM exponent; gem_input: GeMPool's positive mapping.
    layer_norm: normalise each collected block output with its own LayerNorm
      (the last block's output is otherwise the only normalised one).
    dtype: compute dtype of the projection.
  """
  num_layers: int = 4
  out_dim: int = 512
  gem_p: float = 3.0
  gem_input: str = "softplus"
  layer_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    if self.num_layers > len(features["hidden"]):
      raise ValueError(f"model.dtop.num_layers={self.num_layers} exceeds the "
                       f"encoder's {len(features['hidden'])} blocks.")
    hidden = features["hidden"][-self.num_layers:]
    prefix = features["num_prefix"]
    glob, loc = [], []
    for i, h in enumerate(hidden):
      if self.layer_norm:
        h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"norm_{i}")(h)
      glob.append(h[:, 0])
      loc.append(GeMPool(self.gem_p, positive=self.gem_input,
                         name=f"gem_{i}")(h[:, prefix:]))
    x = jnp.concatenate(glob + loc, axis=-1)
    x = nn.Dense(self.out_dim, dtype=self.dtype, name="projection")(x)
    return l2_normalize(x)
