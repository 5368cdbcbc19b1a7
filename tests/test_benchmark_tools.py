"""benchmarks/_devices.py: each benchmark's header names the CPU it ran on
(ratios against torch differ between machines of this project)."""
import importlib.util
import os

from conftest import REPO

# Loaded from its file: benchmarks/ is not put on sys.path, where its
# scripts' names (knn, throughput, ...) could shadow other modules.
_SPEC = importlib.util.spec_from_file_location(
    "_devices", os.path.join(REPO, "benchmarks", "_devices.py"))
_devices = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_devices)


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


def test_describe_cpu_without_proc(monkeypatch):
  """Where /proc/cpuinfo cannot be read (macOS, a sandbox), still a line."""
  real_open = open

  def no_proc(path, *a, **k):
    if str(path).startswith("/proc/"):
      raise OSError("no /proc here")
    return real_open(path, *a, **k)

  monkeypatch.setattr("builtins.open", no_proc)
  assert f"{os.cpu_count()} cores" in _devices.describe_cpu()
