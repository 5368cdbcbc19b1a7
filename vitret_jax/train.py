"""The training loop: takes the run (experiment.Run: data, model, the
state's layout, evaluators) and trains with logging, checkpointing and
evaluation at the config's cadence, under the workdir's lock.

Data flow: check_config (no data) -> Run (data, the state's layout) ->
resume_or_init (the checkpoint, else a fresh state) -> loader (sampler
checks) -> config.json -> [untrained evaluation] -> _Trainer.train (step,
log, save, evaluate the saved step, stop on SIGTERM) -> final save -> final
evaluation -> eval.json (evaluate.finish). No model or loss maths lives
here.
"""
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import tqdm
from absl import logging

from vitret_jax import checkpoint
from vitret_jax import evaluate
from vitret_jax import config_checks
from vitret_jax import experiment
from vitret_jax import metric_writer
from vitret_jax import mining
from vitret_jax import models
from vitret_jax import preemption
from vitret_jax import profiling
from vitret_jax import sharding
from vitret_jax import train_step as ts
from vitret_jax import workdir as workdir_lib
from vitret_jax.data import image_sizes
from vitret_jax.data import pipeline
from vitret_jax.data import preprocess
from vitret_jax.data import samplers
from vitret_jax.errors import UserError


def _check_finite(metrics, step, ckpt):
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    last = ckpt.latest_step()
    raise UserError(
        f"Non-finite training metrics at step {step}: {bad}. Lower optim.lr, "
        f"set optim.clip_norm, or check the data; the latest checkpoint "
        f"(step {last}, verified on restore) is untouched in "
        f"{ckpt.directory}.")


def _meta(config, next_step, loader=None):
  """What a checkpoint records beside the state: the config, and the input
  position. Batches are a pure function of (seed, step), so that is the
  whole iterator state; a sampler with state (tuple sampling: the epoch's
  mined negatives) adds it."""
  meta = {"config": json.loads(config.to_json_best_effort()),
          "input": {"next_step": int(next_step), "seed": config.seed,
                    "sampler": config.input.sampler}}
  sampler_state = loader.sampler.state() if loader is not None else None
  if sampler_state is not None:
    meta["input"]["sampler_state"] = sampler_state
  return meta


@jax.jit
def _all_finite(params):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(params)]))


