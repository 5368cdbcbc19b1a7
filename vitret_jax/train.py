"""The training loop: builds data, model, state and evaluators from the config,
then trains with logging, checkpointing and evaluation at the config's cadence.

No model or loss maths lives here (see models/, losses.py, train_step.py).
"""
import json
import math
import os
import time

import jax
import tqdm
from absl import logging

from vitret_jax import checkpoint
from vitret_jax import losses
from vitret_jax import metric_writer
from vitret_jax import mining
from vitret_jax import models
from vitret_jax import optim
from vitret_jax import preemption
from vitret_jax import sharding
from vitret_jax import train_step as ts
from vitret_jax.data import datasets
from vitret_jax.data import image_sizes
from vitret_jax.data import pipeline
from vitret_jax.data import preprocess
from vitret_jax.data import samplers
from vitret_jax.errors import UserError
from vitret_jax.eval import embed
from vitret_jax.eval import evaluator
from vitret_jax.eval import report as report_lib


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


class Run:
  """What training and evaluation share, built once from the config."""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir
    self.mesh = sharding.build_mesh(config.mesh)
    if config.input.tfds_dir:
      # Read through the TFDS builder (prepared once from data_dir).
      from vitret_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
      self.splits = tfds_builders.load_splits(
          config.input.dataset, config.input.data_dir, config.input.tfds_dir,
          **config.input.options)
    else:
      self.splits = datasets.load_dataset(
          config.input.dataset, config.input.data_dir, **config.input.options)
    self.model = models.build_model(config.model)
    unit = sharding.batch_size_on(self.mesh) * config.optim.accum_steps
    if config.input.batch_size % unit:
      raise UserError(
          f"input.batch_size={config.input.batch_size} does not split into "
          f"{config.optim.accum_steps} micro-batch(es) over "
          f"{sharding.batch_size_on(self.mesh)} device(s): use a multiple of "
          f"{unit}.")
    self.tx, self.schedule = optim.build_optimizer(
        config.optim, config.schedule, config.total_steps)
    grouped = preprocess.uses_group_shape(config.input.pp_train)
    if grouped != (config.input.sampler == "group_size"):
      raise UserError(
          f"input.sampler={config.input.sampler!r} with input.pp_train="
          f"{config.input.pp_train!r}: group-size sampling and the group_* "
          f"pp ops go together (e.g. sampler='group_size' with pp_train="
          f"'decode|group_resize(1.1)|group_crop|flip_lr|normalize').")
    # Group-size batches vary in shape around model.image_size squared.
    self.image_size = (config.model.image_size if grouped
                       else preprocess.output_size(config.input.pp_train))
    self.train_split = self.splits[config.input.train_split]
    self.state, self.state_sharding = ts.create_train_state(
        self.model, self.tx, jax.random.key(config.seed),
        (self.image_size, self.image_size, 3), self.mesh,
        memory_slots(config.loss, len(self.train_split),
                     config.input.batch_size))
    self.evaluators = evaluator.build_evaluators(
        config.evals, self._embed_fn_for, self.mesh, self.splits,
        skip_corrupt=config.input.skip_corrupt)
    self.ckpt = checkpoint.Checkpointer(
        workdir, keep=config.ckpt.keep, keep_best=config.ckpt.keep_best,
        best_metric=config.ckpt.best_metric)

  def embed_fn(self):
    """The embedding function of the trained model (its precision)."""
    return self._embed_fn_for()

  def _embed_fn_for(self, dtype=""):
    """The embedding function, in `dtype` if given (e.g. bf16 evaluation of
    an fp32 model: same parameters, another compute precision)."""
    model = self.model
    if dtype and dtype != self.config.model.dtype:
      cfg = self.config.model.copy_and_resolve_references()
      with cfg.unlocked():
        cfg.dtype = dtype
      model = models.build_model(cfg)
    return embed.make_embed_fn(model, self.mesh, self.state_sharding.params)

  def evaluate(self, params, step=None, report=False) -> dict:
    """Runs every evaluator. With `step`, embeddings are saved under
    workdir/embeddings and reused by a later evaluation of the same step;
    with `report`, a PNG grid of queries and results is written per
    evaluator (workdir/report_<name>.png)."""
    out = {}
    for name, ev in self.evaluators.items():
      t0 = time.time()
      cache = ""
      if step is not None and self.config.eval_cache:
        cache = os.path.join(self.workdir, "embeddings", f"{name}-step{step}")
      res = ev.run(params, cache)
      if report and jax.process_index() == 0:
        rows = ev.report_rows(self.config.report.queries, self.config.report.k)
        if rows:
          report_lib.write_grid(
              os.path.join(self.workdir, f"report_{name}.png"), rows)
      logging.info("eval %s (%.1fs): %s", name, time.time() - t0, res)
      prefix = "" if len(self.evaluators) == 1 else f"{name}/"
      out.update({prefix + k: v for k, v in res.items()})
    return out


