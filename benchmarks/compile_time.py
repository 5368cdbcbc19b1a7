"""Compile time of vitret_jax's train step with and without `model.scan`
(one lax.scan over the transformer blocks), ViT-L/16 by default.

  python benchmarks/compile_time.py [--variant L/16] [--size 224]
      [--batch 8] [--remat]

For each setting: XLA compile time of the jitted train step (lowering
included; JAX's persistent cache off, so nothing is reused), the compiled
step's memory (XLA's memory analysis), and whether one step's loss agrees
between the two (same parameters, drop-path off: the scan changes the
program, not the mathematics).
"""
import argparse
import os
import sys
import time

import _devices  # benchmarks/_devices.py

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]


def compile_step(variant, size, batch, scan, remat):
  import _workers  # pylint: disable=g-import-not-at-top
  from vitret_jax import profiling  # pylint: disable=g-import-not-at-top
  _, state, step, data = _workers.jax_train_step(
      variant, size, batch, drop_path=0.0, scan=scan, remat=remat)
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  seconds = time.perf_counter() - t0
  mib = profiling.compiled_bytes(compiled) / 2 ** 20
  _, metrics = compiled(state, data)
  return seconds, mib, float(metrics["loss"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="L/16")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--remat", action="store_true")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  rows = []
  for scan in (False, True):
    rows.append((scan,) + compile_step(args.variant, args.size, args.batch,
                                       scan, args.remat))
  print(f"ViT-{args.variant} train step, {args.size} px, batch {args.batch}, "
        f"remat={args.remat}, {jax.devices()[0].platform}, "
        f"{_devices.describe_cpu()}")
  print("| model.scan | compile s | XLA step MiB | loss after 1 step |")
  print("|---|---|---|---|")
  for scan, seconds, mib, loss in rows:
    print(f"| {scan} | {seconds:.1f} | {mib:.0f} | {loss:.6f} |")
  print(f"compile time with scan / without: {rows[1][1] / rows[0][1]:.2f}x; "
        f"loss difference {abs(rows[1][3] - rows[0][3]):.2e}")


if __name__ == "__main__":
  main()
