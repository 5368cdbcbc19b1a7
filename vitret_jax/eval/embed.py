"""Embedding a split: sharded forward passes, padded last batch dropped,
optionally at several scales (descriptors averaged, then re-normalised).
Unreadable images, when skipped, come out as rows of NaN (see
pipeline.eval_batches); `readable_rows` finds the others."""
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from vitret_jax import descriptor
from vitret_jax import models
from vitret_jax import sharding
from vitret_jax.data import image_sizes
from vitret_jax.data import preprocess
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
    self._splits = descriptor.splits_batches(mesh.devices.flat, multiple)
    self._step_tokens = None  # the model's, from its first params

  def __call__(self, params, images, scale=1.0, bad=None):
    """`bad` [B] (with uint8 images): NaN for an unreadable image, whose
    descriptor then comes out NaN; 0 otherwise. On a mesh of one CPU
    device (descriptor.splits_batches), a batch goes through in calls of
    at most `descriptor.step_tokens(params)` tokens at this scale (see
    descriptor.STEP_BYTES)."""
    step = self._images_per_call(params, images.shape, scale)
    if step < images.shape[0]:
      return descriptor.in_calls(
          lambda x, b: self._call(params, x, scale, b), images.shape[0],
          step, images, bad, concatenate=jnp.concatenate)
    return self._call(params, images, scale, bad)

  def _images_per_call(self, params, shape, scale):
    if not self._splits:
      return int(shape[0])
    if self._step_tokens is None:  # shapes only: the same for every params
      self._step_tokens = descriptor.step_tokens(params)
    return descriptor.images_per_call(shape, scale, self.multiple,
                                      self._step_tokens)

  def _call(self, params, images, scale, bad):
    key = (images.shape, images.dtype, scale, bad is None)
    if key not in self._compiled:
      model, multiple = self.model, self.multiple

      def embed(params, images, bad):
        images = preprocess.normalize_on_device(images)
        if bad is not None:
          images = images + bad[:, None, None, None]
        images = descriptor.resize_for_scale(images, scale, multiple)
        return model.apply({"params": params}, images, train=False)
      batch = sharding.batch_sharding(self.mesh)
      self._compiled[key] = jax.jit(
          embed, in_shardings=(self.param_sharding, batch,
                               None if bad is None else batch),
          out_shardings=sharding.replicated(self.mesh))
    return self._compiled[key](params, images, bad)

  def put_params(self, params):
    """params on the devices with `param_sharding`, explicitly and once
    (no copy for parameters already there, as the train state's are): a
    caller embedding many batches passes these, so no batch copies the
    parameters from the host (numpy parameters loaded from a checkpoint
    would otherwise travel with every call)."""
    return jax.device_put(params, self.param_sharding)


def make_embed_fn(model, mesh, param_sharding=None):
  multiple = models.input_stride(model)
  return EmbedFn(model, mesh, param_sharding, multiple)


def local_mesh():
  """A mesh of this process's own devices (the mesh's axis names): for
  work a process does alone, e.g. its shards of a descriptor store."""
  auto = jax.sharding.AxisType.Auto
  return jax.sharding.Mesh(np.asarray(jax.local_devices()).reshape(-1, 1),
                           sharding.BATCH_AXES, axis_types=(auto, auto))


def local_params(params, mesh):
  """`params` replicated on `mesh`'s devices (local_mesh): with several
  processes, gathered whole first (a parameter may be split over them)."""
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  return jax.device_put(params, sharding.replicated(mesh))


def readable_rows(emb):
  """Boolean [N]: rows whose descriptor is finite (not a skipped image)."""
  return np.isfinite(emb).all(axis=1)


def _bucket_shapes(split, spec, upright, fallback_hw, skip_corrupt):
  """[N, 2] output shape of every image, from the file headers (no
  decoding; as shown upright with `upright`); an unreadable image gets
  `fallback_hw` (with skip_corrupt)."""
  sizes = image_sizes.image_sizes(split, skip_corrupt=skip_corrupt,
                                  upright=upright)
  out = np.empty((len(split), 2), np.int64)
  for i, hw in enumerate(sizes):
    box = None if split.boxes is None else split.boxes[i]
    out[i] = fallback_hw if not hw.all() else spec.output_hw(hw, box)
  return out


