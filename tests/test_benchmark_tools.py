"""The benchmarks' own helpers, without torch: each header names the CPU it
ran on (ratios against torch differ between machines of this project), and
throughput.py rejects a bad --models list before starting any worker."""
import os
import sys

from conftest import load_script

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


def test_throughput_models_checked_before_any_worker(monkeypatch):
  monkeypatch.setitem(sys.modules, "_devices", _devices)  # its own import
  throughput = load_script("benchmarks/throughput.py")
  assert throughput.check_models("S/16, Ti/8@64") == (["S/16", "Ti/8@64"],
                                                      None)
  for bad, says in (("X/16", "size one of"), ("S/x", "size one of"),
                    ("R50+B/16", "size one of"), ("S/16@big", "integer")):
    models, problem = throughput.check_models(f"Ti/16,{bad}")
    assert models is None and repr(bad) in problem and says in problem