class _Trainer:
  """The loop's state between steps: saving, evaluating and logging at the
  config's cadence (train_and_evaluate drives it)."""

  def __init__(self, run, loader, writer, stopper, starting):
    """`starting`: what the state's weights are while no step has been
    trained on them (evaluate.finish), recorded in the meta of each
    checkpoint saved so; "" once a step has."""
    self.run, self.loader, self.writer = run, loader, writer
    self.config, self.stopper, self.starting = run.config, stopper, starting
    self.t_last, self.n_last, self.skipped = time.time(), 0, 0

  def save(self, state, force=False):
    """Saves the state, never a diverged one (a NaN between two log steps
    must not become the checkpoint a resumed run starts from)."""
    step = int(jax.device_get(state.step))
    if not bool(jax.device_get(_all_finite(state.params))):
      raise UserError(
          f"The parameters of step {step} are not finite: training "
          f"diverged. Not saved; the latest checkpoint (step "
          f"{self.run.ckpt.latest_step()}) is untouched in "
          f"{self.run.ckpt.directory}. Lower optim.lr or set "
          f"optim.clip_norm.")
    meta = _meta(self.config, step, self.loader)
    if self.starting:
      meta["starting"] = self.starting
    self.run.ckpt.save(state, meta, force=force)
    return step

  def evaluate_saved(self, state, step, report=False, names=None):
    """Evaluates `step` (evaluators `names`, default all), whose checkpoint
    is already saved: SIGTERM or an error here loses no training."""
    try:
      with self.stopper.interruptible(step, f"the evaluation of step {step}"):
        res = self.run.evaluate(state.params, step=step, report=report,
                                names=names)
    except UserError as e:
      raise UserError(f"{e} (Evaluation of step {step} failed; its "
                      f"checkpoint is saved: fix this, then run the same "
                      f"command, or --mode=eval.)") from e
    labelled = dict(res, **evaluate.seen_marks(self.run, res))
    self.run.ckpt.record_eval(step, labelled)
    self.writer.write(step, {f"eval/{k}": v for k, v in labelled.items()})
    return res

  def log(self, metrics, done, step):
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(metrics, done, self.run.ckpt)
    now = time.time()
    metrics["lr"] = float(self.run.schedule(step))
    metrics["img_per_s"] = ((done - self.n_last) *
                            self.config.input.batch_size /
                            max(now - self.t_last, 1e-9))
    if self.config.input.skip_corrupt:
      metrics["skipped_images"] = self.skipped
    # Per step since the last row: waiting for the input vs computing.
    metrics.update(self.clock.row())
    self.t_last, self.n_last = now, done
    self.writer.write(done, metrics)
    return metrics

  def train(self, state, source):
    """Steps from the state's step to total_steps; returns the last state.
    Saves and evaluates at the config's cadence, stops on SIGTERM."""
    config, run, total = self.config, self.run, self.config.total_steps
    start = self.n_last = int(jax.device_get(state.step))
    step_fn = profiling.CompiledStep(_build_step(config, run))
    tracer = profiling.Tracer(run.workdir, config.profile.start_step,
                              config.profile.num_steps)
    self.clock = profiling.StepClock()
    sampler, latest = self.loader.sampler, {"params": state.params}
    if source == "workdir":  # e.g. the epoch's mined negatives
      saved = run.ckpt.read_meta(start).get("input", {})
      sampler.restore(saved.get("sampler_state"))
    logging.info("Training steps %d..%d (start: %s) on %d device(s) of %d "
                 "process(es), mesh %s, global batch %d, %d training "
                 "images.", start, total, source, run.mesh.devices.size,
                 jax.process_count(), dict(run.mesh.shape),
                 config.input.batch_size, len(run.train_split))
    if source == "workdir":
      self.pending_eval(state, start)
    bar = tqdm.tqdm(initial=start, total=total, desc="train", unit="step",
                    disable=jax.process_index() != 0)
    in_flight = None
    try:
      for step, batch in self.loader.iterate(
          start, total, before_segment=lambda first: sampler.start_epoch(
              first, latest["params"])):
        self.clock.got_batch()
        self.skipped += int(batch.pop("skipped", 0))
        batch = sharding.to_global_batch(batch, run.mesh)  # explicit copy
        with self.clock.apart():  # compiled outside traces and clock
          step_fn.prepare(state, batch)
        tracer.before_step(step)
        with jax.transfer_guard("disallow"):  # and no implicit one
          state, metrics = step_fn(state, batch)
        self.starting = ""
        tracer.after_step(step, metrics)
        latest["params"] = state.params
        # At most one step runs ahead of the host: the bar shows real
        # progress and queued batches do not pile up in device memory.
        if in_flight is not None:
          jax.block_until_ready(in_flight)
          bar.update(1)
        in_flight, done = metrics, step + 1
        self.clock.step_done()
        if done % config.log_every == 0 or done == total:
          metrics = self.log(metrics, done, step)
          bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                          lr=f"{metrics['lr']:.2e}")
        if done < total:
          self.after_step(state, done)
        self.clock.restart()
      bar.update(bar.total - bar.n)
    finally:
      tracer.stop()
      bar.close()
    if self.skipped:
      logging.warning("Skipped %d unreadable training image(s) "
                      "(input.skip_corrupt).", self.skipped)
    return state

  def after_step(self, state, done):
    """Periodic save and evaluation (a step is saved before it is
    evaluated), then a stop if SIGTERM came."""
    due = self.run.evaluators.due(done)
    if done % self.config.ckpt.every_steps == 0 or due:
      self.save(state)
    if due:
      self.evaluate_saved(state, done, names=due)
    if self.stopper.should_stop(done):
      self.save(state, force=True)
      self.run.ckpt.wait()
      raise preemption.Preempted(done, self.run.ckpt.directory)

  def pending_eval(self, state, start):
    """A resumed run whose last evaluation was interrupted evaluates that
    step first (its checkpoint has no recorded metrics)."""
    due = self.run.evaluators.due(start) if start else []
    if due and start < self.config.total_steps:
      folder = self.run.ckpt.step_dir(start)
      if not os.path.exists(os.path.join(folder, checkpoint.EVAL_METRICS)):
        logging.info("Step %d's evaluation did not finish before the run "
                     "stopped: evaluating it now.", start)
        self.evaluate_saved(state, start, names=due)


def check_steps(config):
  """total_steps >= 1, or 0: save and evaluate the starting weights, which
  must then come from somewhere (model.init_from or resume_from)."""
  if config.total_steps < 0 or not (config.total_steps or
                                    evaluate.start_name(config) ==
                                    "pretrained"):
    raise UserError(
        f"total_steps={config.total_steps}: train 1 step or more, or set 0 "
        f"with model.init_from (or resume_from) to evaluate those weights "
        f"as they are.")


