"""ArcFace (additive angular margin) with the class weights split over devices.

Notation: descriptors z_i are L2-normalised, w_c the class centres (rows of
W [C, E], normalised in the loss), cos t_ic = z_i . w_c / |w_c|.

  logit_ic = s * cos(t_ic + m)   if c = y_i   (the margin on the target)
             s * cos(t_ic)       otherwise
  L        = 1/N sum_i [ log sum_c exp(logit_ic) - logit_iy_i ]

Where t + m would pass pi (cos t < cos(pi - m)), cos(t + m) is no longer
decreasing in t; the target logit is then s * (cos t - m sin m), the usual
continuation (insightface's), so the loss keeps pushing the target up.

GLDv2-clean has 81,313 classes: W is 166 MB in float32 and its Adam moments
twice that. `make_sharded_arcface` splits the class dimension over every
device of the mesh (partial-FC style): each device holds C/n centres and
their optimizer state, compares the whole (all-gathered) global batch with
its centres, and the softmax normaliser is assembled from a max (pmax) and a
sum of exponentials (psum) over devices. The loss and its gradients equal the
one-device `arcface_loss` (tests/test_arcface.py, 8 simulated devices), and
per-device memory falls with the device count (benchmarks/arcface_memory.py).

The class dimension is padded to `padded_classes(C)` so that a checkpoint
is portable between power-of-two device counts up to 1024; padded centres
take part in no softmax.
"""
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vitret_jax import losses
from vitret_jax import sharding

CLASS_WEIGHTS = "class_weights"  # the parameter's name (optim.DECAYED)
_HIGHEST = jax.lax.Precision.HIGHEST
_NEG = -1e30  # logit of a padded class: exp() underflows to exactly 0
_PAD_TO = 1024


def padded_classes(num_classes: int, num_devices: int = 1) -> int:
  """Rows of W: num_classes rounded up to a multiple of 1024 (and of the
  device count when that does not divide 1024)."""
  unit = _PAD_TO if _PAD_TO % num_devices == 0 else (
      _PAD_TO * num_devices // math.gcd(_PAD_TO, num_devices))
  return -(-num_classes // unit) * unit


def init_class_weights(rng, num_classes: int, dim: int, num_devices: int = 1):
  """W [padded_classes(C), E] drawn from N(0, 1/E): rows of norm ~1. Only
  directions enter the loss, but the gradient scales with 1/|w|, so rows
  start at unit norm rather than tiny."""
  rows = padded_classes(num_classes, num_devices)
  return jax.random.normal(rng, (rows, dim), jnp.float32) / math.sqrt(dim)


def _margin_logits(cos, is_target, margin, scale):
  cos = jnp.clip(cos, -1.0 + 1e-7, 1.0 - 1e-7)
  sin = jnp.sqrt(1.0 - cos * cos)
  with_margin = cos * math.cos(margin) - sin * math.sin(margin)
  with_margin = jnp.where(cos > math.cos(math.pi - margin), with_margin,
                          cos - margin * math.sin(margin))
  return scale * jnp.where(is_target, with_margin, cos)


def _cosines(emb, weights):
  w = weights.astype(jnp.float32)
  w = w * jax.lax.rsqrt(jnp.maximum(jnp.sum(w * w, -1, keepdims=True), 1e-24))
  return jnp.matmul(emb.astype(jnp.float32), w.T, precision=_HIGHEST)


def arcface_loss(emb, labels, weights, *, num_classes, margin=0.3,
                 scale=30.0, entropy_weight=0.0, eps=1e-8):
  """Unsharded ArcFace (the reference for the sharded one).

  Args:
    emb: [N, E] L2-normalised descriptors; labels: [N] class indices in
      [0, num_classes).
    weights: [C_pad, E] class centres (rows >= num_classes are padding).
    margin, scale: m (radians) and s.
    entropy_weight, eps: lambda and eps of an optional KoLeo term over the
      batch (losses.koleo_partials); 0 = ArcFace alone.
  Returns:
    (loss, metrics) with metrics "arcface", "accuracy" (the fraction of rows
    whose own centre is the nearest, without margin), "koleo" if used, and
    "loss" (the total).
  """
  cos = _cosines(emb, weights)
  cols = jnp.arange(weights.shape[0])
  is_target = labels[:, None] == cols[None, :]
  logits = _margin_logits(cos, is_target, margin, scale)
  logits = jnp.where(cols[None, :] < num_classes, logits, _NEG)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1)
                  - jnp.sum(jnp.where(is_target, logits, 0.0), axis=1))
  plain = jnp.where(cols[None, :] < num_classes, cos, -jnp.inf)
  acc = jnp.mean((jnp.argmax(plain, axis=1) == labels).astype(jnp.float32))
  koleo = None
  if entropy_weight:
    k = losses.koleo_partials(emb, emb, jnp.arange(emb.shape[0]), eps)
    koleo = k["koleo_sum"] / k["n"]
  return _total(loss, acc, koleo, entropy_weight)


