"""What training and evaluation share, built once from the config (`Run`:
mesh, data, model, fresh train state, evaluators, checkpointer), the checks
that need no data and run before anything heavy (`check_config`), and a
run's descriptors as its evaluator computes them (`RunEmbedder`)."""
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vitret_jax import arcface
from vitret_jax import checkpoint
from vitret_jax import descriptor
from vitret_jax import host_memory
from vitret_jax import image_files
from vitret_jax import losses
from vitret_jax import models
from vitret_jax import optim
from vitret_jax import sharding
from vitret_jax import train_step as ts
from vitret_jax.data import datasets
from vitret_jax.data import preprocess
from vitret_jax.data import readers
from vitret_jax.data import samplers
from vitret_jax.errors import UserError
from vitret_jax.eval import embed
from vitret_jax.eval import evaluator
from vitret_jax.eval import report as report_lib
from vitret_jax.eval import rerank_spec


def memory_slots(loss_cfg, num_train: int, global_batch: int) -> int:
  """Cross-batch memory size: ratio x training-set size (0 = no memory)."""
  if not loss_cfg.xbm.ratio:
    return 0
  size = int(round(loss_cfg.xbm.ratio * num_train))
  if size < global_batch:
    raise UserError(
        f"loss.xbm.ratio={loss_cfg.xbm.ratio} gives a memory of {size} slots, "
        f"smaller than the batch of {global_batch}; raise the ratio or set it "
        f"to 0 to train without memory.")
  return size


LOSS_KINDS = ("irt", "arcface")


def check_loss(loss_cfg):
  kind = loss_cfg.kind
  if kind not in LOSS_KINDS:
    raise UserError(f"loss.kind={kind!r}; valid: {LOSS_KINDS}.")
  if kind == "arcface" and loss_cfg.xbm.ratio:
    raise UserError(f"loss.kind='arcface' with loss.xbm.ratio="
                    f"{loss_cfg.xbm.ratio}: the cross-batch memory belongs "
                    f"to the contrastive loss; set loss.xbm.ratio=0.")
  if kind == "arcface" and not 0.0 <= loss_cfg.arcface.margin < 1.5:
    raise UserError(f"loss.arcface.margin={loss_cfg.arcface.margin}: an "
                    f"angle in radians in [0, 1.5) (GLAM's: 0.3).")
  momentum = loss_cfg.xbm.momentum
  if not 0.0 <= momentum < 1.0:
    raise UserError(f"loss.xbm.momentum={momentum}: use a value in [0, 1) "
                    f"(0: no momentum encoder; In-Shop's recipe: 0.999).")
  if momentum and not loss_cfg.xbm.ratio:
    raise UserError(f"loss.xbm.momentum={momentum} fills the cross-batch "
                    f"memory, but loss.xbm.ratio=0 (no memory): set a "
                    f"ratio, or momentum=0.")


def build_loss(loss_cfg, mesh, num_classes):
  """(loss_fn, init_loss_params) of `config.loss` on `mesh`; see
  train_step.train_step for loss_fn's signatures. init_loss_params is None
  for the IRT loss; for ArcFace it draws the class centres."""
  if loss_cfg.kind == "arcface":
    a = loss_cfg.arcface
    fn = arcface.make_sharded_arcface(
        mesh, num_classes=num_classes, margin=a.margin, scale=a.scale,
        entropy_weight=a.entropy_weight, eps=loss_cfg.eps)
    n = sharding.batch_size_on(mesh)
    init = lambda rng, dim: {arcface.CLASS_WEIGHTS: arcface.init_class_weights(
        rng, num_classes, dim, n)}
    return fn, init
  fn = losses.make_sharded_loss(
      mesh, margin=loss_cfg.margin, entropy_weight=loss_cfg.entropy_weight,
      reduction=loss_cfg.reduction, eps=loss_cfg.eps)
  return fn, None


