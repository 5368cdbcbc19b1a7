"""Orbax checkpoints of the TrainState, and the one place the resume order
lives.

A checkpoint `<workdir>/checkpoints/<step>/` holds two items: `state` (the
TrainState: params, optimizer state, step, loop RNG, cross-batch memory) and
`meta` (JSON: the config, and the input position, i.e. the next step, whose
batch is a pure function of (seed, step), so that is the whole iterator state).
Orbax writes to a temporary folder and renames it only when complete, so a
save killed half-way leaves nothing that `latest_step` would pick up.

Beside orbax's files each step folder gets:
  vitret_checksums.json   size and SHA-256 of every file, written once the
                          save is complete and verified before a restore
  vitret_eval.json        the metrics of the evaluation of that step (the
                          keep-best policy ranks by them)
A checkpoint whose files do not match (bytes damaged, a file truncated or
deleted) is moved to `<workdir>/checkpoints_damaged/<step>` with a one-line
warning naming the file, and the previous good one is restored instead.

Resume order (`resume_or_init`): the workdir's own latest checkpoint, then
`config.resume_from` (another run's workdir: its whole state), then
`config.model.init_from` (parameters only), then the fresh state.
"""
import dataclasses
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from vitret_jax import best_policy
from vitret_jax import integrity
from vitret_jax import orbax_compat
from vitret_jax import params_tree
from vitret_jax import sharding
from vitret_jax.errors import UserError
from vitret_jax.errors import first_line

CHECKSUMS = integrity.CHECKSUMS
EVAL_METRICS = best_policy.EVAL_METRICS
_OWN_FILES = (CHECKSUMS, EVAL_METRICS)

orbax_compat.register_array_handler()


