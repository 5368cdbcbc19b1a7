"""Transformer building blocks shared by the ViT and hybrid encoders.

Submodule names (`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3`, `encoderblock_{i}`, `encoder_norm`) follow the Google ViT /
big_vision
checkpoints so that their `.npz` files map onto these modules by name.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitret_jax.models import attention

# timm and the Google checkpoints both use LayerNorm eps 1e-6 and exact GELU;
# the tanh approximation moves pooled features far above the parity bounds
# (docs/benchmarks.md, "Figures behind code choices").
LN_EPS = 1e-6


@jax.custom_vjp
def gelu(x):
  """Exact (erf) GELU, with its derivative written out: Phi(x) + x phi(x),
  one fused pass where autodiff of Flax's form makes several (what it
  saves: docs/benchmarks.md, "Figures behind code choices")."""
  return nn.gelu(x, approximate=False)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, dy):
  xf = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * 0.7071067811865476))
  pdf = jnp.exp(-0.5 * xf * xf) * 0.3989422804014327
  return ((dy.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example.

  Attributes:
    rate: probability of dropping the branch; kept branches are scaled by
      1 / (1 - rate) so the expectation is unchanged.
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    # `rate` may be a traced value (Encoder's scanned blocks).
    if deterministic or (isinstance(self.rate, (int, float)) and
                         self.rate == 0.0):
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


LOCALITY_FORMS = ("residual", "inverted")


class LocalityMlp(nn.Module):
  """MLP with a depth-wise 3x3 convolution over the patch-token grid between
  its two Dense layers (DToP's locality enhancement, after LocalViT). Prefix
  tokens (class, distillation) bypass the convolution. Names keep Dense_0 /
  Dense_1 of MlpBlock, so pretrained MLP weights load.

  Forms (`form`):
    "residual" (default): h + GELU(dwconv(h)) with the convolution
      zero-initialised, so a block loaded from a pretrained checkpoint
      computes exactly its plain MLP at step 0 and the locality branch
      grows from there.
    "inverted": GELU(dwconv(h)), LocalViT's inverted residual as is; the
      fresh convolution replaces the pretrained MLP's hidden features at
      step 0.

  Attributes:
    mlp_dim, dropout, dtype: as MlpBlock.
    grid_hw: (h, w) of the patch-token grid.
    num_prefix: tokens before the grid.
    form: "residual" or "inverted".
  """
  mlp_dim: int
  grid_hw: Tuple[int, int]
  num_prefix: int = 1
  dropout: float = 0.0
  dtype: Any = jnp.float32
  form: str = "residual"

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if self.form not in LOCALITY_FORMS:
      raise ValueError(f"model.locality_form={self.form!r}; valid: "
                       f"{LOCALITY_FORMS}.")
    d = x.shape[-1]
    x = gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x))
    prefix, grid = x[:, :self.num_prefix], x[:, self.num_prefix:]
    b = grid.shape[0]
    h, w = self.grid_hw
    grid = grid.reshape(b, h, w, self.mlp_dim)
    residual = self.form == "residual"
    init = nn.initializers.zeros if residual else nn.linear.default_kernel_init
    local = gelu(nn.Conv(self.mlp_dim, (3, 3), padding="SAME",
                         feature_group_count=self.mlp_dim, dtype=self.dtype,
                         kernel_init=init, name="dwconv")(grid))
    grid = (grid + local) if residual else local
    x = jnp.concatenate([prefix, grid.reshape(b, h * w, self.mlp_dim)], axis=1)
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
    locality_grid: (h, w) of the patch grid to use a LocalityMlp, or None
      for the plain MLP; num_prefix: tokens before the grid; locality_form:
      the LocalityMlp's form.
    attention: the resolved attention implementation ("cpu", "xla",
      "cudnn"; models/attention.py).
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  locality_grid: Optional[Tuple[int, int]] = None
  num_prefix: int = 1
  locality_form: str = "residual"
  attention: str = "cpu"

  @nn.compact
  def __call__(self, x, deterministic: bool):
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        force_fp32_for_softmax=True,
        attention_fn=attention.make_attention_fn(self.attention),
        name="MultiHeadDotProductAttention_1")(y, y, deterministic=True)
    y = nn.Dropout(self.dropout)(y, deterministic)
    x = x + DropPath(self.drop_path)(y, deterministic)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="LayerNorm_2")(x)
    if self.locality_grid is None:
      mlp = MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="MlpBlock_3")
    else:
      mlp = LocalityMlp(self.mlp_dim, self.locality_grid, self.num_prefix,
                        self.dropout, self.dtype, self.locality_form,
                        name="MlpBlock_3")
    y = mlp(y, deterministic)
    return x + DropPath(self.drop_path)(y, deterministic)


class Encoder(nn.Module):
  """A stack of `EncoderBlock`s and the final LayerNorm,
  `[B, N, D] -> [B, N, D]`.

  Attributes:
    depth: number of blocks.
    mlp_dim, num_heads, dropout, dtype: as in `EncoderBlock`.
    drop_path_rate: stochastic depth of the last block; it grows linearly from
      0 at the first block (the DeiT / timm schedule).
    remat: recompute each block's activations in the backward pass.
    scan: run each stretch of identical blocks as one `lax.scan` over their
      stacked parameters (one compiled block instead of `depth`: shorter
      compiles for deep models). The parameter tree is the unscanned one
      (`encoderblock_{i}`), so checkpoints and weight files work either way;
      drop-path draws other random masks than the unrolled loop.
    locality_blocks: indices of the blocks whose MLP is a LocalityMlp
      (negative counts from the end); they need `grid_hw` and `num_prefix`;
      locality_form: their form (LocalityMlp).
    attention: the blocks' attention implementation (EncoderBlock).
  Returns (final-normed tokens, list of every block's raw output).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  locality_blocks: Sequence[int] = ()
  grid_hw: Optional[Tuple[int, int]] = None
  num_prefix: int = 1
  locality_form: str = "residual"
  scan: bool = False
  attention: str = "cpu"

  def _rate(self, i):
    return self.drop_path_rate * i / max(1, self.depth - 1)

  def _block_args(self, i, rate):
    local = {j % self.depth for j in self.locality_blocks}
    return (self.mlp_dim, self.num_heads, self.dropout, rate, self.dtype,
            self.grid_hw if i in local else None, self.num_prefix,
            self.locality_form, self.attention)

  def _runs(self):
    """[start, end) stretches of blocks of one kind (plain / locality)."""
    local = {j % self.depth for j in self.locality_blocks}
    runs, start = [], 0
    for i in range(1, self.depth + 1):
      if i == self.depth or (i in local) != (start in local):
        runs.append((start, i))
        start = i
    return runs

  @nn.compact
  def __call__(self, x, deterministic: bool):
    block_cls = EncoderBlock
    if self.remat:
      block_cls = nn.remat(EncoderBlock, static_argnums=(2,))
    blocks = [block_cls(*self._block_args(i, self._rate(i)),
                        name=f"encoderblock_{i}") for i in range(self.depth)]
    hidden = []
    if self.scan and not self.is_initializing():
      for start, end in self._runs():
        x, outs = self._scan_run(x, deterministic, start, end)
        hidden += outs
    else:
      for block in blocks:
        x = block(x, deterministic)
        hidden.append(x)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="encoder_norm")(x)
    return x, hidden

  def _scan_run(self, x, deterministic, start, end):
    """Blocks start..end-1 as one lax.scan over their stacked parameters."""
    params = self.variables["params"]
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *[
        params[f"encoderblock_{i}"] for i in range(start, end)])
    rates = jnp.asarray([self._rate(i) for i in range(start, end)],
                        jnp.float32)
    n = end - start
    random = not deterministic and (self.drop_path_rate > 0 or
                                    self.dropout > 0)
    keys = (jax.random.split(self.make_rng("dropout"), n) if random
            else jnp.zeros((n,), jnp.uint32))

    def body(h, inputs):
      p, rate, key = inputs
      block = EncoderBlock(*self._block_args(
          start, rate if self.drop_path_rate > 0 else 0.0), parent=None)
      rngs = {"dropout": key} if random else None
      h = block.apply({"params": p}, h, deterministic, rngs=rngs)
      return h, h

    if self.remat:
      body = jax.checkpoint(body)
    x, ys = jax.lax.scan(body, x, (stacked, rates, keys))
    return x, [ys[i] for i in range(n)]
