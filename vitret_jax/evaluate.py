"""Evaluating without training, and what eval.json says about its metrics.

`evaluate_only(config, workdir)` (--mode=eval) evaluates the workdir's latest
intact checkpoint; a workdir that holds no trained run (no checkpoint ever
saved, no training logged, no trained eval.json) evaluates the starting
weights of `model.init_from` (or `resume_from`): the off-the-shelf figure
the papers report before fine-tuning, labelled "pretrained". A trained run
that lost its checkpoints is an error, never overwritten with the starting
weights' figures; so is a workdir with neither.

A run's saved config whose mesh does not fit this machine is fitted to it
(`fit_mesh`, said in the log), and only the parameters are read
(`restore_params`), in whatever layout they were saved: a run trained on a
pod's mesh evaluates on a workstation.

eval.json holds the final metrics and `step`, the metrics before the first
step under "untrained" with what they were of under "start", and labels:
"evaluated": "pretrained" when the metrics are of the starting weights (no
step trained), "seen_classes": the evaluators whose test classes are also
training classes (input.options.shared_classes, or a data set's own
protocol such as Grocery's "official"), whose figures are not comparable
with class-disjoint ones. The same label reaches the metrics of every
evaluation (metrics.jsonl, TensorBoard, each checkpoint's vitret_eval.json:
seen_marks) and the browser's /evaluation page (eval/report.py).
"""
import json
import math
import os

import jax
from absl import logging

from vitret_jax import checkpoint
from vitret_jax import config_checks
from vitret_jax import experiment
from vitret_jax import init_from
from vitret_jax import integrity
from vitret_jax import models
from vitret_jax import sharding
from vitret_jax import workdir as workdir_lib
from vitret_jax.errors import UserError

# eval.json's keys that are not metrics.
LABELS = ("untrained", "step", "start", "evaluated", "seen_classes")


def write_json(path, obj):
  if jax.process_index() == 0:
    integrity.write_json_atomic(path, obj, indent=2)


def start_name(config):
  """What the metrics before the first step are of: weights loaded by
  model.init_from (or a run continued with resume_from) are "pretrained",
  a fresh initialisation "untrained"."""
  return ("pretrained" if config.model.init_from or config.resume_from
          else "untrained")


def seen_marks(run, metrics) -> dict:
  """{"<prefix>seen_classes": 1.0} for each evaluator of `metrics` that is
  over classes seen in training (prefix: the evaluator's name and "/",
  as its metrics have it when there are several), so that the metrics
  logged per step (metrics.jsonl, TensorBoard) and kept per checkpoint
  (vitret_eval.json) carry eval.json's "seen_classes" label."""
  out = {}
  for name in run.seen_classes:
    prefix = "" if len(run.evaluators) == 1 else f"{name}/"
    if any(k.startswith(prefix) for k in metrics):
      out[f"{prefix}seen_classes"] = 1.0
  return out


def untrained_eval(run, params, fresh, stopper):
  """The untrained model's metrics: computed by a fresh run (every process
  takes part, so the decision must not depend on files another process may
  be writing) and kept in eval_untrained.json; a resumed run reads them.
  Its descriptors are cached as step 0's (workdir/embeddings, keyed on the
  parameters): +R1M distractors resume after a kill and are shared by the
  processes of a multi-process run."""
  path = os.path.join(run.workdir, "eval_untrained.json")
  if not fresh:
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)
  with stopper.interruptible(0, "the untrained evaluation"):
    res = run.evaluate(params, step=0)
  write_json(path, res)
  return res


def finish(workdir, final, untrained, step, config, seen, starting):
  """Writes eval.json (see the module doc) and returns its contents.
  `starting`: "" when a step was trained on the evaluated weights, else
  what they are ("pretrained", "untrained": start_name of the run that
  started from them; saved_as_starting); resume_from's keep the other
  run's step."""
  out = dict(final, step=step)
  if untrained is not None:
    out["untrained"] = untrained
    out["start"] = start_name(config)
  if starting:
    out["evaluated"] = starting
  if seen:
    out["seen_classes"] = list(seen)
  write_json(os.path.join(workdir, "eval.json"), out)
  return out


def saved_as_starting(ckpt, step):
  """What checkpoint `step`'s weights are when no step was trained on them
  (finish's `starting`; its meta's "starting", written by training; a run
  saved before that key: "pretrained" when its total_steps was 0), else
  ""."""
  meta = ckpt.read_meta(step)
  if "starting" in meta:
    return str(meta["starting"])
  return "pretrained" if meta.get("config", {}).get("total_steps") == 0 else ""


def init_state(run, config):
  """(state, source): the run's own checkpoint, else its starting weights
  (checkpoint.resume_or_init's order)."""
  return checkpoint.resume_or_init(
      run.ckpt, run.abstract_state, run.make_state, config.resume_from,
      _init_params(config))


def _init_params(config):
  return init_from.make_init_params(config.model.init_from,
                                    config.model.init_format, config.model,
                                    tuple(config.model.init_fresh))


def _starting_weights(run, config):
  """(params, step) of the starting weights alone, with neither optimizer
  nor loss state: resume_from's latest intact checkpoint's parameters (in
  any saved layout, as restore_params), else model.init_from's over fresh
  parameters (the leaves it leaves fresh)."""
  if config.resume_from:
    other = checkpoint.open_run(config.resume_from, "resume_from")
    try:
      step = other.latest_intact()
      return restore_params(other, step, run.abstract_state.params), step
    finally:
      other.close()
  # The fresh parameters alone: under jit, XLA drops the rest of the
  # state's initialisation (optimizer moments, memory) instead of making it.
  fresh = jax.jit(lambda: run.make_state().params,
                  out_shardings=run.state_sharding.params)()
  return sharding.place(lambda: _init_params(config)(fresh),
                        run.abstract_state.params,
                        "model.init_from's parameters"), 0


