"""The device measurements in one command: parity of the device against the
CPU, then train and embedding speed in bfloat16 of vitret_jax and of timm on
the same device in the same run.

  python benchmarks/device_check.py            # on a GPU or TPU host, < 8 min
  python benchmarks/device_check.py --smoke    # the same code, tiny, on CPU

Prints, as Markdown tables:
- the device, the library versions and the attention model.attention="auto"
  chooses there (models/attention.py);
- ViT-S/16 forward parity, device against the host CPU, same weights and
  images: max abs difference in float32, relative L2 in bfloat16;
- for each model (default S/16 and B/16 at 224 px, B/16 at 384 px), the
  trainer's own jitted train step (IRT loss + KoLeo, AdamW) in bfloat16:
  images/s, MFU (XLA-counted FLOPs of the compiled step over the device's
  peak bf16 rate), peak device memory, compile time, and embedding images/s;
- timm's ViT with the same loss and AdamW under torch.autocast(bfloat16),
  eager and, where it compiles within --torch_compile_s, torch.compile, on the
  same device, with the ratio vitret_jax / timm (> 1: vitret_jax faster).
  Each torch measurement runs in a child process with a time limit.

--smoke runs every step with a test-size model on the CPU in seconds (the
test suite runs it), so the script is known to work the day a device is lent.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import _devices  # benchmarks/_devices.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets; matched
# against jax's device_kind. MFU is left out on a device not listed.
PEAK_BF16 = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
    "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}
TIMM = {"mu": None, "Ti": "vit_tiny_patch16_224",
        "S": "vit_small_patch16_224", "B": "vit_base_patch16_224",
        "L": "vit_large_patch16_224"}
MARGIN, LAMBDA, LR, WD = 0.5, 0.7, 3e-5, 5e-4


def peak_flops(device_kind):
  for name in sorted(PEAK_BF16, key=len, reverse=True):
    if name.lower() in device_kind.lower():
      return PEAK_BF16[name]
  return None


def parse_models(spec):
  """"S/16@224,B/16@384" -> [("S/16", 224), ("B/16", 384)]."""
  out = []
  for item in filter(None, spec.split(",")):
    variant, _, size = item.partition("@")
    out.append((variant, int(size or 224)))
  return out


def model_config(variant, size, dtype="auto", attention="auto"):
  from vitret_jax import config_common  # pylint: disable=g-import-not-at-top
  cfg = config_common.base_config().model
  cfg.variant, cfg.image_size = variant, size
  cfg.dtype, cfg.attention = dtype, attention
  return cfg


def versions():
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {name: metadata.version(name) for name in ("jax", "jaxlib", "flax")}
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    if cuda_versions is not None:
      out["cudnn"] = str(cuda_versions.cudnn_get_version())
  except ImportError:
    pass
  return out


def parity(variant, size, batch, seed=0):
  """(max abs fp32, relative L2 bf16) of the default device's descriptors
  against the host CPU's fp32 ones, same parameters and images."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  cpu = jax.devices("cpu")[0]
  images = np.random.default_rng(seed).normal(
      size=(batch, size, size, 3)).astype(np.float32)
  ref_model = models.build_model(model_config(variant, size, "float32"),
                                 platform="cpu")
  with jax.default_device(cpu):
    params = ref_model.init(jax.random.key(seed), jnp.zeros(
        (1, size, size, 3)))["params"]
    ref = np.asarray(jax.jit(lambda p, x: ref_model.apply(
        {"params": p}, x))(params, images), np.float64)
  out = {}
  for dtype in ("float32", "bfloat16"):
    model = models.build_model(model_config(variant, size, dtype))
    dev = jax.device_put(params, jax.devices()[0])
    got = np.asarray(jax.jit(lambda p, x, m=model: m.apply(
        {"params": p}, x))(dev, images), np.float64)
    out[dtype] = (float(np.max(np.abs(got - ref))) if dtype == "float32"
                  else float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
  return out


def _time(fn, steps):
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t0) / steps