def _write_json(path, obj):
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)


def _untrained_eval(run, params, fresh):
  """The untrained model's metrics: computed by a fresh run (every process
  takes part, so the decision must not depend on files another process may
  be writing) and kept in eval_untrained.json; a resumed run reads them."""
  path = os.path.join(run.workdir, "eval_untrained.json")
  if not fresh:
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)
  res = run.evaluate(params)
  _write_json(path, res)
  return res


def _check_finite(metrics, step, ckpt):
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    last = ckpt.latest_step()
    raise UserError(
        f"Non-finite training metrics at step {step}: {bad}. Lower optim.lr, "
        f"set optim.clip_norm, or check the data; the last good checkpoint "
        f"(step {last}) is untouched in {ckpt.directory}.")


def _meta(config, next_step, loader=None):
  """What a checkpoint records beside the state: the config, and the input
  position (batches are a pure function of the seed and the step; grain's
  iterator state is kept too)."""
  meta = {"config": json.loads(config.to_json_best_effort()),
          "input": {"next_step": int(next_step), "seed": config.seed,
                    "sampler": config.input.sampler}}
  state = loader.state(next_step) if loader is not None else None
  if state is not None:
    meta["input"]["grain"] = _jsonable(state["grain"])
  if loader is not None and hasattr(loader.sampler, "state"):
    # Tuple sampling: the epoch's mined negatives, which batches depend on.
    meta["input"]["mined"] = loader.sampler.state()
  return meta


def _jsonable(x):
  try:
    json.dumps(x)
    return x
  except TypeError:
    return repr(x)


