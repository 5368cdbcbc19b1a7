"""The device measurements in one command: parity of the device against the
host CPU, then train and embedding speed in bfloat16 of vitret_jax and of
timm on the same device, within a time budget.

  python benchmarks/device_check.py            # on a GPU or TPU host
  python benchmarks/device_check.py --smoke    # the same code, tiny, on CPU

Prints, as Markdown tables:
- the device, the library versions and what model.dtype / model.attention
  "auto" resolve to there (models/attention.py);
- S/16 forward parity against the host CPU, same weights and images:
  float32 max abs at jax.lax.Precision.HIGHEST (the parity check) and at
  the default precision (what float32 training gets: TF32 on NVIDIA GPUs,
  one bf16 pass on TPUs), and bfloat16's relative L2, apart;
- per model (default S/16 and B/16 at 224 px, B/16 at 384 px), the
  trainer's own jitted train step (IRT loss + KoLeo, AdamW) in bfloat16:
  images/s, MFU, the model's FLOPs and XLA's, peak device memory beside
  XLA's compiled memory, compile time and embedding images/s;
- timm's ViT with the same loss and AdamW under torch.autocast(bfloat16),
  eager and torch.compile'd, with the ratio vitret_jax / timm (> 1:
  vitret_jax faster) only where torch runs on the device JAX measured (an
  NVIDIA GPU against the same GPU; elsewhere the cells say why).

No contention: every measurement runs in its own child process, one at a
time, and this process never starts a JAX backend or torch. A child holds
the device alone (a TPU admits one process anyway) and frees all of it
when it exits (XLA's and torch's allocators keep their memory until then,
preallocated or not), so neither framework runs in memory the other
holds, and each model's peak memory is its own fresh process's.

MFU (model-FLOPs utilisation, PaLM appendix B) counts the model's own
FLOPs (`vit_flops`), matmuls only, 2 per multiply-add, per image:
  patch embedding   2 N (3 p^2) D
  each of L blocks  8 T D^2 (q, k, v, output) + 4 T^2 D (scores, and
                    weights x values) + 4 T D M (MLP)
  head              2 D E (the IRT projection, when model.proj_dim is set)
with N = (S/p)^2 patches of p px in an S px image, T = N + 1 tokens (+1
distilled), width D, MLP width M; a train step is 3x its forward
(backward = 2x forward) times the batch. MFU = that / step seconds / the
chip's peak dense bf16 FLOP/s (the step runs on one device). XLA's own
count of the compiled step is printed beside it: it adds the element-wise
work (LayerNorm, softmax, GELU, the loss, AdamW) and misses custom calls,
so a row using cuDNN attention is marked, its XLA count short of the
model's.

Budget: --budget_s (default 480 s) bounds the whole run. A child starts
only if its whole time limit fits in what is left, so the run ends within
the budget even if every child runs to its limit; the project's own
measurements come first, then timm eager, then torch.compile, and what did
not fit is named in the table.

--smoke runs every step with a test-size model on the CPU (the test suite
runs it), so the script is known to run the day a device is lent.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import _devices  # benchmarks/_devices.py

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, matched
# against jax's device_kind (longest name first). MFU is left out on a
# device not listed.
PEAK_BF16 = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
    "A100": 312e12, "L4": 121e12, "MI300X": 1307e12, "TPU v4": 275e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}
# Time limit (seconds) of each kind of child; see the module doc's budget.
LIMITS = {"probe": 120, "jax": 150, "torch_probe": 60, "torch_eager": 90,
          "torch_compile": 150}


def peak_flops(device_kind):
  for name in sorted(PEAK_BF16, key=len, reverse=True):
    if name.lower() in device_kind.lower():
      return PEAK_BF16[name]
  return None


def parse_models(spec):
  """"S/16@224,B/16@384" -> [("S/16", 224), ("B/16", 384)]."""
  out = []
  for item in filter(None, spec.split(",")):
    variant, _, size = item.partition("@")
    out.append((variant, int(size or 224)))
  return out


def vit_flops(cfg, batch=1):
  """The model's own FLOPs of a train step of `batch` images (module doc),
  or None for a model the formula does not cover (a hybrid, a DToP head,
  locality blocks)."""
  from vitret_jax.models import vit  # pylint: disable=g-import-not-at-top
  arch = vit.decode_variant(cfg.variant)
  if arch["resnet"] or cfg.head != "irt" or tuple(cfg.locality_blocks):
    return None
  d, m, p = arch["width"], arch["mlp_dim"], arch["patch_size"]
  n = (cfg.image_size // p) ** 2
  t = n + (2 if cfg.distilled else 1)
  forward = (2 * n * 3 * p * p * d
             + arch["depth"] * (8 * t * d * d + 4 * t * t * d + 4 * t * d * m)
             + 2 * d * (cfg.proj_dim or 0))
  return 3 * forward * batch


def same_device(jax_info, torch_info):
  """(True, "") when torch computes on the device JAX measured, else
  (False, why). `torch_info` is probe_torch's answer, or a string saying
  why torch could not be asked."""
  platform, kind = jax_info["platform"], jax_info["kind"]
  if isinstance(torch_info, str):
    return False, torch_info
  where = (f"torch {torch_info['torch']} computes on {torch_info['name']} "
           f"({torch_info['device']})")
  if platform == "tpu":
    return False, f"{where}: torch has no TPU here, JAX ran on {kind}"
  want = {"gpu": "cuda", "rocm": "rocm", "cpu": "cpu"}.get(platform)
  if torch_info["device"] != want:
    return False, f"{where}, not JAX's {kind} ({platform})"
  if want != "cpu" and torch_info["name"].strip() != kind.strip():
    return False, f"{where}, JAX's device is {kind}"
  return True, ""


class Budget:
  """Children run one at a time, each only if its time limit fits in what
  is left of `total` seconds; `runner(args, limit)` runs one."""

  def __init__(self, total, runner):
    self.total, self.runner = total, runner
    self.start = time.monotonic()
    self.limits = []  # (what, limit) of every child started

  def left(self):
    return self.total - (time.monotonic() - self.start)

  def run(self, what, args, limit):
    """(result, why): the child's JSON, or None and why there is none."""
    if limit > self.left():
      return None, (f"left out: its {limit:.0f} s limit does not fit in "
                    f"the {max(self.left(), 0):.0f} s left of --budget_s")
    self.limits.append((what, limit))
    return self.runner(args, limit)


