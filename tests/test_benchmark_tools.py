"""The benchmarks' own helpers, without torch or a device: each header
names the CPU it ran on (ratios against torch differ between machines of
this project), throughput.py rejects a bad --models list before starting
any worker, and device_check.py's guards hold with fake children (a fake
JAX device kind, a fake torch that reports cuda, cpu or nothing): a ratio
only between one device and itself, peak memory per model, MFU from the
model's own FLOPs, parity at HIGHEST precision, a budget it keeps."""
import contextlib
import io
import os
import re
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import load_script
from conftest import model_config
from vitret_jax import models

_devices = load_script("benchmarks/_devices.py")


def test_describe_cpu_names_cores_isa_and_caps(monkeypatch):
  monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
  monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
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
  for name in ("_workers", "_device_work"):
    monkeypatch.setitem(sys.modules, name,
                        load_script(f"benchmarks/{name}.py"))
  return {name: load_script(f"benchmarks/{name}.py")
          for name in ("throughput", "device_check", "_device_work")}


def test_throughput_models_checked_before_any_worker(scripts):
  throughput = scripts["throughput"]
  assert throughput.check_models("S/16, Ti/8@64") == (["S/16", "Ti/8@64"],
                                                      None)
  for bad, says in (("X/16", "size one of"), ("S/x", "size one of"),
                    ("R50+B/16", "size one of"), ("S/16@big", "integer")):
    models, problem = throughput.check_models(f"Ti/16,{bad}")
    assert models is None and repr(bad) in problem and says in problem


H100 = "NVIDIA H100 80GB HBM3"


def fake_probe(platform="gpu", kind=H100):
  return {"platform": platform, "kind": kind, "count": 1,
          "versions": {"jax": "0.10.2"}, "memory_gib": 79.1,
          "auto": {"dtype": "bfloat16", "attention": "cudnn", "why": "auto",
                   "platform": platform},
          "parity_model": "S/16 @ 224",
          "parity": {"float32_highest": 3e-6, "float32_default": 2e-3,
                     "bfloat16": 8e-3}}


class FakeChildren:
  """The children's answers: JAX's probe, one JAX row per model (its own
  peak memory), torch's probe (`torch`: device and name, or None when it
  cannot be asked) and timm rows. Each child takes `seconds` of a fake
  clock (its whole limit when None)."""

  def __init__(self, probe, torch, seconds=1.0):
    self.probe, self.torch, self.seconds = probe, torch, seconds
    self.calls, self.now = [], 0.0

  def clock(self):
    return self.now

  def __call__(self, args, limit):
    kind = args[args.index("--child") + 1]
    model = args[args.index("--model") + 1] if "--model" in args else ""
    self.calls.append((kind, model, limit))
    self.now += limit if self.seconds is None else self.seconds
    if kind == "probe":
      return self.probe, ""
    if kind == "jax":
      gib = {"S/16@224": 11.5, "B/16@224": 23.25, "B/16@384": 61.75}[model]
      return {"train_img_s": 1000.0, "embed_img_s": 4000.0, "step_s": 0.128,
              "compile_s": 30.0, "model_flops": 4.0e13,
              "xla_flops": 3.1e13, "hidden": ["__cudnn$fmhaSoftmax"],
              "peak_gib": gib, "peak_source": "allocator",
              "compiled_gib": gib - 1, "attention": "cudnn"}, ""
    if kind == "torch_probe":
      if self.torch is None:
        return None, "ModuleNotFoundError: No module named 'torch'"
      device, name = self.torch
      return {"torch": "2.13.0", "timm": "1.0.31", "cuda": "12.8",
              "hip": None, "device": device, "name": name}, ""
    return {"train_img_s": 800.0, "embed_img_s": 3200.0, "warmup_s": 9.0,
            "peak_gib": 30.0, "peak_source": "allocator"}, ""


