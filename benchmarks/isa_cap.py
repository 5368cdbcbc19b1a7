"""What an ISA cap reaches on a CPU: XLA's code, or also its matrix products.

  python benchmarks/isa_cap.py [--caps AVX2,SSE4_2] [--size 2048]
      [--repeats 15] [--rounds 2] [--torch]

Capping the vector ISA (XLA_FLAGS=--xla_cpu_max_isa=..., torch's
ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) is a
tempting way to estimate a ratio against torch on an older CPU than the one
at hand. This measures whether the XLA cap does that: a jitted float32
matrix product [size, size] @ [size, size] and a jitted element-wise
expression over the same array, each in a child process with no cap (the
reference, same run) and with each of `--caps`; the children take turns in
each of `--rounds`. Columns: milliseconds a call (the median over the
children of each one's median) and the ratio to the uncapped children.
A cap that reaches a computation slows it (SSE4.2 has 4-lane vectors
against AVX-512's 16); one that does not leaves it as it was. JAX runs
on the CPU (JAX_PLATFORMS=cpu).

--torch adds torch's float32 `torch.mm` under the same level of torch's
caps, in two children: ATEN_CPU_CAPABILITY with ONEDNN_MAX_CPU_ISA, and
MKL_ENABLE_INSTRUCTIONS alone (needs the reference stack: `make parity`).
Every child clears the caps it is not given.
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


# The environment of each cap, by what it caps: XLA's generated code, and
# torch's libraries (ATen's own kernels and oneDNN; MKL, which runs its
# float32 matrix products on x86).
CAPS = {
    "AVX2": {"xla": "AVX2", "aten": {"ATEN_CPU_CAPABILITY": "avx2",
                                     "ONEDNN_MAX_CPU_ISA": "AVX2"},
             "mkl": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}},
    "SSE4_2": {"xla": "SSE4_2", "aten": {"ATEN_CPU_CAPABILITY": "default",
                                         "ONEDNN_MAX_CPU_ISA": "SSE41"},
               "mkl": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}},
}
CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
            "MKL_ENABLE_INSTRUCTIONS")


def timed(fn, repeats):
  """Median milliseconds of `repeats` calls, the first call not counted."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def child(size, repeats, what):
  """Times `what` (xla: both XLA programs; torch: torch.mm) in this
  process; prints one JSON line."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  host = np.random.default_rng(0).random((size, size)).astype(np.float32)
  if what == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    t = torch.from_numpy(host)
    print(json.dumps({"mm": timed(lambda: torch.mm(t, t), repeats)}))
    return
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(host)
  matmul = jax.jit(lambda a: a @ a)
  elementwise = jax.jit(
      lambda a: jnp.tanh(a) * jnp.exp(-a) + jnp.sqrt(jnp.abs(a)))
  print(json.dumps({
      "matmul": timed(lambda: matmul(x).block_until_ready(), repeats),
      "elementwise": timed(lambda: elementwise(x).block_until_ready(),
                           repeats)}))


def child_env(cap, part):
  """The environment of a child timing `part` (xla, aten or mkl) under
  `cap` ("" for none): that part's cap alone, every other cap cleared."""
  env = {k: v for k, v in os.environ.items() if k not in CAP_VARS}
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_cpu_max_isa")]
  if cap and part == "xla":
    flags.append(f"--xla_cpu_max_isa={CAPS[cap]['xla']}")
  elif cap:
    env.update(CAPS[cap][part])
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
  return env


def run_child(cap, part, size, repeats):
  r = subprocess.run(
      [sys.executable, __file__, "--child", "xla" if part == "xla" else
       "torch", "--size", str(size), "--repeats", str(repeats)],
      capture_output=True, text=True, env=child_env(cap, part), check=False)
  if r.returncode:
    raise SystemExit(f"child ({part}, cap {cap or 'none'}) failed:\n"
                     f"{r.stderr[-2000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--caps", default="AVX2,SSE4_2")
  parser.add_argument("--size", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--torch", action="store_true")
  parser.add_argument("--child", choices=("xla", "torch"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.size, args.repeats, args.child)
    return
  caps = [""] + [c for c in args.caps.split(",") if c]
  unknown = [c for c in caps[1:] if c not in CAPS]
  if unknown:
    raise SystemExit(f"--caps: {unknown} unknown; known: {sorted(CAPS)}.")
  parts = ["xla"] + (["aten", "mkl"] if args.torch else [])
  seen = {(cap, part): [] for cap in caps for part in parts}
  for _ in range(args.rounds):  # the children take turns
    for cap in caps:
      for part in parts:
        seen[cap, part].append(run_child(cap, part, args.size, args.repeats))
  columns = [("xla", "matmul", "XLA matmul"),
             ("xla", "elementwise", "XLA element-wise")]
  if args.torch:
    columns += [("aten", "mm", "torch mm, ATen + oneDNN caps"),
                ("mkl", "mm", "torch mm, MKL cap")]
  ms = {(cap, part, key): statistics.median(r[key] for r in seen[cap, part])
        for cap in caps for part, key, _ in columns}
  print(f"# float32 programs on [{args.size}, {args.size}]: the median over "
        f"{args.rounds} child processes of each one's median of "
        f"{args.repeats} calls; {_devices.describe_cpu()}")
  print("| cap | " + " | ".join(f"{name} ms | vs no cap"
                                for _, _, name in columns) + " |")
  print("|---" * (1 + 2 * len(columns)) + "|")
  for cap in caps:
    print(f"| {cap or 'none (reference)'} | " + " | ".join(
        f"{ms[cap, part, key]:.2f} | "
        f"{ms[cap, part, key] / ms['', part, key]:.2f}x"
        for part, key, _ in columns) + " |")


if __name__ == "__main__":
  main()
