"""The benchmarks' own helpers, without torch or a device: each header
names the CPU it ran on (ratios against torch differ between machines of
this project), throughput.py rejects a bad --models list before starting
any worker, the model's FLOPs and the chips' peaks are counted right, and
device_check.py's guards hold with fake children (a fake JAX device kind,
a fake torch that reports cuda, rocm, cpu or nothing): a ratio only
between one device and itself, peak memory per model, MFU from the
model's own FLOPs, parity at HIGHEST precision, a budget that leaves room
for torch.compile, an exit status that fails, children that hold one GPU
alone and die with their parent."""
import contextlib
import io
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO
from conftest import load_script
from conftest import model_config
from vitret_jax import models
from vitret_jax import profiling

_devices = load_script("benchmarks/_devices.py")


def test_describe_cpu_names_cores_isa_and_caps(monkeypatch):
  monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
  monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
  monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  line = _devices.describe_cpu()
  assert f"{os.cpu_count()} cores" in line
  if os.path.exists("/proc/cpuinfo"):
    assert any(isa in line for isa in ("AVX-512", "AVX2", "AVX", "SSE"))
  assert "capped" not in line
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_cpu_max_isa=AVX2")
  monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
  line = _devices.describe_cpu()
  assert "capped: xla_cpu_max_isa=AVX2, ONEDNN_MAX_CPU_ISA=AVX2" in line
  assert "not an emulation of an older CPU" in line
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
  line = _devices.describe_cpu()
  assert "capped: ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2" in (
      line) and "not an emulation of an older CPU" in line


