"""The one definition of FLOPs and peak rates the benchmarks use: the
model's own count (MFU's numerator, PaLM appendix B; MaxText and big_vision
count the same way) and the chips' peak dense bfloat16 rates (MFU's
denominator and the projections' divisor).

The model's count is matmul FLOPs, 2 per multiply-add, per image. For a
plain ViT it has a closed form (`vit_flops`), forward:
  patch embedding   2 N (3 p^2) D
  each of L blocks  8 T D^2 (q, k, v, output) + 4 T^2 D (scores, and
                    weights x values) + 4 T D M (MLP)
  head              2 D E (the IRT projection, when model.proj_dim is set)
with N = (S/p)^2 patches of p px in an S px image, T = N + 1 tokens (+1
distilled), width D, MLP width M. A train step is 3x its forward (the
backward is 2x) times the batch. Other models (a hybrid's ResNet, DToP's
head) are counted from their traced forward by profiling.matmul_flops,
the same quantity (tests/test_benchmark_tools.py checks the closed form
against it exactly).
"""
import re

# Peak dense (no sparsity) bfloat16 FLOP/s per chip, from the vendors' data
# sheets, keyed by a pattern that must match the whole of jax's
# device_kind (case and spacing aside): "NVIDIA L40" is not an L4, nor an
# "H200 NVL" an H200. A device not listed gets no MFU.
PEAK_BF16 = (
    (r"NVIDIA H100 PCIe", 756e12),
    (r"NVIDIA H100 NVL", 835e12),
    (r"NVIDIA H100( SXM\d?)?( \d+GB)?( HBM3e?)?", 989e12),
    (r"NVIDIA H200 NVL", 835e12),
    (r"NVIDIA H200( SXM\d?)?( \d+GB)?( HBM3e?)?", 989e12),
    (r"NVIDIA GH200( \d+GB)?( HBM3e?)?", 989e12),
    (r"NVIDIA A100([- ].*)?", 312e12),
    (r"NVIDIA L4", 121e12),
    (r"NVIDIA L40", 181e12),
    (r"NVIDIA L40S", 362e12),
    (r"AMD Instinct MI300X( .*)?", 1307e12),
    (r"TPU v4", 275e12),
    (r"TPU v5 ?lite|TPU v5e", 197e12),
    (r"TPU v5p?", 459e12),  # jax names a v5p "TPU v5"
    (r"TPU v6 ?lite|TPU v6e", 918e12),
)
H100 = "NVIDIA H100 80GB HBM3"  # the SXM card's device_kind
TPU_V5E = "TPU v5 lite"


def peak_flops(device_kind):
  """Peak dense bf16 FLOP/s of one chip of `device_kind`, or None."""
  kind = " ".join(str(device_kind).split())
  for pattern, peak in PEAK_BF16:
    if re.fullmatch(pattern, kind, re.IGNORECASE):
      return peak
  return None


def vit_flops(cfg, batch=1):
  """The model's own FLOPs of a train step of `batch` images of the
  `config.model` section `cfg` (module doc), or None for a model the
  closed form does not cover (a hybrid, a DToP head, locality blocks)."""
  from vitret_jax.models import vit  # pylint: disable=g-import-not-at-top
  arch = vit.decode_variant(cfg.variant)
  if arch["resnet"] or cfg.head != "irt" or tuple(cfg.locality_blocks):
    return None
  d, m, p = arch["width"], arch["mlp_dim"], arch["patch_size"]
  n = (cfg.image_size // p) ** 2
  t = n + (2 if cfg.distilled else 1)
  forward = (2 * n * 3 * p * p * d
             + arch["depth"] * (8 * t * d * d + 4 * t * t * d + 4 * t * d * m)
             + 2 * d * (cfg.proj_dim or 0))
  return 3 * forward * batch


def forward_flops(cfg, height, width):
  """The model's own FLOPs of one forward pass of an image of height x
  width px: traced (profiling.matmul_flops) with XLA's attention, whose
  matmuls the trace shows (a cuDNN kernel would hide them)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  from vitret_jax import profiling  # pylint: disable=g-import-not-at-top
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.attention, cfg.dtype = "xla", "float32"
  model = models.build_model(cfg)
  x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return profiling.matmul_flops(
      lambda v, x: model.apply(v, x, train=False), variables, x)


def train_flops(cfg, batch=1):
  """The model's own FLOPs of a train step: the closed form where it
  applies, else 3x the traced forward at the model's size."""
  closed = vit_flops(cfg, batch)
  if closed is not None:
    return closed
  return 3 * batch * forward_flops(cfg, cfg.image_size, cfg.image_size)
