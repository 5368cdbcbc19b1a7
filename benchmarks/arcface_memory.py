"""Per-device memory of ArcFace training at GLDv2-clean size: 81,313 classes x
512-d centres, their AdamW moments, and the loss's value and gradients for a
global batch, on 1 device versus the centres split over 8 (partial-FC
style, vitret_jax.arcface). Figures are XLA's compiled memory analysis per
device (arguments + outputs + temporaries of one jitted update of the
centres), no timing.

  python benchmarks/arcface_memory.py [--classes 81313] [--dim 512]
      [--batch 64] [--devices 8]
"""
import argparse

import _devices  # benchmarks/_devices.py

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--classes", type=int, default=81_313)
parser.add_argument("--dim", type=int, default=512)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--devices", type=int, default=8)
args = parser.parse_args()
_devices.simulate(args.devices)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from vitret_jax import arcface  # pylint: disable=g-import-not-at-top
from vitret_jax import optim  # pylint: disable=g-import-not-at-top
from vitret_jax import profiling  # pylint: disable=g-import-not-at-top
from vitret_jax import sharding  # pylint: disable=g-import-not-at-top


def per_device_bytes(n):
  """(centre bytes per device, peak bytes per device) of one jitted ArcFace
  update (loss, gradients, AdamW) on an n-device mesh."""
  mesh = sharding.make_mesh(n)
  c = arcface.padded_classes(args.classes, n)
  loss_fn = arcface.make_sharded_arcface(mesh, num_classes=args.classes)
  tx = optax.adamw(1e-3, weight_decay=1e-4, mask=optim.decay_mask)
  cls = sharding.class_sharding(mesh)
  batch = sharding.batch_sharding(mesh)
  w = jax.ShapeDtypeStruct((c, args.dim), jnp.float32, sharding=cls)
  params = {"class_weights": w}
  opt = jax.eval_shape(tx.init, params)
  opt = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=(cls if x.ndim == 2 else
                                      sharding.replicated(mesh))), opt)
  emb = jax.ShapeDtypeStruct((args.batch, args.dim), jnp.float32,
                             sharding=batch)
  lab = jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=batch)

  def update(params, opt_state, emb, labels):
    loss, (g_p, g_e) = jax.value_and_grad(
        lambda p, e: loss_fn(e, labels, p)[0], argnums=(0, 1))(params, emb)
    updates, opt_state = tx.update(g_p, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, g_e

  compiled = jax.jit(update, donate_argnums=(0, 1)).lower(
      params, opt, emb, lab).compile()
  return c * args.dim * 4 // n, profiling.compiled_bytes(compiled)


def main():
  mib = 2 ** 20
  one_w, one = per_device_bytes(1)
  many_w, many = per_device_bytes(args.devices)
  print(f"ArcFace update at {args.classes:,} classes x {args.dim}-d "
        f"(padded to {arcface.padded_classes(args.classes, args.devices):,}),"
        f" global batch {args.batch}, AdamW")
  print("| layout | centres per device MiB | peak per device MiB "
        "(centres, 2 Adam moments, logits, gradients) | ratio |")
  print("|---|---|---|---|")
  print(f"| 1 device (reference) | {one_w / mib:.1f} | {one / mib:.1f} | "
        f"1.000 |")
  print(f"| {args.devices} devices, classes split | {many_w / mib:.1f} | "
        f"{many / mib:.1f} | {many / one:.3f} |")


if __name__ == "__main__":
  main()
