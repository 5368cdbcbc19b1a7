"""Self-contained pretrained artifacts, and loading them back.

An artifact is a folder:
  params.safetensors   the parameters, keys "encoder/Transformer/.../kernel"
  model.json           the model config, descriptor size, preprocessing,
                       scales, stride, whitening, file checksums
  embed.stablehlo      the model's forward pass serialised with `jax.export`
                       (StableHLO, lowered for cpu, cuda and tpu unless
                       the exporter names fewer platforms) with a
                       symbolic batch size, height and width (multiples of
                       the encoder's stride): any image size, any batch
  whitening.safetensors  the learned whitening (mean, projection), when the
                       evaluator it follows has one

`load_pretrained(path)` needs only that folder, JAX, safetensors, pillow and
absl-py:
no model code of this repository runs, so an artifact keeps working when the
code moves on. Around the exported forward pass it applies the evaluator's
multi-scale and whitening steps (vitret_jax/descriptor.py), so its
descriptors are the evaluator's.
"""
import functools
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors import numpy as st_numpy

from vitret_jax import descriptor
from vitret_jax import image_files
from vitret_jax import integrity
from vitret_jax import params_tree
from vitret_jax.errors import UserError
from vitret_jax.errors import first_line

# 2: symbolic height and width, scales, stride and whitening. Version 1
# artifacts (fixed square size, one scale) still load: an artifact is a
# file users keep and hand to others, unlike a run's own state, so its
# format is versioned and read back.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PLATFORMS = ("cpu", "cuda", "tpu")
FILES = ("params.safetensors", "model.json", "embed.stablehlo")
WHITENING = "whitening.safetensors"


def flatten_params(params) -> dict:
  """Nested param dict -> {"a/b/c": np.ndarray} (the safetensors keys)."""
  return {k: np.asarray(jax.device_get(x))
          for k, x in params_tree.flatten(params).items()}


def export_artifact(model, params, out_dir, *, model_config: dict,
                    preprocess: str, image_size: int, multiple: int = 1,
                    scales=(1.0,), whitening=None, overwrite=False,
                    platforms=PLATFORMS, host_pp="exact"):
  """Writes the artifact of `model` with `params` to `out_dir`.

  Args:
    model: the Flax module (images [B, H, W, 3] -> [B, E]).
    params: its parameters.
    out_dir: target folder; an existing one is an error unless `overwrite`.
    model_config: the config's model section, as a plain dict.
    preprocess: deterministic pp spec the model expects (evaluation's).
    image_size: the model's nominal input side (recorded).
    multiple: the encoder's stride: the exported function takes images
      whose sides are multiples of it.
    scales: the evaluator's scales; whitening: its (mean, projection).
    host_pp: how the run ran `preprocess` (preprocess.HOST_PP), recorded so
      that embed_files reads files as the evaluator did.
    platforms: what the forward is lowered for (jax.export platform names,
      "cpu", "cuda", "tpu"); `model` should carry the attention
      models.for_export chooses for them (recorded in model.json).
  Returns:
    out_dir.
  """
  out_dir = os.path.abspath(out_dir)
  platforms = _check_target(out_dir, overwrite, platforms,
                            model.encoder.attention)
  flat = flatten_params(params)
  exported = _export_forward(model, params, multiple, platforms)
  dim = int(exported.out_avals[0].shape[-1])
  if whitening is not None:
    dim = int(np.shape(whitening[1])[1])
  meta = {"format_version": FORMAT_VERSION, "model": model_config,
          "image_size": image_size, "embedding_dim": dim,
          "preprocess": preprocess, "host_pp": host_pp,
          # embed_files reads people's photos upright (EXIF orientation).
          "exif_transpose": True,
          "platforms": list(platforms),
          "attention": model.encoder.attention,
          "dtype": jnp.dtype(model.encoder.dtype).name,
          "multiple": int(multiple), "scales": [float(s) for s in scales],
          "whitening": whitening is not None,
          "jax_version": jax.__version__}

  def write(tmp):
    st_numpy.save_file(flat, os.path.join(tmp, "params.safetensors"))
    with open(os.path.join(tmp, "embed.stablehlo"), "wb") as f:
      f.write(exported.serialize())
    names = [n for n in FILES if n != "model.json"]
    if whitening is not None:
      names.append(_save_whitening(tmp, *whitening))
    # Checked by the loader: a truncated or damaged file is named.
    meta["files"] = {name: integrity.file_digest(os.path.join(tmp, name))
                     for name in names}
    with open(os.path.join(tmp, "model.json"), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)

  _write_folder(out_dir, write)
  return out_dir


