"""What an ISA cap reaches on a CPU: XLA's code, or also its matrix products.

  python benchmarks/isa_cap.py [--caps AVX2,SSE4_2] [--size 2048] [--repeats 15]

Capping the vector ISA (XLA_FLAGS=--xla_cpu_max_isa=..., torch's
ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) is a
tempting way to estimate a ratio against torch on an older CPU than the one
at hand. This measures whether the XLA cap does that: a jitted float32
matrix product [size, size] @ [size, size] and a jitted element-wise
expression over the same array, each in a child process with no cap (the
reference, same run) and with each of `--caps`; the children take turns in
each repeat. Columns: median milliseconds a call and the ratio to the
uncapped child. A cap that reaches a computation slows it (SSE4.2 has
4-lane vectors against AVX-512's 16); one that does not leaves it as it
was. JAX runs on the CPU (JAX_PLATFORMS=cpu).

--torch adds torch's float32 matrix product under the same caps as its
libraries take them (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS; needs the reference stack: `make parity`).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _devices  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402


# The caps torch's libraries take for each of XLA's names.
TORCH_CAPS = {
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "SSE4_2": {"ATEN_CPU_CAPABILITY": "default",
               "ONEDNN_MAX_CPU_ISA": "SSE41",
               "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def timed(fn, repeats):
  """Median milliseconds of `repeats` calls, the first call not counted."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def child(size, repeats, torch_too):
  """Times the programs in this process; prints one JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  host = np.random.default_rng(0).random((size, size)).astype(np.float32)
  x = jnp.asarray(host)
  matmul = jax.jit(lambda a: a @ a)
  elementwise = jax.jit(
      lambda a: jnp.tanh(a) * jnp.exp(-a) + jnp.sqrt(jnp.abs(a)))
  out = {"matmul": timed(lambda: matmul(x).block_until_ready(), repeats),
         "elementwise": timed(lambda: elementwise(x).block_until_ready(),
                              repeats)}
  if torch_too:
    import torch  # pylint: disable=g-import-not-at-top
    t = torch.from_numpy(host)
    out["torch"] = timed(lambda: torch.mm(t, t), repeats)
  print(json.dumps(out))


def run_child(cap, size, repeats, torch_too):
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_cpu_max_isa")]
  env = {k: v for k, v in os.environ.items()
         if k not in TORCH_CAPS["AVX2"]}
  if cap:
    flags.append(f"--xla_cpu_max_isa={cap}")
    env.update(TORCH_CAPS.get(cap, {}))
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
  r = subprocess.run([sys.executable, __file__, "--child", "--size",
                      str(size), "--repeats", str(repeats)]
                     + ["--torch"] * torch_too,
                     capture_output=True, text=True, env=env, check=False)
  if r.returncode:
    raise SystemExit(f"child (cap {cap or 'none'}) failed:\n"
                     f"{r.stderr[-2000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--caps", default="AVX2,SSE4_2")
  parser.add_argument("--size", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--torch", action="store_true")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.size, args.repeats, args.torch)
    return
  unknown = [c for c in args.caps.split(",") if c and c not in TORCH_CAPS]
  if args.torch and unknown:
    raise SystemExit(f"--torch: no torch caps known for {unknown}; use "
                     f"{sorted(TORCH_CAPS)}.")
  caps = [""] + [c for c in args.caps.split(",") if c]
  seen = {cap: [] for cap in caps}
  for _ in range(args.rounds):  # the caps take turns
    for cap in caps:
      seen[cap].append(run_child(cap, args.size, args.repeats, args.torch))
  base = {k: statistics.median(r[k] for r in seen[""])
          for k in seen[""][0]}
  print(f"# jitted float32 programs on [{args.size}, {args.size}], median "
        f"of {args.rounds} x {args.repeats} calls; "
        f"{_devices.describe_cpu()}")
  names = {"matmul": "XLA matmul", "elementwise": "XLA element-wise",
           "torch": "torch matmul"}
  print("| cap | " + " | ".join(f"{names[k]} ms | vs no cap" for k in base)
        + " |")
  print("|---" * (1 + 2 * len(base)) + "|")
  for cap in caps:
    ms = {k: statistics.median(r[k] for r in seen[cap]) for k in base}
    print(f"| {cap or 'none (reference)'} | " + " | ".join(
        f"{ms[k]:.2f} | {ms[k] / base[k]:.2f}x" for k in base) + " |")


if __name__ == "__main__":
  main()
