"""ResNetV2 backbone of the hybrid (CNN + ViT) encoders.

The hybrid encoder is `vit.VisionTransformer` with this backbone in front: the
backbone's feature map (stride 16 for R50, 32 for R26) is embedded by a 1x1
"patch" convolution and the same transformer encoder code runs on it.

Non-pre-activation ResNetV2 as in the Google R50+ViT checkpoints and timm's
`vit_base_r50_s16_*` / `vit_small_r26_s32_224`: weight-standardised convs
with TF "SAME" padding, GroupNorm(32), a 7x7/2 stem and a 3x3/2 max pool,
bottleneck units with the stride on the 3x3 conv. Names follow the Google
checkpoints: conv_root, gn_root, block{i}/unit{j}/{conv,gn}{1,2,3,_proj}.
"""
import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Units per stage of the backbones the hybrids use. "Rmu" is a test-size
# backbone of ours (one unit per stage, stem width 32 instead of 64; no
# published checkpoint): R26's four stages and stride at ~1/7 of its
# parameters, for runlocal configs and tests.
RESNETS = {"R50": (3, 4, 9), "R26": (2, 2, 2, 2), "Rmu": (1, 1, 1, 1)}
# Stem width where not the published 64 (GroupNorm(32) needs a multiple of
# 32).
WIDTHS = {"Rmu": 32}


class StdConv(nn.Module):
  """Conv with weight standardisation (per output channel, biased variance).

  Attributes:
    features, kernel_size, strides: as nn.Conv (no bias; padding "SAME").
    eps: added to the variance (1e-8 in timm's hybrids).
    dtype: compute dtype.
  """
  features: int
  kernel_size: int
  strides: int = 1
  eps: float = 1e-8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    w = self.param("kernel", nn.initializers.lecun_normal(),
                   (k, k, x.shape[-1], self.features))
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    w = (w - mean) / jnp.sqrt(var + self.eps)
    # Products in `dtype`, sums in float32 (as TPU / GPU convolutions do; the
    # CPU backend would otherwise accumulate bf16 in bf16).
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), w.astype(self.dtype), (self.strides,) * 2,
        "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32)
    return y.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class ConvNorm:
  """How every backbone layer convolves and normalises: the weight
  standardisation eps (1e-8 in timm's hybrids), the GroupNorm(32) eps and
  the compute dtype. `conv` and `norm` make the named layers."""
  ws_eps: float = 1e-8
  gn_eps: float = 1e-5
  dtype: Any = jnp.float32

  def conv(self, features, kernel, strides, name):
    return StdConv(features, kernel, strides, self.ws_eps, self.dtype,
                   name=name)

  def norm(self, name):
    return nn.GroupNorm(32, epsilon=self.gn_eps, dtype=self.dtype, name=name)


class BottleneckUnit(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 with GroupNorm, projection shortcut when the
  shape changes; `[B, H, W, C] -> [B, H/s, W/s, 4 * features]`."""
  features: int
  strides: int = 1
  cn: ConvNorm = ConvNorm()

  @nn.compact
  def __call__(self, x):
    out, cn = 4 * self.features, self.cn
    residual = x
    if x.shape[-1] != out or self.strides != 1:
      residual = cn.norm("gn_proj")(cn.conv(out, 1, self.strides,
                                            "conv_proj")(x))
    y = nn.relu(cn.norm("gn1")(cn.conv(self.features, 1, 1, "conv1")(x)))
    y = nn.relu(cn.norm("gn2")(cn.conv(self.features, 3, self.strides,
                                       "conv2")(y)))
    y = cn.norm("gn3")(cn.conv(out, 1, 1, "conv3")(y))
    # Residual sum in float32 (bf16 only inside the convolutions).
    return nn.relu(residual.astype(jnp.float32) + y.astype(jnp.float32))


class ResNetV2(nn.Module):
  """Stem + stages; `[B, H, W, 3] -> [B, H/2^(1+S), W/2^(1+S), 256 * 2^(S-1)]`
  for S stages.

  Attributes:
    units: units per stage, e.g. (3, 4, 9) for R50 (3 stages, stride 16).
    width: stem width (64).
    cn: eps values and compute dtype of every layer.
  """
  units: Sequence[int]
  width: int = 64
  cn: ConvNorm = ConvNorm()

  @nn.compact
  def __call__(self, x):
    x = self.cn.conv(self.width, 7, 2, "conv_root")(x)
    x = nn.relu(self.cn.norm("gn_root")(x))
    # "SAME" max pooling pads with -inf, as TF and timm's MaxPool2dSame do.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, n in enumerate(self.units):
      x = ResNetStage(n, self.width * 2 ** i, 2 if i > 0 else 1, self.cn,
                      name=f"block{i + 1}")(x)
    return x


class ResNetStage(nn.Module):
  """`units` bottleneck units named unit1..unitN, the first with the stride."""
  units: int
  features: int
  strides: int
  cn: ConvNorm

  @nn.compact
  def __call__(self, x):
    for j in range(self.units):
      x = BottleneckUnit(self.features, self.strides if j == 0 else 1,
                         self.cn, name=f"unit{j + 1}")(x)
    return x


def stride_of(units) -> int:
  """Total stride of a backbone: 4 (stem) x 2 per stage after the first."""
  return 4 * 2 ** (len(units) - 1)