def test_isa_cap_children_get_one_cap_each(monkeypatch):
  """benchmarks/isa_cap.py: each child has its own part's cap alone (a cap
  of the environment or of XLA_FLAGS cleared), the reference none."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_cpu_max_isa=AVX")
  monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX")
  isa = load_script("benchmarks/isa_cap.py")
  caps = set(isa.CAP_VARS)
  none = isa.child_env("", "mkl")
  assert none["XLA_FLAGS"] == "--xla_foo=1" and not caps & set(none)
  xla = isa.child_env("SSE4_2", "xla")
  assert xla["XLA_FLAGS"] == "--xla_foo=1 --xla_cpu_max_isa=SSE4_2"
  assert not caps & set(xla)
  aten = isa.child_env("AVX2", "aten")
  assert {k for k in caps if k in aten} == {"ATEN_CPU_CAPABILITY",
                                           "ONEDNN_MAX_CPU_ISA"}
  mkl = isa.child_env("AVX2", "mkl")
  assert {k: mkl[k] for k in caps if k in mkl} == {
      "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
  assert mkl["XLA_FLAGS"] == "--xla_foo=1"


def test_describe_cpu_other_machines(tmp_path):
  """An Arm /proc/cpuinfo (no flags, no model name), and none at all (macOS,
  a sandbox): still a line with the cores, never an x86 ISA made up."""
  arm = tmp_path / "cpuinfo"
  arm.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd "
                 "sve sve2 bf16 i8mm\nCPU implementer\t: 0x41\nCPU part\t: "
                 "0xd4f\n\nprocessor\t: 1\n")
  line = _devices.describe_cpu(str(arm))
  assert "implementer 0x41 part 0xd4f" in line
  assert "asimd + sve + sve2 + bf16 + i8mm" in line and "AVX" not in line
  line = _devices.describe_cpu(str(tmp_path / "missing"))
  assert f"{os.cpu_count()} cores" in line and "ISA unknown" in line


@pytest.fixture
def scripts(monkeypatch):
  """The benchmark scripts' own imports (`import _devices`, ...), which
  their folder on sys.path provides when they run."""
  monkeypatch.setitem(sys.modules, "_devices", _devices)
  for name in ("_flops", "_workers", "_device_work", "_device_tables"):
    monkeypatch.setitem(sys.modules, name,
                        load_script(f"benchmarks/{name}.py"))
  return {name: load_script(f"benchmarks/{name}.py")
          for name in ("throughput", "device_check", "_device_work",
                       "_flops", "_workers")}


def test_throughput_models_checked_before_any_worker(scripts):
  throughput = scripts["throughput"]
  assert throughput.check_models("S/16, Ti/8@64") == (["S/16", "Ti/8@64"],
                                                      None)
  for bad, says in (("X/16", "size one of"), ("S/x", "size one of"),
                    ("R50+B/16", "size one of"), ("S/16@big", "integer")):
    models_, problem = throughput.check_models(f"Ti/16,{bad}")
    assert models_ is None and repr(bad) in problem and says in problem


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
    ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12),
    ("AMD Instinct MI300X", 1307e12), ("NVIDIA GeForce RTX 4090", None),
    ("NVIDIA H100X", None), ("cpu", None)])
def test_peak_flops_by_the_whole_device_name(scripts, kind, peak):
  """A chip's peak matches its whole name: an L40S is not an L4, an H200
  NVL not an H200; an unknown chip gets none (no MFU)."""
  assert scripts["_flops"].peak_flops(kind) == peak


def test_matmul_flops_counts_products_and_convolutions():
  """2 per multiply-add of every dot and convolution, scans once per
  iteration, the costlier branch of a cond; element-wise work not at all."""
  x = jax.ShapeDtypeStruct((3, 4), jnp.float32)
  w = jax.ShapeDtypeStruct((4, 5), jnp.float32)
  assert profiling.matmul_flops(lambda a, b: jnp.tanh(a @ b) + 1, x, w) == (
      2 * 3 * 4 * 5)
  img = jax.ShapeDtypeStruct((2, 8, 8, 6), jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, 2, 6), jnp.float32)  # 3 groups
  conv = lambda i, k: jax.lax.conv_general_dilated(
      i, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=3)
  assert profiling.matmul_flops(conv, img, kernel) == 2 * (2 * 6 * 6 * 6) * (
      2 * 3 * 3)

  def looped(a, b):
    a = jax.lax.scan(lambda c, _: (c @ jnp.eye(4), None), a, None,
                     length=5)[0]
    return jax.lax.cond(a.sum() > 0, lambda: a @ b,
                        lambda: jnp.broadcast_to(a[:, :1], (3, 5)))
  assert profiling.matmul_flops(looped, x, w) == (5 * 2 * 3 * 4 * 4
                                                  + 2 * 3 * 4 * 5)


def test_xla_figures_where_the_backend_has_none():
  """A backend without XLA's cost or memory analysis (Compiled raises
  NotImplementedError) gives NaN FLOPs and no bytes, not a lost row."""
  class Bare:
    def cost_analysis(self):
      raise NotImplementedError

    memory_analysis = cost_analysis

  assert math.isnan(profiling.xla_flops(Bare()))
  assert profiling.compiled_bytes(Bare()) is None
  described = profiling.describe_compiled(Bare())
  assert list(described) == ["flops"] and math.isnan(described["flops"])


def test_vit_flops_is_the_hand_count_and_the_traced_one(scripts):
  """The closed form (MFU's numerator) against a count by hand for S/16 at
  224 px, and exactly against the matmuls of the traced forward: a term
  left out or miscounted (the patch embedding is 1% of the total) fails."""
  flops = scripts["_flops"]
  cfg = model_config(variant="S/16", image_size=224)
  # N = 196 patches, T = 197 tokens, D = 384, M = 1536, 12 blocks:
  # 2*196*768*384 + 12 * (8*197*384^2 + 4*197^2*384 + 4*197*384*1536).
  assert flops.vit_flops(cfg) == 3 * 9_196_996_608
  assert flops.vit_flops(cfg, batch=4) == 12 * 9_196_996_608
  for variant, size, distilled, proj in (("S/16", 224, False, 0),
                                         ("B/16", 384, True, 512)):
    cfg = model_config(variant=variant, image_size=size,
                       distilled=distilled, proj_dim=proj)
    assert flops.vit_flops(cfg) == 3 * flops.forward_flops(cfg, size, size)
  hybrid = model_config(variant="Rmu+mu/32", image_size=32)
  assert flops.vit_flops(hybrid) is None
  assert flops.train_flops(hybrid, 2) == 6 * flops.forward_flops(hybrid, 32,
                                                                 32) > 0


H100 = "NVIDIA H100 80GB HBM3"
MODELS = ("S/16@224", "B/16@224", "B/16@384")


def fake_probe(platform="gpu", kind=H100, fp32=3e-6):
  return {"platform": platform, "kind": kind, "count": 1,
          "versions": {"jax": "0.10.2"}, "limit_gib": 75.6,
          "total_gib": 79.6,
          "auto": {"dtype": "bfloat16", "attention": "cudnn", "why": "auto",
                   "platform": platform},
          "parity_model": "S/16 @ 224",
          "parity": {"float32_highest": fp32, "float32_default": 2e-3,
                     "bfloat16": 8e-3}}


def fake_jax_row(model):
  gib = {"S/16@224": 11.5, "B/16@224": 23.25, "B/16@384": 61.75}[model]
  return {"train_img_s": 1000.0, "embed_img_s": 4000.0, "step_s": 0.128,
          "compile_s": 30.0, "model_flops": 4.0e13, "xla_flops": 3.1e13,
          "hidden": ["__cudnn$fmhaSoftmax"], "peak_gib": gib,
          "peak_source": "allocator", "compiled_gib": gib - 1,
          "attention": "cudnn", "batch": 128, "out_of_memory": []}


class FakeChildren:
  """The children's answers: JAX's probe, one JAX row per model (its own
  peak memory), torch's probe (`torch`: device and name, or None when it
  cannot be asked) and timm rows. Each child takes `seconds[kind]` (per
  model for "jax") of a fake clock, default 1 s; None: its whole limit."""

  def __init__(self, probe, torch, seconds=None, rows=None):
    self.probe, self.torch, self.seconds = probe, torch, seconds or {}
    self.rows = rows or {}
    self.calls, self.now = [], 0.0

  def clock(self):
    return self.now

  def __call__(self, args, limit):
    kind = args[args.index("--child") + 1]
    model = args[args.index("--model") + 1] if "--model" in args else ""
    batch = args[args.index("--batch") + 1] if "--batch" in args else ""
    self.calls.append((kind, model, limit, batch))
    took = self.seconds.get(kind, 1.0)
    took = took.get(model) if isinstance(took, dict) else took
    self.now += limit if took is None else took
    if kind == "probe":
      return self.probe, ""
    if kind == "jax":
      return self.rows.get(model, (fake_jax_row(model), ""))
    if kind == "torch_probe":
      if self.torch is None:
        return None, "ModuleNotFoundError: No module named 'torch'"
      device, name = self.torch
      return {"torch": "2.13.0", "timm": "1.0.31", "cuda": "12.8",
              "hip": None, "device": device, "name": name}, ""
    return {"train_img_s": 800.0, "embed_img_s": 3200.0, "warmup_s": 9.0,
            "peak_gib": 30.0, "peak_source": "allocator"}, ""


def run_check(scripts, monkeypatch, children, *argv, status=0):
  dc = scripts["device_check"]
  monkeypatch.setattr(dc.time, "monotonic", children.clock)
  monkeypatch.setattr(dc, "has_torch", lambda: True)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert dc.main(list(argv), runner=children) == status
  return out.getvalue()


def timm_row(out, model):
  """The model's row of the timm table, its "not measured (n)" cells
  replaced by footnote n's reason."""
  row = [l for l in out.splitlines() if l.startswith(f"| {model} |")][-1]
  notes = dict(re.findall(r"^\((\d+)\) (.*)$", out, re.MULTILINE))
  return re.sub(r"not measured \((\d+)\)", lambda m: notes[m.group(1)], row)