def check_prepared_size(config):
  """A prepared copy at a reduced size (input.tfds_resize) must hold the
  pixels every spec reading it resizes from: never an upsampled image."""
  cfg = config.input
  if not cfg.tfds_resize:
    return
  if not cfg.tfds_dir:
    raise UserError(f"input.tfds_resize={cfg.tfds_resize}: set "
                    f"input.tfds_dir too.")
  # The training spec, and the evaluators that read the training data.
  for where, spec in [("input.pp_train", cfg.pp_train)] + [
      (f"evals.{n}.pp", ev.pp) for n, ev in config.evals.items()
      if "dataset" not in ev]:
    first = preprocess.PPSpec(spec).ops[:1]
    if cfg.tfds_square and (not first or first[0][0] != "resize"
                            or first[0][1][0] > cfg.tfds_resize):
      raise UserError(
          f"input.tfds_square=True stores {cfg.tfds_resize}x{cfg.tfds_resize}"
          f" images (the recipe's square resize), but {where}={spec!r} does "
          f"not start with a resize(S) of S <= {cfg.tfds_resize}: prepare "
          f"the copy with input.tfds_square=False.")
    need = preprocess.needed_short_side(spec, config.model.image_size)
    if need is None or need > cfg.tfds_resize:
      raise UserError(
          f"input.tfds_resize={cfg.tfds_resize} keeps images of shorter side "
          f"{cfg.tfds_resize}, but {where}={spec!r} needs "
          + ("the original images" if need is None else f"{need} px")
          + ": prepare the copy with input.tfds_resize="
          + ("0" if need is None else f"{need} or more (or 0)") + ".")


def check_resolution(config, train_size):
  """The training crop and model.image_size (the grid the position
  embedding is made for) must agree: otherwise every step resamples the
  embedding to the crop's grid, slower and from a degraded table. A fixed
  evaluation size that differs is legitimate (testing at a higher
  resolution) and is said once."""
  image_size = config.model.image_size
  if train_size != image_size:
    raise UserError(
        f"input.pp_train={config.input.pp_train!r} makes {train_size} px "
        f"crops but model.image_size={image_size}: set them to one size "
        f"(the category configs take it as an argument, e.g. "
        f"configs/grocery.py:res={image_size}, which sets both and the "
        f"evaluation crop).")
  for name, ev in config.evals.items():
    spec = preprocess.PPSpec(ev.pp)
    if spec.fixed_size and spec.size != image_size:
      logging.warning(
          "evals.%s evaluates %d px images of a model trained at %d px: the "
          "position embedding is resampled from %dx%d to their grid.",
          name, spec.size, image_size, image_size, image_size)


def check_config(config, mesh):
  """The checks that need no data: run before anything heavy, so a config
  mistake stops the run in seconds with one line."""
  cfg = config.input
  if cfg.batch_size < 1:
    raise UserError(f"input.batch_size={cfg.batch_size}: it must be >= 1.")
  unit = sharding.batch_size_on(mesh) * config.optim.accum_steps
  if cfg.batch_size % unit:
    raise UserError(
        f"input.batch_size={cfg.batch_size} does not split into "
        f"{config.optim.accum_steps} micro-batch(es) over "
        f"{sharding.batch_size_on(mesh)} device(s): use a multiple of "
        f"{unit}.")
  check_loss(config.loss)
  if config.ckpt.every_steps < 1:
    raise UserError(f"ckpt.every_steps={config.ckpt.every_steps}: it must be "
                    f">= 1.")
  samplers.check_config(cfg.sampler, cfg.batch_size, cfg.m_per_class,
                        cfg.tuples)
  check_prepared_size(config)
  if cfg.host_pp not in preprocess.HOST_PP:
    raise UserError(f"input.host_pp={cfg.host_pp!r}; valid: "
                    f"{preprocess.HOST_PP}.")
  preprocess.build_pp(cfg.pp_train)  # a bad spec fails here
  grouped = preprocess.uses_group_shape(cfg.pp_train)
  if grouped != (cfg.sampler == "group_size"):
    raise UserError(
        f"input.sampler={cfg.sampler!r} with input.pp_train="
        f"{cfg.pp_train!r}: group-size sampling and the group_* "
        f"pp ops go together (e.g. sampler='group_size' with pp_train="
        f"'decode|group_resize(1.1)|group_crop|flip_lr|normalize').")
  resolved = models.resolve(config.model)
  logging.info("model: %s compute, %s attention (%s), on %s.",
               resolved.dtype, resolved.attention, resolved.why,
               resolved.platform)
  model = models.build_model(config.model)
  stride = models.input_stride(model)
  size = (config.model.image_size if grouped
          else preprocess.output_size(cfg.pp_train))
  if size % stride:
    what = ("model.image_size" if grouped else
            f"the training crop of input.pp_train={cfg.pp_train!r}")
    raise UserError(f"{what} is {size} px, not a multiple of the encoder's "
                    f"stride of {stride} px (model.variant="
                    f"{config.model.variant!r}): use e.g. "
                    f"{max(stride, size // stride * stride)}.")
  for name, ev in config.evals.items():
    preprocess.build_pp(ev.pp)
    rerank_spec.check(ev, f"evals.{name}.rerank")
    if ev.type not in evaluator.EVALUATORS:
      raise UserError(f"evals.{name}.type={ev.type!r}; valid: "
                      f"{sorted(evaluator.EVALUATORS)}.")
    # Evaluators are built when first used: the folder of one with data of
    # its own (revisited_eval) is checked here, before training.
    if "dataset" in ev and not os.path.isdir(ev.data_dir):
      raise UserError(
          f"evals.{name}.data_dir={ev.data_dir!r} is not a folder: "
          f"set it to the {ev.dataset} data (--config.evals.{name}.data_dir="
          f"...).\n{readers.INSTRUCTIONS.get(ev.dataset, '')}")
  check_resolution(config, size)
  return model, size