def run_child(args, limit):
  """This script with `args` in a child process of its own session, killed
  (with whatever it started) after `limit` seconds; (json, "") or (None,
  why)."""
  cmd = [sys.executable, os.path.abspath(__file__), *args]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  try:
    out, err = proc.communicate(timeout=limit)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return None, f"over its {limit:.0f} s limit"
  except BaseException:  # Ctrl-C or SIGTERM: never leave it on the device
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise
  lines = [l for l in out.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    last = (err.strip().splitlines() or [f"exit status {proc.returncode}"])
    return None, last[-1][:120].replace("|", "/")
  return json.loads(lines[-1]), ""


def child_main(args):
  """One measurement (_device_work), its result as one JSON line."""
  import _device_work as work  # pylint: disable=g-import-not-at-top
  variant, size = parse_models(args.model or "mu/8@32")[0]
  if args.child == "probe":
    out = work.probe(args.smoke)
  elif args.child == "jax":
    out = work.measure_jax(variant, size, args.batch, args.steps, vit_flops)
  elif args.child == "torch_probe":
    out = work.probe_torch()
  else:
    out = work.measure_torch(variant, size, args.batch, args.steps,
                             args.child == "torch_compile")
  print(json.dumps(out), flush=True)
  return 0


def has_torch():
  """torch and timm are installed (nothing is imported)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  return all(importlib.util.find_spec(m) for m in ("torch", "timm"))


def _gflop(flops):
  """GFLOP, to 0.1 from 100 GFLOP up, else to 3 significant digits."""
  if flops is None:
    return "-"
  g = flops / 1e9
  return f"{g:,.1f}" if g >= 100 else f"{g:.3g}"


def _fmt(x, spec, none="-"):
  return none if x is None else format(x, spec)


def print_device(info):
  auto = info["auto"]
  memory = _fmt(info.get("memory_gib"), ".1f")
  print(f"device: {info['kind']} ({info['platform']}, {info['count']} "
        f"device(s), {memory} GiB each)")
  print("versions: " + ", ".join(f"{k} {v}"
                                 for k, v in info["versions"].items()))
  print(f"model.dtype=auto -> {auto['dtype']}; model.attention=auto -> "
        f"{auto['attention']} ({auto['why']})")
  if "parity" not in info:
    print(f"\nforward parity not measured: {info['parity_error']}")
    return
  par = info["parity"]
  fp32 = par["float32_highest"]
  print(f"\n| forward parity, {info['parity_model']}, device vs host CPU "
        f"(fp32, HIGHEST) | value |\n|---|---|\n"
        f"| float32 at HIGHEST precision, max abs | {fp32:.2e} "
        f"({'within' if fp32 <= 1e-4 else 'OVER'} 1e-4) |\n"
        f"| float32 at the default precision, max abs | "
        f"{par['float32_default']:.2e} |\n"
        f"| bfloat16, relative L2 | {par['bfloat16']:.2e} |")


def jax_table(args, info, todo, rows):
  fps = peak_flops(info["kind"])
  print(f"\nvitret_jax on one device, bf16, batch {args.batch}, mean of "
        f"{args.steps} steps after a warm-up, one child process per model; "
        f"MFU: the model's own FLOPs over "
        + (f"the device's {fps / 1e12:.0f} TFLOP/s" if fps
           else "an unknown peak (MFU -)"))
  print("| model | attention | train img/s | MFU | model GFLOP/step | XLA "
        "GFLOP/step | XLA / model | peak GiB | XLA compiled GiB | compile s "
        "| embed img/s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  notes = set()
  for variant, size in todo:
    r, why = rows[(variant, size)]
    if r is None:
      print(f"| {variant} @ {size} | {why} |" + " - |" * 9)
      continue
    model, xla = r["model_flops"], r["xla_flops"]
    mfu = (model / r["step_s"] / fps
           if model and fps and info["platform"] != "cpu" else None)
    mark = "*" if r["hidden"] else ""
    if r["hidden"]:
      notes.add(f"*: XLA's count leaves out {', '.join(r['hidden'])} "
                f"(cuDNN attention, a custom call).")
    if r["peak_source"] != "allocator":
      notes.add(f"peak GiB: the child's {r['peak_source']} (the CPU keeps "
                f"no allocator statistics).")
    print(f"| {variant} @ {size} | {r['attention']} | "
          f"{r['train_img_s']:.1f} | {_fmt(mfu, '.1%')} | "
          f"{_gflop(model)} | {_gflop(xla)}{mark} | "
          f"{_fmt(model and xla / model, '.3f')}{mark} | "
          f"{r['peak_gib']:.2f} | {_fmt(r['compiled_gib'], '.2f')} | "
          f"{r['compile_s']:.1f} | {r['embed_img_s']:.1f} |")
  for note in sorted(notes):
    print(note)


def measure_timm(args, budget, info, todo, jax_rows):
  """({(model, kind): (result, why)}, the torch line): timm eager for every
  model, then torch.compile, each where the budget allows and torch runs
  on JAX's device."""
  import _workers  # pylint: disable=g-import-not-at-top
  timm_name = lambda m: _workers.TIMM.get(m[0].split("/")[0])
  out, line = {}, ""
  if args.no_torch:
    why = "--no_torch"
  elif not any(map(timm_name, todo)):
    why = "no timm model of these sizes"
  elif not has_torch():
    why = "torch and timm are not installed (make parity installs them)"
  else:
    torch_info, why = budget.run("torch_probe", ["--child", "torch_probe"],
                                 LIMITS["torch_probe"])
    if torch_info is not None:
      build = (f"CUDA {torch_info['cuda']}" if torch_info["cuda"] else
               f"HIP {torch_info['hip']}" if torch_info["hip"] else
               "a CPU build")
      line = (f"torch {torch_info['torch']} ({build}), timm "
              f"{torch_info['timm']}, on {torch_info['name']} "
              f"({torch_info['device']})")
    _, why = same_device(info, torch_info or f"torch probe: {why}")
  for kind in ("eager", "compile"):
    for m in todo:
      if why:
        out[(m, kind)] = (None, why)
      elif not timm_name(m):
        out[(m, kind)] = (None, "no timm model of this size")
      elif jax_rows[m][0] is None:
        out[(m, kind)] = (None, "vitret_jax's row failed")
      else:
        out[(m, kind)] = budget.run(
            f"torch_{kind}", ["--child", f"torch_{kind}", "--model",
                              f"{m[0]}@{m[1]}", "--batch", str(args.batch),
                              "--steps", str(args.steps)],
            LIMITS[f"torch_{kind}"])
  return out, line or f"not measured: {why}"


def timm_table(todo, jax_rows, timm_rows, line):
  print(f"\ntimm on the same device, torch.autocast(bfloat16), same batch, "
        f"loss and AdamW; ratio = vitret_jax / timm (> 1: vitret_jax "
        f"faster), printed only when both ran on one device. torch: {line}")
  print("| model | timm eager train img/s | ratio | timm compiled train "
        "img/s | ratio | timm eager embed img/s | ratio | timm peak GiB |")
  print("|---|---|---|---|---|---|---|---|")
  reasons = []  # why cells are empty, numbered once below the table

  def why_cell(why):
    if why not in reasons:
      reasons.append(why)
    return f"not measured ({reasons.index(why) + 1})"

  for m in todo:
    mine = jax_rows[m][0]
    cells = []
    for kind, task in (("eager", "train"), ("compile", "train"),
                       ("eager", "embed")):
      r, why = timm_rows[(m, kind)]
      if r is None:
        cells += [why_cell(why), "-"]
      else:
        ratio = mine[f"{task}_img_s"] / r[f"{task}_img_s"]
        cells += [f"{r[f'{task}_img_s']:.1f}", f"{ratio:.2f}"]
    eager = timm_rows[(m, "eager")][0]
    cells.append(_fmt(eager and eager["peak_gib"], ".2f"))
    print(f"| {m[0]} @ {m[1]} | " + " | ".join(cells) + " |")
  for i, why in enumerate(reasons):
    print(f"({i + 1}) {why}")


def report(args, budget):
  """The parent: children one after another, then the tables."""
  print(f"# device check; host CPU: {_devices.describe_cpu()}")
  info, why = budget.run("probe", ["--child", "probe"]
                         + (["--smoke"] if args.smoke else []),
                         LIMITS["probe"])
  if info is None:
    print(f"The device probe failed: {why}")
    return 1
  print_device(info)
  todo = parse_models(args.models)
  common = ["--batch", str(args.batch), "--steps", str(args.steps)]
  jax_rows = {}
  for variant, size in todo:
    jax_rows[(variant, size)] = budget.run(
        "jax", ["--child", "jax", "--model", f"{variant}@{size}"] + common,
        LIMITS["jax"])
  timm_rows, line = measure_timm(args, budget, info, todo, jax_rows)
  jax_table(args, info, todo, jax_rows)
  timm_table(todo, jax_rows, timm_rows, line)
  spent = time.monotonic() - budget.start
  print(f"\n{spent:.0f} s of the {budget.total:.0f} s budget; "
        f"{len(budget.limits)} children, time limits "
        + ", ".join(f"{w} {l:.0f} s" for w, l in budget.limits))
  return 0


def main(argv=None, runner=run_child):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="test-size model on CPU, seconds")
  parser.add_argument("--models", default="S/16@224,B/16@224,B/16@384")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--budget_s", type=float, default=480,
                      help="the whole run's time; children that would not "
                      "fit are left out, and the table says so")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--model", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return child_main(args)
  if args.smoke:
    _devices.simulate(1)  # the children: one CPU device
    args.models, args.batch, args.steps = "mu/8@32", 4, 2
  try:
    if not parse_models(args.models):
      raise ValueError("no model")
  except ValueError:
    parser.error(f"--models={args.models!r}: expected a comma-separated "
                 f"list of <variant>[@<pixels>], e.g. S/16@224,B/16@384.")
  # SIGTERM ends this process through Python (SystemExit), so that the
  # running child, in a session of its own, is killed first (run_child).
  previous = signal.signal(signal.SIGTERM,
                           lambda *_: sys.exit(128 + signal.SIGTERM))
  try:
    return report(args, Budget(args.budget_s, runner))
  finally:
    signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
  sys.exit(main())
