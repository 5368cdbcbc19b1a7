"""Train-step and embedding throughput: vitret_jax against PyTorch + timm on
the same work, measured in one run with the two alternating.

Same model (timm's ViT of the variant, drop-path 0.1), same loss (IRT
contrastive, beta 0.5, anchor mean, + KoLeo 0.7, written here in torch),
AdamW (lr 3e-5, weight decay 5e-4 on kernels only, timm's groups), same
batch (random images, 2 per class). Each framework runs in its own worker
process, so its memory is its own; the parent sends "run N steps" to one,
then the other, alternating which goes first, and reports medians.

  python benchmarks/throughput.py [--models Ti/16,S/16,B/16,Ti/8@64]
      [--repeats 3] [--steps 2] [--train_batch 32] [--embed_batch 64]

Needs the reference stack (`make parity`: torch 2.13.0 CPU, timm 1.0.31).

The vitret_jax worker follows VITRET_MALLOC as `python -m vitret_jax.main`
does (`vitret_jax.host_memory`; the README's table: VITRET_MALLOC=keep).
The torch worker runs as users run torch, with glibc's defaults;
`--torch_malloc keep` gives it the same settings, to show what they are
worth to torch.

  python benchmarks/throughput.py --project [--mfu 0.3]

prints instead the projected wall time of each paper's recipe (README,
"Reproduce the papers") on one H100 and on a TPU v5e-8: the FLOPs of the
config's model counted by XLA's cost analysis (forward at the training
size, x3 for the backward pass, +1 forward for In-Shop's key encoder; the
evaluation at its real sizes and scales), divided by the accelerator's
peak bf16 rate times an assumed model-FLOPs utilisation. A projection, not
a measurement: no torch needed, nothing is run.
Columns: images/s (median of the repeats), ratio vitret_jax / torch (> 1:
vitret_jax faster), vitret_jax compile time, peak memory (XLA's compiled
memory analysis of the step, and each worker's peak RSS growth).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

import _devices  # benchmarks/_devices.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Our variant -> timm constructor (name, extra kwargs).
TIMM = {"Ti": "vit_tiny_patch16_224", "S": "vit_small_patch16_224",
        "B": "vit_base_patch16_224", "L": "vit_large_patch16_224"}
MARGIN, LAMBDA, LR, WD, DROP_PATH = 0.5, 0.7, 3e-5, 5e-4, 0.1


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
    if size_name not in TIMM or not patch.isdigit():
      return None, (f"--models: {m!r}: expected <size>/<patch>[@<pixels>] "
                    f"with size one of {sorted(TIMM)} (plain ViTs, the "
                    "ones timm builds the same way), e.g. S/16 or Ti/8@64.")
    models.append(m.strip())
  return models, None


def batch(n, size, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
  labels = np.repeat(np.arange(n // 2), 2).astype(np.int32)
  return images, labels


def rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- workers


def jax_train_step(variant, size, train_b, drop_path=DROP_PATH, scan=False,
                   remat=False, model_cfg=None):
  """(model, state, jitted train step, batch): vitret_jax's own step, as
  the trainer builds it, on one device (also used by compile_time.py and
  device_check.py). `model_cfg`: a whole model section instead (its
  variant, size, dtype and attention); default float32."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitret_jax import config_common, losses, models, optim, sharding  # pylint: disable=g-import-not-at-top
  from vitret_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  if model_cfg is None:
    model_cfg = config_common.base_config().model
    model_cfg.update(dict(variant=variant, image_size=size,
                          drop_path_rate=drop_path, dtype="float32",
                          remat=remat, scan=scan))
  model = models.build_model(model_cfg)
  mesh = sharding.make_mesh(1)
  tx = optim.make_optimizer(optim.make_schedule("constant", LR, 1),
                            weight_decay=WD)
  state, shard = ts.create_train_state(model, tx, jax.random.key(0),
                                       (size, size, 3), mesh)
  step = ts.make_train_step(
      model, tx, losses.make_sharded_loss(mesh, margin=MARGIN,
                                          entropy_weight=LAMBDA),
      mesh, shard)
  x, y = batch(train_b, size)
  return model, state, step, sharding.to_global_batch(
      {"image": x, "label": y}, mesh)


class JaxWorker:
  """vitret_jax's own jitted train step (the trainer's) and embedding."""

  def __init__(self, variant, size, train_b, embed_b):
    import jax  # pylint: disable=g-import-not-at-top
    self.jax = jax
    base = rss_mib()
    model, state, step, self.batch = jax_train_step(variant, size, train_b)
    t0 = time.perf_counter()
    self.step = step.lower(state, self.batch).compile()
    self.compile_train = time.perf_counter() - t0
    m = self.step.memory_analysis()
    self.xla_train_mib = (m.argument_size_in_bytes + m.output_size_in_bytes
                          + m.temp_size_in_bytes
                          - m.alias_size_in_bytes) / 2 ** 20
    self.state = state
    embed = jax.jit(lambda p, im: model.apply({"params": p}, im, train=False))
    self.images = jax.device_put(batch(embed_b, size, 1)[0])
    t0 = time.perf_counter()
    self.embed = embed.lower(state.params, self.images).compile()
    self.compile_embed = time.perf_counter() - t0
    self.base = base
    self.run("train", 1)  # warm-up
    self.run("embed", 1)

  def run(self, task, n):
    t0 = time.perf_counter()
    for _ in range(n):
      if task == "train":
        self.state, metrics = self.step(self.state, self.batch)
        self.jax.block_until_ready(metrics["loss"])
      else:
        self.jax.block_until_ready(self.embed(self.state.params, self.images))
    return time.perf_counter() - t0

  def info(self):
    return {"compile_train_s": self.compile_train,
            "compile_embed_s": self.compile_embed,
            "xla_train_mib": self.xla_train_mib,
            "rss_growth_mib": rss_mib() - self.base}


