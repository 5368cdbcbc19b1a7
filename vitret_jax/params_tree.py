"""Parameter trees by flat names ("encoder/Transformer/encoderblock_0/...").

The one place that names leaves: checkpoints (shape checks, init_from),
exported artifacts (safetensors keys) and weight import all use it. Names
join the keys of nested dicts and the fields of dataclasses (TrainState)
with "/", as flax.traverse_util does.
"""
import jax
import numpy as np
from flax import traverse_util


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree) -> dict:
  """{"a/b/c": leaf} of any pytree (dicts, dataclasses, sequences)."""
  return {"/".join(_key_name(k) for k in path): x
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: dict) -> dict:
  """{"a/b/c": leaf} -> nested dicts."""
  return traverse_util.unflatten_dict(flat, sep="/")


def shapes(tree) -> dict:
  """{"a/b/c": shape} of a pytree of arrays or ShapeDtypeStructs."""
  return {k: tuple(x.shape) for k, x in flatten(tree).items()}


def like(template, loaded):
  """`template` with every leaf that `loaded` has (by name) replaced by it,
  cast to the template's dtype."""
  flat = flatten(loaded)

  def pick(path, t):
    name = "/".join(_key_name(k) for k in path)
    return np.asarray(flat[name], t.dtype) if name in flat else t
  return jax.tree_util.tree_map_with_path(pick, template)
