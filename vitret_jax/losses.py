"""IRT loss: contrastive loss with margin, cross-batch memory, KoLeo
regularizer.

Notation (docs/irt.md): descriptors z are L2-normalised and
s_ij = z_i . z_j.

  L_contr = 1/N sum_i [ sum_{j != i, y_j = y_i} (1 - s_ij)
                        + sum_{j: y_j != y_i} max(0, s_ij - beta) ]
  L_KoLeo = -1/N sum_i log(rho_i + eps),  rho_i = min_{j != i} ||z_i - z_j||
  L       = L_contr [+ L_contr against the memory] + lambda * L_KoLeo

Every term is computed by one per-shard function that takes this device's
anchors `[b, E]` and the reference set `[R, E]` (the all-gathered global batch,
or the cross-batch memory) and returns partial *sums and counts*. Summing those
over devices (`psum`) and dividing once gives exactly the single-device loss,
whether or not the classes split evenly over devices. The unsharded loss is the
same code with the batch as its own reference and no collective.

Reductions of the contrastive term:
  "anchor_mean": the paper's formula above: pair costs summed per anchor,
    averaged over the N anchors (default).
  "nonzero_mean": pytorch-metric-learning's ContrastiveLoss(pos_margin=1,
    neg_margin=beta) with AvgNonZeroReducer, as in the public reimplementation:
    positive and negative pair costs each averaged over the pairs whose cost is
    > 0, then added.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vitret_jax import sharding

REDUCTIONS = ("anchor_mean", "nonzero_mean")
_HIGHEST = jax.lax.Precision.HIGHEST


def contrastive_partials(emb, labels, ref, ref_labels, self_index, margin):
  """Partial sums of the contrastive term for anchors `emb` against `ref`.

  Args:
    emb: [b, E] anchors (L2-normalised).
    labels: [b] int class labels of the anchors.
    ref: [R, E] reference descriptors.
    ref_labels: [R] labels of `ref`; a negative label marks an empty slot
      (an unfilled memory entry), which takes part in no pair.
    self_index: [b] column of each anchor's own entry in `ref` (masked out),
      or -1 when the anchor is not in `ref`.
    margin: beta, the negative-pair margin on cosine similarity.
  Returns:
    dict of scalars: "sum" (all pair costs), "pos_sum", "pos_n" (positive
    pairs with non-zero cost), "neg_sum", "neg_n" (likewise negatives).
  """
  sim = jnp.matmul(emb.astype(jnp.float32), ref.astype(jnp.float32).T,
                   precision=_HIGHEST)
  cols = jnp.arange(ref.shape[0])
  valid = (cols[None, :] != self_index[:, None]) & (ref_labels[None, :] >= 0)
  same = labels[:, None] == ref_labels[None, :]
  pos = jnp.where(same & valid, 1.0 - sim, 0.0)
  neg = jnp.where(~same & valid, jax.nn.relu(sim - margin), 0.0)
  pos_sum, neg_sum = jnp.sum(pos), jnp.sum(neg)
  return {
      "sum": pos_sum + neg_sum,
      "pos_sum": pos_sum, "pos_n": jnp.sum(pos > 0).astype(jnp.float32),
      "neg_sum": neg_sum, "neg_n": jnp.sum(neg > 0).astype(jnp.float32),
  }


def _safe_norm(x):
  """Row L2 norm whose gradient is 0 (not NaN) where the row is all zeros."""
  sq = jnp.sum(x * x, axis=-1)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def koleo_partials(emb, ref, self_index, eps):
  """Partial sum of -log(rho_i + eps) over the anchors `emb` [b, E].

  rho_i is the distance from anchor i to its nearest neighbour among `ref`
  [R, E] other than itself (`self_index` [b]). The neighbour is chosen without
  gradient; the distance carries gradient to both ends. Coinciding descriptors
  give rho = 0, a loss of -log(eps) and a finite (zero) gradient.
  Returns dict(koleo_sum=..., n=b).
  """
  emb = emb.astype(jnp.float32)
  ref = ref.astype(jnp.float32)
  d2 = (jnp.sum(emb * emb, -1)[:, None] + jnp.sum(ref * ref, -1)[None, :]
        - 2.0 * jnp.matmul(emb, ref.T, precision=_HIGHEST))
  is_self = jnp.arange(ref.shape[0])[None, :] == self_index[:, None]
  nn_idx = jnp.argmin(jax.lax.stop_gradient(jnp.where(is_self, jnp.inf, d2)),
                      axis=1)
  rho = _safe_norm(emb - ref[nn_idx])
  return {"koleo_sum": -jnp.sum(jnp.log(rho + eps)),
          "n": jnp.asarray(emb.shape[0], jnp.float32)}


def _contrastive_value(p, n_anchors, reduction):
  if reduction == "anchor_mean":
    return p["sum"] / n_anchors
  return (p["pos_sum"] / jnp.maximum(p["pos_n"], 1.0)
          + p["neg_sum"] / jnp.maximum(p["neg_n"], 1.0))


def _partials(emb, labels, ref, ref_labels, self_index, memory, mem_slots,
              *, margin, eps):
  out = {"batch": contrastive_partials(emb, labels, ref, ref_labels,
                                       self_index, margin),
         "koleo": koleo_partials(emb, ref, self_index, eps)}
  if memory is not None:
    mem_emb = jax.lax.stop_gradient(memory["emb"])
    out["xbm"] = contrastive_partials(emb, labels, mem_emb, memory["labels"],
                                      mem_slots, margin)
  return out


def _finalize(p, *, reduction, entropy_weight, xbm_weight=1.0):
  n = p["koleo"]["n"]
  contr = _contrastive_value(p["batch"], n, reduction)
  koleo = p["koleo"]["koleo_sum"] / n
  metrics = {"contrastive": contr, "koleo": koleo}
  total = contr + entropy_weight * koleo
  if "xbm" in p:
    xbm = _contrastive_value(p["xbm"], n, reduction)
    metrics["xbm"] = xbm
    total = total + xbm_weight * xbm
  metrics["loss"] = total
  return total, metrics


def check_reduction(reduction):
  if reduction not in REDUCTIONS:
    raise ValueError(f"loss.reduction={reduction!r}; valid: {REDUCTIONS}.")


def irt_loss(emb, labels, *, margin=0.5, entropy_weight=0.7,
             reduction="anchor_mean", eps=1e-8, memory=None, mem_ptr=0,
             xbm_weight=1.0):
  """Unsharded IRT loss of one batch (the reference for the sharded one).

  Args:
    emb: [N, E] L2-normalised descriptors of the batch.
    labels: [N] int labels.
    margin, entropy_weight, reduction, eps: beta, lambda, see module doc.
    memory: optional cross-batch memory dict(emb=[M, E], labels=[M]) that
      already holds this batch at slots (mem_ptr + i) % M.
    mem_ptr: slot of the batch's first row in the memory.
    xbm_weight: weight of the memory term (0 during the memory's warm-up).
  Returns:
    (loss, metrics dict).
  """
  check_reduction(reduction)
  idx = jnp.arange(emb.shape[0])
  slots = None
  if memory is not None:
    slots = (mem_ptr + idx) % memory["labels"].shape[0]
  p = _partials(emb, labels, emb, labels, idx, memory, slots,
                margin=margin, eps=eps)
  return _finalize(p, reduction=reduction, entropy_weight=entropy_weight,
                   xbm_weight=xbm_weight)


def make_sharded_loss(mesh, *, margin=0.5, entropy_weight=0.7,
                      reduction="anchor_mean", eps=1e-8):
  """The IRT loss over a batch split over `sharding.BATCH_AXES`.

  Each device compares its b local anchors with the all-gathered global batch
  [B, E] (and the replicated memory), so memory per device is O(b * B).

  Returns:
    loss_fn(emb [B, E], labels [B], memory=None, mem_ptr=0, xbm_weight=1.0)
    -> (loss, metrics),
    to be called inside jit with `emb` and `labels` split over BATCH_AXES.
  """
  check_reduction(reduction)
  data = sharding.BATCH_AXES  # collectives over every device of the batch

  def per_shard(emb, labels, memory, mem_ptr, xbm_weight):
    ref = jax.lax.all_gather(emb, data, tiled=True)
    ref_labels = jax.lax.all_gather(labels, data, tiled=True)
    b = emb.shape[0]
    idx = jax.lax.axis_index(data) * b + jnp.arange(b)
    slots = None
    if memory is not None:
      slots = (mem_ptr + idx) % memory["labels"].shape[0]
    p = _partials(emb, labels, ref, ref_labels, idx, memory, slots,
                  margin=margin, eps=eps)
    p = jax.lax.psum(p, data)
    return _finalize(p, reduction=reduction, entropy_weight=entropy_weight,
                     xbm_weight=xbm_weight)

  def loss_fn(emb, labels, memory=None, mem_ptr=0, xbm_weight=1.0):
    fn = jax.shard_map(
        per_shard, mesh=mesh,
        in_specs=(P(data), P(data), P(), P(), P()), out_specs=(P(), P()))
    return fn(emb, labels, memory, jnp.asarray(mem_ptr, jnp.int32),
              jnp.asarray(xbm_weight, jnp.float32))

  return loss_fn


def enqueue(memory, emb, labels, ptr):
  """Writes the global batch into the FIFO memory at slots (ptr + i) % M.

  Args:
    memory: dict(emb=[M, E], labels=[M]); emb: [B, E]; labels: [B].
    ptr: int32 scalar, the slot of the oldest entry (the next to overwrite).
  Returns:
    (new memory, new ptr).
  """
  size = memory["labels"].shape[0]
  slots = (ptr + jnp.arange(emb.shape[0])) % size
  new = {"emb": memory["emb"].at[slots].set(
             jax.lax.stop_gradient(emb).astype(memory["emb"].dtype)),
         "labels": memory["labels"].at[slots].set(labels)}
  return new, (ptr + emb.shape[0]) % size
