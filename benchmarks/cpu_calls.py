"""Forward calls on a CPU: images per call against one call a batch.

  python benchmarks/cpu_calls.py [--variants Ti/16,S/16,B/16] [--batch 64]
      [--per_call 5,10,20] [--repeats 5] [--torch]

descriptor.MultiScale splits a batch on a one-device CPU placement into
calls of at most `descriptor.step_tokens(params)` tokens. This measures
why, through that same code: a jitted forward of the variant (random
weights, 224 px, float32, the CPU attention kernel) described by
MultiScale with one call a batch (the reference, same run) and with each
`--per_call` images a call, plus the library's own choice; the
configurations take turns in each repeat. The default batch, 64, is
`--mode=index`'s, so the last call of a split is a remainder, as there.
Columns: images/s (median of the repeats), ratio to one call, and the
largest difference of any descriptor from one call's. JAX runs on the CPU
(JAX_PLATFORMS=cpu) whatever else the host has.

--torch adds timm's model of the variant (random weights, under
`inference_mode`, in a child process of its own) called the same ways,
and the ratio vitret_jax / torch at each call size (needs the reference
stack: `make parity`).

glibc's malloc defaults, as `--mode=index` runs (VITRET_MALLOC=off); set
VITRET_MALLOC=keep to see how much of the gain the kept heap gives alone.
"""
import argparse
import json
import os
import statistics
import subprocess
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
  rows = [("one call", batch, None)] + [(str(n), n, n * tokens)
                                        for n in per_call]
  mine = min(own // tokens, batch)
  rows.append((f"library ({mine})", mine, own))
  describes = [descriptor.MultiScale(lambda x: apply(params, x),
                                     multiple=multiple, step_tokens=step)
               for _, _, step in rows]
  got = [d(images) for d in describes]  # compiles
  times = interleaved(describes, lambda d: d(images), repeats)
  return [(name, n, batch / t, float(np.abs(g - got[0]).max()))
          for (name, n, _), t, g in zip(rows, times, got)]


def interleaved(items, run, repeats):
  """Median seconds of `run(item)` for each item, the items taking turns
  in each repeat (the first one no longer gets the quietest moment)."""
  times = [[] for _ in items]
  for _ in range(repeats):
    for item, out in zip(items, times):
      start = time.perf_counter()
      run(item)
      out.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def torch_rates(variant, batch, per_call, repeats):
  """[(images a call, img/s)] of timm's model of `variant`, one call a
  batch and each of `per_call` images a call (run in a child process)."""
  import _workers  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(_workers.REPO, "tools"))
  import timm_parity  # pylint: disable=g-import-not-at-top
  torch, timm = timm_parity.import_timm()
  model = timm.create_model(_workers.TIMM[variant.split("/")[0]],
                            pretrained=False, num_classes=0,
                            global_pool="token").eval()
  images = torch.from_numpy(np.random.default_rng(0).normal(
      size=(batch, 3, 224, 224)).astype(np.float32))
  counts = [batch] + per_call
  call = lambda n: [model(images[i:i + n]) for i in range(0, batch, n)]
  with torch.inference_mode():
    for n in counts:
      call(n)
    times = interleaved(counts, call, repeats)
  return [(n, batch / t) for n, t in zip(counts, times)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="Ti/16,S/16,B/16")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--per_call", default="5,10,20")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch", action="store_true")
  parser.add_argument("--torch_worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_worker:
    print(json.dumps(torch_rates(
        args.torch_worker, args.batch,
        [int(n) for n in args.per_call.split(",")], args.repeats)))
    return
  os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX starts
  malloc = host_memory.configure(None)  # VITRET_MALLOC, before JAX starts
  per_call = [int(n) for n in args.per_call.split(",")]
  print(f"# forward passes on a CPU, batch {args.batch}, 224 px, float32; "
        f"{_devices.describe_cpu()}; {malloc}")
  print("| model | images a call | img/s | vs one call | max abs diff | "
        "torch img/s | torch vs its one call | vitret_jax / torch |")
  print("|---|---|---|---|---|---|---|---|")
  for variant in args.variants.split(","):
    rows = measure(variant, args.batch, per_call, args.repeats)
    theirs = {}
    if args.torch:
      counts = sorted({n for _, n, _, _ in rows[1:]})
      child = subprocess.run(
          [sys.executable, __file__, "--torch_worker", variant,
           "--batch", str(args.batch),
           "--per_call", ",".join(map(str, counts)),
           "--repeats", str(args.repeats)],
          capture_output=True, text=True, check=True)
      theirs = dict(json.loads(child.stdout.splitlines()[-1]))
    base = rows[0][2]
    for name, n, rate, diff in rows:
      line = (f"| {variant} | {name} | {rate:.1f} | {rate / base:.2f}x | "
              f"{diff:.1e} |")
      if n in theirs:
        line += (f" {theirs[n]:.1f} | {theirs[n] / theirs[args.batch]:.2f}x"
                 f" | {rate / theirs[n]:.2f}x |")
      else:
        line += " | | |"
      print(line, flush=True)


if __name__ == "__main__":
  main()