def train_and_evaluate(config, workdir) -> dict:
  """Trains (see checkpoint.resume_or_init for where it starts) and evaluates.

  Returns the final metrics, also written to workdir/eval.json (labels:
  evaluate.py). The final state is saved before the final evaluation.
  total_steps=0 saves and evaluates the starting weights (model.init_from
  or resume_from), labelled "pretrained". Raises preemption.Preempted after
  saving when SIGTERM arrives, and holds the workdir's lock throughout; a
  run that fails its checks leaves nothing it created in the workdir.
  """
  check_steps(config)
  mesh = sharding.build_mesh(config.mesh)
  # total_steps=0 evaluates the starting weights: no training batch.
  training = bool(config.total_steps)
  checked = config_checks.check_config(config, mesh, training)
  with workdir_lib.Lock(workdir, "train") as lock:
    run = experiment.Run(config, workdir, mesh, checked, training)
    state, source = evaluate.init_state(run, config)
    loader = _build_loader(config, run) if training else None
    if jax.process_index() == 0:
      # Only now: the data, the sampler and the starting weights passed
      # their checks, so a run that failed them leaves no config behind.
      workdir_lib.write_config(config, workdir,
                               models.resolve(config.model).as_dict())
    lock.checks_passed()
    start = int(jax.device_get(state.step))
    starting = (evaluate.start_name(config) if source != "workdir" else
                evaluate.saved_as_starting(run.ckpt, start))
    writer = metric_writer.MetricWriter(workdir, resume_step=start)
    try:
      with preemption.Stopper(run.ckpt.directory) as stopper:
        untrained = None
        if config.eval_untrained and training:
          untrained = evaluate.untrained_eval(
              run, state.params, source != "workdir", stopper)
        trainer = _Trainer(run, loader, writer, stopper, starting)
        if loader is not None:
          state = trainer.train(state, source)
        end = trainer.save(state, force=True)  # first save, then evaluate
        run.ckpt.wait()
        final = trainer.evaluate_saved(state, end, report=True)
    finally:
      if loader is not None:
        loader.close()
      writer.close()
      run.ckpt.close()
    out = evaluate.finish(workdir, final, untrained, end, config,
                          run.seen_classes, trainer.starting)
  if jax.process_index() == 0:
    logging.info("Done: metrics in %s (eval.json, metrics.jsonl), "
                 "checkpoints in %s, retrieval grids report_<eval>.png.",
                 workdir, run.ckpt.directory)
  return out


def _build_loader(config, run):
  return pipeline.GrainTrainLoader(
      run.train_split, config.input.pp_train, _build_sampler(config, run),
      seed=config.seed + 1, num_workers=config.input.num_workers,
      num_threads=config.input.num_threads, prefetch=config.input.prefetch,
      skip_corrupt=config.input.skip_corrupt, host_pp=config.input.host_pp)


def _build_step(config, run):
  return ts.make_train_step(
      run.model, run.tx, run.loss_fn, run.mesh, run.state_sharding,
      xbm_start=config.loss.xbm.start_step,
      accum_steps=config.optim.accum_steps,
      momentum=config.loss.xbm.momentum)


def _build_sampler(config, run):
  sizes, multiple = None, 1
  if config.input.sampler == "group_size":
    sizes = image_sizes.image_sizes(
        run.train_split, os.path.join(run.workdir, "cache"),
        skip_corrupt=config.input.skip_corrupt,
        upright=preprocess.PPSpec(config.input.pp_train).exif_transpose)
    multiple = models.input_stride(run.model)
  tuples = {k: v for k, v in config.input.tuples.items()
            if k not in ("mine", "pp_mine", "mine_batch_size")}
  sampler = samplers.build_sampler(
      config.input.sampler, run.train_split.labels, config.input.batch_size,
      config.input.m_per_class, config.seed, sizes=sizes,
      image_size=run.image_size, multiple=multiple,
      pairs=run.train_split.pairs, tuples=tuples,
      unit=sharding.batch_size_on(run.mesh) * config.optim.accum_steps)
  if sizes is not None:
    logging.info("Group-size sampling, groups: %s", "; ".join(
        sampler.describe()))
  t = config.input.tuples
  if config.input.sampler == "tuples" and t.mine:
    sampler.miner = mining.NegativeMiner(
        run.embed_fn(), run.mesh, run.train_split,
        t.pp_mine or default_pp_mine(config.input.pp_train, run.image_size),
        t.mine_batch_size, config.input.num_threads,
        config.input.skip_corrupt, run.image_size, config.input.host_pp)
  return sampler


def default_pp_mine(pp_train, image_size):
  """The mining preprocessing when input.tuples.pp_mine is empty: the whole
  image at the training size, turned upright (exif_transpose) when the
  training images are, so that negatives are mined from the images as
  they are trained on."""
  spec = f"decode|resize({image_size})|normalize"
  if preprocess.PPSpec(pp_train).exif_transpose:
    spec = preprocess.with_exif_transpose(spec)
  return spec
