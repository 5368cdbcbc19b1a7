"""What each child process of device_check.py measures. Every function runs
in a fresh process that holds the device alone and prints one JSON line:

- `probe`: the device, versions, what "auto" resolves to, and forward
  parity of the device against the host CPU (float32 at HIGHEST matmul
  precision, float32 at the default precision, bfloat16);
- `measure_jax`: one model's bf16 train step and embedding;
- `probe_torch`: torch's version and the device it would use;
- `measure_torch`: timm's train step and embedding on that device.

A process per measurement frees the device when it exits (XLA's and
torch's allocators keep what they took until then) and gives each model a
peak memory of its own.
"""
import contextlib
import os
import re
import resource
import sys
import time

import numpy as np

import _workers  # benchmarks/_workers.py (puts the repository on sys.path)

# The forward parity's model and batch (the smoke run's: test size).
PARITY = {"full": ("S/16", 224, 8), "smoke": ("mu/8", 32, 8)}
# Custom calls whose work XLA's cost analysis does not count: cuDNN's fused
# attention (GPU). Convolutions and GEMMs through cuDNN / cuBLAS are
# counted.
_HIDDEN = re.compile(r"fmha|flash|dot_product_attention", re.IGNORECASE)


def model_config(variant, size, dtype="auto", attention="auto"):
  from vitret_jax import config_common  # pylint: disable=g-import-not-at-top
  cfg = config_common.base_config().model
  cfg.variant, cfg.image_size = variant, size
  cfg.dtype, cfg.attention = dtype, attention
  cfg.drop_path_rate = _workers.DROP_PATH  # as timm's in TorchWorker
  return cfg


def _versions():
  """Versions of JAX, its device plugin (CUDA, ROCm or TPU: whichever is
  installed), Flax and cuDNN."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin",
               "jax-rocm60-plugin", "jax-rocm7-plugin", "libtpu", "flax"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    if cuda_versions is not None:
      out["cudnn"] = str(cuda_versions.cudnn_get_version())
  except (ImportError, AttributeError, RuntimeError):
    pass
  return out


def forward(model, precision=None):
  """The jitted forward `(params, images) -> descriptors` of `model`, its
  matmuls at `precision` ("highest", or None for the backend's default:
  TF32 on recent NVIDIA GPUs, one bf16 pass on TPUs) when it is traced."""
  import jax  # pylint: disable=g-import-not-at-top

  def apply(params, images):
    scope = (jax.default_matmul_precision(precision) if precision
             else contextlib.nullcontext())
    with scope:
      return model.apply({"params": params}, images, train=False)
  return jax.jit(apply)


def parity(variant, size, batch, seed=0):
  """{name: difference} of the default device's descriptors against the
  host CPU's float32 ones at HIGHEST precision, same parameters and
  images: max abs for float32 (HIGHEST and default precision), relative L2
  for bfloat16."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  cpu, device = jax.devices("cpu")[0], jax.devices()[0]
  images = np.random.default_rng(seed).normal(
      size=(batch, size, size, 3)).astype(np.float32)
  ref_model = models.build_model(model_config(variant, size, "float32"),
                                 platform="cpu")
  with jax.default_device(cpu):
    params = jax.jit(ref_model.init)(jax.random.key(seed), images[:1])
    params = params["params"]
    ref = np.asarray(forward(ref_model, "highest")(params, images),
                     np.float64)
  on_device = jax.device_put(params, device)
  x = jax.device_put(images, device)
  out = {}
  for name, dtype, precision in (("float32_highest", "float32", "highest"),
                                 ("float32_default", "float32", None),
                                 ("bfloat16", "bfloat16", None)):
    model = models.build_model(model_config(variant, size, dtype))
    got = np.asarray(forward(model, precision)(on_device, x), np.float64)
    out[name] = (float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                 if dtype == "bfloat16" else float(np.max(np.abs(got - ref))))
  return out


