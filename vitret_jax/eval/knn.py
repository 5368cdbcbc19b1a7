"""Exact k-nearest-neighbour search by inner product, chunked on device.

`exact_knn(query, reference, k, exclude_self)` compares `query_chunk` queries
with `ref_chunk` references at a time and merges running top-k lists, so the
device never holds more than [query_chunk, ref_chunk + k] scores whatever the
gallery size.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_chunk(best_s, best_i, q, r, q_start, r_start, n_ref, k,
                 exclude_self):
  s = jnp.matmul(q, r.T, precision=jax.lax.Precision.HIGHEST)  # [c, rc]
  cols = r_start + jnp.arange(r.shape[0])
  rows = q_start + jnp.arange(q.shape[0])
  drop = cols[None, :] >= n_ref  # padding of the last reference chunk
  drop |= exclude_self & (cols[None, :] == rows[:, None])
  s = jnp.where(drop, -jnp.inf, s)
  s = jnp.concatenate([best_s, s], axis=1)
  i = jnp.concatenate(
      [best_i, jnp.broadcast_to(cols, s.shape[:1] + cols.shape)], axis=1)
  top_s, pos = jax.lax.top_k(s, k)
  return top_s, jnp.take_along_axis(i, pos, axis=1)


def _pad_rows(x, n):
  return x if x.shape[0] == n else np.concatenate(
      [x, np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)])


def exact_knn(query, reference, k, exclude_self=False, query_chunk=1024,
              ref_chunk=65536):
  """Top-k references by inner product (cosine for unit vectors).

  Args:
    query: [Q, E] float array.
    reference: [R, E] float array.
    k: neighbours per query (clamped to the references available).
    exclude_self: query i never retrieves reference i (leave-one-out, when
      query and reference are the same set).
    query_chunk, ref_chunk: block sizes bounding device memory.
  Returns:
    (scores [Q, k] float32, indices [Q, k] int32), best first. Slots with no
    valid neighbour have score -inf.
  """
  query = np.asarray(query, np.float32)
  reference = np.asarray(reference, np.float32)
  n_ref = reference.shape[0]
  k = max(1, min(k, n_ref - int(exclude_self)))
  rc = min(ref_chunk, n_ref)
  n_ref_pad = -(-n_ref // rc) * rc
  ref_pad = _pad_rows(reference, n_ref_pad)
  ref_blocks = [jnp.asarray(ref_pad[s:s + rc]) for s in range(0, n_ref_pad, rc)]
  scores, indices = [], []
  for qs in range(0, query.shape[0], query_chunk):
    q = query[qs:qs + query_chunk]
    nq = q.shape[0]
    q = jnp.asarray(_pad_rows(q, min(query_chunk, query.shape[0])))
    best_s = jnp.full((q.shape[0], k), -jnp.inf, jnp.float32)
    best_i = jnp.full((q.shape[0], k), -1, jnp.int32)
    for b, r in enumerate(ref_blocks):
      best_s, best_i = _merge_chunk(best_s, best_i, q, r, qs, b * rc, n_ref,
                                    k, exclude_self)
    scores.append(np.asarray(best_s)[:nq])
    indices.append(np.asarray(best_i)[:nq])
  return np.concatenate(scores), np.concatenate(indices)


def build_scann(database, k, *, brute_force_below=20_000, num_leaves=0,
                num_leaves_to_search=0, training_sample_size=100_000,
                dims_per_block=2, quantization_threshold=0.2, reorder=0):
  """A ScaNN searcher over `database` [N, E] by inner product.

  Below `brute_force_below` rows it scores exhaustively (exact). Above, it
  partitions with a spherical k-means tree (descriptors are unit vectors;
  num_leaves, default ~sqrt(N); searches num_leaves_to_search, default
  ~num_leaves/20), scores with anisotropic
  asymmetric hashing (dims_per_block, quantization_threshold) and re-ranks
  the best `reorder` (default 100 * k) exactly.
  """
  # scann loads a large native library: imported when a searcher is
  # first built or loaded, not by every user of exact search.
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  database = np.ascontiguousarray(database, np.float32)
  n = database.shape[0]
  builder = scann_ops_pybind.builder(database, k, "dot_product")
  if n < brute_force_below:
    return builder.score_brute_force().build()
  leaves = num_leaves or int(np.sqrt(n))
  to_search = num_leaves_to_search or max(1, leaves // 20)
  return (builder
          .tree(num_leaves=leaves, num_leaves_to_search=to_search,
                training_sample_size=min(n, training_sample_size),
                spherical=True)
          .score_ah(dims_per_block,
                    anisotropic_quantization_threshold=quantization_threshold)
          .reorder(reorder or min(n, 100 * k))
          .build())


def load_scann(directory):
  # As in build_scann.
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  return scann_ops_pybind.load_searcher(directory)


def scann_search(searcher, query, k):
  """(scores [Q, k], indices [Q, k]) from a ScaNN searcher, best first.

  ScaNN pads a row that found fewer than k neighbours (an index smaller
  than k, or a tree search whose leaves held fewer) with index 0 and a NaN
  score; those slots come back as index -1 and score -inf, as exact_knn's
  empty slots, so no caller can take the padding for database row 0.
  """
  idx, scores = searcher.search_batched(np.asarray(query, np.float32),
                                        final_num_neighbors=k)
  scores = np.asarray(scores, np.float32).reshape(len(query), -1)
  idx = np.asarray(idx, np.int64).reshape(len(query), -1)
  pad = ~np.isfinite(scores)
  return np.where(pad, -np.inf, scores), np.where(pad, -1, idx)


BACKENDS = ("exact", "scann")


def search(query, reference, k, exclude_self=False, backend="exact",
           scann_options=None, searcher=None):
  """The one k-NN signature: (scores [Q, k], indices [Q, k]), best first.

  Args:
    query: [Q, E]; reference: [R, E].
    k: neighbours per query.
    exclude_self: query i never retrieves reference i.
    backend: "exact" (chunked matmul + top-k on device) or "scann".
    scann_options: build_scann keyword arguments.
    searcher: an already built (or loaded) ScaNN searcher over `reference`.
  """
  if backend == "exact":
    return exact_knn(query, reference, k, exclude_self)
  if backend != "scann":
    raise ValueError(f"knn backend {backend!r}; valid: {BACKENDS}.")
  k = max(1, min(k, len(reference) - int(exclude_self)))
  extra = int(exclude_self)
  if searcher is None:
    searcher = build_scann(reference, k + extra, **(scann_options or {}))
  scores, idx = scann_search(searcher, query, k + extra)
  if exclude_self:
    rows = np.arange(len(idx))[:, None]
    keep = idx != rows
    # Drop the self match where it was found, else the last neighbour.
    keep[np.all(keep, axis=1), -1] = False
    scores = scores[keep].reshape(len(idx), k)
    idx = idx[keep].reshape(len(idx), k)
  return scores, idx


def neighbour_recall(approx_idx, exact_idx):
  """Mean fraction of the exact top-k found by the approximate top-k."""
  a, e = np.asarray(approx_idx), np.asarray(exact_idx)
  return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, e)]))
