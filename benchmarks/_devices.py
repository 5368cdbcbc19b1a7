"""Shared by the benchmarks: simulated CPU devices and the line naming the
CPU.

`simulate(n)` must run before jax is imported: XLA reads the device count
when its CPU backend starts.
"""
import glob
import os


def simulate(n):
  """n CPU devices (--xla_force_host_platform_device_count), CPU platform."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_"
                             f"host_platform_device_count={n}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def describe_cpu(cpuinfo="/proc/cpuinfo"):
  """One line naming the CPU the figures were taken on: model, family /
  model number (x86) or implementer / part (Arm), cores, caches, vector ISA,
  and any ISA cap in force (XLA's --xla_cpu_max_isa, torch's
  ATEN_CPU_CAPABILITY, oneDNN's ONEDNN_MAX_CPU_ISA, MKL's
  MKL_ENABLE_INSTRUCTIONS). Ratios against torch differ between CPU models
  (docs/benchmarks.md), so a figure without this is not comparable with
  another. No cap emulates an older CPU for such a ratio, and the line
  says so when one is set: XLA's reaches the code XLA generates but not
  its matrix products (YNNPACK in jaxlib 0.10, which picks its kernels
  from the CPU), and torch's float32 matrix products follow MKL's alone
  (benchmarks/isa_cap.py)."""
  import platform  # pylint: disable=g-import-not-at-top
  info = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key and key not in info:
          info[key] = value.strip()
        if not line.strip() and info:
          break  # the first processor's block is enough
  except OSError:
    pass
  if "flags" in info:  # x86
    flags_ = set(info["flags"].split())
    isa = [next((name for name, flag in (
        ("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx"))
                 if flag in flags_), "SSE")]
    isa += [name for name, flag in (("bf16", "avx512_bf16"),
                                    ("VNNI", "avx512_vnni"),
                                    ("AMX", "amx_tile")) if flag in flags_]
    ident = (f"family {info.get('cpu family', '?')} model "
             f"{info.get('model', '?')}")
  elif "Features" in info:  # Arm
    features = set(info["Features"].split())
    isa = [f for f in ("asimd", "sve", "sve2", "bf16", "i8mm")
           if f in features] or ["no SIMD listed"]
    ident = (f"implementer {info.get('CPU implementer', '?')} part "
             f"{info.get('CPU part', '?')}")
  else:
    isa, ident = ["ISA unknown"], platform.machine() or "machine unknown"
  caches = []
  for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
    try:
      level, kind, size = (_read(os.path.join(index, name))
                           for name in ("level", "type", "size"))
    except OSError:
      continue
    if kind != "Instruction":
      caches.append(f"L{level} {size}")
  caps = [f"{name}={value}" for name, value in (
      ("xla_cpu_max_isa", _xla_flag("xla_cpu_max_isa")),
      ("ATEN_CPU_CAPABILITY", os.environ.get("ATEN_CPU_CAPABILITY")),
      ("ONEDNN_MAX_CPU_ISA", os.environ.get("ONEDNN_MAX_CPU_ISA")),
      ("MKL_ENABLE_INSTRUCTIONS", os.environ.get("MKL_ENABLE_INSTRUCTIONS")),
  ) if value]
  parts = [info.get("model name") or platform.processor() or "CPU", ident,
           f"{os.cpu_count()} cores", "/".join(caches) or "caches unknown",
           " + ".join(isa)]
  if caps:
    parts.append("capped: " + ", ".join(caps) + " (not an emulation of an "
                 "older CPU: XLA's matrix products ignore xla_cpu_max_isa, "
                 "torch's follow MKL_ENABLE_INSTRUCTIONS alone)")
  return ", ".join(parts)


def _read(path):
  with open(path) as f:
    return f.read().strip()


def _xla_flag(name):
  for flag in os.environ.get("XLA_FLAGS", "").split():
    key, _, value = flag.lstrip("-").partition("=")
    if key == name:
      return value
  return None
