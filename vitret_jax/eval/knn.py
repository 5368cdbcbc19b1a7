"""Exact k-nearest-neighbour search by inner product, chunked on device.

`exact_knn(query, reference, k, exclude_self)` compares `query_chunk` queries
with `ref_chunk` references at a time and merges running top-k lists, so the
device never holds more than [query_chunk, ref_chunk + k] scores whatever the
gallery size. `exact_knn_blocks` does the same over references that come in
blocks (the shards of a memory-mapped store, vitret_jax/store): each block
is read once, whatever the number of queries.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_chunk(best_s, best_i, q, r, excl, r_start, n_valid, k):
  """Running top-k of queries `q` [c, E] merged with block `r` [rc, E],
  whose row j is reference r_start + j; rows from n_valid on are padding;
  query i never retrieves reference excl[i] (-1: none)."""
  s = jnp.matmul(q, r.T, precision=jax.lax.Precision.HIGHEST)  # [c, rc]
  cols = r_start + jnp.arange(r.shape[0])
  drop = cols[None, :] >= r_start + n_valid  # padding of a short block
  drop |= cols[None, :] == excl[:, None]
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
  reference = np.asarray(reference, np.float32)
  n_ref = reference.shape[0]
  rc = max(1, min(ref_chunk, n_ref))
  blocks = ((s, reference[s:s + rc]) for s in range(0, n_ref, rc))
  exclude = np.arange(len(query)) if exclude_self else None
  return exact_knn_blocks(query, blocks, n_ref, k, exclude, query_chunk)


def exact_knn_blocks(query, blocks, n_ref, k, exclude=None,
                     query_chunk=1024, block_rows=0):
  """exact_knn over references given block by block.

  Args:
    query: [Q, E] float array.
    blocks: iterable of (first reference id, float array [r, E]) covering
      references 0..n_ref-1 in order; every block is padded to `block_rows`
      (default: the first one's row count; a longer block is split), so one
      compiled program serves them all.
    n_ref: the number of references.
    k: neighbours per query (clamped to the references available).
    exclude: optional int [Q]: query i never retrieves reference
      exclude[i] (-1: none).
    query_chunk: queries compared at a time.
  Returns:
    (scores [Q, k] float32, indices [Q, k] int32), best first; slots with
    no valid neighbour have score -inf and index -1.
  """
  query = np.asarray(query, np.float32)
  nq = query.shape[0]
  excl = (np.full(nq, -1, np.int32) if exclude is None
          else np.asarray(exclude, np.int32))
  k = max(1, min(k, n_ref - int(exclude is not None and n_ref > 1
                                 and bool(np.all(excl >= 0)))))
  qc = max(1, min(query_chunk, nq))
  chunks = []
  for qs in range(0, nq, qc):
    q = jnp.asarray(_pad_rows(query[qs:qs + qc], qc))
    e = jnp.asarray(_pad_rows(excl[qs:qs + qc], qc))
    chunks.append([q, e, jnp.full((qc, k), -jnp.inf, jnp.float32),
                   jnp.full((qc, k), -1, jnp.int32)])
  rc = block_rows or None
  for start, block in blocks:
    block = np.asarray(block, np.float32)
    if not len(block):
      continue
    rc = rc or len(block)
    for lo in range(0, len(block), rc):  # a block longer than the first
      part = block[lo:lo + rc]
      r = jnp.asarray(_pad_rows(part, rc))
      for c in chunks:
        c[2], c[3] = _merge_chunk(c[2], c[3], c[0], r, c[1], start + lo,
                                  len(part), k)
  if not chunks:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  scores = np.concatenate([np.asarray(c[2]) for c in chunks])[:nq]
  idx = np.concatenate([np.asarray(c[3]) for c in chunks])[:nq]
  return scores, np.where(np.isfinite(scores), idx, -1).astype(np.int32)


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