class TorchWorker:
  """timm's ViT with the same loss and AdamW, eager PyTorch."""

  def __init__(self, variant, size, train_b, embed_b):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import timm_parity  # pylint: disable=g-import-not-at-top
    torch, timm = timm_parity.import_timm()
    from timm.optim import _param_groups  # pylint: disable=g-import-not-at-top
    self.torch = torch
    base = rss_mib()
    size_name, patch = variant.split("/")
    self.model = timm.create_model(
        TIMM[size_name], pretrained=False, num_classes=0, img_size=size,
        patch_size=int(patch), drop_path_rate=DROP_PATH)
    groups = _param_groups.param_groups_weight_decay(
        self.model, WD, no_weight_decay_list=self.model.no_weight_decay())
    self.opt = torch.optim.AdamW(groups, lr=LR)
    x, y = batch(train_b, size)
    self.x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    self.y = torch.from_numpy(y).long()
    self.images = torch.from_numpy(batch(embed_b, size, 1)[0]).permute(
        0, 3, 1, 2).contiguous()
    self.base = base
    self.run("train", 1)
    self.run("embed", 1)

  def loss(self, z, y):
    torch = self.torch
    z = torch.nn.functional.normalize(z, dim=1)
    n = z.shape[0]
    sim = z @ z.T
    eye = torch.eye(n, dtype=torch.bool)
    same = (y[:, None] == y[None, :]) & ~eye
    diff = y[:, None] != y[None, :]
    contr = ((1 - sim) * same).sum() + (torch.relu(sim - MARGIN) * diff).sum()
    with torch.no_grad():
      d2 = torch.cdist(z, z).masked_fill(eye, float("inf"))
      nn = d2.argmin(dim=1)
    rho = (z - z[nn]).norm(dim=1)
    koleo = -torch.log(rho + 1e-8).mean()
    return contr / n + LAMBDA * koleo

  def run(self, task, n):
    torch = self.torch
    t0 = time.perf_counter()
    for _ in range(n):
      if task == "train":
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
      else:
        self.model.eval()
        with torch.inference_mode():
          torch.nn.functional.normalize(self.model(self.images), dim=1)
    return time.perf_counter() - t0

  def info(self):
    torch = self.torch
    return {"rss_growth_mib": rss_mib() - self.base,
            "kernels": f"torch {torch.__version__}, ATen CPU capability "
                       f"{torch.backends.cpu.get_cpu_capability()}, "
                       f"{torch.get_num_threads()} threads"}


def worker_main(kind, model, train_b, embed_b, torch_malloc):
  variant, size = parse_model(model)
  if kind == "jax" or torch_malloc == "keep":  # before JAX's backend starts
    sys.path.insert(0, REPO)
    from vitret_jax import host_memory  # pylint: disable=g-import-not-at-top
    malloc = host_memory.configure(None if kind == "jax" else "keep")
  else:
    malloc = "glibc malloc defaults"
  cls = JaxWorker if kind == "jax" else TorchWorker
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

# Peak dense bf16 FLOP/s (vendor figures): H100 SXM; TPU v5e-8 = 8 chips.
PEAK = {"H100": 989e12, "TPU v5e-8": 8 * 197e12}
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


def _forward_flops(model, h, w):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, x)
  return lowered.cost_analysis()["flops"]


def landmark_image_flops(model, variant, scales, sides=(768, 1024)):
  """Forward FLOPs of one landmark evaluation image (whole, 4:3, longer
  side 1024) summed over the multi-scale passes, each side rounded to the
  patch size."""
  patch = 32 if "/32" in variant else 16
  return sum(_forward_flops(model, *(max(patch, round(s * d / patch) * patch)
                                     for d in sides)) for s in scales)


def project(mfu):
  import importlib.util  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from vitret_jax import models  # pylint: disable=g-import-not-at-top
  print(f"Projected wall time, model-FLOPs utilisation {mfu:.0%} assumed "
        f"(not measured here); FLOPs from XLA's cost analysis.")
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
    model = models.build_model(c.model)
    size = c.model.image_size
    fwd = _forward_flops(model, size, size)
    passes = 3 + (1 if c.loss.xbm.get("momentum", 0.0) else 0)
    images = c.total_steps * c.input.batch_size
    train = passes * fwd * images
    evals = (1 if c.get("eval_untrained", False) else 0) + 1 + (
        c.total_steps // c.eval_every if c.eval_every else 0)
    ev = next(iter(c.evals.values()))
    if ev.type == "revisited":
      per_image = landmark_image_flops(model, c.model.variant, ev.scales)
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