@pytest.mark.parametrize("probe,torch,why", [
    (fake_probe(), ("cuda", H100), ""),
    (fake_probe(), ("cuda", "NVIDIA A100-SXM4-80GB"), "JAX's device is"),
    (fake_probe(), ("cpu", "host CPU"), "not JAX's NVIDIA H100"),
    (fake_probe(), None, "No module named 'torch'"),
    (fake_probe("tpu", "TPU v5 lite"), ("cpu", "host CPU"), "no TPU"),
    (fake_probe("rocm", "AMD Instinct MI300X"), ("cuda", H100),
     "not JAX's AMD"),
    (fake_probe("rocm", "AMD Instinct MI300X"), ("rocm", "gfx942"), ""),
])
def test_device_check_ratio_only_on_one_device(scripts, monkeypatch, probe,
                                               torch, why):
  """timm is measured, and a ratio printed, only when torch computes on
  the device JAX measured; otherwise every timm cell says why."""
  children = FakeChildren(probe, torch)
  out = run_check(scripts, monkeypatch, children)
  row = timm_row(out, "S/16 @ 224")
  timm_kinds = {k for k, _, _, _ in children.calls if k.startswith("torch_")}
  if not why:
    assert "| 800.0 | 1.25 |" in row and "| 3200.0 | 1.25 |" in row, row
    assert timm_kinds == {"torch_probe", "torch_eager", "torch_compile"}
    assert "torch 2.13.0 (CUDA 12.8" in out
  else:
    assert why in row and "1.25" not in row, row
    assert "torch_eager" not in timm_kinds and "torch_compile" not in timm_kinds


