"""Peak memory of the IRT loss (value and gradient) for a large global batch:
split over 8 devices (each [b, B] against the gathered batch) versus one
device holding the whole [B, B] problem. Figures are XLA's compiled memory
analysis per device (arguments + outputs + temporaries), no timing.

  python benchmarks/loss_memory.py [--batch 4096] [--dim 384] [--devices 8]
"""
import argparse

import _devices  # benchmarks/_devices.py

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=4096)
parser.add_argument("--dim", type=int, default=384)
parser.add_argument("--devices", type=int, default=8)
args = parser.parse_args()
_devices.simulate(args.devices)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from vitret_jax import losses  # pylint: disable=g-import-not-at-top
from vitret_jax import profiling  # pylint: disable=g-import-not-at-top
from vitret_jax import sharding  # pylint: disable=g-import-not-at-top


def peak_bytes(fn, *specs):
  return profiling.compiled_bytes(jax.jit(fn).lower(*specs).compile())


def main():
  b, e, n = args.batch, args.dim, args.devices
  emb = jax.ShapeDtypeStruct((b, e), jnp.float32)
  lab = jax.ShapeDtypeStruct((b,), jnp.int32)
  single = lambda z, y: jax.value_and_grad(
      lambda z: losses.irt_loss(z, y)[0])(z)
  mesh = sharding.make_mesh(n)
  split = sharding.batch_sharding(mesh)
  loss_fn = losses.make_sharded_loss(mesh)
  sharded = lambda z, y: jax.value_and_grad(lambda z: loss_fn(z, y)[0])(z)
  emb_s = jax.ShapeDtypeStruct((b, e), jnp.float32, sharding=split)
  lab_s = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=split)
  one = peak_bytes(single, emb, lab)
  many = peak_bytes(sharded, emb_s, lab_s)
  mib = 2 ** 20
  print(f"IRT loss + gradient, global batch {b}, dim {e}")
  print("| layout | per-device similarity block | peak MiB per device | "
        "ratio |")
  print("|---|---|---|---|")
  print(f"| 1 device (reference) | [{b}, {b}] | {one / mib:.1f} | 1.00 |")
  print(f"| {n} devices, shard_map | [{b // n}, {b}] | {many / mib:.1f} | "
        f"{many / one:.3f} |")


if __name__ == "__main__":
  main()