def probe(smoke):
  """The device, versions, "auto"'s choices and parity (see module doc)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  variant, size, batch = PARITY["smoke" if smoke else "full"]
  auto = models.resolve(model_config(variant, size))
  stats = _memory_stats(device)
  out = {"platform": models.platform_name(),
         "kind": getattr(device, "device_kind", device.platform),
         "count": jax.device_count(), "versions": _versions(),
         "auto": auto.as_dict(), "parity_model": f"{variant} @ {size}",
         "memory_gib": stats.get("bytes_limit", 0) / 2 ** 30 or None}
  try:
    out["parity"] = parity(variant, size, batch)
  except Exception as e:  # pylint: disable=broad-except
    # Said in the table; the speed measurements still run.
    out["parity_error"] = str(e).splitlines()[0][:200] if str(e) else repr(e)
    if "cpu" in out["parity_error"].lower():
      out["parity_error"] += (" (the parity check needs JAX's CPU backend "
                              "beside the device: JAX_PLATFORMS unset, or "
                              "listing cpu)")
  return out


def _memory_stats(device):
  try:
    return device.memory_stats() or {}
  except (NotImplementedError, RuntimeError):
    return {}


def peak_memory(device):
  """(GiB, source) of this process's peak on `device`: the allocator's
  peak where the device keeps one (GPU, TPU), else the process's peak
  resident memory (a CPU's device memory is the host's)."""
  peak = _memory_stats(device).get("peak_bytes_in_use")
  if peak is not None:
    return peak / 2 ** 30, "allocator"
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss_kib / 2 ** 20, "process RSS"


def hidden_work(compiled):
  """Custom calls of a compiled program whose work XLA does not count."""
  try:
    text = compiled.as_text() or ""
  except Exception:  # pylint: disable=broad-except
    return []
  targets = set(re.findall(r'custom_call_target="([^"]+)"', text))
  return sorted(t for t in targets if _HIDDEN.search(t))


def _mean_seconds(fn, steps):
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t0) / steps


def measure_jax(variant, size, batch, steps, flops_fn):
  """vitret_jax's own train step (the trainer's: IRT loss + KoLeo, AdamW)
  and embedding in bfloat16, with the attention "auto" resolves to here.
  `flops_fn(model_cfg, batch)`: the model's own FLOP count of a step."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  from vitret_jax import profiling  # pylint: disable=g-import-not-at-top
  cfg = model_config(variant, size, "bfloat16")
  model, state, step, data = _workers.jax_train_step(
      variant, size, batch, model_cfg=cfg)
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def train():
    holder["state"], metrics = compiled(holder["state"], data)
    jax.block_until_ready(metrics["loss"])

  train()  # warm-up
  step_s = _mean_seconds(train, steps)
  embed = forward(model)
  images = jax.device_put(_workers.batch(batch, size, 1)[0])
  params = holder["state"].params
  jax.block_until_ready(embed(params, images))
  embed_s = _mean_seconds(lambda: jax.block_until_ready(embed(params, images)),
                          steps)
  peak_gib, peak_source = peak_memory(jax.devices()[0])
  compiled_bytes = profiling.compiled_bytes(compiled)
  return {"train_img_s": batch / step_s, "embed_img_s": batch / embed_s,
          "step_s": step_s, "compile_s": compile_s,
          "model_flops": flops_fn(cfg, batch),
          "xla_flops": profiling.xla_flops(compiled),
          "hidden": hidden_work(compiled),
          "peak_gib": peak_gib, "peak_source": peak_source,
          "compiled_gib": (compiled_bytes / 2 ** 30 if compiled_bytes
                           is not None else None),
          "attention": models.resolve(cfg).attention}


def probe_torch():
  """torch's and timm's versions and the device torch would use: "cuda"
  (an NVIDIA GPU), "rocm" (an AMD GPU, torch's HIP build) or "cpu"."""
  sys.path.insert(0, os.path.join(_workers.REPO, "tools"))
  import timm_parity  # pylint: disable=g-import-not-at-top
  torch, timm = timm_parity.import_timm()
  hip = getattr(torch.version, "hip", None)
  out = {"torch": torch.__version__, "timm": timm.__version__,
         "cuda": torch.version.cuda, "hip": hip}
  if torch.cuda.is_available():
    out.update(device="rocm" if hip else "cuda",
               name=torch.cuda.get_device_name(0))
  else:
    out.update(device="cpu", name="host CPU")
  return out


def measure_torch(variant, size, batch, steps, compile_model):
  """timm's ViT, the same loss and AdamW, under autocast(bfloat16), eager
  or torch.compile'd, on the device probe_torch names."""
  device = "cpu" if probe_torch()["device"] == "cpu" else "cuda"
  t0 = time.perf_counter()
  w = _workers.TorchWorker(variant, size, batch, batch, device=device,
                           bf16=True, compile_model=compile_model)
  warm_s = time.perf_counter() - t0
  train_s = w.run("train", steps) / steps
  embed_s = w.run("embed", steps) / steps
  torch = w.torch
  if device == "cuda":
    peak_gib, source = torch.cuda.max_memory_allocated() / 2 ** 30, "allocator"
  else:
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    source = "process RSS"
  return {"train_img_s": batch / train_s, "embed_img_s": batch / embed_s,
          "warmup_s": warm_s, "peak_gib": peak_gib, "peak_source": source}

