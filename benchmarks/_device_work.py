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
import gc
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np

import _workers  # benchmarks/_workers.py (puts the repository on sys.path)

# The forward parity's model and batch (the smoke run's: test size).
PARITY = {"full": ("S/16", 224, 8), "smoke": ("mu/8", 32, 8)}
# Custom calls named in the table as work XLA's cost analysis does not
# count: cuDNN's fused attention (GPU). GEMMs XLA hands to cuBLAS can be
# missing from the count too (jax-ml/jax#22249): the table marks any row
# whose count falls far below the model's.
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


# The parity runs: (name, the device model's dtype, its matmul precision).
# float32 at HIGHEST is the check; the default precision is what float32
# training gets (TF32 on recent NVIDIA GPUs, one bf16 pass on a TPU).
PARITY_RUNS = (("float32_highest", "float32", "highest"),
               ("float32_default", "float32", None),
               ("bfloat16", "bfloat16", None))


def parity(variant, size, batch, seed=0):
  """{name: difference} of the default device's descriptors against the
  host CPU's float32 ones at HIGHEST precision, same parameters and
  images, for each of PARITY_RUNS: max abs for float32, relative L2 for
  bfloat16."""
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
  for name, dtype, precision in PARITY_RUNS:
    model = models.build_model(model_config(variant, size, dtype))
    got = np.asarray(forward(model, precision)(on_device, x), np.float64)
    out[name] = (float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                 if dtype == "bfloat16" else float(np.max(np.abs(got - ref))))
  return out


def probe(smoke):
  """The device, versions, "auto"'s choices, memory and parity (see the
  module doc)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  variant, size, batch = PARITY["smoke" if smoke else "full"]
  auto = models.resolve(model_config(variant, size))
  platform = models.platform_name()
  limit = _memory_stats(device).get("bytes_limit")
  out = {"platform": platform,
         "kind": getattr(device, "device_kind", device.platform),
         "count": jax.device_count(), "versions": _versions(),
         "auto": auto.as_dict(), "parity_model": f"{variant} @ {size}",
         "limit_gib": limit / 2 ** 30 if limit else None,
         "total_gib": total_memory_gib(platform, limit)}
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


# The device's whole memory, from its driver's tool (JAX's own figure,
# bytes_limit, is what its allocator may take: a fraction of it on a GPU):
# platform -> (command, the variable naming the device, its flag, unit).
_TOTAL_QUERY = {
    "gpu": (["nvidia-smi", "--query-gpu=memory.total",
             "--format=csv,noheader,nounits"], "CUDA_VISIBLE_DEVICES", "-i",
            2 ** 20),
    "rocm": (["rocm-smi", "--showmeminfo", "vram", "--csv"],
             "HIP_VISIBLE_DEVICES", "-d", 1),
}


def total_memory_gib(platform, limit):
  """GiB of the device this process uses, or None when unknown. A TPU's
  allocator limit is its whole HBM; a GPU's total comes from nvidia-smi
  or rocm-smi, asked for the device *_VISIBLE_DEVICES names (the tools
  themselves list every device)."""
  if platform == "tpu":
    return limit / 2 ** 30 if limit else None
  if platform not in _TOTAL_QUERY:
    return None
  cmd, env, flag, unit = _TOTAL_QUERY[platform]
  index = os.environ.get(env, "0").split(",")[0]
  try:
    text = subprocess.run(cmd + [flag, index], capture_output=True,
                          text=True, timeout=20, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  # nvidia-smi prints the total alone; rocm-smi the total and the used.
  numbers = [int(n) for n in re.findall(r"\b\d+\b", text)]
  return max(numbers) * unit / 2 ** 30 if numbers else None


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


def out_of_memory(error):
  """Whether `error` is a device running out of memory (XLA's
  RESOURCE_EXHAUSTED, at compile time on a TPU or when a step runs)."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def measure_jax(variant, size, batch, timing, flops_fn, min_batch=8):
  """vitret_jax's own train step (the trainer's: IRT loss + KoLeo, AdamW)
  and embedding in bfloat16, with the attention "auto" resolves to here.
  A batch the device has no memory for is halved (down to `min_batch`),
  and the row says so. `timing`: (min steps, min seconds) of each timed
  run (_workers.seconds_per_step); `flops_fn(model_cfg, batch)`: the
  model's own FLOP count of a step."""
  cfg = model_config(variant, size, "bfloat16")
  short = []  # the batches that ran out of memory
  while True:
    try:
      out = _measure_jax(cfg, batch, timing)
      break
    except Exception as e:  # pylint: disable=broad-except
      if not out_of_memory(e) or batch // 2 < min_batch:
        raise
    short.append(batch)
    batch //= 2
    gc.collect()  # the failed attempt's buffers, before the next
  out.update(batch=batch, out_of_memory=short,
             model_flops=flops_fn(cfg, batch))
  return out


def _measure_jax(cfg, batch, timing):
  import jax  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  from vitret_jax import profiling  # pylint: disable=g-import-not-at-top
  w = _workers.JaxWorker(cfg.variant, cfg.image_size, batch, batch,
                         model_cfg=cfg)
  out = {}
  for task in ("train", "embed"):
    seconds, steps = _workers.seconds_per_step(
        lambda t=task: w.step(t), w.wait, *timing)
    out.update({f"{task}_img_s": batch / seconds, f"{task}_steps": steps})
    if task == "train":
      out["step_s"] = seconds
  peak_gib, peak_source = peak_memory(jax.devices()[0])
  xla = profiling.xla_flops(w.step_fn)
  out.update(compile_s=w.compile_train, xla_flops=None if xla != xla else xla,
             hidden=hidden_work(w.step_fn), peak_gib=peak_gib,
             peak_source=peak_source, attention=models.resolve(cfg).attention,
             compiled_gib=(None if w.xla_train_mib is None
                           else w.xla_train_mib / 1024))
  return out


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


def measure_torch(variant, size, batch, timing, compile_model):
  """timm's ViT, the same loss and AdamW, under autocast(bfloat16), eager
  or torch.compile'd, on the device probe_torch names, timed as
  measure_jax times vitret_jax."""
  device = "cpu" if probe_torch()["device"] == "cpu" else "cuda"
  t0 = time.perf_counter()
  w = _workers.TorchWorker(variant, size, batch, batch, device=device,
                           bf16=True, compile_model=compile_model)
  out = {"warmup_s": time.perf_counter() - t0}
  for task in ("train", "embed"):
    seconds, steps = _workers.seconds_per_step(
        lambda t=task: w.step(t), w.wait, *timing)
    out.update({f"{task}_img_s": batch / seconds, f"{task}_steps": steps})
  if device == "cuda":
    out.update(peak_gib=w.torch.cuda.max_memory_allocated() / 2 ** 30,
               peak_source="allocator")
  else:
    out.update(peak_gib=resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, peak_source="process RSS")
  return out
