"""The checks of a run's config that need no data, run before anything
heavy so that a mistake stops the run in seconds with one line
(`check_config`), and the loss the config names (`build_loss`)."""
import difflib
import hashlib
import json
import os

import jax
from absl import logging

from vitret_jax import arcface
from vitret_jax import config_common
from vitret_jax import losses
from vitret_jax import models
from vitret_jax import sharding
from vitret_jax.data import preprocess
from vitret_jax.data import readers
from vitret_jax.data import samplers
from vitret_jax.errors import UserError
from vitret_jax.eval import evaluator
from vitret_jax.eval import rerank_spec


def memory_slots(loss_cfg, num_train: int, global_batch: int) -> int:
  """Cross-batch memory size: ratio x training-set size (0 = no memory),
  checked to hold a batch of `global_batch` (0: no batch, no check)."""
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


def check_config(config, mesh, training=True):
  """The checks that need no data: run before anything heavy, so a config
  mistake stops the run in seconds with one line. An evaluation alone
  (`training=False`) has no training batch: it need not split over the
  mesh (the evaluation's passes are rounded up to the devices) nor suit
  the sampler."""
  cfg = config.input
  if cfg.batch_size < 1:
    raise UserError(f"input.batch_size={cfg.batch_size}: it must be >= 1.")
  devices = sharding.batch_size_on(mesh)
  unit = devices * config.optim.accum_steps
  if training and cfg.batch_size % unit:
    raise UserError(
        f"input.batch_size={cfg.batch_size} does not split into "
        f"{config.optim.accum_steps} micro-batch(es) over {devices} "
        f"device(s): use a multiple of {unit}.")
  check_loss(config.loss)
  if config.ckpt.every_steps < 1:
    raise UserError(f"ckpt.every_steps={config.ckpt.every_steps}: it must be "
                    f">= 1.")
  if training:
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
  check_evals(config.evals)
  check_resolution(config, size)
  check_best_metric(config)
  return model, size


def check_evals(evals_cfg):
  """Each evaluator's pp spec, re-ranking specs, type and (for one with
  data of its own, revisited_eval) folder: evaluators are built when first
  used, so these are checked before training."""
  for name, ev in evals_cfg.items():
    preprocess.build_pp(ev.pp)
    rerank_spec.check(ev, f"evals.{name}.rerank")
    if ev.type not in evaluator.EVALUATORS:
      raise UserError(f"evals.{name}.type={ev.type!r}; valid: "
                      f"{sorted(evaluator.EVALUATORS)}.")
    if "dataset" in ev and not os.path.isdir(ev.data_dir):
      raise UserError(
          f"evals.{name}.data_dir={ev.data_dir!r} is not a folder: "
          f"set it to the {ev.dataset} data (--config.evals.{name}.data_dir="
          f"...).\n{readers.INSTRUCTIONS.get(ev.dataset, '')}")


def metric_names(evals_cfg) -> list:
  """The names of the metrics the evaluators of `evals_cfg` report, as
  vitret_eval.json and eval.json hold them ("<evaluator>/" first when
  there are several), re-ranked ones under their plans' canonical names."""
  names = []
  for name, ev in evals_cfg.items():
    prefix = "" if len(evals_cfg) == 1 else f"{name}/"
    if ev.type == "revisited":
      plain = [f"{s}/{m}" for s in ("easy", "medium", "hard") for m in
               ["map"] + [f"mp@{k}" for k in ev.get("kappas", (1, 5, 10))]]
    else:
      plain = [f"recall@{k}" for k in ev.get("ks", (1,))] + (
          ["map@r"] if ev.get("map_at_r", True) else [])
    plans = rerank_spec.parse_all(ev.get("rerank", ()))
    names += [prefix + m + suffix for m in plain
              for suffix in [""] + [f"+{p.name}" for p in plans]]
    if ev.get("knn", "exact") == "scann":
      names.append(f"{prefix}scann_recall@10")
  return names


def check_best_metric(config):
  """ckpt.best_metric (with keep_best and evaluators): a re-ranked metric
  spelled as its spec ("roxford/medium/map+aqe+dba") becomes the plan's
  canonical name ("...+dba+aqe"), which the metrics carry; a name no
  evaluator reports is a one-line UserError (else no step would compete
  and keep_best would keep nothing)."""
  ckpt = config.ckpt
  if not ckpt.get("keep_best") or not config.evals:
    return
  metric = canonical = ckpt.best_metric
  base, plus, spec = metric.partition("+")
  if plus:
    try:
      canonical = f"{base}+{rerank_spec.parse(spec).name}"
    except UserError:
      pass
  names = metric_names(config.evals)
  (only,) = config.evals if len(config.evals) == 1 else (None,)
  if only and canonical.startswith(f"{only}/") and canonical not in names:
    canonical = canonical[len(only) + 1:]  # a lone evaluator: no prefix
  if canonical != metric:
    logging.info("ckpt.best_metric=%r: the metric is named %r (canonical "
                 "re-ranking names; no evaluator prefix when there is one "
                 "evaluator).", metric, canonical)
    ckpt.best_metric = metric = canonical
  if metric not in names:
    near = difflib.get_close_matches(metric, names, 3, 0.5)
    raise UserError(
        f"ckpt.best_metric={metric!r} is not a metric of the evaluators "
        f"(evals): use one of " + ", ".join(repr(n) for n in (
            near if len(names) > 12 and near else names[:12])) + (
                ", ..." if len(names) > 12 and not near else "") + ".")


def same_on_every_process(config, error=None):
  """With several processes, each must run the same config: one whose
  paths expand to other folders on another host (`~` under another HOME)
  would train as one run and then part ways at the first shared file. A
  digest of each section is compared across the processes at the start
  (sharding.agree: a process that failed to make its config, `error`,
  stops them all); sections that differ are a one-line error naming
  them."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  plain = config.to_dict() if config is not None else {}
  names = sorted(set(config_common.base_config().keys()) | {"other"})
  plain["other"] = {k: v for k, v in plain.items() if k not in names}
  differ = sharding.agree([hashlib.sha256(json.dumps(
      plain.get(name), sort_keys=True, default=str).encode()).digest()
                           for name in names], error, "the config")
  differ = [name for name, d in zip(names, differ) if d]
  if differ:
    raise UserError(
        f"The {jax.process_count()} processes were given different configs "
        f"(differing from process 0's: {', '.join(differ)}): give every "
        f"process the same flags, and paths that name the same folder on "
        f"every host (`~` expands to each host's HOME).")
