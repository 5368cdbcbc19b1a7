"""Orbax checkpoints of the TrainState in `<workdir>/checkpoints`.

Resume order lives in `restore_or_init`: the workdir's own latest checkpoint,
otherwise the freshly initialised state. A checkpoint whose shapes do not match
the model being trained is refused with the offending names.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vitret_jax.errors import UserError


class Checkpointer:
  """Saves every `every_steps` steps, keeps the last `keep`.

  Args:
    workdir: run folder; checkpoints go to workdir/checkpoints.
    keep: how many recent checkpoints to keep.
    async_save: write in a background thread (the step loop goes on).
  """

  def __init__(self, workdir, keep=3, async_save=True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            create=True))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, state, force=False):
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.StandardSave(state),
                             force=force)

  def restore(self, abstract_state, step=None):
    """Restores `step` (default latest) into the structure of `abstract_state`."""
    step = self.latest_step() if step is None else step
    try:
      return self.manager.restore(
          step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError) as e:
      raise UserError(
          f"The checkpoint at {self.directory}/{step} does not fit the model "
          f"of this config ({e}). Use the config it was trained with, or a "
          f"new --workdir.") from e

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


def restore_or_init(ckpt, state, state_sharding):
  """The workdir's latest checkpoint restored into `state`'s layout, or `state`.

  Returns (state, restored_step or None).
  """
  step = ckpt.latest_step()
  if step is None:
    return state, None
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, state_sharding)
  saved = ckpt.manager.item_metadata(step)
  if saved is not None:
    want, have = _shapes(abstract), _shapes(saved)
    diff = sorted(k for k in set(want) | set(have)
                  if want.get(k) != have.get(k))
    if diff:
      raise UserError(
          f"Checkpoint {ckpt.directory}/{step} does not match this config's "
          f"model: {len(diff)} entries differ, e.g. " + "; ".join(
              f"{k}: checkpoint {have.get(k)} vs model {want.get(k)}"
              for k in diff[:5]) +
          ". Train with the original config, or use a new --workdir.")
  logging.info("Resuming from %s/%d", ckpt.directory, step)
  return ckpt.restore(abstract, step), step


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