def run_check(scripts, monkeypatch, children, *argv):
  dc = scripts["device_check"]
  monkeypatch.setattr(dc.time, "monotonic", children.clock)
  monkeypatch.setattr(dc, "has_torch", lambda: True)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert dc.main(list(argv), runner=children) == 0
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
])
def test_device_check_ratio_only_on_one_device(scripts, monkeypatch, probe,
                                               torch, why):
  """timm is measured, and a ratio printed, only when torch computes on
  the device JAX measured; otherwise every timm cell says why."""
  children = FakeChildren(probe, torch)
  out = run_check(scripts, monkeypatch, children)
  row = timm_row(out, "S/16 @ 224")
  timm_kinds = {k for k, _, _ in children.calls if k.startswith("torch_")}
  if not why:
    assert "| 800.0 | 1.25 |" in row and "| 3200.0 | 1.25 |" in row, row
    assert timm_kinds == {"torch_probe", "torch_eager", "torch_compile"}
    assert "torch 2.13.0 (CUDA 12.8" in out and H100 in out
  else:
    assert why in row and "1.25" not in row, row
    assert "torch_eager" not in timm_kinds and "torch_compile" not in timm_kinds


def test_device_check_rows_per_model_mfu_and_hidden_flops(scripts,
                                                          monkeypatch):
  """Each model is its own JAX child and its row shows that child's peak
  memory beside XLA's compiled memory; MFU is the model's own FLOPs over
  the H100's peak; XLA's count is marked where cuDNN attention hides
  work."""
  children = FakeChildren(fake_probe(), ("cuda", H100))
  out = run_check(scripts, monkeypatch, children)
  jax_calls = [m for k, m, _ in children.calls if k == "jax"]
  assert jax_calls == ["S/16@224", "B/16@224", "B/16@384"]
  for model, gib in (("S/16 @ 224", 11.5), ("B/16 @ 384", 61.75)):
    row = [l for l in out.splitlines() if l.startswith(f"| {model} | cudnn")]
    cells = [c.strip() for c in row[0].split("|")[1:-1]]
    assert cells[7] == f"{gib:.2f}" and cells[8] == f"{gib - 1:.2f}", cells
    # 4e13 FLOPs in 0.128 s on a 989 TFLOP/s chip.
    assert cells[3] == f"{4.0e13 / 0.128 / 989e12:.1%}", cells
    assert cells[4] == "40,000.0" and cells[5] == "31,000.0*", cells
    assert cells[6] == "0.775*", cells
  assert "leaves out __cudnn$fmhaSoftmax" in out
  assert "float32 at HIGHEST precision, max abs | 3.00e-06 (within" in out


def test_device_check_keeps_its_budget(scripts, monkeypatch):
  """Every child runs to its limit: the limits of the children started
  fit in the budget, the project's rows come first, and what was left
  out says so."""
  dc = scripts["device_check"]
  children = FakeChildren(fake_probe(), ("cuda", H100), seconds=None)
  out = run_check(scripts, monkeypatch, children, "--budget_s", "480")
  assert sum(limit for _, _, limit in children.calls) <= 480
  kinds = [k for k, _, _ in children.calls]
  assert kinds[:3] == ["probe", "jax", "jax"], kinds  # 120 + 2 x 150
  assert "B/16 @ 384 | left out: its 150 s limit does not fit" in out
  assert "torch_eager" not in kinds or kinds.index("torch_eager") > 2
  row = timm_row(out, "B/16 @ 224")
  assert "left out" in row or "vitret_jax's row failed" in row
  # A budget too small for even the probe.
  children = FakeChildren(fake_probe(), None)
  dc_out = io.StringIO()
  monkeypatch.setattr(dc.time, "monotonic", children.clock)
  with contextlib.redirect_stdout(dc_out):
    assert dc.main(["--budget_s", "60"], runner=children) == 1
  assert not children.calls and "does not fit" in dc_out.getvalue()


def test_model_flops_match_xla_where_nothing_hides_work(scripts):
  """The model's own count (vit_flops) against XLA's cost analysis of the
  forward with XLA's attention on the CPU (no custom call): XLA adds the
  element-wise work, 1-5% at these sizes."""
  dc, work = scripts["device_check"], scripts["_device_work"]
  for variant, size in (("S/16", 224), ("B/16", 384)):
    cfg = work.model_config(variant, size, "float32", "xla")
    model = models.build_model(cfg)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    xla = work.forward(model).lower(params, x).cost_analysis()["flops"]
    ours = dc.vit_flops(cfg, batch=2) / 3  # the forward of 2 images
    assert 1.0 <= xla / ours <= 1.05, (variant, xla / ours)
  assert dc.vit_flops(model_config(variant="R50+B/16")) is None


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