def test_device_check_rows_per_model_mfu_and_marks(scripts, monkeypatch):
  """Each model is its own JAX child and its row shows that child's peak
  memory beside XLA's compiled memory; MFU is the model's own FLOPs over
  the H100's peak; XLA's count is marked where a cuDNN kernel is named or
  where it falls far below the model's; a batch halved for memory is said,
  and timm runs at that batch."""
  short = dict(fake_jax_row("B/16@224"), hidden=[], xla_flops=1.0e12)
  halved = dict(fake_jax_row("B/16@384"), batch=32, out_of_memory=[128, 64])
  children = FakeChildren(fake_probe(), ("cuda", H100), rows={
      "B/16@224": (short, ""), "B/16@384": (halved, "")})
  out = run_check(scripts, monkeypatch, children)
  jax_calls = [m for k, m, _, _ in children.calls if k == "jax"]
  assert jax_calls == list(MODELS)
  cells = {}
  for model in ("S/16 @ 224", "B/16 @ 224", "B/16 @ 384"):
    row = [l for l in out.splitlines() if l.startswith(f"| {model} | cudnn")]
    cells[model] = [c.strip() for c in row[0].split("|")[1:-1]]
  s16 = cells["S/16 @ 224"]
  assert s16[8] == "11.50" and s16[9] == "10.50", s16  # its own peak
  assert cells["B/16 @ 384"][8] == "61.75", cells
  # 4e13 FLOPs in 0.128 s on a 989 TFLOP/s chip.
  assert s16[4] == f"{4.0e13 / 0.128 / 989e12:.1%}", s16
  assert s16[5] == "40,000.0" and s16[6] == "31,000.0*", s16
  assert cells["B/16 @ 224"][6:8] == ["1,000.0*", "0.025*"], cells
  assert "XLA's count misses custom calls" in out
  assert cells["B/16 @ 384"][2] == "32 (128, 64: out of memory)", cells
  timm_batches = {(k, m): b for k, m, _, b in children.calls
                  if k.startswith("torch_") and m}
  assert timm_batches[("torch_eager", "B/16@384")] == "32"
  assert timm_batches[("torch_compile", "S/16@224")] == "128"
  assert "float32 at HIGHEST precision, max abs | 3.00e-06 (within" in out
  assert "device memory: 79.6 GiB; JAX's allocator may take 75.6 GiB" in out


def test_device_check_default_plan_measures_torch_compile(scripts,
                                                          monkeypatch):
  """The default run with plausible H100 durations: the project's rows,
  then per model timm eager and torch.compile, so that compiled cells are
  measured within the 480 s; what did not fit says so."""
  children = FakeChildren(fake_probe(), ("cuda", H100), seconds={
      "probe": 40, "jax": {"S/16@224": 50, "B/16@224": 70, "B/16@384": 110},
      "torch_probe": 10, "torch_eager": 40, "torch_compile": 80})
  out = run_check(scripts, monkeypatch, children)
  kinds = [(k, m) for k, m, _, _ in children.calls]
  assert kinds[:4] == [("probe", "")] + [("jax", m) for m in MODELS]
  assert kinds[4:7] == [("torch_probe", ""), ("torch_eager", "S/16@224"),
                        ("torch_compile", "S/16@224")], kinds
  assert children.now <= 480
  row = timm_row(out, "S/16 @ 224")
  assert row.count("| 1.25 |") == 3, row  # eager, compiled, embed
  assert "left out: its" in timm_row(out, "B/16 @ 384")


def test_device_check_keeps_its_budget(scripts, monkeypatch):
  """Every child runs to its limit: the limits of the children started
  fit in the budget, the project's rows come first, and what was left
  out says so."""
  dc = scripts["device_check"]
  children = FakeChildren(fake_probe(), ("cuda", H100), seconds={
      k: None for k in dc.LIMITS})
  out = run_check(scripts, monkeypatch, children, "--budget_s", "480")
  assert sum(limit for _, _, limit, _ in children.calls) <= 480
  kinds = [k for k, _, _, _ in children.calls]
  assert kinds[:3] == ["probe", "jax", "jax"], kinds  # 120 + 2 x 150
  assert "B/16 @ 384 | left out: its 150 s limit does not fit" in out
  assert "left out" in timm_row(out, "B/16 @ 224")
  assert out.rstrip().endswith("check: passed")  # left out is no failure
  # A budget too small for even the probe.
  children = FakeChildren(fake_probe(), None)
  out = run_check(scripts, monkeypatch, children, "--budget_s", "60",
                  status=1)
  assert not children.calls and "does not fit" in out