def train_and_evaluate(config, workdir) -> dict:
  """Trains (see checkpoint.resume_or_init for where it starts) and evaluates.

  Returns the final metrics, also written to workdir/eval.json together with
  the untrained model's under "untrained". Raises preemption.Preempted after
  saving when SIGTERM arrives.
  """
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    checkpoint.write_config(config, workdir)
  run = Run(config, workdir)
  state, source = checkpoint.resume_or_init(
      run.ckpt, run.state, run.state_sharding, config.resume_from,
      checkpoint.make_init_params(config.model.init_from,
                                  config.model.init_format, config.model,
                                  tuple(config.model.init_fresh)))
  untrained = None
  if config.eval_untrained:
    untrained = _untrained_eval(run, state.params, fresh=source != "workdir")
  step_fn = ts.make_train_step(
      run.model, run.tx,
      losses.make_sharded_loss(run.mesh, margin=config.loss.margin,
                               entropy_weight=config.loss.entropy_weight,
                               reduction=config.loss.reduction,
                               eps=config.loss.eps),
      run.mesh, run.state_sharding, xbm_start=config.loss.xbm.start_step,
      accum_steps=config.optim.accum_steps)
  sampler = _build_sampler(config, run)
  preprocess.build_pp(config.input.pp_train)  # a bad spec fails here, early
  loader = pipeline.GrainTrainLoader(
      run.train_split, config.input.pp_train, sampler, seed=config.seed + 1,
      num_workers=config.input.num_workers,
      num_threads=config.input.num_threads, prefetch=config.input.prefetch,
      skip_corrupt=config.input.skip_corrupt)
  before_segment = None
  if config.input.sampler == "tuples":
    if source == "workdir":
      sampler.restore(run.ckpt.read_meta().get("input", {}).get("mined"))
    if config.input.tuples.mine:
      # Reads `state` when called: the parameters of the latest step.
      before_segment = mining.NegativeMiner(run, sampler,
                                            lambda: state.params)
  writer = metric_writer.MetricWriter(workdir)
  start = int(jax.device_get(state.step))
  total = config.total_steps
  logging.info("Training steps %d..%d (start: %s) on %d device(s) of %d "
               "process(es), mesh %s, global batch %d, %d training images.",
               start, total, source, run.mesh.devices.size,
               jax.process_count(), dict(run.mesh.shape),
               config.input.batch_size, len(run.train_split))
  bar = tqdm.tqdm(initial=start, total=total, desc="train", unit="step",
                  disable=jax.process_index() != 0)
  t_last, n_last = time.time(), start
  in_flight = None
  skipped = 0
  try:
    with preemption.Stopper() as stopper:
      for step, batch in loader.iterate(start, total,
                                        before_segment=before_segment):
        skipped += int(batch.pop("skipped", 0))
        state, metrics = step_fn(state,
                                 sharding.to_global_batch(batch, run.mesh))
        # At most one step runs ahead of the host: the bar shows real
        # progress and queued batches do not pile up in device memory.
        if in_flight is not None:
          jax.block_until_ready(in_flight)
          bar.update(1)
        in_flight = metrics
        done = step + 1
        if done % config.log_every == 0 or done == total:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(metrics, done, run.ckpt)
          now = time.time()
          metrics["lr"] = float(run.schedule(step))
          metrics["img_per_s"] = ((done - n_last) * config.input.batch_size
                                  / max(now - t_last, 1e-9))
          if config.input.skip_corrupt:
            metrics["skipped_images"] = skipped
          t_last, n_last = now, done
          writer.write(done, metrics)
          bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                          lr=f"{metrics['lr']:.2e}")
        if done == total:
          break
        evals = None
        if config.eval_every and done % config.eval_every == 0:
          evals = run.evaluate(state.params, step=done)
          writer.write(done, {f"eval/{k}": v for k, v in evals.items()})
        if done % config.ckpt.every_steps == 0 or evals is not None:
          run.ckpt.save(state, _meta(config, done, loader), metrics=evals)
        if stopper.should_stop(done):
          run.ckpt.save(state, _meta(config, done, loader), force=True)
          run.ckpt.wait()
          raise preemption.Preempted(done, run.ckpt.directory)
    bar.update(bar.total - bar.n)
    bar.close()
    end = int(jax.device_get(state.step))
    if skipped:
      logging.warning("Skipped %d unreadable training image(s) "
                      "(input.skip_corrupt).", skipped)
    final = run.evaluate(state.params, step=end, report=True)
    run.ckpt.save(state, _meta(config, end, loader), metrics=final,
                  force=True)
    writer.write(end, {f"eval/{k}": v for k, v in final.items()})
  finally:
    bar.close()
    loader.close()
    writer.close()
    run.ckpt.close()
  return _finish(workdir, final, untrained, end)


def _build_sampler(config, run):
  sizes, multiple = None, 1
  if config.input.sampler == "group_size":
    sizes = image_sizes.image_sizes(
        run.train_split, os.path.join(run.workdir, "cache"),
        skip_corrupt=config.input.skip_corrupt)
    multiple = models.input_stride(run.model)
  tuples = {k: v for k, v in config.input.tuples.items()
            if k not in ("mine", "pp_mine", "mine_batch_size")}
  sampler = samplers.build_sampler(
      config.input.sampler, run.train_split.labels, config.input.batch_size,
      config.input.m_per_class, config.seed, sizes=sizes,
      image_size=run.image_size, multiple=multiple,
      pairs=run.train_split.pairs, tuples=tuples)
  if sizes is not None:
    logging.info("Group-size sampling, groups: %s", "; ".join(
        sampler.describe()))
  return sampler


def _finish(workdir, final, untrained, step):
  out = dict(final, step=step)
  if untrained is not None:
    out["untrained"] = untrained
  _write_json(os.path.join(workdir, "eval.json"), out)
  return out


def evaluate_only(config, workdir) -> dict:
  """Evaluates the workdir's latest checkpoint and writes eval.json."""
  run = Run(config, workdir)
  if run.ckpt.latest_step() is None:
    run.ckpt.close()
    raise UserError(f"No checkpoint in {run.ckpt.directory}: train first "
                    f"(--mode=train) or point --workdir at a trained run.")
  state, _ = run.ckpt.restore(
      checkpoint.abstract_like(run.state, run.state_sharding))
  run.ckpt.close()
  untrained = _untrained_eval(run, None, fresh=False)
  step = int(jax.device_get(state.step))
  return _finish(workdir, run.evaluate(state.params, step=step, report=True),
                 untrained, step)