def measure_jax(variant, size, batch, steps):
  """The trainer's train step and the embedding, bf16 ("auto" on an
  accelerator; forced bf16 on a CPU too, so the smoke run takes the same
  path)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  import throughput  # pylint: disable=g-import-not-at-top
  cfg = model_config(variant, size, "bfloat16")
  model, state, step, data = throughput.jax_train_step(
      variant, size, batch, model_cfg=cfg)
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
  xla_bytes = _devices.peak_bytes(compiled)
  holder = {"state": state}

  def train():
    holder["state"], metrics = compiled(holder["state"], data)
    jax.block_until_ready(metrics["loss"])

  train()  # warm-up
  step_s = _time(train, steps)
  embed = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  images = jax.device_put(throughput.batch(batch, size, 1)[0])
  params = holder["state"].params
  jax.block_until_ready(embed(params, images))
  embed_s = _time(lambda: jax.block_until_ready(embed(params, images)),
                  steps)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use", xla_bytes)
  device = jax.devices()[0]
  fps = peak_flops(getattr(device, "device_kind", ""))
  return {"train_img_s": batch / step_s, "embed_img_s": batch / embed_s,
          "step_s": step_s, "flops": flops, "compile_s": compile_s,
          "peak_gib": peak / 2 ** 30,
          "mfu": flops / step_s / fps if fps else None,
          "attention": models.resolve(cfg).attention}


def torch_worker(variant, size, batch, steps, use_compile):
  """Runs in a child process: timm under autocast(bf16) on the same kind of
  device; prints one JSON line."""
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import timm_parity  # pylint: disable=g-import-not-at-top
  torch, timm = timm_parity.import_timm()
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  size_name, patch = variant.split("/")
  model = timm.create_model(TIMM[size_name], pretrained=False, num_classes=0,
                            img_size=size, patch_size=int(patch),
                            drop_path_rate=0.1).to(dev)
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
  x = torch.randn(batch, 3, size, size, device=dev)
  y = torch.arange(batch, device=dev) // 2
  fwd = torch.compile(model) if use_compile else model

  def loss_fn(z):
    z = torch.nn.functional.normalize(z.float(), dim=1)
    sim = z @ z.T
    eye = torch.eye(len(z), dtype=torch.bool, device=dev)
    same = (y[:, None] == y[None, :]) & ~eye
    diff = y[:, None] != y[None, :]
    contr = ((1 - sim) * same).sum() + (torch.relu(sim - MARGIN) * diff).sum()
    with torch.no_grad():
      nn_idx = torch.cdist(z, z).masked_fill(eye, float("inf")).argmin(1)
    koleo = -torch.log((z - z[nn_idx]).norm(dim=1) + 1e-8).mean()
    return contr / len(z) + LAMBDA * koleo

  def sync():
    if dev == "cuda":
      torch.cuda.synchronize()

  def train():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev, dtype=torch.bfloat16):
      z = fwd(x)
    loss_fn(z).backward()
    opt.step()
    sync()

  def embed():
    with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16):
      fwd(x)
    sync()

  t0 = time.perf_counter()
  train()
  embed()
  warm = time.perf_counter() - t0
  step_s, embed_s = _time(train, steps), _time(embed, steps)
  print(json.dumps({"train_img_s": batch / step_s,
                    "embed_img_s": batch / embed_s, "warmup_s": warm,
                    "torch": torch.__version__, "timm": timm.__version__}))


def measure_torch(variant, size, batch, steps, use_compile, timeout):
  """The torch worker's figures, or a reason it has none."""
  if TIMM.get(variant.split("/")[0]) is None:
    return None, "no timm model of this size"
  cmd = [sys.executable, os.path.abspath(__file__), "--torch_worker",
         f"{variant}@{size}", "--batch", str(batch), "--steps", str(steps)]
  if use_compile:
    cmd.append("--torch_compile")
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         check=False)
  except subprocess.TimeoutExpired:
    return None, f"over {timeout:.0f} s"
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    err = (out.stderr.strip().splitlines() or ["failed"])[-1]
    return None, err[:100]
  return json.loads(lines[-1]), ""


def has_torch():
  import importlib.util  # pylint: disable=g-import-not-at-top
  return all(importlib.util.find_spec(m) for m in ("torch", "timm"))


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="test-size model on CPU, seconds")
  parser.add_argument("--models", default="S/16@224,B/16@224,B/16@384")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--torch_compile_s", type=float, default=150,
                      help="time limit of each torch.compile measurement")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--torch_worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--torch_compile", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.torch_worker:
    variant, size = parse_models(args.torch_worker)[0]
    return torch_worker(variant, size, args.batch, args.steps,
                        args.torch_compile)
  if args.smoke:
    _devices.simulate(1)
    args.models, args.batch, args.steps = "mu/8@32", 4, 2
  started = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  print(f"# device check: {kind} ({device.platform}, {jax.device_count()} "
        f"device(s)); host CPU: {_devices.describe_cpu()}")
  print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
  todo = parse_models(args.models)
  parity_variant = "mu/8" if args.smoke else "S/16"
  parity_size = 32 if args.smoke else 224
  auto = models.resolve(model_config(parity_variant, parity_size))
  print(f"model.dtype=auto -> {auto.dtype}; model.attention=auto -> "
        f"{auto.attention} ({auto.why})")
  par = parity(parity_variant, parity_size, 8)
  print(f"\n| forward parity, {parity_variant} @ {parity_size}, device vs "
        f"CPU | value |\n|---|---|\n| float32 max abs | "
        f"{par['float32']:.2e} |\n| bfloat16 relative L2 | "
        f"{par['bfloat16']:.2e} |")
  torch_ok = has_torch() and not args.no_torch
  print(f"\nbf16, batch {args.batch}, mean of {args.steps} steps after a "
        f"warm-up; "
        f"ratio = vitret_jax / timm"
        + ("" if torch_ok else " (torch and timm not installed: timm "
           "columns skipped; `make parity` installs them)"))
  print("| model | attention | train img/s | MFU | peak GiB | compile s | "
        "embed img/s | timm eager train | timm compiled train | ratio eager "
        "| ratio compiled |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for variant, size in todo:
    r = measure_jax(variant, size, args.batch, args.steps)
    cols = ["-", "-", "-", "-"]
    if torch_ok:
      eager, why_e = measure_torch(variant, size, args.batch, args.steps,
                                   False, 300)
      comp, why_c = measure_torch(variant, size, args.batch, args.steps,
                                  True, args.torch_compile_s)
      cols = [f"{eager['train_img_s']:.1f}" if eager else why_e,
              f"{comp['train_img_s']:.1f}" if comp else why_c,
              f"{r['train_img_s'] / eager['train_img_s']:.2f}" if eager
              else "-",
              f"{r['train_img_s'] / comp['train_img_s']:.2f}" if comp
              else "-"]
    print(f"| {variant} @ {size} | {r['attention']} | "
          f"{r['train_img_s']:.1f} | {_fmt(r['mfu'], '.1%')} | "
          f"{r['peak_gib']:.2f} | {r['compile_s']:.1f} | "
          f"{r['embed_img_s']:.1f} | " + " | ".join(cols) + " |")
  print(f"\ntotal {time.perf_counter() - started:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