def _total(arc, acc, koleo, entropy_weight):
  metrics = {"arcface": arc, "accuracy": acc}
  total = arc
  if koleo is not None:
    metrics["koleo"] = koleo
    total = arc + entropy_weight * koleo
  metrics["loss"] = total
  return total, metrics


def make_sharded_arcface(mesh, *, num_classes, margin=0.3, scale=30.0,
                         entropy_weight=0.0, eps=1e-8):
  """ArcFace over a batch split over `sharding.BATCH_AXES` and class centres
  split over the same devices (`class_sharding(mesh)`).

  Returns:
    loss_fn(emb [B, E], labels [B], loss_params) -> (loss, metrics), with
    loss_params = {"class_weights": [C_pad, E]}, to be called inside jit;
    memory per device is O(B * C_pad / n) for the logits and
    O(C_pad * E / n) for the centres.
  """
  axes = sharding.BATCH_AXES

  def per_shard(local, labels, weights):
    emb = jax.lax.all_gather(local, axes, tiled=True)       # [B, E]
    labels = jax.lax.all_gather(labels, axes, tiled=True)   # [B]
    c = weights.shape[0]
    cols = jax.lax.axis_index(axes) * c + jnp.arange(c)     # global ids
    cos = _cosines(emb, weights)                            # [B, c]
    is_target = labels[:, None] == cols[None, :]
    valid = cols[None, :] < num_classes
    logits = jnp.where(valid, _margin_logits(cos, is_target, margin, scale),
                       _NEG)
    top = jax.lax.pmax(jnp.max(jax.lax.stop_gradient(logits), axis=1), axes)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - top[:, None]), axis=1),
                           axes)
    target = jax.lax.psum(
        jnp.sum(jnp.where(is_target, logits, 0.0), axis=1), axes)
    loss = jnp.mean(jnp.log(sum_exp) + top - target)
    # Accuracy without margin: is the own centre's cosine the largest?
    plain = jax.lax.stop_gradient(jnp.where(valid, cos, -jnp.inf))
    best = jax.lax.pmax(jnp.max(plain, axis=1), axes)
    own = jax.lax.psum(jnp.sum(jnp.where(is_target, plain, 0.0), axis=1),
                       axes)
    acc = jnp.mean((own >= best).astype(jnp.float32))
    koleo = None
    if entropy_weight:
      b = local.shape[0]
      idx = jax.lax.axis_index(axes) * b + jnp.arange(b)
      k = jax.lax.psum(losses.koleo_partials(local, emb, idx, eps), axes)
      koleo = k["koleo_sum"] / k["n"]
    return _total(loss, acc, koleo, entropy_weight)

  def loss_fn(emb, labels, loss_params):
    fn = jax.shard_map(per_shard, mesh=mesh,
                       in_specs=(P(axes), P(axes), P(axes, None)),
                       out_specs=(P(), P()))
    return fn(emb, labels, loss_params[CLASS_WEIGHTS])

  return loss_fn