def _save_whitening(folder, mean, projection):
  """Writes WHITENING into `folder` (float64, as evaluation applies it);
  returns its name."""
  st_numpy.save_file({"mean": np.asarray(mean, np.float64),
                      "projection": np.asarray(projection, np.float64)},
                     os.path.join(folder, WHITENING))
  return WHITENING


def _check_target(out_dir, overwrite, platforms, attention):
  """The platforms as a tuple, once the folder and the platforms are known
  to be usable (a UserError says what to change otherwise)."""
  if os.path.exists(out_dir) and not overwrite:
    raise UserError(f"{out_dir} exists: refusing to overwrite an artifact. "
                    f"Pass --overwrite to replace it, or choose another "
                    f"--export_dir.")
  platforms = tuple(platforms)
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise UserError(f"--export_platforms: {unknown or 'none'}; choose from "
                    f"{', '.join(PLATFORMS)}.")
  if attention == "cudnn" and platforms != ("cuda",):
    raise UserError(f"A model with cuDNN attention exports for cuda alone, "
                    f"not {platforms}: build it with models.for_export.")
  return platforms


def _export_forward(model, params, multiple, platforms):
  """`model`'s forward (params, images [batch, multiple*h, multiple*w, 3]
  -> [batch, E]) lowered with jax.export for `platforms`, with a symbolic
  batch size, height and width."""
  def embed(params, images):
    return model.apply({"params": params}, images, train=False)

  shape = jax.export.symbolic_shape(f"batch, {multiple}*h, {multiple}*w")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          params)
  images = jax.ShapeDtypeStruct(tuple(shape) + (3,), jnp.float32)
  return jax.export.export(jax.jit(embed), platforms=platforms)(
      abstract, images)


def _write_folder(out_dir, write):
  """`write(tmp)` fills a sibling temporary folder, which then replaces
  `out_dir`: a crash never leaves a half-written artifact under the final
  name."""
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from others
  try:
    write(tmp)
    if os.path.exists(out_dir):
      old = out_dir + ".replaced"
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