class Run:
  """What training and evaluation share, built once from the config."""

  def __init__(self, config, workdir, mesh=None, checked=None):
    """`mesh` and `checked` (check_config's result on it) when the caller
    has already built and checked them, so neither is done twice."""
    self.config, self.workdir = config, workdir
    self.mesh = mesh if mesh is not None else sharding.build_mesh(config.mesh)
    self.model, self.image_size = checked or check_config(config, self.mesh)
    self.splits = load_splits(config)
    if config.input.train_split not in self.splits:
      raise UserError(f"input.train_split={config.input.train_split!r}; the "
                      f"data set has {sorted(self.splits)}.")
    self.tx, self.schedule = optim.build_optimizer(
        config.optim, config.schedule, config.total_steps)
    self.train_split = self.splits[config.input.train_split]
    self.seen_classes = datasets.check_evaluations(
        config.input.dataset, self.splits, config.input.train_split,
        config.evals)
    if config.loss.kind == "arcface":
      # A classifier's rows are indexed 0..C-1.
      self.train_split = self.train_split.with_class_indices()
    self.loss_fn, init_loss_params = build_loss(
        config.loss, self.mesh, self.train_split.num_classes)
    self.state, self.state_sharding = ts.create_train_state(
        self.model, self.tx, jax.random.key(config.seed),
        (self.image_size, self.image_size, 3), self.mesh,
        memory_slots(config.loss, len(self.train_split),
                     config.input.batch_size),
        momentum_encoder=bool(config.loss.xbm.momentum),
        init_loss_params=init_loss_params)
    self.embed_fn_for = make_embed_fn_for(config.model, self.mesh,
                                          self.state_sharding.params)
    self.evaluators = evaluator.Evaluators(
        config.evals, self.embed_fn_for, self.mesh, self.splits,
        skip_corrupt=config.input.skip_corrupt,
        default_every=config.eval_every, host_pp=config.input.host_pp)
    self.ckpt = checkpoint.Checkpointer(
        workdir, keep=config.ckpt.keep, keep_best=config.ckpt.keep_best,
        best_metric=config.ckpt.best_metric)

  def embed_fn(self):
    """The embedding function of the trained model (its precision)."""
    return self.embed_fn_for("")

  def evaluate(self, params, step=None, report=False, names=None) -> dict:
    """Runs the evaluators `names` (default all). With `step`, embeddings
    are saved under workdir/embeddings and reused by a later evaluation of
    the same parameters with the same settings; with `report`, a PNG grid of
    queries and results is written per evaluator (report_<name>.png)."""
    out = {}
    # One parameter fingerprint for every evaluator of this call.
    params_key = (params_fingerprint(params) if step is not None and
                  self.config.eval_cache else None)
    for name in self.evaluators.names() if names is None else names:
      ev = self.evaluators.get(name)
      t0 = time.time()
      res = ev.run(params, cache_prefix(self.workdir, self.config, name,
                                        params_key, step))
      if report and jax.process_index() == 0:
        rows = ev.report_rows(self.config.report.queries, self.config.report.k)
        if rows:
          report_lib.write_grid(
              os.path.join(self.workdir, f"report_{name}.png"), rows)
        report_lib.write_evaluation(self.workdir, name, ev, res, step,
                                    name in self.seen_classes)
      logging.info("eval %s (%.1fs): %s", name, time.time() - t0, res)
      prefix = "" if len(self.evaluators) == 1 else f"{name}/"
      out.update({prefix + k: v for k, v in res.items()})
    # The embedding's blocks stay in the heap between the train step's
    # (host_memory): hand them back rather than let the two interleave.
    host_memory.release()
    return out


@jax.jit
def _leaf_sums(params):
  return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)),
                               jnp.sum(jnp.abs(x.astype(jnp.float32)))])
                    for x in jax.tree.leaves(params)])


def params_fingerprint(params) -> bytes:
  """A few bytes that change whenever the parameters do (per-leaf sums)."""
  return np.asarray(jax.device_get(_leaf_sums(params)), np.float32).tobytes()


