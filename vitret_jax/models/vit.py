"""Vision Transformer (ViT / DeiT) encoder and its variant table.

Variants are strings "<size>/<patch>" ("Ti/16", "S/16", "B/32", ...) decoded by
`decode_variant` from the one `VARIANTS` table.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitret_jax.errors import UserError
from vitret_jax.models import hybrid
from vitret_jax.models import layers

# width, depth, mlp_dim, num_heads (ViT paper / DeiT; "mu" is a test-size
# model).
VARIANTS = {
    "mu": dict(width=32, depth=2, mlp_dim=128, num_heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
}


def decode_variant(variant: str) -> dict:
  """"S/16" -> dict(width=384, ..., patch_size=16, resnet=());
  "R50+B/16" (hybrid) -> ViT-B on the stride-16 map of ResNetV2-50:
  dict(width=768, ..., patch_size=1, resnet=(3, 4, 9))."""
  cnn, plus, rest = variant.rpartition("+")
  size, sep, patch = rest.partition("/")
  valid = (size in VARIANTS and sep and patch.isdigit()
           and (not plus or cnn in hybrid.RESNETS))
  if not valid:
    raise UserError(
        f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' with size "
        f"one of {sorted(VARIANTS)} (e.g. 'S/16'), or a hybrid "
        f"'<cnn>+<size>/<stride>' with cnn one of {sorted(hybrid.RESNETS)} "
        f"(e.g. 'R50+B/16').")
  if not plus:
    return dict(VARIANTS[size], patch_size=int(patch), resnet=(),
                resnet_width=64)
  units = hybrid.RESNETS[cnn]
  if hybrid.stride_of(units) != int(patch):
    raise UserError(f"{variant!r}: {cnn} gives stride "
                    f"{hybrid.stride_of(units)}, not {patch}.")
  return dict(VARIANTS[size], patch_size=1, resnet=tuple(units),
              resnet_width=hybrid.WIDTHS.get(cnn, 64))


def resample_posemb(posemb, grid_hw, num_prefix=1):
  """[1, P + g*g, D] -> [1, P + h*w, D]: the grid part resized (cubic) to an
  h x w grid, the P prefix tokens' part kept. No-op when the grid already
  fits, so any input resolution and aspect ratio works (multi-scale
  evaluation, landmark images at their own aspect, checkpoints made for
  another resolution)."""
  h, w = grid_hw
  n = posemb.shape[1] - num_prefix
  if n == h * w:
    return posemb
  g = int(round(n ** 0.5))
  tok, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
  grid = grid.reshape(1, g, g, -1)
  grid = jax.image.resize(grid, (1, h, w, grid.shape[-1]), method="cubic")
  return jnp.concatenate([tok, grid.reshape(1, h * w, -1)], axis=1)


class VisionTransformer(nn.Module):
  """ViT / DeiT encoder, optionally hybrid (a ResNetV2 in front).

  Attributes:
    patch_size: side of the patches (of the backbone's feature map if any).
    width, depth, mlp_dim, num_heads: transformer size.
    image_size: input side the position embedding is made for.
    resnet: units per ResNetV2 stage for a hybrid; () = plain ViT.
    resnet_width: the ResNetV2's stem width (64 as published).
    distilled: add DeiT's distillation token after the class token.
    dropout: dropout rate; drop_path_rate: stochastic depth of the last block.
    dtype: compute dtype (bfloat16 for mixed precision; parameters stay fp32).
    remat: rematerialise blocks in the backward pass.
    scan: scan over the transformer blocks (layers.Encoder), same parameters.
    locality_blocks: blocks with a locality-enhanced MLP (DToP);
      locality_form: its form (layers.LocalityMlp).
    attention: the resolved attention implementation ("cpu", "xla",
      "cudnn"; models/attention.py). It changes no parameter.
    backbone_dtype: compute dtype of a hybrid's CNN. float32 by default even
      when `dtype` is bfloat16: bf16 activations through a ResNet roughly
      double the descriptor error per stage (R26: 4e-2 relative vs 1e-2 for
      the transformer alone, tools/timm_parity.py); set bfloat16 for speed.

  Returns, from `__call__(images [B, H, W, 3], train)`, a dict with
    "cls" [B, D] (class token after the final LayerNorm), "dist" [B, D]
    (distillation token, if any), "pooled" [B, D] (timm's pre-logits
    features: the class token, or the mean of class and distillation tokens),
    "tokens" [B, N, D] (patch tokens after the final LayerNorm), "hidden"
    (every block's raw output [B, P + N, D]) and "num_prefix" (P).
  """
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  image_size: int = 224
  resnet: Sequence[int] = ()
  resnet_width: int = 64
  distilled: bool = False
  dropout: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  locality_blocks: Sequence[int] = ()
  backbone_dtype: Any = jnp.float32
  scan: bool = False
  locality_form: str = "residual"
  attention: str = "cpu"

  @property
  def stride(self) -> int:
    """Input pixels per token side (backbone stride x patch size)."""
    cnn = hybrid.stride_of(self.resnet) if self.resnet else 1
    return cnn * self.patch_size

  @property
  def num_prefix(self) -> int:
    return 2 if self.distilled else 1

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.shape[1] % self.stride or images.shape[2] % self.stride:
      raise ValueError(f"Image size {images.shape[1:3]} is not a multiple of "
                       f"the encoder's stride {self.stride}.")
    x = images
    if self.resnet:
      x = hybrid.ResNetV2(self.resnet, self.resnet_width,
                          cn=hybrid.ConvNorm(dtype=self.backbone_dtype),
                          name="backbone")(x)
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=self.patch_size,
                padding="VALID", dtype=self.dtype, name="embedding")(x)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    prefix = [self.param("cls", nn.initializers.zeros, (1, 1, d))]
    if self.distilled:
      prefix.append(self.param("dist", nn.initializers.zeros, (1, 1, d)))
    x = jnp.concatenate(
        [jnp.tile(t, (b, 1, 1)).astype(x.dtype) for t in prefix] + [x], axis=1)
    grid = self.image_size // self.stride
    posemb = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                        (1, self.num_prefix + grid * grid, d))
    # The residual stream stays float32 whatever the compute dtype: bf16 then
    # only enters the matmuls (mixed precision), not the running sums.
    x = x.astype(jnp.float32) + resample_posemb(posemb, (h, w), self.num_prefix)
    x = nn.Dropout(self.dropout)(x, not train)
    x, hidden = layers.Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout=self.dropout, drop_path_rate=self.drop_path_rate,
        dtype=self.dtype, remat=self.remat,
        locality_blocks=tuple(self.locality_blocks), grid_hw=(h, w),
        num_prefix=self.num_prefix, locality_form=self.locality_form,
        scan=self.scan, attention=self.attention,
        name="Transformer")(x, not train)
    out = {"cls": x[:, 0], "tokens": x[:, self.num_prefix:], "hidden": hidden,
           "num_prefix": self.num_prefix, "pooled": x[:, 0]}
    if self.distilled:
      out["dist"] = x[:, 1]
      out["pooled"] = (x[:, 0] + x[:, 1]) / 2
    return out
