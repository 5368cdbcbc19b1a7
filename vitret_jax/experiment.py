"""What training and evaluation share, built once from the config (`Run`:
mesh, data, model, the train state's layout and how to make it fresh,
evaluators, checkpointer; the config checked first by config_checks), and a
run's descriptors as its evaluator computes them (`RunEmbedder`).
"""
import functools
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vitret_jax import checkpoint
from vitret_jax import config_checks
from vitret_jax import descriptor
from vitret_jax import host_memory
from vitret_jax import image_files
from vitret_jax import models
from vitret_jax import optim
from vitret_jax import sharding
from vitret_jax import train_step as ts
from vitret_jax.data import datasets
from vitret_jax.data import preprocess
from vitret_jax.errors import UserError
from vitret_jax.eval import embed
from vitret_jax.eval import evaluator
from vitret_jax.eval import report as report_lib


class Run:
  """What training and evaluation share, built once from the config."""

  def __init__(self, config, workdir, mesh=None, checked=None,
               training=True):
    """`mesh` and `checked` (check_config's result on it) when the caller
    has already built and checked them, so neither is done twice; without
    `training` no batch is checked against the cross-batch memory."""
    self.config, self.workdir = config, workdir
    self.mesh = mesh if mesh is not None else sharding.build_mesh(config.mesh)
    self.model, self.image_size = checked or config_checks.check_config(
        config, self.mesh)
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
    self.loss_fn, init_loss_params = config_checks.build_loss(
        config.loss, self.mesh, self.train_split.num_classes)
    # The fresh state is made only where a run starts without a checkpoint
    # (make_state), never beside a restored one.
    self.make_state, self.abstract_state, self.state_sharding = (
        ts.train_state_init(
            self.model, self.tx, jax.random.key(config.seed),
            (self.image_size, self.image_size, 3), self.mesh,
            config_checks.memory_slots(
                config.loss, len(self.train_split),
                config.input.batch_size if training else 0),
            momentum_encoder=bool(config.loss.xbm.momentum),
            init_loss_params=init_loss_params))
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


# Evaluator options that act on the descriptors once computed (search,
# re-ranking, metrics, cadence, loader threads) or on how they are stored
# (the distractor store's shard size: a committed store is read whatever
# its shards, an unfinished one planned otherwise is started again): left
# out of the cache key, so that changing them reuses the descriptors.
SEARCH_ONLY = ("every", "rerank", "knn", "scann", "ks", "map_at_r", "kappas",
               "ranking_depth", "num_workers", "distractor_shard_size")


def cache_prefix(workdir, config, name, params_key, step):
  """workdir/embeddings/<name>-step<step>-<key>: the key covers what
  changes a descriptor besides the images (the evaluator's config but
  SEARCH_ONLY, the model's, the parameters themselves, `params_key`) and
  input.skip_corrupt (whether an unreadable image is a NaN row or an
  error); the evaluator adds each split's fingerprint. "" (no caching) when
  params_key is None."""
  if params_key is None:
    return ""
  ev = {k: v for k, v in config.evals[name].to_dict().items()
        if k not in SEARCH_ONLY}
  key = hashlib.sha256(json.dumps(
      [ev, config.model.to_dict(), config.input.host_pp,
       config.input.skip_corrupt], sort_keys=True, default=str).encode())
  key.update(params_key)
  return os.path.join(workdir, "embeddings",
                      f"{name}-step{step}-{key.hexdigest()[:12]}")


def load_splits(config):
  """The training data set's splits (config.input), read from its folder
  or its prepared TFDS copy."""
  cfg = config.input
  splits = datasets.read_alike(
      lambda: datasets.load_dataset(cfg.dataset, cfg.data_dir, **cfg.options),
      f"input.data_dir={cfg.data_dir!r} ({cfg.dataset})")
  if not cfg.tfds_dir:
    return splits
  # tensorflow_datasets takes seconds to import: only runs that read a
  # prepared copy pay for it.
  from vitret_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  return tfds_builders.with_sources(
      splits, cfg.dataset, cfg.data_dir, cfg.tfds_dir, cfg.tfds_resize,
      cfg.tfds_square, **cfg.options)


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
    devices: those each batch is split over (default: this process's
      first; descriptor.Placement).
  """

  def __init__(self, config, workdir, eval_name="", devices=None):
    if not config.evals:
      raise UserError("the config has no evals section to take the "
                      "evaluation preprocessing from.")
    self.eval_name = eval_name or next(iter(config.evals))
    if self.eval_name not in config.evals:
      raise UserError(f"--export_eval={self.eval_name!r}: the run's "
                      f"evaluators are {sorted(config.evals)}.")
    ev = config.evals[self.eval_name]
    self.model_config = config.model.to_dict()  # as an export records it
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
    placement = descriptor.Placement(devices)
    self.num_devices = placement.num_devices
    self.params = placement.put_params(params)  # once, for every call
    apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                                  train=False))
    self._describe = descriptor.MultiScale(
        lambda x: apply(self.params, x), self.scales, self.multiple,
        self.whitening, placement, descriptor.step_tokens(params))

  @functools.cached_property
  def params_digest(self) -> str:
    """descriptor.digest of the parameters and whitening (an index's
    identity; the same as the run's exported artifact's)."""
    return descriptor.digest(self.params, self.whitening)

  def __call__(self, images):
    return self._describe(images)

  def embed_files(self, paths, batch_size=64):
    """Descriptors [N, E] of image files, in order (as
    export.Embedder.embed_files)."""
    return image_files.embed_all(self, paths, batch_size)

  embed_files_iter = image_files.embed_files_iter
