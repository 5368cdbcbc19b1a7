"""Parity of vitret_jax's encoders with timm (needs torch and timm).

  python tools/timm_parity.py            # full-size table, every TIMM_MODELS
  python tools/timm_parity.py --golden   # rewrite tests/golden/*.npz

timm 1.0.31 imports torchvision, whose PyPI build (0.28.0) is CUDA-only; on a
CPU machine it imports once its two custom op schemas exist, which
`import_timm` defines first. Weights are random
(no pretrained weights can be downloaded here) and every tensor is drawn
afresh, norm scales included, so no path hides behind a zero init (timm
zero-initialises each bottleneck's last GroupNorm).
"""
import argparse
import functools
import os
import sys

import numpy as np

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "tests", "golden")


def import_timm():
  import torch  # pylint: disable=g-import-not-at-top
  try:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) "
               "-> Tensor")
  except RuntimeError:
    pass  # already defined (a real torchvision, or a second call)
  import timm  # pylint: disable=g-import-not-at-top
  return torch, timm


def randomize(model, seed=0):
  torch, _ = import_timm()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1 and name.endswith("weight"):  # norm scales
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 1:
        p.copy_(0.05 * noise)
      else:
        fan_in = max(1, int(np.prod(p.shape[1:])))
        p.copy_(noise / np.sqrt(fan_in) if fan_in > 1 else 0.2 * noise)
  return model.eval()


def pooled(model, x_nchw):
  torch, _ = import_timm()
  with torch.no_grad():
    return model.forward_head(model.forward_features(x_nchw),
                              pre_logits=True).numpy()


def state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def tiny_models():
  """name -> (timm module, our arch dict, image size): small members of every
  family (ViT, DeiT distilled, ResNetV2 hybrid)."""
  _, timm = import_timm()
  from timm.models import deit, resnetv2, vision_transformer  # pylint: disable=g-import-not-at-top
  from timm.layers import HybridEmbed, StdConv2dSame  # pylint: disable=g-import-not-at-top
  vit_kw = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=0)
  arch = dict(width=32, depth=2, mlp_dim=128, num_heads=2)
  backbone = resnetv2.ResNetV2(
      layers=(1, 1), num_classes=0, global_pool="", preact=False,
      stem_type="same", conv_layer=functools.partial(StdConv2dSame, eps=1e-8))
  return {
      "vit_tiny": (vision_transformer.VisionTransformer(patch_size=8, **vit_kw),
                   dict(arch, patch_size=8), False, 32),
      "deit_tiny_distilled": (deit.VisionTransformerDistilled(
          patch_size=8, **vit_kw), dict(arch, patch_size=8), True, 32),
      "hybrid_tiny": (vision_transformer.VisionTransformer(
          patch_size=1, embed_layer=functools.partial(
              HybridEmbed, backbone=backbone), **vit_kw),
                      dict(arch, patch_size=1, resnet=(1, 1)), False, 32),
  }


def write_golden():
  torch, _ = import_timm()
  os.makedirs(GOLDEN, exist_ok=True)
  for name, (model, arch, distilled, size) in tiny_models().items():
    randomize(model)
    x = torch.randn(2, 3, size, size,
                    generator=torch.Generator().manual_seed(1))
    out = {"input_nhwc": x.permute(0, 2, 3, 1).numpy(),
           "output": pooled(model, x),
           "arch": np.asarray(repr(dict(arch, distilled=distilled,
                                        image_size=size)))}
    out.update({"sd/" + k: v for k, v in state_dict(model).items()})
    np.savez_compressed(os.path.join(GOLDEN, f"{name}.npz"), **out)
    numbers = sum(v.size for v in out.values() if v.dtype != object)
    print(f"wrote {name}.npz ({numbers:,} numbers)")


def parity_ok(err32, rel16, amp16):
  """fp32: equal to timm within 1e-4 (absolute). bf16: the relative L2
  error against timm's fp32 output at most twice timm's own under
  torch.autocast bf16 on the same input: the two round to bf16 in
  different places, so a fixed bound would sit inside their spread
  (docs/benchmarks.md has the measured errors). Without a bf16 comparison
  (both NaN), fp32 alone decides."""
  bf16_ok = (np.isnan(rel16) and np.isnan(amp16)) or rel16 <= 2 * amp16
  return bool(err32 <= 1e-4 and bf16_ok)


def full_size_parity(names=None, batch=2, bf16=True):
  """[(name, params, max |diff| fp32, rel. diff bf16, timm's own rel. diff
  under torch.autocast bf16)] against timm's fp32 output."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitret_jax import weights  # pylint: disable=g-import-not-at-top
  torch, timm = import_timm()
  rows = []
  for name in names or sorted(weights.TIMM_MODELS):
    size = weights.TIMM_MODELS[name][1]
    model = randomize(timm.create_model(name, pretrained=False, num_classes=0))
    x = torch.randn(batch, 3, size, size,
                    generator=torch.Generator().manual_seed(1))
    want = pooled(model, x)
    sd = state_dict(model)
    ours, variables = weights.from_timm(name, sd)
    x_nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    got = np.asarray(ours.apply(variables, x_nhwc))
    rel16 = rel16_cnn = amp16 = float("nan")
    rel = lambda a: float(np.linalg.norm(np.asarray(a, np.float32) - want)
                          / np.linalg.norm(want))
    if bf16:
      # The reference's own bf16 error: timm under torch's autocast (bf16
      # matmuls and convolutions, fp32 elsewhere) against timm in fp32.
      with torch.autocast("cpu", dtype=torch.bfloat16):
        amp16 = rel(pooled(model, x))
      ours16, v16 = weights.from_timm(name, sd, dtype=jnp.bfloat16)
      rel16 = rel(ours16.apply(v16, x_nhwc))
      if weights.TIMM_MODELS[name][0].startswith("R"):
        ours16, v16 = weights.from_timm(name, sd, dtype=jnp.bfloat16,
                                        backbone_dtype=jnp.bfloat16)
        rel16_cnn = rel(ours16.apply(v16, x_nhwc))
    n_params = sum(p.numel() for p in model.parameters())
    rows.append((name, n_params, float(np.max(np.abs(got - want))), rel16,
                 amp16))
    print(f"| {name} | {n_params:,} | {rows[-1][2]:.2e} | {rel16:.2e} | "
          f"{rel16_cnn:.2e} | {amp16:.2e} |".replace("nan", "-"), flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--golden", action="store_true")
  parser.add_argument("--models", nargs="*")
  args = parser.parse_args()
  if args.golden:
    write_golden()
    return
  torch, timm = import_timm()
  print(f"torch {torch.__version__}, timm {timm.__version__}; random weights, "
        f"batch 2; pooled = timm's pre-logits features")
  print("| timm model | params | max abs diff fp32 | rel. L2 diff bf16 "
        "| same, CNN in bf16 too | timm autocast bf16 |")
  print("|---|---|---|---|---|---|")
  rows = full_size_parity(args.models)
  sys.exit(0 if all(parity_ok(*r[2:]) for r in rows) else 1)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  main()