class Checkpointer:
  """Keeps the last `keep` checkpoints and the `keep_best` best by a metric.

  Args:
    workdir: run folder; checkpoints go to workdir/checkpoints.
    keep: how many recent checkpoints to keep.
    keep_best: how many checkpoints with the best `best_metric` to keep as
      well (0: none); only steps with recorded metrics (`record_eval`)
      compete.
    best_metric: metric name, higher is better (e.g. "recall@1").
    async_save: write in a background thread while training goes on.
    read_only: open someone else's run (resume_from) without touching it.
    flag: the config key or flag that named this run, for error messages.
  """

  def __init__(self, workdir, keep=3, keep_best=0, best_metric="recall@1",
               async_save=True, read_only=False, flag="--workdir"):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.read_only, self.flag = read_only, flag
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(best_policy.BestByEvalFile(self.directory, best_metric,
                                                  keep_best))
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(
                policies)))
    self._unsealed = []
    if not read_only:
      self._remove_unfinished()

  def _remove_unfinished(self):
    """Deletes the temporary folders of saves that never finished (a run
    killed while saving). Safe: the workdir's lock says no other run is
    saving here."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        logging.warning("Removed %s/%s, an unfinished save of a run that "
                        "was killed.", self.directory, name)

  def latest_step(self):
    return self.manager.latest_step()

  def agreed_latest_step(self):
    """latest_step, the same on every process (restoring is collective)."""
    return sharding.read_alike(
        self.manager.latest_step, None, self.directory, lambda others: (
            f"The processes see other checkpoints in {self.directory}: "
            f"every host must see the same run folder (a shared filesystem, "
            f"and an absolute path)."))

  def all_steps(self):
    return list(self.manager.all_steps())

  def step_dir(self, step):
    return os.path.join(self.directory, str(step))

  def save(self, state, meta=None, force=False):
    """Saves `state` at its step (once per step); returns True if saved.
    Checksums are written when the save is complete (`wait`)."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    self._seal()
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta or {}))
    saved = self.manager.save(step, args=args, force=force)
    if saved:
      self._unsealed.append(step)
    return saved

  def _seal(self):
    """Waits for saves in flight, then writes their checksums."""
    self.manager.wait_until_finished()
    steps, self._unsealed = self._unsealed, []
    if jax.process_index() != 0:
      return
    for step in steps:
      folder = self.step_dir(step)
      if os.path.isdir(folder):  # else already removed by the keep policy
        files = integrity.file_checksums(folder, skip=_OWN_FILES)
        integrity.write_json_atomic(os.path.join(folder, CHECKSUMS),
                                    {"step": step, "files": files})

  def record_eval(self, step, metrics):
    """Stores the evaluation of `step` beside its checkpoint (keep-best
    ranks by it; nothing happens if that step has no checkpoint)."""
    folder = self.step_dir(step)
    if jax.process_index() == 0 and os.path.isdir(folder):
      integrity.write_json_atomic(os.path.join(folder, EVAL_METRICS),
                                  {k: float(v) for k, v in metrics.items()})

  def restore(self, abstract_state, step=None):
    """(state, meta) of `step` (default: the latest intact checkpoint) in
    `abstract_state`'s layout. Damaged checkpoints met on the way are moved
    aside (see module doc); a model of other shapes is a UserError."""
    if step is None:
      step = self.latest_intact()
    saved = check_shapes(self, step, abstract_state)
    target, absent = _older_state_target(saved, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        meta=ocp.args.JsonRestore()))
    state = out.state
    if absent:
      state = abstract_state.replace(**dict(state), **{k: None
                                                       for k in absent})
    return state, dict(out.meta or {})

  def latest_intact(self):
    """The newest step whose files pass their checksums, decided by process
    0 and shared with the others (-2: process 0 found none, and raised)."""
    step, error = -1, None
    if jax.process_index() == 0:
      try:
        step = self._find_intact()
      except Exception as e:  # pylint: disable=broad-except
        step, error = -2, e
    if jax.process_count() > 1:
      step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
      self.manager.reload()
    if error is not None or step == -2:
      raise error or UserError(f"No intact checkpoint in {self.directory} "
                               f"(process 0's log says why).")
    return step

  def _find_intact(self):
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      problem = integrity.verify_checksums(self.step_dir(step))
      if problem == "unverified":
        logging.warning("Checkpoint %s has no checksums (written by an older "
                        "version, or killed right after the save): restoring "
                        "it unverified.", self.step_dir(step))
        problem = self._try_meta(step)
      if problem is None or problem == "unverified":
        if damaged:
          logging.warning("Restoring step %d, the newest intact checkpoint.",
                          step)
        return step
      damaged.append(step)
      self._set_aside(step, problem)
    raise UserError(
        f"Every checkpoint in {self.directory} is damaged (steps {damaged}; "
        f"see the warnings above). Restore them from a backup, or move the "
        f"folder away to train from scratch.")

  def _try_meta(self, step):
    try:
      self.read_meta(step)
      return None
    except Exception as e:  # pylint: disable=broad-except
      return f"its meta item is unreadable ({first_line(e)})"

  def _set_aside(self, step, problem):
    folder = self.step_dir(step)
    if self.read_only:
      logging.warning("Checkpoint %s is damaged: %s. Skipping it.", folder,
                      problem)
      return
    dest = os.path.join(self.workdir, "checkpoints_damaged", str(step))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.exists(dest):
      dest += f".{os.getpid()}"
    os.rename(folder, dest)
    self.manager.reload()
    logging.warning("Checkpoint step %d is damaged: %s. Moved it to %s.",
                    step, problem, dest)

  def saved_state(self, step):
    """The metadata tree of `step`'s state; a UserError when it is missing,
    unreadable or without parameters."""
    try:  # missing, not JSON, or JSON of another layout: named below
      saved, why = self.manager.item_metadata(step), ""
      saved = saved.get("state") if saved is not None else None
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
      first = (str(e).splitlines() or [""])[0][:100]
      saved, why = None, f" ({type(e).__name__}: {first})"
    if saved is None or "params" not in saved:
      raise UserError(
          f"Checkpoint {self.step_dir(step)} has no readable state metadata "
          f"with parameters (state/_METADATA){why}: it is damaged or not a "
          f"vitret_jax checkpoint. {self._fix(step)}")
    return saved

  def _fix(self, step):
    return "Restore it from a backup, or " + (
        f"move {self.step_dir(step)} aside to use the run's previous "
        f"checkpoint." if self.flag == "--workdir" else
        f"name another run with {self.flag}.")

  def read_params(self, step):
    """The parameters of `step` alone, numpy arrays on the host, from any
    device layout: a pod's run loads on other devices, or one CPU."""
    saved = self.saved_state(step)
    shapes = {"params": jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved["params"])}
    as_numpy = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
    try:
      with ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(
            os.path.join(self.step_dir(step), "state"),
            args=ocp.args.PyTreeRestore(item=shapes, restore_args=as_numpy,
                                        partial_restore=True))
    except (OSError, ValueError) as e:
      raise UserError(
          f"Checkpoint {self.step_dir(step)}: its parameters are unreadable "
          f"({first_line(e)}). {self._fix(step)}") from e
    return restored["params"]

  def read_meta(self, step=None):
    """The JSON meta of `step` (default latest), without the state."""
    step = self.latest_step() if step is None else step
    return dict(self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta or {})

  wait = _seal  # the saves in flight: finished, then checksummed

  def close(self):
    self._seal()
    self.manager.close()


