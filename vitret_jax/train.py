"""The training loop: takes the run (experiment.Run: data, model, state,
evaluators) and trains with logging, checkpointing and evaluation at the
config's cadence, under the workdir's lock.

Data flow: check_config (no data) -> Run (data, fresh state) -> config.json
-> resume_or_init -> [untrained evaluation] -> _Trainer.train (step, log,
save, evaluate the saved step, stop on SIGTERM) -> final save -> final
evaluation -> eval.json. No model or loss maths lives here.
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
from vitret_jax import experiment
from vitret_jax import init_from
from vitret_jax import integrity
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
from vitret_jax.data import samplers
from vitret_jax.errors import UserError


def _write_json(path, obj):
  if jax.process_index() == 0:
    integrity.write_json_atomic(path, obj, indent=2)


def _untrained_eval(run, params, fresh, stopper):
  """The untrained model's metrics: computed by a fresh run (every process
  takes part, so the decision must not depend on files another process may
  be writing) and kept in eval_untrained.json; a resumed run reads them."""
  path = os.path.join(run.workdir, "eval_untrained.json")
  if not fresh:
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)
  with stopper.interruptible(0, "the untrained evaluation"):
    res = run.evaluate(params)
  _write_json(path, res)
  return res


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

  def __init__(self, run, loader, writer, stopper):
    self.run, self.loader, self.writer = run, loader, writer
    self.config, self.stopper = run.config, stopper
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
    self.run.ckpt.save(state, _meta(self.config, step, self.loader),
                       force=force)
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
    self.run.ckpt.record_eval(step, res)
    self.writer.write(step, {f"eval/{k}": v for k, v in res.items()})
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
    config, run = self.config, self.run
    start, total = int(jax.device_get(state.step)), config.total_steps
    self.n_last = start
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


def train_and_evaluate(config, workdir) -> dict:
  """Trains (see checkpoint.resume_or_init for where it starts) and evaluates.

  Returns the final metrics, also written to workdir/eval.json together with
  the untrained model's under "untrained". The final state is saved before
  the final evaluation. Raises preemption.Preempted after saving when
  SIGTERM arrives, and holds the workdir's lock throughout.
  """
  mesh = sharding.build_mesh(config.mesh)
  checked = experiment.check_config(config, mesh)
  with workdir_lib.Lock(workdir, "train"):
    run = experiment.Run(config, workdir, mesh, checked)
    state, source = checkpoint.resume_or_init(
        run.ckpt, run.state, run.state_sharding, config.resume_from,
        init_from.make_init_params(config.model.init_from,
                                   config.model.init_format, config.model,
                                   tuple(config.model.init_fresh)))
    if jax.process_index() == 0:
      # Only now: the data and the starting weights passed their checks, so
      # a run that failed them leaves no config behind.
      workdir_lib.write_config(config, workdir,
                               models.resolve(config.model).as_dict())
    loader = _build_loader(config, run)
    start = int(jax.device_get(state.step))
    writer = metric_writer.MetricWriter(workdir, resume_step=start)
    try:
      with preemption.Stopper(run.ckpt.directory) as stopper:
        untrained = None
        if config.eval_untrained:
          untrained = _untrained_eval(run, state.params, source != "workdir",
                                      stopper)
        trainer = _Trainer(run, loader, writer, stopper)
        state = trainer.train(state, source)
        end = trainer.save(state, force=True)  # first save, then evaluate
        run.ckpt.wait()
        final = trainer.evaluate_saved(state, end, report=True)
    finally:
      loader.close()
      writer.close()
      run.ckpt.close()
    out = _finish(workdir, final, untrained, end, start_name(config))
  if jax.process_index() == 0:
    logging.info("Done: metrics in %s (eval.json, metrics.jsonl), "
                 "checkpoints in %s, retrieval grids report_<eval>.png.",
                 workdir, run.ckpt.directory)
  return out


def start_name(config):
  """What the metrics before the first step are of: weights loaded by
  model.init_from (or a run continued with resume_from) are "pretrained",
  a fresh initialisation "untrained"."""
  return ("pretrained" if config.model.init_from or config.resume_from
          else "untrained")


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
  t = config.input.tuples
  if config.input.sampler == "tuples" and t.mine:
    sampler.miner = mining.NegativeMiner(
        run.embed_fn(), run.mesh, run.train_split,
        t.pp_mine or f"decode|resize({run.image_size})|normalize",
        t.mine_batch_size, config.input.num_threads,
        config.input.skip_corrupt, run.image_size, config.input.host_pp)
  return sampler


def _finish(workdir, final, untrained, step, start="untrained"):
  """eval.json: the final metrics, with the metrics before the first step
  under "untrained" and what they were of (`start`: "untrained" or
  "pretrained") under "start"."""
  out = dict(final, step=step)
  if untrained is not None:
    out["untrained"] = untrained
    out["start"] = start
  _write_json(os.path.join(workdir, "eval.json"), out)
  return out


def evaluate_only(config, workdir) -> dict:
  """Evaluates the workdir's latest intact checkpoint; writes eval.json."""
  mesh = sharding.build_mesh(config.mesh)
  checked = experiment.check_config(config, mesh)
  with workdir_lib.Lock(workdir, "eval"):
    run = experiment.Run(config, workdir, mesh, checked)
    try:
      if run.ckpt.latest_step() is None:
        raise UserError(f"No checkpoint in {run.ckpt.directory}: train first "
                        f"(--mode=train) or point --workdir at a trained "
                        f"run.")
      state, _ = run.ckpt.restore(
          checkpoint.abstract_like(run.state, run.state_sharding))
    finally:
      run.ckpt.close()
    untrained = _untrained_eval(run, None, fresh=False, stopper=None)
    step = int(jax.device_get(state.step))
    final = run.evaluate(state.params, step=step, report=True)
    run.ckpt.record_eval(step, final)
    return _finish(workdir, final, untrained, step, start_name(config))
