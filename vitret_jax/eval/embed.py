"""Embedding a split: sharded forward passes, padded last batch dropped,
optionally at several scales (descriptors averaged, then re-normalised).
Unreadable images, when skipped, come out as rows of NaN (see
pipeline.eval_batches); `readable_rows` finds the others."""
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from vitret_jax import models
from vitret_jax import sharding
from vitret_jax.data import pipeline


class EmbedFn:
  """`embed(params, images [B, H, W, 3], scale=1.0) -> [B, E]`, replicated.

  Images are split over the mesh's batch axes; params keep `param_sharding`
  (the train state's, FSDP-split or replicated). At scale s the images are
  resized on device to (s*H, s*W) rounded to a multiple of the patch size;
  one compiled function per input shape and scale.
  """

  def __init__(self, model, mesh, param_sharding=None, multiple=1):
    self.model, self.mesh, self.multiple = model, mesh, multiple
    self.param_sharding = param_sharding or sharding.replicated(mesh)
    self._compiled = {}

  def _size(self, n, scale):
    return max(self.multiple, int(round(n * scale / self.multiple))
               * self.multiple)

  def __call__(self, params, images, scale=1.0):
    b, h, w, c = images.shape
    out_hw = (self._size(h, scale), self._size(w, scale))
    key = (out_hw, images.shape)
    if key not in self._compiled:
      model = self.model

      def embed(params, images):
        if images.shape[1:3] != out_hw:
          images = jax.image.resize(images, (b,) + out_hw + (c,), "bilinear")
        return model.apply({"params": params}, images, train=False)
      self._compiled[key] = jax.jit(
          embed, in_shardings=(self.param_sharding,
                               sharding.batch_sharding(self.mesh)),
          out_shardings=sharding.replicated(self.mesh))
    return self._compiled[key](params, images)


def make_embed_fn(model, mesh, param_sharding=None):
  multiple = models.input_stride(model)
  return EmbedFn(model, mesh, param_sharding, multiple)


def readable_rows(emb):
  """Boolean [N]: rows whose descriptor is finite (not a skipped image)."""
  return np.isfinite(emb).all(axis=1)


def embed_split(embed_fn, params, split, pp_fn, batch_size, mesh,
                desc="embed", num_workers=2, scales=(1.0,), fixed_size=True,
                skip_corrupt=False, fallback_hw=(32, 32)):
  """Descriptors of every image of `split`, in order.

  Args:
    embed_fn: an EmbedFn.
    params: model parameters.
    split: split.Split (its boxes, if any, crop the images first);
      pp_fn: deterministic preprocessing.
    batch_size: images per forward pass (rounded up to the device count);
      images of varying size (fixed_size=False) go one at a time.
    scales: descriptors at these scales are summed and L2-normalised.
    skip_corrupt: unreadable images give NaN rows instead of an error;
      fallback_hw is the pp's output size (the shape of their placeholders).
  Returns:
    (embeddings [N, E] float32 numpy, labels [N]).
  """
  n_dev = mesh.devices.size
  # Fixed-size images fill whole passes; others go one real image a pass,
  # padded with zeros of its shape up to the device count.
  per_pass = -(-(batch_size if fixed_size else 1) // n_dev) * n_dev
  real = per_pass if fixed_size else 1
  chunks = []
  bar = tqdm.tqdm(total=len(split), desc=desc, unit="img", leave=False,
                  disable=jax.process_index() != 0)
  for batch in pipeline.eval_batches(split, pp_fn, per_pass, num_workers,
                                     jax.process_index(), jax.process_count(),
                                     real_rows=real, skip_corrupt=skip_corrupt,
                                     fallback_hw=fallback_hw):
    images = sharding.to_global_batch({"image": batch["image"]}, mesh)["image"]
    emb = None
    for s in scales:
      e = jnp.asarray(embed_fn(params, images, s), jnp.float32)
      emb = e if emb is None else emb + e
    if len(scales) > 1:
      emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=1, keepdims=True),
                              1e-12)
    chunks.append(np.asarray(jax.device_get(emb))[batch["mask"]])
    bar.update(int(batch["mask"].sum()))
  bar.close()
  return np.concatenate(chunks), np.asarray(split.labels)
