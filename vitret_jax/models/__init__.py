"""Model zoo: `build_model(model_cfg)` = encoder + retrieval head.

Dispatch goes through the explicit `ENCODERS` / `HEADS` dicts; an unknown name
is an error that lists the valid ones. `model.dtype` and `model.attention`
may be "auto": `resolve` turns them into what runs on this backend (bfloat16
compute and cuDNN / XLA attention on accelerators, XLA's on AMD GPUs and
TPUs, float32 and the CPU kernel on CPUs); the parameters are the same
whatever they resolve to.
"""
import dataclasses

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from vitret_jax.errors import UserError
from vitret_jax.models import attention
from vitret_jax.models import heads
from vitret_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Compute precision of model.dtype="auto" per platform; parameters, optimizer
# state, the loss, LayerNorm statistics and softmax stay float32 regardless.
AUTO_DTYPE = {"cpu": "float32", "gpu": "bfloat16", "rocm": "bfloat16",
              "tpu": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Resolved:
  """What `model.dtype` and `model.attention` mean on a platform."""
  platform: str
  dtype: str
  attention: str
  why: str

  def as_dict(self):
    return dataclasses.asdict(self)


def gpu_platform(platform_version):
  """"rocm" for an AMD GPU backend, "gpu" for an NVIDIA (CUDA) one, from
  its client's platform_version ("rocm 60200", "cuda 12040"): JAX names
  both backends "gpu"."""
  version = str(platform_version).lower()
  return "rocm" if "rocm" in version or "hip" in version else "gpu"


def platform_name(platform=None):
  """"cpu", "gpu" (NVIDIA, CUDA), "rocm" (AMD) or "tpu": `platform` (a jax
  platform name) or the default backend's."""
  if platform is None:
    platform = jax.default_backend()
    if platform == "gpu":
      client = getattr(jax.devices()[0], "client", None)
      platform = gpu_platform(getattr(client, "platform_version", ""))
  return {"cuda": "gpu"}.get(platform, platform)


def _is_hopper_or_later():
  try:
    cc = jax.devices()[0].compute_capability
  except (AttributeError, RuntimeError):
    return False
  return float(cc) >= 9.0


def resolve(cfg, platform=None, hopper=None) -> Resolved:
  """The dtype and attention the `config.model` section `cfg` runs with on
  `platform` (default: this process's backend). A choice the platform
  cannot run is a UserError that names it and suggests "auto"."""
  platform = platform_name(platform)
  dtype = cfg.dtype
  if dtype == "auto":
    dtype = AUTO_DTYPE.get(platform, "float32")
  if dtype not in DTYPES:
    raise UserError(f"model.dtype={cfg.dtype!r}; valid: "
                    f"{sorted(DTYPES) + ['auto']}.")
  arch = vit.decode_variant(cfg.variant)
  if hopper is None:
    hopper = platform == "gpu" and _is_hopper_or_later()
  try:
    impl, why = attention.resolve(cfg.attention, platform, dtype,
                                  arch["width"] // arch["num_heads"], hopper)
  except ValueError as e:
    raise UserError(str(e)) from e
  return Resolved(platform, dtype, impl, why)


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


def _build_vit(cfg, dtype, impl):
  arch = vit.decode_variant(cfg.variant)
  return vit.VisionTransformer(
      **arch, image_size=cfg.image_size, dropout=cfg.dropout,
      drop_path_rate=cfg.drop_path_rate, dtype=dtype, remat=cfg.remat,
      distilled=cfg.distilled, backbone_dtype=DTYPES[cfg.backbone_dtype],
      locality_blocks=tuple(cfg.locality_blocks),
      locality_form=cfg.locality_form, scan=cfg.scan, attention=impl,
      name="encoder")


def _build_irt_head(cfg, dtype):
  return heads.IrtHead(proj_dim=cfg.proj_dim or None, dtype=dtype, name="head")


def _build_dtop_head(cfg, dtype):
  d = cfg.dtop
  return heads.DToPHead(num_layers=d.num_layers, out_dim=cfg.proj_dim or 512,
                        gem_p=d.gem_p, gem_input=d.gem_input,
                        layer_norm=d.layer_norm, dtype=dtype, name="head")


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


def build_model(cfg, platform=None, attention_impl="") -> RetrievalModel:
  """Builds the model of the `config.model` section for `platform` (default:
  this process's backend); `attention_impl` forces a resolved attention
  (export: "xla" for a forward that runs on every platform)."""
  resolved = resolve(cfg, platform)
  dtype = DTYPES[resolved.dtype]
  encoder = _choose(ENCODERS, cfg.encoder, "model.encoder")(
      cfg, dtype, attention_impl or resolved.attention)
  head = _choose(HEADS, cfg.head, "model.head")(cfg, dtype)
  return RetrievalModel(encoder=encoder, head=head)


def for_export(model, platforms):
  """`model` with the attention an artifact for `platforms` (jax.export
  names) is exported with: XLA's, which runs everywhere, for several; for
  one, what "auto" chooses there (the CPU kernel on cpu; cuDNN's on cuda
  where it can be lowered, that is, when exporting on an NVIDIA GPU)."""
  impl = "xla"
  if len(platforms) == 1:
    enc = model.encoder
    impl, _ = attention.resolve("auto", platforms[0],
                                jnp.dtype(enc.dtype).name,
                                enc.width // enc.num_heads)
    if impl == "cudnn" and platform_name() != "gpu":
      logging.info("Exporting for cuda from a %s host: cuDNN attention "
                   "cannot be lowered without an NVIDIA GPU; XLA's is "
                   "exported.", platform_name())
      impl = "xla"
  return model.clone(encoder=model.encoder.clone(attention=impl))