def _plan(split, pp_fn, batch_size, n_dev, fixed_size, bucket, fallback_hw,
          skip_corrupt):
  """(pipeline.eval_plan of the split's passes, each image's expected
  output shape or None); see embed_split."""
  per_pass = -(-max(1, batch_size) // n_dev) * n_dev
  spec = getattr(pp_fn, "spec", None)
  if fixed_size:
    return pipeline.eval_plan(len(split), per_pass), None
  if bucket and spec is not None:
    expected = _bucket_shapes(split, spec, getattr(pp_fn, "upright", False),
                              tuple(fallback_hw), skip_corrupt)
    return pipeline.eval_plan(len(split), per_pass,
                              groups=[tuple(x) for x in expected]), expected
  # One real image a pass, padded to the device count.
  return pipeline.eval_plan(len(split), n_dev, real_rows=1), None


def _describe(embed_fn, params, batch, mesh, scales):
  """The multi-scale descriptors of one pass's batch (a global array)."""
  if batch["image"].dtype == np.uint8:  # normalised on the device
    arrays = sharding.to_global_batch(
        {"image": batch["image"], "bad": batch["bad"]}, mesh)
    per_scale = [embed_fn(params, arrays["image"], s, arrays["bad"])
                 for s in scales]
  else:
    images = sharding.to_global_batch({"image": batch["image"]},
                                      mesh)["image"]
    per_scale = [embed_fn(params, images, s) for s in scales]
  return descriptor.combine_scales(per_scale)


def embed_split(embed_fn, params, split, pp_fn, batch_size, mesh,
                desc="embed", num_workers=2, scales=(1.0,), fixed_size=True,
                skip_corrupt=False, fallback_hw=(32, 32), bucket=True,
                alone=False):
  """Descriptors of every image of `split`, in order.

  Args:
    embed_fn: an EmbedFn, whose `put_params` places the parameters on the
      devices once for the whole split (any other callable of its
      signature gets them as given).
    params: model parameters.
    split: split.Split (its boxes, if any, crop the images first);
      pp_fn: deterministic preprocessing (from preprocess.build_pp).
    batch_size: images per forward pass, rounded up to the device count.
    fixed_size: the pp makes images of one size. Otherwise, with `bucket`,
      images are grouped by their preprocessed shape (computed from the file
      headers) and each pass holds up to batch_size images of one shape,
      spread over every device; without `bucket` (or for a pp function
      without a spec) each pass holds one image. Either way the padding
      rows of a pass are masked out, so descriptors do not depend on it.
    scales: descriptors at these scales are summed and L2-normalised.
    skip_corrupt: unreadable images give NaN rows instead of an error;
      fallback_hw is the pp's output size (the shape of their placeholders).
    alone: this process embeds the whole split on its own devices (`mesh`
      a local_mesh, `params` from local_params), not its share of a split
      every process embeds.
  Returns:
    (embeddings [N, E] float32 numpy, labels [N]).
  """
  plan, expected = _plan(split, pp_fn, batch_size, mesh.devices.size,
                         fixed_size, bucket, fallback_hw, skip_corrupt)
  put = getattr(embed_fn, "put_params", None)
  if put is not None:  # once per split, not per batch
    params = put(params)
  out = None
  bar = tqdm.tqdm(total=len(split), desc=desc, unit="img", leave=False,
                  disable=alone or jax.process_index() != 0)
  processes = (0, 1) if alone else (jax.process_index(), jax.process_count())
  for batch in pipeline.eval_batches(split, pp_fn, plan, num_workers,
                                     *processes,
                                     skip_corrupt=skip_corrupt,
                                     fallback_hw=fallback_hw,
                                     expected_hw=expected):
    emb = np.asarray(jax.device_get(_describe(embed_fn, params, batch,
                                              mesh, scales)))
    if out is None:
      out = np.full((len(split), emb.shape[1]), np.nan, np.float32)
    out[batch["rows"][batch["mask"]]] = emb[batch["mask"]]
    bar.update(int(batch["mask"].sum()))
  bar.close()
  if out is None:  # an empty split
    out = np.zeros((0, 0), np.float32)
  return out, np.asarray(split.labels)
