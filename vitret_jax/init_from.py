"""Where a run's parameters start when `model.init_from` is set: resolving
the name (a Hub name, a gs:// name, a run's workdir, an exported artifact, a
timm or npz file) to parameters of the config's model, and saying what was
loaded, resampled and left fresh. The conversions themselves are
weights.py's; the order of resume, resume_from and init_from is
checkpoint.resume_or_init's.
"""
import os

import jax
import numpy as np
from absl import logging

from vitret_jax import checkpoint
from vitret_jax import export
from vitret_jax import hub
from vitret_jax import params_tree
from vitret_jax import sharding
from vitret_jax import weights
from vitret_jax import workdir as workdir_lib
from vitret_jax.errors import UserError

INIT_FORMATS = ("auto", "vitret_run", "vitret_export", "timm", "npz")


def _load_init_source(path, fmt, model_cfg):
  """(parameters from `model.init_from` as a nested dict (see
  INIT_FORMATS), the flat names of those resampled to the model's grid)."""
  if fmt in ("auto", "timm") and hub.is_hub_name(path):
    path, arch = hub.fetch(path)
    _check_timm_architecture(arch, model_cfg)
    fmt = "timm"
  if fmt in ("auto", "npz") and hub.is_gcs_name(path):
    path = hub.fetch_gcs(path)
    fmt = "npz"
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
  if fmt in ("vitret_export", "vitret_run"):
    return _load_vitret(path, fmt, model_cfg), []
  # Encoder-only checkpoints: converted with the encoder of this config,
  # after a check that they are of its variant (a one-line hint, not a
  # list of every misfitting name).
  model = weights.build_encoder(model_cfg.variant, model_cfg.image_size,
                        model_cfg.distilled)
  if fmt == "timm":
    sd = weights.load_state_dict(path)
    found = weights.timm_variant(sd)
    if found:
      _check_variant("a timm file", *found, model_cfg)
    params = weights.convert_timm(model, sd, model_cfg.image_size,
                                  path)["params"]
    source_pe = sd.get("pos_embed")
  else:
    with np.load(path) as f:
      ckpt = dict(f)
    found = weights.npz_variant(ckpt)
    if found:
      _check_variant("a ViT npz file", *found, model_cfg)
    params = weights.from_npz(ckpt, model_cfg.variant,
                      model_cfg.image_size)[1]["params"]
    source_pe = ckpt.get("Transformer/posembed_input/pos_embedding")
  # The position embedding is the one tensor the converters resample
  # (weights made for another grid).
  pe = params["encoder"]["pos_embedding"]
  resampled = ([] if source_pe is None or source_pe.shape == pe.shape
               else ["encoder/pos_embedding"])
  return jax.tree.map(np.asarray, params), resampled


def _check_timm_architecture(arch, model_cfg):
  """A known timm architecture must be the config's model (a mismatch says
  which variant to set); an unknown one is left to the shape check."""
  if arch not in weights.TIMM_MODELS or model_cfg is None:
    return
  variant, _, distilled = weights.TIMM_MODELS[arch]
  _check_variant(f"timm's {arch}", variant, distilled, model_cfg)


def _load_vitret(path, fmt, model_cfg):
  """The parameters of a vitret_jax artifact or run, after the variant
  check against the model section it saved."""
  if fmt == "vitret_export":
    # Read from the file to the host: the run places them with its own
    # (possibly multi-host) sharding, never from another placement.
    meta, params = export.load_params(path)
    _check_source_model("a vitret_jax artifact", meta.get("model"),
                        model_cfg)
    return params
  workdir = os.path.normpath(path)
  if os.path.basename(workdir) == "checkpoints":
    workdir = os.path.dirname(workdir)
  saved = (workdir_lib.read_saved_config(workdir) if os.path.isdir(workdir)
           else None)
  _check_source_model("a vitret_jax run", saved and saved.get("model"),
                      model_cfg)
  return checkpoint.load_run_params(path, flag="model.init_from")


def _agree_on_source(path):
  """Every process classifies `path` alike (a hub name is told from a
  local path by whether the path exists here) and finds a local one."""
  def local():
    here = not (hub.is_hub_name(path) or hub.is_gcs_name(path))
    if here and not os.path.exists(path):
      raise UserError(
          f"model.init_from={path!r}: not found on this host: every host "
          f"must see the same file (a shared filesystem, and an absolute "
          f"path).")
    return here
  sharding.read_alike(local, None, f"model.init_from={path!r}", lambda _: (
      f"model.init_from={path!r} is a local path on some hosts and a hub "
      f"name on others: give an absolute path that every host sees."))


def _check_source_model(what, source, model_cfg):
  """The variant hint for a run or artifact whose saved model section
  (`source`, a dict) is of another variant than the config's."""
  if source and model_cfg is not None and source.get("variant"):
    _check_variant(what, source["variant"], bool(source.get("distilled")),
                   model_cfg)


def _fit_pos_embedding(loaded, template, model_cfg):
  """`loaded` with its position embedding resampled to the template's grid
  when it was made for another one (a run or an artifact at another
  resolution; timm and npz files are resampled by their converters).
  Returns (params, whether it was resampled)."""
  have = loaded.get("encoder", {}).get("pos_embedding")
  want = template.get("encoder", {}).get("pos_embedding")
  if (have is None or want is None or have.shape == want.shape
      or have.shape[::2] != want.shape[::2] or model_cfg is None):
    return loaded, False
  prefix = 1 + int(bool(model_cfg.distilled))
  side, grid = [int(round((n - prefix) ** 0.5)) for n in (have.shape[1],
                                                          want.shape[1])]
  if side * side + prefix != have.shape[1] or grid * grid + prefix != (
      want.shape[1]):
    return loaded, False  # not square grids: the shape check names it
  pe = weights.fit_posemb(np.asarray(have), grid, prefix)
  return dict(loaded, encoder=dict(loaded["encoder"], pos_embedding=pe)), True


def _check_variant(what, variant, distilled, model_cfg):
  """One line naming the variant to set when weights of `variant` meet a
  config of another."""
  mine = (model_cfg.variant, bool(model_cfg.distilled))
  if mine != (variant, distilled):
    raise UserError(
        f"model.init_from is {what}, a {variant}"
        f"{' distilled' if distilled else ''} model; the config's model is "
        f"{mine[0]}{', distilled' if mine[1] else ''}: set "
        f"--config.model.variant={variant} --config.model.distilled="
        f"{distilled}.")


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
    if jax.process_count() > 1:  # before a run's collective reads
      _agree_on_source(path)
    loaded, resampled = _load_init_source(path, fmt, model_cfg)
    loaded, fitted = _fit_pos_embedding(loaded, template, model_cfg)
    resampled = resampled + ["encoder/pos_embedding"] * fitted
    want, have = params_tree.shapes(template), params_tree.shapes(loaded)
    kept = {k for k in set(want) - set(have) if any(f in k for f in fresh)}
    want_loaded = {k: v for k, v in want.items() if k not in kept}
    weights.check_fit(have, want_loaded, f"model.init_from={path!r}")
    size = lambda names: sum(int(np.prod(want[k])) for k in names)
    logging.info(
        "init_from %s: loaded %d tensors (%s values), of which %d resampled "
        "(%s); %d left freshly initialised (%s values: %s).", path,
        len(want_loaded), f"{size(want_loaded):,}", len(resampled),
        ", ".join(resampled) or "none", len(kept), f"{size(kept):,}",
        ", ".join(sorted(kept)[:4]) or "none")
    return params_tree.like(template, loaded)
  return load


