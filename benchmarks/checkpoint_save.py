"""Seconds per checkpoint save of a data-parallel training state (parameters
and two Adam moments, replicated over 8 simulated CPU devices), with
orbax's default jax.Array handler (every replicated array split between
the replicas, one small compiled slice per array and device) against
vitret_jax's (`checkpoint.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL`: split only
where each replica's slice is at least 64 KiB). Each measurement runs in a
fresh process without a compilation cache, alternating the two handlers.

  python benchmarks/checkpoint_save.py [--models Rmu+mu/32,Ti/8,S/16]
      [--devices 8] [--repeats 2] [--saves 4]

"first" is a process's first save (it compiles the slices), "later" the
median of the saves after it; ratio = orbax default / vitret_jax (> 1:
vitret_jax is faster).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import _devices  # benchmarks/_devices.py

SIZES = {"Rmu+mu/32": 96, "Ti/8": 64, "S/16": 224}


def child(handler, variant, saves):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  if handler == "orbax":  # orbax's own default, as before vitret_jax's
    checkpoint.type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
        jax.Array, ocp.type_handlers.ArrayHandler(
            array_metadata_store=checkpoint.array_metadata_store.Store()),
        override=True, ignore_warnings=True)
  size = SIZES[variant]
  cfg = mlc.ConfigDict(dict(
      encoder="vit", variant=variant, image_size=size, head="irt", proj_dim=0,
      dropout=0.0, drop_path_rate=0.0, dtype="float32", remat=False))
  model = models.build_model(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  state = [jax.tree.map(lambda s: jax.device_put(
      rng.normal(size=s.shape).astype(s.dtype), rep), shapes)
           for _ in range(3)]
  leaves = jax.tree.leaves(state)
  times = []
  with tempfile.TemporaryDirectory() as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      for i in range(saves):
        t0 = time.perf_counter()
        ckptr.save(os.path.join(tmp, str(i)), state)
        ckptr.wait_until_finished()
        times.append(time.perf_counter() - t0)
  print(json.dumps(dict(times=times, arrays=len(leaves),
                        mib=sum(x.nbytes for x in leaves) / 2**20)))


def run(handler, variant, devices, saves):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}"))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # every first save compiles
  out = subprocess.run([sys.executable, __file__, "--child", handler,
                        "--models", variant, "--saves", str(saves)],
                       capture_output=True, text=True, env=env, check=False)
  if out.returncode:
    raise SystemExit(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default=",".join(SIZES))
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--saves", type=int, default=4)
  p.add_argument("--child", choices=("orbax", "vitret"))
  a = p.parse_args()
  if a.child:
    return child(a.child, a.models, a.saves)
  print(f"{a.devices} simulated CPU devices, {_devices.describe_cpu()}; "
        f"{a.repeats} processes per handler, alternating; {a.saves} saves "
        "each.\n")
  print("| model | arrays | state MiB | first save s, orbax / vitret_jax "
        "| later saves s, orbax / vitret_jax | ratio first | ratio later |")
  print("|---|---|---|---|---|---|---|")
  for variant in a.models.split(","):
    res = {"orbax": [], "vitret": []}
    for _ in range(a.repeats):
      for handler in res:
        res[handler].append(run(handler, variant, a.devices, a.saves))
    first = {h: statistics.median(r["times"][0] for r in v)
             for h, v in res.items()}
    later = {h: statistics.median(t for r in v for t in r["times"][1:])
             for h, v in res.items()}
    r0 = res["orbax"][0]
    print(f"| {variant} | {r0['arrays']} | {r0['mib']:.0f} | "
          f"{first['orbax']:.2f} / {first['vitret']:.2f} | "
          f"{later['orbax']:.2f} / {later['vitret']:.2f} | "
          f"{first['orbax'] / first['vitret']:.2f} | "
          f"{later['orbax'] / later['vitret']:.2f} |")


if __name__ == "__main__":
  main()