def check_shapes(ckpt, step, abstract, only=None):
  """`step`'s state metadata, once its shapes are `abstract`'s (`only`:
  of that field alone); a UserError naming what differs otherwise."""
  saved = ckpt.saved_state(step)
  have = saved if only is None else {only: saved[only]}
  want, have = params_tree.shapes(abstract), params_tree.shapes(have)
  diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
  if diff and all(k.startswith("ema_params") for k in diff):
    has = any(k.startswith("ema_params") for k in have)
    raise UserError(
        f"Checkpoint {ckpt.step_dir(step)} was trained "
        f"{'with' if has else 'without'} a momentum encoder for the memory "
        f"and this config {'has none' if has else 'asks for one'}: set "
        f"--config.loss.xbm.momentum "
        + ("to the run's value (In-Shop: 0.999)" if has else "=0")
        + f", or use a new {ckpt.flag}.")
  if diff and all("class_weights" in k for k in diff):
    raise UserError(
        f"Checkpoint {ckpt.step_dir(step)} has other ArcFace class rows "
        f"({have.get(diff[0])} vs {want.get(diff[0])} here): another number "
        f"of classes (data set, input.options), or of devices, to which the "
        f"rows are padded. Continue it with its own data on its devices; its "
        f"weights evaluate on any with --mode=eval.")
  if diff:
    raise UserError(
        f"Checkpoint {ckpt.step_dir(step)} does not match this config's "
        f"model: {len(diff)} entries differ, e.g. " + "; ".join(
            f"{k}: checkpoint {have.get(k)} vs model {want.get(k)}"
            for k in diff[:5]) +
        f". Use the config it was trained with, or a new {ckpt.flag}.")
  return saved


def _older_state_target(saved, abstract):
  """(restore target, absent fields). A checkpoint written before a
  TrainState field existed (ema_params, loss_params) lacks it; when this
  run does not use that field either (None), the fields the checkpoint has
  are restored and the others stay None. (A field this run does use is a
  shape mismatch, reported by check_shapes.)"""
  if not dataclasses.is_dataclass(abstract) or not hasattr(saved, "keys"):
    return abstract, []
  fields = {f.name: getattr(abstract, f.name)
            for f in dataclasses.fields(abstract)}
  absent = [k for k in fields if k not in set(saved.keys())]
  if not absent or any(fields[k] is not None for k in absent):
    return abstract, []
  return {k: v for k, v in fields.items() if k not in absent}, absent


def open_run(path, flag="resume_from"):
  """A Checkpointer reading another run (its workdir or checkpoints folder);
  `flag` is what the user set to name it (for the error messages). With
  several processes, each checks the folder before any collective, and a
  folder missing on one host stops all (sharding.agree)."""
  path = os.path.abspath(path)
  if os.path.basename(path) == "checkpoints":
    path = os.path.dirname(path)
  folder, error = os.path.join(path, "checkpoints"), None
  if not os.path.isdir(folder):
    what = "does not exist" if not os.path.exists(path) else (
        "holds no checkpoints/ folder")
    error = UserError(f"{flag}={path!r} {what}: point it at a vitret_jax "
                      f"run's --workdir.")
  elif not any(name.isdigit() for name in os.listdir(folder)):
    error = UserError(f"{flag}={path!r}: its checkpoints/ folder is empty "
                      f"(the run saved nothing yet).")
  sharding.agree([], error, f"{flag}={path!r}")
  return Checkpointer(path, read_only=True, flag=flag)


def resume_or_init(ckpt, abstract, make_state, resume_from="",
                   init_params=None):
  """The resume order, in one place.

  Args:
    ckpt: this run's Checkpointer.
    abstract: the TrainState's shapes, dtypes and shardings.
    make_state: () -> a fresh TrainState, made only if nothing is restored.
    resume_from: another run's workdir to continue from (whole state).
    init_params: callable(params) -> params loading `model.init_from`, or None.
  Returns: (state, source), source one of "workdir", "resume_from",
    "init_from", "scratch".
  """
  if ckpt.agreed_latest_step() is not None:
    restored = ckpt.restore(abstract)[0]
    logging.info("Resuming from %s/%d", ckpt.directory,
                 int(jax.device_get(restored.step)))
    return restored, "workdir"
  if resume_from:
    other = open_run(resume_from, "resume_from")
    logging.info("Continuing %s/%d", other.directory, other.latest_step())
    restored = other.restore(abstract)[0]
    other.close()
    return restored, "resume_from"
  state = make_state()
  if init_params is not None:
    return state.with_params(sharding.place(
        lambda: init_params(state.params), abstract.params,
        "model.init_from's parameters")), "init_from"
  return state, "scratch"


def load_run_params(workdir, step=None, flag="--workdir", with_step=False):
  """The parameters of a vitret_jax run's latest intact (or `step`)
  checkpoint, as numpy arrays, without rebuilding its optimizer or data
  (with `with_step`: (params, step))."""
  ckpt = open_run(workdir, flag)
  try:
    step = ckpt.latest_intact() if step is None else step
    params = ckpt.read_params(step)
  finally:
    ckpt.close()
  return (params, step) if with_step else params