@pytest.mark.parametrize("probe,rows,says", [
    (fake_probe(fp32=3e-3), {}, "float32 parity 3.00e-03 is over 1e-4"),
    (dict(fake_probe(), parity_error="no cpu backend", parity=None), {},
     "forward parity not measured (no cpu backend)"),
    (fake_probe(), {"B/16@384": (None, "RESOURCE_EXHAUSTED: 9 GiB")},
     "B/16 @ 384 failed: RESOURCE_EXHAUSTED"),
])
def test_device_check_exit_status_fails_the_check(scripts, monkeypatch,
                                                  probe, rows, says):
  if probe.get("parity") is None:
    probe = {k: v for k, v in probe.items() if k != "parity"}
  out = run_check(scripts, monkeypatch, FakeChildren(probe, None, rows=rows),
                  status=1)
  assert "check: FAILED: " in out and says in out, out[-400:]


def test_device_check_children_hold_one_gpu_alone_and_cold(scripts):
  """The children's environment: one GPU (the first the user named),
  95% of it for JAX unless the user chose, both compilation caches cold."""
  dc = scripts["device_check"]
  env = dc.child_env({"JAX_COMPILATION_CACHE_DIR": "/c", "PATH": "/bin"},
                     "/tmp/x")
  assert env["CUDA_VISIBLE_DEVICES"] == env["HIP_VISIBLE_DEVICES"] == "0"
  assert env["XLA_CLIENT_MEM_FRACTION"] == "0.95"
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
  assert env["JAX_ENABLE_COMPILATION_CACHE"] == "false"
  assert "JAX_COMPILATION_CACHE_DIR" not in env and env["PATH"] == "/bin"
  assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/x")
  env = dc.child_env({"CUDA_VISIBLE_DEVICES": "2,3",
                      "XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}, "/tmp/x")
  assert env["CUDA_VISIBLE_DEVICES"] == env["HIP_VISIBLE_DEVICES"] == "2"
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".5"
  assert "XLA_CLIENT_MEM_FRACTION" not in env
  assert dc.child_env({"CUDA_VISIBLE_DEVICES": ""}, "/x")[
      "CUDA_VISIBLE_DEVICES"] == ""  # no GPU stays no GPU


def test_a_python_that_is_not_there(scripts, tmp_path, capsys):
  """--torch_python naming no executable is a usage error before anything
  runs; a child that cannot start is a reason in its cell, not a
  traceback."""
  dc = scripts["device_check"]
  with pytest.raises(SystemExit):
    dc.main(["--torch_python", str(tmp_path / "nope")])
  assert "is not an executable Python" in capsys.readouterr().err
  out, why = dc.spawn([str(tmp_path / "nope"), "-c", "pass"], 5)
  assert out is None and why.startswith("cannot start"), why


def test_one_device_check_at_a_time(scripts, monkeypatch, tmp_path):
  """A second check on the host while one runs (their children would share
  the device) stops at once, saying why."""
  dc = scripts["device_check"]
  monkeypatch.setattr(dc.tempfile, "gettempdir", lambda: str(tmp_path))
  lock = str(tmp_path / "vitret-device-check.lock")
  with dc.one_run_at_a_time(lock) as first:
    assert first == lock
    with dc.one_run_at_a_time(lock) as second:
      assert second is None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      assert dc.main(["--no_torch"]) == 1
    assert "Another device check is running" in out.getvalue()
  with dc.one_run_at_a_time(lock) as again:
    assert again == lock


# A parent that runs a child (which starts a grandchild) through spawn,
# with device_check's signal handling, as the real run does.
_PARENT = """
import sys
sys.path.insert(0, sys.argv[1])
import device_check
with device_check.ending_signals():
  device_check.spawn([sys.executable, "-c", sys.argv[2], sys.argv[3]], 120)
"""
_CHILD = """
import os, subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(sys.argv[1] + ".tmp", "w") as f:
  f.write(f"{os.getpid()} {g.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


def _gone(pid, seconds=20):
  """Whether process `pid` is gone (or a zombie) within `seconds`."""
  deadline = time.monotonic() + seconds
  while True:
    try:
      with open(f"/proc/{pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
          return True
    except FileNotFoundError:
      return True
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_a_child_dies_with_its_parent(tmp_path, signum):
  """kill -9 of device_check leaves no child on the device (the
  parent-death signal); SIGHUP (a dropped ssh session) kills the child
  and what it started."""
  pids = tmp_path / "pids"
  parent = subprocess.Popen([sys.executable, "-c", _PARENT,
                             os.path.join(REPO, "benchmarks"), _CHILD,
                             str(pids)])
  child = grandchild = None
  try:
    deadline = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    child, grandchild = map(int, pids.read_text().split())
    parent.send_signal(signum)
    parent.wait(timeout=30)
    assert _gone(child), "the child outlived its parent"
    if signum == signal.SIGHUP:
      assert _gone(grandchild), "SIGHUP left the child's own child running"
  finally:
    for pid in (child, grandchild):
      if pid and not _gone(pid, 0):
        with contextlib.suppress(ProcessLookupError):
          os.kill(pid, signal.SIGKILL)
    if parent.poll() is None:
      parent.kill()
      parent.wait()


def test_jax_row_halves_a_batch_out_of_memory(scripts, monkeypatch):
  """A batch the device has no memory for (RESOURCE_EXHAUSTED) is halved
  and the row says so; any other error, or running out at the smallest
  batch, is the row's failure."""
  work = scripts["_device_work"]
  tried = []

  def fake(cfg, batch, timing):
    del cfg, timing
    tried.append(batch)
    if batch > 32:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9G")
    return {"train_img_s": 1.0}

  monkeypatch.setattr(work, "_measure_jax", fake)
  out = work.measure_jax("mu/8", 32, 128, (1, 0.0), lambda cfg, b: 10 * b)
  assert tried == [128, 64, 32]
  assert (out["batch"], out["out_of_memory"], out["model_flops"]) == (
      32, [128, 64], 320)
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    work.measure_jax("mu/8", 32, 128, (1, 0.0), None, min_batch=128)
  monkeypatch.setattr(work, "_measure_jax", lambda *a: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    work.measure_jax("mu/8", 32, 128, (1, 0.0), None)


def test_steps_timed_back_to_back_for_long_enough(scripts, monkeypatch):
  """Both frameworks' steps are dispatched back to back and waited for
  once per timed run, which grows until it lasts min_seconds."""
  workers = scripts["_workers"]
  clock = {"t": 0.0}
  waits = []

  def step():
    clock["t"] += 0.01
    return clock["t"]

  monkeypatch.setattr(workers, "time", type("T", (), {
      "perf_counter": staticmethod(lambda: clock["t"])}))
  seconds, steps = workers.seconds_per_step(step, waits.append, 10, 1.0)
  assert seconds == pytest.approx(0.01) and steps >= 100
  assert len(waits) == 2, waits  # 10 steps (0.1 s), then enough for 1 s
  assert waits[-1] == pytest.approx(clock["t"])


def test_parity_runs_at_highest_precision(scripts):
  """The fp32 parity's device forward is traced at HIGHEST matmul
  precision (every dot says so); the default-precision one is not."""
  work = scripts["_device_work"]
  model = models.build_model(work.model_config("mu/8", 32, "float32"))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  highest = work.forward(model, "highest").lower(params, x).as_text()
  default = work.forward(model).lower(params, x).as_text()
  dots = len(re.findall(r"dot_general", highest))
  assert dots and highest.count("HIGHEST") >= dots
  assert "HIGHEST" not in default


def test_parity_check_is_the_highest_precision_float32_run(scripts,
                                                           monkeypatch):
  """parity() itself: the figure the check reads (float32_highest) comes
  from a float32 model whose every dot runs at HIGHEST, the default
  precision's from one that does not, bfloat16's apart. On a CPU both
  float32 runs agree, so the programs are what can be checked."""
  work = scripts["_device_work"]
  real, seen = work.forward, []

  def spy(model, precision=None):
    fn = real(model, precision)

    def call(params, x):
      text = fn.lower(params, x).as_text()
      seen.append((jnp.dtype(model.encoder.dtype).name,
                   text.count("dot_general"), text.count("HIGHEST")))
      return fn(params, x)
    return call

  monkeypatch.setattr(work, "forward", spy)
  out = work.parity("mu/8", 32, 2)
  assert list(out) == ["float32_highest", "float32_default", "bfloat16"]
  runs = dict(zip(out, seen[1:]))  # seen[0]: the host's reference
  dtype, dots, highest = runs["float32_highest"]
  assert dtype == "float32" and dots and highest >= dots, runs
  assert runs["float32_default"][0] == "float32", runs
  assert runs["float32_default"][2] == 0, runs
  assert runs["bfloat16"][0] == "bfloat16", runs