class Embedder:
  """The embedding function of an artifact.

  Attributes:
    meta: model.json's contents (model config, image_size, embedding_dim,
      preprocess spec, scales, stride, whitening).
    params: the parameters, a nested dict of jax arrays put on the
      devices once, at load (descriptor.Placement): every call reuses
      them, none copies them from the host.
    whitening: (mean, projection), or None.
  `embedder(images [B, H, W, 3] float32, preprocessed) -> [B, E]` for any B
  and (format 2) any H and W: the evaluator's descriptors (multi-scale,
  whitening). `images` may be numpy or a jax array already on a device.

  Args:
    path: the artifact folder.
    devices: the devices each batch is split over (default: this
      process's first device; see descriptor.Placement).
  """

  def __init__(self, path, devices=None):
    self.meta, params = load_params(path)
    try:
      with open(os.path.join(path, "embed.stablehlo"), "rb") as f:
        self.exported = jax.export.deserialize(bytearray(f.read()))
      whitening = None
      if self.meta.get("whitening"):
        w = st_numpy.load_file(os.path.join(path, WHITENING))
        whitening = (w["mean"], w["projection"])
    except Exception as e:  # pylint: disable=broad-except
      # Artifacts from before checksums: the library's own error, in a line.
      raise UserError(f"{path}: cannot load the artifact "
                      f"({first_line(e)}); export it "
                      f"again.") from e
    self.path, self.whitening = path, whitening
    if devices and len(devices) > 1 and self.meta.get("attention") == "cudnn":
      # Its exported cuDNN attention is a custom call without a rule to
      # split it: every device would gather the whole batch.
      logging.info("%s: cuDNN attention, exported for one device: each "
                   "batch runs on the first of %d devices.", path,
                   len(devices))
      devices = devices[:1]
    placement = descriptor.Placement(devices)
    self.num_devices = placement.num_devices
    self.params = placement.put_params(params)
    # Format 1 (a fixed size, one scale) has no scales or stride: one
    # scale of 1 at a stride of 1 leaves its images as they are.
    self._describe = descriptor.MultiScale(
        lambda x: self.exported.call(self.params, x),
        self.meta.get("scales", (1.0,)), self.meta.get("multiple", 1),
        whitening, placement, descriptor.step_tokens(params))

  @functools.cached_property
  def params_digest(self) -> str:
    """descriptor.digest of the parameters and whitening (an index's
    identity)."""
    return descriptor.digest(self.params, self.whitening)

  @property
  def scales(self) -> tuple:
    """The evaluator's scales the descriptors combine (1.0 alone for
    format 1)."""
    return tuple(float(x) for x in self.meta.get("scales", (1.0,)))

  @property
  def model_config(self):
    """The model config as the run wrote it (model.json's "model")."""
    return self.meta.get("model")

  @property
  def image_size(self) -> int:
    return self.meta["image_size"]

  @property
  def preprocess(self) -> str:
    return self.meta["preprocess"]

  @property
  def host_pp(self) -> str:
    return self.meta.get("host_pp", "exact")

  @property
  def exif_transpose(self) -> bool:
    """Whether embed_files turns photos upright (EXIF orientation); True
    for artifacts that do not say."""
    return bool(self.meta.get("exif_transpose", True))

  def embed_files(self, paths, batch_size=64):
    """Descriptors [N, E] of image files (paths, or one path), in order:
    this artifact's own preprocessing, scales and whitening, images batched
    by shape. An unreadable file is an error naming it."""
    return image_files.embed_all(self, paths, batch_size)

  # embedder.embed_files_iter(paths, batch_size=64, skipped=None): a
  # generator of (paths_chunk, descriptors) for millions of files.
  embed_files_iter = image_files.embed_files_iter

  def __call__(self, images):
    # Sides are rounded to the stride at every scale, as in evaluation.
    return self._describe(images)


def load_params(path):
  """(model.json's contents, the parameters as a nested dict of numpy
  arrays on the host) of the artifact at `path`, its files checked: what
  model.init_from reads, without placing anything on a device."""
  meta = _read_meta(path)
  try:
    return meta, params_tree.unflatten(
        st_numpy.load_file(os.path.join(path, "params.safetensors")))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{path}: cannot load the artifact's parameters "
                    f"({first_line(e)}); export it "
                    f"again.") from e


def _read_meta(path):
  """model.json of the artifact at `path`, its format checked and every
  file's checksum verified (a damaged or truncated file is named)."""
  missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise UserError(f"{path} is not a vitret_jax artifact: missing "
                    f"{', '.join(missing)} (make one with --mode=export).")
  try:
    with open(os.path.join(path, "model.json")) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}/model.json is unreadable ({e}): the artifact "
                    f"is damaged; export it again.") from e
  if meta.get("format_version") not in READABLE_VERSIONS:
    raise UserError(f"{path}: artifact format "
                    f"{meta.get('format_version')}, this version reads "
                    f"{READABLE_VERSIONS}.")
  for name, want in meta.get("files", {}).items():
    got = integrity.file_digest(os.path.join(path, name))
    if got != want:
      raise UserError(
          f"{path}/{name} is damaged or truncated ({got[0]} bytes, "
          f"{want[0]} were exported; checksum mismatch): export the "
          f"artifact again or copy it anew.")
  return meta


def load_pretrained(path, devices=None) -> Embedder:
  """The embed function of the artifact folder `path` (see module doc);
  `devices`: as Embedder's."""
  return Embedder(path, devices)
