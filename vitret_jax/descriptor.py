"""From preprocessed images to final descriptors around any forward function:
the evaluators' multi-scale and whitening steps, in one place for exported
artifacts and for index / search on a run (the evaluators' own batched path,
eval/embed.py, uses the same `scaled_hw`; tests/test_export_search.py checks
that both give the same descriptors).

Only JAX and numpy: an exported artifact runs this without model code.
"""
import jax
import jax.numpy as jnp
import numpy as np


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


def combine_scales(per_scale):
  """Descriptors of several scales summed and L2-normalised (one scale: as
  it is), in float32, as the evaluators do."""
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


class MultiScale:
  """`describe(images [B, H, W, 3] preprocessed) -> [B, E]` numpy.

  Args:
    forward: fn(images at one scale) -> [B, E] descriptors.
    scales: the evaluator's scales (summed, then L2-normalised).
    multiple: the encoder's stride (image sides are rounded to it).
    whitening: (mean [E], projection [E, d]) or None.
  """

  def __init__(self, forward, scales=(1.0,), multiple=1, whitening=None):
    self.forward, self.scales = forward, tuple(float(s) for s in scales)
    self.multiple, self.whitening = int(multiple), whitening
    self._resize = jax.jit(resize_for_scale, static_argnums=(1, 2))

  def __call__(self, images):
    images = jnp.asarray(images, jnp.float32)
    per_scale = [self.forward(self._resize(images, s, self.multiple))
                 for s in self.scales]
    out = np.asarray(jax.device_get(combine_scales(per_scale)))
    if self.whitening is not None:
      out = apply_whitening(out, *self.whitening)
    return out
