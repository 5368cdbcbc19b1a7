"""From preprocessed images to final descriptors around any forward function:
the evaluators' multi-scale and whitening steps, in one place for exported
artifacts and for index / search on a run (the evaluators' own batched path,
eval/embed.py, uses the same `scaled_hw`; tests/test_export_search.py checks
that both give the same descriptors).

Only JAX, numpy and the mesh helpers (sharding.py): an exported artifact
runs this without model code.
"""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from vitret_jax import sharding


def scaled_hw(hw, scale, multiple):
  """(h, w) of an image of size `hw` at `scale`, each side rounded to a
  multiple of the encoder's stride (at least one stride)."""
  return tuple(max(multiple, int(round(n * scale / multiple)) * multiple)
               for n in hw)


def resize_for_scale(images, scale, multiple):
  """images [B, H, W, C] resized (bilinear) to scaled_hw(...); unchanged
  when that is already their size."""
  b, h, w, c = images.shape
  out = scaled_hw((h, w), scale, multiple)
  if out == (h, w):
    return images
  return jax.image.resize(images, (b,) + out + (c,), "bilinear")


@jax.jit
def combine_scales(per_scale):
  """Descriptors of several scales summed and L2-normalised (one scale: as
  it is), in float32, as the evaluators do. Jitted: its constants are part
  of the program, not host values sent with each call."""
  out = None
  for e in per_scale:
    e = jnp.asarray(e, jnp.float32)
    out = e if out is None else out + e
  if len(per_scale) > 1:
    out = out / jnp.maximum(jnp.linalg.norm(out, axis=1, keepdims=True),
                            1e-12)
  return out


def apply_whitening(x, mean, projection):
  """normalize((x - mean) @ projection), in float64 (eval/whitening.py)."""
  y = (np.asarray(x, np.float64) - mean) @ projection
  y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
  return y.astype(np.float32)


def digest(params, whitening=None) -> str:
  """A short digest of a model's parameters (values, shapes and dtypes, as
  stored) and its whitening (mean, projection; as float64): what a run and
  its exported artifact share. The forward pass is not in it (the model
  config is: image_files.identity)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    x = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(x.tobytes())
  for x in whitening or ():
    x = np.ascontiguousarray(x, np.float64)
    h.update(f"{x.shape}".encode())
    h.update(x.tobytes())
  return h.hexdigest()[:16]


# A batch embedded on a one-device CPU placement goes through the forward
# pass in calls of at most `step_tokens(params)` tokens. On a CPU, one call
# over a large batch is slower per image than several calls over its parts:
# XLA:CPU gives each call its temporaries as one block, which glibc maps
# afresh and the kernel faults in a page at a time at every call
# (host_memory.py). The budget is a heuristic on the encoder's widest dense
# layer (a ViT's MLP hidden layer): its float32 output in one call stays
# under STEP_BYTES. Attention scores (larger images) and a hybrid's
# convolutions are not counted; at those sizes the rule already gives a
# few images a call. docs/benchmarks.md, "Forward calls on a CPU", has the
# measurements behind the budget. Accelerators keep whole batches.
STEP_BYTES = 12 << 20


def step_tokens(params) -> int:
  """Tokens per forward call on a CPU (see STEP_BYTES): the budget over
  the widest output of the encoder's 2-D (dense) kernels, float32. A
  head's layers, applied once an image, are left out."""
  if isinstance(params, dict) and "encoder" in params:
    params = params["encoder"]
  widest = max((int(x.shape[-1]) for x in jax.tree.leaves(params)
                if getattr(x, "ndim", 0) == 2), default=1)
  return max(1, STEP_BYTES // (4 * widest))


def splits_batches(devices, multiple) -> bool:
  """Whether embedding on `devices` takes a batch in calls of
  `step_tokens`: one CPU device, and a stride above 1 (a stride of 1, an
  artifact of format 1, leaves the tokens of an image unknown).
  Accelerators and several devices keep whole batches."""
  devices = list(devices)
  return (len(devices) == 1 and devices[0].platform == "cpu"
          and multiple > 1)


def images_per_call(shape, scale, multiple, tokens) -> int:
  """How many images of a batch of `shape` [B, H, W, C] one forward call
  at `scale` takes when a call holds at most `tokens` tokens (patches of
  the encoder's stride `multiple`); at least one, however large the
  image."""
  h, w = scaled_hw(shape[1:3], scale, multiple)
  per_image = (h // multiple) * (w // multiple)
  return min(int(shape[0]), max(1, tokens // per_image))


def take_rows(x, start, stop):
  """x[start:stop] along the first axis; for a jax array a static slice
  on its device (plain indexing would send the start from the host, which
  jax.transfer_guard("disallow") refuses)."""
  if isinstance(x, jax.Array):
    return jax.lax.slice_in_dim(x, start, min(stop, x.shape[0]), axis=0)
  return x[start:stop]


def in_calls(fn, rows, step, *arrays, concatenate=np.concatenate):
  """fn over the rows of `arrays` (None stays None) in calls of `step`
  rows, in order, the outputs concatenated."""
  return concatenate([
      fn(*(None if a is None else take_rows(a, i, i + step) for a in arrays))
      for i in range(0, rows, step)])


class Placement:
  """Where an embedder's parameters live and its batches go: parameters
  replicated on the devices once (`put_params`), each batch split over
  them (`put_batch`), so that no call copies the parameters from the host
  again. Every transfer is an explicit `jax.device_put`, so embedding runs
  under jax.transfer_guard("disallow").

  One device unless asked for more: a batch split over n devices is
  padded to a multiple of n (a service's single image would be computed n
  times over), and an exported forward holding a single-device kernel
  (cuDNN's fused attention is a custom call) can be replicated on every
  device by the partitioner rather than split.

  Args:
    devices: the devices to use (default: this process's first device;
      jax.local_devices() splits each batch over all of them).
  """

  def __init__(self, devices=None):
    devices = list(devices or jax.local_devices()[:1])
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1, 1),
                             sharding.BATCH_AXES)
    self.num_devices = len(devices)
    self.devices = devices
    self.params_sharding = sharding.replicated(mesh)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self._pad = jax.jit(_pad_rows, static_argnums=1)

  def put_params(self, params):
    """params (numpy or jax arrays) -> jax arrays replicated on the
    devices (no copy for arrays already placed so)."""
    return jax.device_put(params, self.params_sharding)

  def put_batch(self, images):
    """images [B, H, W, C] (numpy or a jax array) -> (float32 jax array
    [B', H, W, C] split over the devices, B): rows are added to make B' a
    multiple of the device count; the caller drops them again."""
    rows = int(images.shape[0])
    pad = -rows % self.num_devices
    if isinstance(images, jax.Array):
      if pad or images.dtype != jnp.float32:
        images = self._pad(images, pad)
    else:
      images = _pad_rows(np.asarray(images, np.float32), pad)
    return jax.device_put(images, self.batch_sharding), rows


def _pad_rows(images, pad):
  """float32 images with `pad` zero rows added (numpy or jax)."""
  xp = np if isinstance(images, np.ndarray) else jnp
  images = images.astype(xp.float32)
  if not pad:
    return images
  return xp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))