def _trained_run(workdir):
  """Why `workdir` holds a trained run ("" when it does not): a checkpoint
  folder with something in it, damaged checkpoints set aside, logged
  training steps, or an eval.json not of the starting weights."""
  def there(name):
    return os.path.exists(os.path.join(workdir, name))
  ckpts = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpts) and os.listdir(ckpts):
    return f"{ckpts} holds {sorted(os.listdir(ckpts))[:3]}"
  for name in ("checkpoints_damaged", "metrics.jsonl",
               "eval_untrained.json"):
    if there(name):
      return f"it has {name}"
  if there("eval.json"):
    with open(os.path.join(workdir, "eval.json")) as f:
      try:
        evaluated = json.load(f).get("evaluated")
      except (ValueError, AttributeError):
        evaluated = None
    if evaluated != "pretrained":
      return "its eval.json holds a trained run's results"
  return ""


def _starting_params(run, config, workdir):
  """(params, step) to evaluate in a workdir without a checkpoint: the
  starting weights, only where no trained run would have its results
  replaced (decided from local files: agreed by the processes)."""
  why, error = _trained_run(workdir), None
  if start_name(config) != "pretrained":
    error = UserError(f"No checkpoint in {run.ckpt.directory}: train first "
                      f"(--mode=train), point --workdir at a trained run, "
                      f"or set model.init_from to evaluate pretrained "
                      f"weights.")
  elif why:
    error = UserError(
        f"--workdir={workdir} holds a run without an intact checkpoint "
        f"({why}): its trained weights cannot be evaluated, and the "
        f"starting weights (model.init_from, resume_from) are not evaluated "
        f"over its results. Evaluate them in a new --workdir, or restore the "
        f"run's checkpoints.")
  sharding.agree([], error, f"--workdir={workdir}")
  out = _starting_weights(run, config)
  if jax.process_index() == 0:
    workdir_lib.write_config(config, workdir,
                             models.resolve(config.model).as_dict())
  return out


def evaluate_only(config, workdir) -> dict:
  """Evaluates the workdir's latest intact checkpoint, or without one (in
  a workdir that holds no trained run) the starting weights; writes
  eval.json."""
  mesh = sharding.build_mesh(config.mesh)
  checked = config_checks.check_config(config, mesh, training=False)
  with workdir_lib.Lock(workdir, "eval") as lock:
    run = experiment.Run(config, workdir, mesh, checked, training=False)
    saved = run.ckpt.agreed_latest_step() is not None
    try:
      if saved:
        step = run.ckpt.latest_intact()
        params = restore_params(run.ckpt, step, run.abstract_state.params)
        starting = saved_as_starting(run.ckpt, step)
      else:
        (params, step), starting = (_starting_params(run, config, workdir),
                                    start_name(config))
    finally:
      run.ckpt.close()
    lock.checks_passed()
    untrained = untrained_eval(run, None, fresh=False, stopper=None)
    final = run.evaluate(params, step=step, report=True)
    if saved:
      run.ckpt.record_eval(step, dict(final, **seen_marks(run, final)))
    return finish(workdir, final, untrained, step, config, run.seen_classes,
                  starting)


def restore_params(ckpt, step, abstract_params):
  """`step`'s parameters alone, checked against `abstract_params` and
  placed with their shardings and dtypes, from a checkpoint of any device
  layout (Checkpointer.read_params). The optimizer and loss state, whose
  shapes can depend on the devices of the training (ArcFace pads its class
  rows to them), are neither read nor checked: an evaluation needs neither.
  Each process places its own devices' slices of its host copy."""
  def read():
    checkpoint.check_shapes(ckpt, step, {"params": abstract_params},
                            only="params")
    return ckpt.read_params(step)
  return sharding.place(read, abstract_params,
                        f"the parameters of {ckpt.step_dir(step)}")


def fit_mesh(config):
  """A run's saved `config` (--mode=eval of the run) with a mesh of this
  machine's devices, said in the log: the run's own when it fits (the
  descriptors of its training's evaluations); else the most devices here
  that the run's FSDP size divides, so its parameters stay split as in
  training (memory first), or when none does every device, FSDP over the
  largest divisor of the run's size. With several processes, every device.
  The training batch need not split over them (check_config's
  training=False). The layout changes descriptors by float rounding
  only."""
  mesh, have = config.mesh, jax.device_count()
  want, fsdp = mesh.num_devices or have, mesh.fsdp
  saved, several = mesh.num_devices or "all", jax.process_count() > 1
  if fsdp < 1 or (want <= have and want % fsdp == 0 and (
      not several or want == have)):
    return config  # fits (or an invalid fsdp, which build_mesh reports)
  n = have if several else next(
      (n for n in range(have, 0, -1) if n % fsdp == 0), have)
  with config.unlocked():
    config.mesh.num_devices = 0 if n == have else n
    config.mesh.fsdp = math.gcd(fsdp, n)
  if jax.process_index() == 0:
    logging.warning(
        "--mode=eval: the run's mesh (%s devices, fsdp=%d) does not fit the "
        "%d device(s) here: evaluating on %d, fsdp=%d.",
        saved, fsdp, have, n, config.mesh.fsdp)
  return config
