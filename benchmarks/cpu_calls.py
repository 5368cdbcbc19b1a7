"""Forward calls on a CPU: images per call against one call a batch.

  python benchmarks/cpu_calls.py [--variants Ti/16,S/16,B/16] [--batch 80]
      [--per_call 5,10,20] [--repeats 5]

descriptor.MultiScale splits a batch on a one-device CPU placement into
calls of at most `descriptor.step_tokens(params)` tokens. This measures
why, through that same code: a jitted forward of the variant (random
weights, 224 px, float32, the CPU attention kernel) described by
MultiScale with one call a batch (the reference, same run) and with each
`--per_call` images a call, plus the library's own choice. Columns:
images/s (median of the repeats), ratio to one call, and the largest
difference of any descriptor from one call's.

glibc's malloc defaults, as `--mode=index` runs (VITRET_MALLOC=off); set
VITRET_MALLOC=keep to see how much of the gain the kept heap gives alone.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import _devices  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402
from vitret_jax import host_memory  # pylint: disable=wrong-import-position  # noqa: E402


def measure(variant, batch, per_call, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitret_jax import config_common  # pylint: disable=g-import-not-at-top
  from vitret_jax import descriptor  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top

  cfg = config_common.model_config()
  cfg.update(variant=variant, image_size=224, drop_path_rate=0.0,
             dtype="float32", attention="cpu")
  model = models.build_model(cfg)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 224, 224, 3)))["params"]
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  multiple = models.input_stride(model)
  tokens = (224 // multiple) ** 2
  images = np.random.default_rng(0).normal(
      size=(batch, 224, 224, 3)).astype(np.float32)
  own = descriptor.step_tokens(params)
  rows = [("one call", None)] + [(str(n), n * tokens) for n in per_call]
  rows.append((f"library ({own // tokens})", own))
  out, ref = [], None
  for name, step in rows:
    describe = descriptor.MultiScale(lambda x: apply(params, x),
                                     multiple=multiple, step_tokens=step)
    got = describe(images)  # compiles
    if ref is None:
      ref = got
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      describe(images)
      times.append(time.perf_counter() - start)
    out.append((name, batch / statistics.median(times),
                float(np.abs(got - ref).max())))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="Ti/16,S/16,B/16")
  parser.add_argument("--batch", type=int, default=80)
  parser.add_argument("--per_call", default="5,10,20")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  malloc = host_memory.configure(None)  # VITRET_MALLOC, before JAX starts
  per_call = [int(n) for n in args.per_call.split(",")]
  print(f"# forward passes on a CPU, batch {args.batch}, 224 px, float32; "
        f"{_devices.describe_cpu()}; {malloc}")
  print("| model | images a call | img/s | vs one call | max abs diff |")
  print("|---|---|---|---|---|")
  for variant in args.variants.split(","):
    rows = measure(variant, args.batch, per_call, args.repeats)
    base = rows[0][1]
    for name, rate, diff in rows:
      print(f"| {variant} | {name} | {rate:.1f} | {rate / base:.2f}x | "
            f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
  main()
