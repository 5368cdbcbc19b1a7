"""Shared by the benchmarks: simulated CPU devices and XLA's memory figure.

`simulate(n)` must run before jax is imported: XLA reads the device count
when its CPU backend starts.
"""
import os


def simulate(n):
  """n CPU devices (--xla_force_host_platform_device_count), CPU platform."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_"
                             f"host_platform_device_count={n}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def peak_bytes(compiled):
  """Per-device bytes of a compiled function: arguments + outputs +
  temporaries, less the outputs aliased to donated arguments."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)
