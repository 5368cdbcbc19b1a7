"""Train-step and embedding throughput: vitret_jax against PyTorch + timm on
the same work, measured in one run with the two alternating.

The same work in both (benchmarks/_workers.py: timm's ViT of the variant,
the IRT loss + KoLeo written in torch, AdamW with the same weight-decay
groups, the same random batch). Each framework runs in its own worker
process, so its memory is its own; the parent sends "run N steps" to one,
then the other, alternating which goes first, and reports medians.

  python benchmarks/throughput.py [--models Ti/16,S/16,B/16,Ti/8@64]
      [--repeats 3] [--steps 2] [--train_batch 32] [--embed_batch 64]

Needs the reference stack (`make parity`: torch 2.13.0 CPU, timm 1.0.31).

The vitret_jax worker follows VITRET_MALLOC as `python -m vitret_jax.main`
does (`vitret_jax.host_memory`; docs/benchmarks.md: VITRET_MALLOC=keep).
The torch worker runs as users run torch, with glibc's defaults;
`--torch_malloc keep` gives it the same settings, to show what they are
worth to torch.

  python benchmarks/throughput.py --project [--mfu 0.3]

prints instead the projected wall time of each paper's recipe (docs/irt.md
and docs/dtop.md) on one H100 and on a TPU v5e-8: the model's own
FLOPs (benchmarks/_flops.py, the count MFU divides: matmuls and
convolutions of the config's model at the training size, x3 for the
backward pass, +1 forward for In-Shop's key encoder; the evaluation at its
real sizes and scales), divided by the accelerator's peak bf16 rate
(_flops.PEAK_BF16) times an assumed model-FLOPs utilisation. A
projection, not a measurement: no torch needed, nothing is run.
Columns: images/s (median of the repeats), ratio vitret_jax / torch (> 1:
vitret_jax faster), vitret_jax compile time, peak memory (XLA's compiled
memory analysis of the step, and each worker's peak RSS growth).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import _devices  # benchmarks/_devices.py
import _flops  # benchmarks/_flops.py
import _workers  # benchmarks/_workers.py

REPO = _workers.REPO


def parse_model(spec):
  """"S/16" -> ("S/16", 224); "Ti/8@64" -> ("Ti/8", 64)."""
  variant, _, size = spec.partition("@")
  return variant, int(size or 224)


def check_models(spec):
  """The --models list, or a message naming what is wrong with it (before
  any worker starts: a worker's own traceback comes after its compile)."""
  models = []
  for m in spec.split(","):
    try:
      variant, size = parse_model(m.strip())
    except ValueError:
      return None, f"--models: {m!r}: the size after '@' must be an integer."
    size_name, _, patch = variant.partition("/")
    if size_name not in _workers.TIMM or not patch.isdigit():
      return None, (f"--models: {m!r}: expected <size>/<patch>[@<pixels>] "
                    f"with size one of {sorted(_workers.TIMM)} (plain ViTs, "
                    "the ones timm builds the same way), e.g. S/16 or "
                    "Ti/8@64.")
    models.append(m.strip())
  return models, None


def worker_main(kind, model, train_b, embed_b, torch_malloc):
  variant, size = parse_model(model)
  if kind == "jax" or torch_malloc == "keep":  # before JAX's backend starts
    sys.path.insert(0, REPO)
    from vitret_jax import host_memory  # pylint: disable=g-import-not-at-top
    malloc = host_memory.configure(None if kind == "jax" else "keep")
  else:
    malloc = "glibc malloc defaults"
  cls = _workers.JaxWorker if kind == "jax" else _workers.TorchWorker
  w = cls(variant, size, train_b, embed_b)
  print(json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
      out = {"seconds": w.run(cmd["task"], cmd["n"])}
    else:
      out = dict(w.info(), malloc=malloc)
    print(json.dumps(out), flush=True)
    if cmd["op"] == "info":
      return


# ---------------------------------------------------------------- parent


class Worker:
  def __init__(self, kind, model, args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    self.p = subprocess.Popen(
        [sys.executable, __file__, "--worker", kind, "--models", model,
         "--train_batch", str(args.train_batch), "--embed_batch",
         str(args.embed_batch), "--torch_malloc", args.torch_malloc],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    self._read()

  def _read(self):
    for line in self.p.stdout:
      if line.startswith("{"):
        return json.loads(line)
    raise RuntimeError("worker ended early (see its stderr above)")

  def ask(self, **cmd):
    self.p.stdin.write(json.dumps(cmd) + "\n")
    self.p.stdin.flush()
    return self._read()


def measure(model, args):
  workers = {"jax": Worker("jax", model, args),
             "torch": Worker("torch", model, args)}
  per = {"train": args.train_batch, "embed": args.embed_batch}
  rates = {(k, t): [] for k in workers for t in per}
  for r in range(args.repeats):
    order = ["jax", "torch"] if r % 2 == 0 else ["torch", "jax"]
    for task in per:
      for kind in order:
        s = workers[kind].ask(op="run", task=task, n=args.steps)["seconds"]
        rates[(kind, task)].append(per[task] * args.steps / s)
  info = {k: w.ask(op="info") for k, w in workers.items()}
  for kind in workers:
    kernels = info[kind].get("kernels")
    print(f"<!-- {model} {kind} worker: {info[kind]['malloc'].rstrip('.')}"
          f"{'; ' + kernels if kernels else ''} -->", flush=True)
  rows = []
  for task in per:
    j = statistics.median(rates[("jax", task)])
    t = statistics.median(rates[("torch", task)])
    rows.append((model, task, per[task], j, t, j / t,
                 info["jax"][f"compile_{task}_s"],
                 info["jax"]["xla_train_mib"] if task == "train" else None,
                 info["jax"]["rss_growth_mib"],
                 info["torch"]["rss_growth_mib"]))
  return rows


# ---------------------------------------------------------------- projection

# Peak dense bf16 FLOP/s: an H100 SXM; a TPU v5e-8 is 8 chips.
PEAK = {"H100": _flops.peak_flops(_flops.H100),
        "TPU v5e-8": 8 * _flops.peak_flops(_flops.TPU_V5E)}
# (row, config file, config arg, overrides, evaluation images per eval).
REVISITED = (4_993 + 70) + (6_322 + 70)  # ROxford + RParis, db + queries
RECIPES = (
    ("IRT CUB-200-2011", "cub", "variant=S/16", {"model.distilled": True},
     5_924),
    ("IRT SOP", "sop", "variant=S/16", {"model.distilled": True}, 60_502),
    ("IRT In-Shop", "inshop", "variant=S/16", {"model.distilled": True},
     14_218 + 12_612),
    ("IRT ROxf/RPar (SfM-120k)", "sfm120k", "variant=B/16",
     {"model.distilled": True}, REVISITED),
    ("DToP ROxf/RPar (GLDv2 / SfM-120k)", "dtop", "variant=R50+B/16", {},
     REVISITED),
)


def landmark_image_flops(model_cfg, scales, sides=(768, 1024)):
  """The model's own forward FLOPs of one landmark evaluation image (whole,
  4:3, longer side 1024) summed over the multi-scale passes, each side
  rounded to the encoder's stride."""
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  patch = models.input_stride(models.build_model(model_cfg))
  return sum(_flops.forward_flops(
      model_cfg, *(max(patch, round(s * d / patch) * patch) for d in sides))
             for s in scales)


def project(mfu):
  import importlib.util  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  print(f"Projected wall time, model-FLOPs utilisation {mfu:.0%} assumed "
        f"(not measured here); the model's own FLOPs (matmuls and "
        f"convolutions, benchmarks/_flops.py).")
  print("| recipe | model | train images | fwd GFLOP/img | train PFLOP | "
        "eval PFLOP | " + " | ".join(PEAK) + " | H100 train img/s |")
  print("|---|---|---|---|---|---|" + "---|" * (len(PEAK) + 1))
  for row, name, arg, overrides, n_eval in RECIPES:
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    for key, value in overrides.items():
      section, field = key.split(".")
      c[section][field] = value
    size = c.model.image_size
    fwd = _flops.train_flops(c.model) / 3
    passes = 3 + (1 if c.loss.xbm.get("momentum", 0.0) else 0)
    images = c.total_steps * c.input.batch_size
    train = passes * fwd * images
    evals = (1 if c.get("eval_untrained", False) else 0) + 1 + (
        c.total_steps // c.eval_every if c.eval_every else 0)
    ev = next(iter(c.evals.values()))
    if ev.type == "revisited":
      per_image = landmark_image_flops(c.model, ev.scales)
    else:
      per_image = fwd
    evaluation = evals * n_eval * per_image
    seconds = [(train + evaluation) / (peak * mfu) for peak in PEAK.values()]
    # The decode + augmentation rate the host must sustain to keep up.
    feed = images / (train / (PEAK["H100"] * mfu))
    print(f"| {row} | {c.model.variant} @ {size} | {images:,} | "
          f"{fwd / 1e9:.1f} | {train / 1e15:,.0f} | {evaluation / 1e15:,.1f} "
          "| " + " | ".join(_duration(t) for t in seconds)
          + f" | {feed:,.0f} |")


def _duration(seconds):
  return (f"{seconds / 60:.1f} min" if seconds < 600 else
          f"{seconds / 60:.0f} min" if seconds < 5400 else
          f"{seconds / 3600:.1f} h")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--project", action="store_true")
  parser.add_argument("--mfu", type=float, default=0.3)
  parser.add_argument("--models", default="Ti/16,S/16,B/16,Ti/8@64")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--train_batch", type=int, default=32)
  parser.add_argument("--embed_batch", type=int, default=64)
  parser.add_argument("--torch_malloc", choices=("default", "keep"),
                      default="default", help="keep: the torch worker "
                      "gets vitret_jax.host_memory's malloc settings too.")
  parser.add_argument("--worker", default="")
  args = parser.parse_args()
  if args.project:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return project(args.mfu)
  if args.worker:
    return worker_main(args.worker, args.models, args.train_batch,
                       args.embed_batch, args.torch_malloc)
  models, problem = check_models(args.models)
  if problem:
    parser.error(problem)
  import importlib.util  # pylint: disable=g-import-not-at-top
  if not all(importlib.util.find_spec(n) for n in ("torch", "timm")):
    parser.error("the reference needs torch and timm: `make parity` installs "
                 "them (torch 2.13.0 CPU, timm 1.0.31), or --project, which "
                 "needs neither.")
  print(f"vitret_jax vs PyTorch + timm, {_devices.describe_cpu()}; fp32, "
        f"alternating, median of {args.repeats} x {args.steps} steps; torch "
        f"malloc: {args.torch_malloc}")
  print("| model | task | batch | vitret_jax img/s | torch+timm img/s | "
        "ratio | JAX compile s | XLA step MiB | JAX RSS MiB | torch RSS MiB |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for model in models:
    for row in measure(model, args):
      m, task, b, j, t, ratio, comp, xla, jr, tr = row
      print(f"| {m} | {task} | {b} | {j:.2f} | {t:.2f} | {ratio:.2f} | "
            f"{comp:.1f} | {'-' if xla is None else f'{xla:.0f}'} | "
            f"{jr:.0f} | {tr:.0f} |", flush=True)


if __name__ == "__main__":
  main()