def cache_prefix(workdir, config, name, params_key, step):
  """workdir/embeddings/<name>-step<step>-<key>: the key covers what
  changes a descriptor besides the images (the evaluator's config, the
  model's, the parameters themselves, `params_key`); the evaluator adds
  each split's fingerprint. "" (no caching) when params_key is None."""
  if params_key is None:
    return ""
  key = hashlib.sha256(json.dumps(
      [config.evals[name].to_dict(), config.model.to_dict(),
       config.input.host_pp], sort_keys=True, default=str).encode())
  key.update(params_key)
  return os.path.join(workdir, "embeddings",
                      f"{name}-step{step}-{key.hexdigest()[:12]}")


def load_splits(config):
  """The training data set's splits (config.input), read from its folder
  or its prepared TFDS copy."""
  cfg = config.input
  if cfg.tfds_dir:
    # tensorflow_datasets takes seconds to import: only runs that read a
    # prepared copy pay for it.
    from vitret_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
    return tfds_builders.load_splits(cfg.dataset, cfg.data_dir, cfg.tfds_dir,
                                     cfg.tfds_resize, cfg.tfds_square,
                                     **cfg.options)
  return datasets.load_dataset(cfg.dataset, cfg.data_dir, **cfg.options)


def run_whitening(config, workdir, name, params, step, model, mesh):
  """The whitening evaluator `name` learns for these parameters (None when
  it has none): exactly the evaluation's, from the cached embeddings of its
  whitening set when that step was evaluated, else embedding them (the
  training data must then be at config.input.data_dir)."""
  cfg = config.evals[name]
  if cfg.whiten_dim < 0:
    return None
  embed_fn_for = make_embed_fn_for(config.model, mesh, None)
  evaluators = evaluator.Evaluators(
      {name: cfg}, embed_fn_for, mesh, load_splits(config),
      skip_corrupt=config.input.skip_corrupt, host_pp=config.input.host_pp)
  key = params_fingerprint(params) if config.eval_cache else None
  white = evaluators.get(name).whitening(
      params, cache_prefix(workdir, config, name, key, step))
  return white.mean, white.projection


def make_embed_fn_for(model_cfg, mesh, param_sharding):
  """embed_fn_for(dtype) -> EmbedFn of the model of `model_cfg`, in `dtype`
  if given (e.g. bf16 evaluation of an fp32 model: same parameters, another
  compute precision). What evaluators get instead of the Run."""
  def embed_fn_for(dtype=""):
    cfg = model_cfg
    if dtype and dtype != model_cfg.dtype:
      cfg = model_cfg.copy_and_resolve_references()
      with cfg.unlocked():
        cfg.dtype = dtype
    return embed.make_embed_fn(models.build_model(cfg), mesh, param_sharding)
  return embed_fn_for


class RunEmbedder:
  """The descriptors of a training run's latest checkpoint, as its
  evaluator computes them: that evaluator's preprocessing, scales and
  learned whitening (run_whitening), around the model; its parameters
  (`params`) are on this process's devices (descriptor.Placement).

  Args:
    config: the run's config.
    workdir: the run folder.
    eval_name: the evaluator to follow (default: the config's first).
  """

  def __init__(self, config, workdir, eval_name=""):
    if not config.evals:
      raise UserError("the config has no evals section to take the "
                      "evaluation preprocessing from.")
    self.eval_name = eval_name or next(iter(config.evals))
    if self.eval_name not in config.evals:
      raise UserError(f"--export_eval={self.eval_name!r}: the run's "
                      f"evaluators are {sorted(config.evals)}.")
    ev = config.evals[self.eval_name]
    self.model = models.build_model(config.model)
    params, self.step = checkpoint.load_run_params(workdir, with_step=True)
    self.preprocess, self.host_pp = ev.pp, config.input.host_pp
    spec = preprocess.PPSpec(self.preprocess)
    self.image_size = spec.size if spec.fixed_size else config.model.image_size
    self.fixed_size = spec.fixed_size
    self.scales = tuple(float(s) for s in ev.scales)
    self.multiple = models.input_stride(self.model)
    self.whitening = run_whitening(
        config, workdir, self.eval_name, params, self.step, self.model,
        sharding.make_mesh())
    placement = descriptor.Placement()
    self.params = placement.put_params(params)  # once, for every call
    apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                                  train=False))
    self._describe = descriptor.MultiScale(
        lambda x: apply(self.params, x), self.scales, self.multiple,
        self.whitening, placement)

  def __call__(self, images):
    return self._describe(images)

  def embed_files(self, paths, batch_size=64):
    """Descriptors [N, E] of image files, in order (as
    export.Embedder.embed_files)."""
    return image_files.embed_all(self, paths, batch_size)

  embed_files_iter = image_files.embed_files_iter
