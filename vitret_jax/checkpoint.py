"""Orbax checkpoints of the TrainState, and the one place the resume order lives.

A checkpoint `<workdir>/checkpoints/<step>/` holds two items: `state` (the
TrainState: params, optimizer state, step, loop RNG, cross-batch memory) and
`meta` (JSON: the config, and the input position, i.e. the next step, whose
batch is a pure function of (seed, step), so that is the whole iterator state).
Orbax writes to a temporary folder and renames it only when complete, so a
save killed half-way leaves nothing that `latest_step` would pick up.

Resume order (`resume_or_init`): the workdir's own latest checkpoint, then
`config.resume_from` (another run's workdir: its whole state), then
`config.model.init_from` (parameters only), then the fresh state.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from vitret_jax.errors import UserError


class Checkpointer:
  """Keeps the last `keep` checkpoints and the `keep_best` best by a metric.

  Args:
    workdir: run folder; checkpoints go to workdir/checkpoints.
    keep: how many recent checkpoints to keep.
    keep_best: how many checkpoints with the best `best_metric` to keep as
      well (0: none); only checkpoints saved with metrics compete.
    best_metric: metric name, higher is better (e.g. "recall@1").
    async_save: write in a background thread while training goes on.
    read_only: open someone else's run (resume_from) without touching it.
  """

  def __init__(self, workdir, keep=3, keep_best=0, best_metric="recall@1",
               async_save=True, read_only=False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric], n=keep_best,
          keep_checkpoints_without_metrics=False))
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(
                policies)))

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, state, meta=None, metrics=None, force=False):
    """Saves `state` at its step (once per step); returns True if saved."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta or {}))
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(self, abstract_state, step=None):
    """(state, meta) of `step` (default latest) in `abstract_state`'s layout."""
    step = self.latest_step() if step is None else step
    _check_shapes(self, step, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta or {})

  def read_meta(self, step=None):
    """The JSON meta of `step` (default latest), without the state."""
    step = self.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return dict(out.meta or {})

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _key_name(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _shapes(tree):
  """{"params/encoder/...": shape}; dataclass fields and dict keys alike."""
  return {"/".join(_key_name(k) for k in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _check_shapes(ckpt, step, abstract):
  saved = ckpt.manager.item_metadata(step)
  saved = saved.get("state") if saved is not None else None
  if saved is None:
    return
  want, have = _shapes(abstract), _shapes(saved)
  diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
  if diff:
    raise UserError(
        f"Checkpoint {ckpt.directory}/{step} does not match this config's "
        f"model: {len(diff)} entries differ, e.g. " + "; ".join(
            f"{k}: checkpoint {have.get(k)} vs model {want.get(k)}"
            for k in diff[:5]) +
        ". Train with the original config, or use a new --workdir.")


def abstract_like(state, state_sharding):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, state_sharding)


def _run_checkpoints(path):
  """A Checkpointer reading another run (its workdir or checkpoints folder)."""
  path = os.path.abspath(path)
  if os.path.basename(path) == "checkpoints":
    path = os.path.dirname(path)
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise UserError(f"resume_from={path!r} holds no checkpoints/ folder: "
                    f"point it at a vitret_jax run's --workdir.")
  ckpt = Checkpointer(path, read_only=True)
  if ckpt.latest_step() is None:
    raise UserError(f"resume_from={path!r}: its checkpoints/ folder is empty.")
  return ckpt


def resume_or_init(ckpt, state, state_sharding, resume_from="", init_params=None):
  """The resume order, in one place.

  Args:
    ckpt: this run's Checkpointer.
    state: the freshly initialised TrainState.
    state_sharding: its shardings.
    resume_from: another run's workdir to continue from (whole state).
    init_params: callable(params) -> params loading `model.init_from`, or None.
  Returns:
    (state, source) with source one of "workdir", "resume_from", "init_from",
    "scratch".
  """
  abstract = abstract_like(state, state_sharding)
  if ckpt.latest_step() is not None:
    logging.info("Resuming from %s/%d", ckpt.directory, ckpt.latest_step())
    return ckpt.restore(abstract)[0], "workdir"
  if resume_from:
    other = _run_checkpoints(resume_from)
    logging.info("Continuing %s/%d", other.directory, other.latest_step())
    restored = other.restore(abstract)[0]
    other.close()
    return restored, "resume_from"
  if init_params is not None:
    params = init_params(state.params)
    params = jax.device_put(params, state_sharding.params)
    return state.replace(params=params), "init_from"
  return state, "scratch"


def write_config(config, workdir):
  """Writes config.json; an existing different one is kept, the new one is
  written beside it as config.<n>.json so nothing is overwritten."""
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  path = os.path.join(workdir, "config.json")
  n = 1
  while os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
    path = os.path.join(workdir, f"config.{n}.json")
    n += 1
  with open(path, "w") as f:
    f.write(text)
  return path


def load_run_params(workdir, step=None):
  """The parameters of a vitret_jax run's latest (or `step`) checkpoint, as
  numpy arrays, without rebuilding its optimizer or data."""
  ckpt = _run_checkpoints(workdir)
  step = ckpt.latest_step() if step is None else step
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  ckpt.close()
  state = restored.state
  params = state["params"] if isinstance(state, dict) else state.params
  return jax.tree.map(np.asarray, params)


INIT_FORMATS = ("auto", "vitret_run", "vitret_export", "timm", "npz")


def _load_init_source(path, fmt, model_cfg):
  """Parameters from `model.init_from` as a nested dict (see INIT_FORMATS)."""
  from vitret_jax import export  # pylint: disable=g-import-not-at-top
  from vitret_jax import weights  # pylint: disable=g-import-not-at-top
  if fmt == "auto":
    if path.endswith((".safetensors", ".pth", ".bin")):
      fmt = "timm"
    elif path.endswith(".npz"):
      fmt = "npz"
    elif os.path.isfile(os.path.join(path, "model.json")):
      fmt = "vitret_export"
    else:
      fmt = "vitret_run"
  if fmt not in INIT_FORMATS:
    raise UserError(f"model.init_format={fmt!r}; valid: {INIT_FORMATS}.")
  if fmt in ("timm", "npz") and not os.path.isfile(path):
    raise UserError(f"model.init_from={path!r}: no such file.")
  if fmt == "vitret_export":
    return export.Embedder(path).params
  if fmt == "vitret_run":
    return load_run_params(path)
  # Encoder-only checkpoints: converted with the encoder of this config.
  kw = dict(variant=model_cfg.variant, image_size=model_cfg.image_size,
            distilled=model_cfg.get("distilled", False))
  model = weights.build_encoder(**kw)
  if fmt == "timm":
    params = weights.convert_timm(model, weights.load_state_dict(path),
                                  model_cfg.image_size, path)["params"]
  else:
    params = weights.from_npz(path, model_cfg.variant,
                              model_cfg.image_size)[1]["params"]
  return jax.tree.map(np.asarray, params)


def make_init_params(path, fmt="auto", model_cfg=None, fresh=("head/",)):
  """callable(template params) -> loaded params, or None when `path` is empty.

  Every name and shape must match the model's: a missing, unexpected or
  misshaped entry is an error listing them, except that parameters whose
  name contains one of `fresh` may be absent from the source (they keep
  their initialisation: a new head, DToP's depth-wise convolutions).
  """
  if not path:
    return None

  def load(template):
    loaded = _load_init_source(path, fmt, model_cfg)
    want, have = _shapes(template), _shapes(loaded)
    kept = {k for k in set(want) - set(have) if any(f in k for f in fresh)}
    if kept:
      logging.info("init_from: %d parameters stay freshly initialised (%s)",
                   len(kept), ", ".join(sorted(kept)[:4]))
      want = {k: v for k, v in want.items() if k not in kept}
    from vitret_jax import weights  # pylint: disable=g-import-not-at-top
    weights.check_fit(have, want, f"model.init_from={path!r}")
    return _like(template, loaded)
  return load


def _like(template, loaded):
  """`template` with every entry that `loaded` has replaced by it."""
  flat = {"/".join(_key_name(k) for k in p): x
          for p, x in jax.tree_util.tree_leaves_with_path(loaded)}

  def pick(path, t):
    name = "/".join(_key_name(k) for k in path)
    return np.asarray(flat[name], t.dtype) if name in flat else t
  return jax.tree_util.tree_map_with_path(pick, template)
