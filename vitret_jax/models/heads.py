"""Retrieval heads: from encoder outputs to an L2-normalised descriptor."""
from typing import Any, Optional

import flax.linen as nn
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