class MultiScale:
  """`describe(images [B, H, W, 3] preprocessed) -> [B, E]` numpy.

  Args:
    forward: fn(images at one scale, on `placement`'s devices) -> [B, E]
      descriptors; its parameters should be placed with
      `placement.put_params` once.
    scales: the evaluator's scales (summed, then L2-normalised).
    multiple: the encoder's stride (image sides are rounded to it).
    whitening: (mean [E], projection [E, d]) or None.
    placement: the Placement of the batches (default: a new one, on this
      process's first device).
    step_tokens: where `splits_batches` (one CPU device), the most tokens
      (at the largest scale) one forward call takes (`step_tokens(params)`),
      or one image when one alone exceeds it; a larger batch goes through
      in several calls, in order. None: one call a batch.
  """

  def __init__(self, forward, scales=(1.0,), multiple=1, whitening=None,
               placement=None, step_tokens=None):
    self.forward, self.scales = forward, tuple(float(s) for s in scales)
    self.multiple, self.whitening = int(multiple), whitening
    self.placement = placement or Placement()
    split = splits_batches(self.placement.devices, self.multiple)
    self.step_tokens = step_tokens if split else None
    self._resize = jax.jit(resize_for_scale, static_argnums=(1, 2))

  def images_per_call(self, shape) -> int:
    """How many of a batch of `shape` [B, H, W, C] one forward call
    takes: the calls of a part run at every scale, so the largest scale
    sizes them."""
    if not self.step_tokens:
      return int(shape[0])
    return images_per_call(shape, max(self.scales), self.multiple,
                           self.step_tokens)

  def __call__(self, images):
    rows, step = int(images.shape[0]), self.images_per_call(images.shape)
    if step >= rows:
      return self._describe(images)
    return in_calls(self._describe, rows, step, images)

  def _describe(self, images):
    images, rows = self.placement.put_batch(images)
    per_scale = [self.forward(self._resize(images, s, self.multiple))
                 for s in self.scales]
    out = np.asarray(jax.device_get(combine_scales(per_scale)))[:rows]
    if self.whitening is not None:
      out = apply_whitening(out, *self.whitening)
    return out
