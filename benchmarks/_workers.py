"""The same work in both frameworks, for the benchmarks: vitret_jax's own
jitted train step and embedding (`jax_train_step`, `JaxWorker`) and timm's
ViT with the same loss and AdamW (`TorchWorker`), on random images, two
per class. Used by throughput.py (CPU, fp32), device_check.py (a GPU or
TPU, bf16) and compile_time.py.

Same model (timm's ViT of the variant, drop-path 0.1), same loss (IRT
contrastive, beta 0.5, anchor mean, + KoLeo 0.7, written here in torch),
AdamW (lr 3e-5, weight decay 5e-4 on kernels only, timm's groups).
"""
import math
import os
import resource
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
# Our variant's size -> timm's constructor.
TIMM = {"Ti": "vit_tiny_patch16_224", "S": "vit_small_patch16_224",
        "B": "vit_base_patch16_224", "L": "vit_large_patch16_224"}
MARGIN, LAMBDA, LR, WD, DROP_PATH = 0.5, 0.7, 3e-5, 5e-4, 0.1


def batch(n, size, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
  labels = np.repeat(np.arange(n // 2), 2).astype(np.int32)
  return images, labels


def seconds_per_step(step, wait, min_steps=1, min_seconds=0.0,
                     max_steps=100_000):
  """(mean seconds of one `step()`, steps timed): steps are dispatched
  back to back, as a training loop runs them, and the device's queue is
  drained once, by `wait(last step's output)`, at the end. A run shorter
  than `min_seconds` (a few ms steps: clocks still ramping up, the
  timer's resolution) is repeated with more steps. Both frameworks are
  timed by this one function."""
  n = max(1, min_steps)
  while True:
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      out = step()
    wait(out)
    elapsed = time.perf_counter() - t0
    if elapsed >= min_seconds or n >= max_steps:
      return elapsed / n, n
    n = min(max_steps, max(2 * n, math.ceil(
        1.2 * n * min_seconds / max(elapsed, 1e-6))))


def rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
  """vitret_jax's own jitted train step (the trainer's) and embedding,
  compiled ahead of time; `model_cfg` as in jax_train_step."""

  def __init__(self, variant, size, train_b, embed_b, model_cfg=None):
    import jax  # pylint: disable=g-import-not-at-top
    from vitret_jax import profiling  # pylint: disable=g-import-not-at-top
    self.jax = jax
    base = rss_mib()
    model, state, step, self.batch = jax_train_step(variant, size, train_b,
                                                    model_cfg=model_cfg)
    self.model = model
    t0 = time.perf_counter()
    self.step_fn = step.lower(state, self.batch).compile()
    self.compile_train = time.perf_counter() - t0
    xla_bytes = profiling.compiled_bytes(self.step_fn)
    self.xla_train_mib = None if xla_bytes is None else xla_bytes / 2 ** 20
    self.state = state
    embed = jax.jit(lambda p, im: model.apply({"params": p}, im, train=False))
    self.images = jax.device_put(batch(embed_b, size, 1)[0])
    t0 = time.perf_counter()
    self.embed = embed.lower(state.params, self.images).compile()
    self.compile_embed = time.perf_counter() - t0
    self.base = base
    self.run("train", 1)  # warm-up
    self.run("embed", 1)

  def step(self, task):
    """Dispatches one step of `task` ("train" or "embed"); returns its
    output without waiting for it."""
    if task == "train":
      self.state, metrics = self.step_fn(self.state, self.batch)
      return metrics["loss"]
    return self.embed(self.state.params, self.images)

  def wait(self, out):
    self.jax.block_until_ready(out)

  def run(self, task, n):
    """Seconds for n steps of `task`, the device's queue drained once at
    the end (seconds_per_step)."""
    return seconds_per_step(lambda: self.step(task), self.wait, n)[0] * n

  def info(self):
    return {"compile_train_s": self.compile_train,
            "compile_embed_s": self.compile_embed,
            "xla_train_mib": self.xla_train_mib,
            "rss_growth_mib": rss_mib() - self.base}


class TorchWorker:
  """timm's ViT with the same loss and AdamW (timm's parameter groups:
  no weight decay on biases and norms, as vitret_jax's mask), eager or
  torch.compile'd, on `device` ("cpu", or "cuda" for the GPU torch sees,
  an AMD one included), in float32 or under torch.autocast(bfloat16)."""

  def __init__(self, variant, size, train_b, embed_b, device="cpu",
               bf16=False, compile_model=False, warm_up=True):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import timm_parity  # pylint: disable=g-import-not-at-top
    torch, timm = timm_parity.import_timm()
    from timm.optim import _param_groups  # pylint: disable=g-import-not-at-top
    self.torch, self.device, self.bf16 = torch, device, bf16
    base = rss_mib()
    size_name, patch = variant.split("/")
    self.model = timm.create_model(
        TIMM[size_name], pretrained=False, num_classes=0, img_size=size,
        patch_size=int(patch), drop_path_rate=DROP_PATH).to(device)
    groups = _param_groups.param_groups_weight_decay(
        self.model, WD, no_weight_decay_list=self.model.no_weight_decay())
    self.opt = torch.optim.AdamW(groups, lr=LR)
    self.forward = torch.compile(self.model) if compile_model else self.model
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().to(
        device)
    x, y = batch(train_b, size)
    self.x, self.y = nchw(x), torch.from_numpy(y).long().to(device)
    self.images = nchw(batch(embed_b, size, 1)[0])
    self.base = base
    if warm_up:
      self.run("train", 1)
      self.run("embed", 1)

  def loss(self, z, y):
    torch = self.torch
    z = torch.nn.functional.normalize(z.float(), dim=1)
    n = z.shape[0]
    sim = z @ z.T
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    same = (y[:, None] == y[None, :]) & ~eye
    diff = y[:, None] != y[None, :]
    contr = ((1 - sim) * same).sum() + (torch.relu(sim - MARGIN) * diff).sum()
    with torch.no_grad():
      d2 = torch.cdist(z, z).masked_fill(eye, float("inf"))
      nn = d2.argmin(dim=1)
    rho = (z - z[nn]).norm(dim=1)
    koleo = -torch.log(rho + 1e-8).mean()
    return contr / n + LAMBDA * koleo

  def _autocast(self):
    torch = self.torch
    return torch.autocast(self.device, dtype=torch.bfloat16,
                          enabled=self.bf16)

  def step(self, task):
    """Dispatches one step of `task` ("train" or "embed")."""
    torch = self.torch
    if task == "train":
      self.model.train()
      self.opt.zero_grad(set_to_none=True)
      with self._autocast():
        z = self.forward(self.x)
      self.loss(z, self.y).backward()
      self.opt.step()
    else:
      self.model.eval()
      with torch.inference_mode(), self._autocast():
        torch.nn.functional.normalize(self.forward(self.images), dim=1)

  def wait(self, out=None):
    """Drains the device's queue (a CPU computes synchronously)."""
    del out
    if self.device != "cpu":
      self.torch.cuda.synchronize()

  def run(self, task, n):
    """Seconds for n steps of `task`, the device's queue drained once at
    the end (seconds_per_step)."""
    return seconds_per_step(lambda: self.step(task), self.wait, n)[0] * n

  def info(self):
    torch = self.torch
    return {"rss_growth_mib": rss_mib() - self.base,
            "kernels": f"torch {torch.__version__}, ATen CPU capability "
                       f"{torch.backends.cpu.get_cpu_capability()}, "
                       f"{torch.get_num_threads()} threads"}
