"""Re-ranking of a global-descriptor search: αQE, αDBA and SuperGlobal.

Specs and plans: eval/rerank_spec.py (aqe(n,alpha), dba(n,alpha), with
',self' for the 2019 winners' convention, superglobal(M,K,beta); joined by
"+"). A plan runs dba first (the database), then aqe (the queries, against
the augmented database), then superglobal (the final ranking).

Negative similarities: w = s^alpha as the paper writes it and both public
codes compute it (numpy's `sims ** alpha`): with an odd alpha (the usual 3)
a neighbour of negative similarity pulls the query away from itself. A
fractional power of a negative number does not exist (numpy gives NaN):
such a neighbour gets weight 0 here.

Everything works from k-NN searches of a database object, never an N x N
matrix: `.shape`, `len()`, `db[ids] -> float32 [..., E]` (a gather of rows
by an integer array) and `db.search(queries [Q, E], k, exclude=None) ->
(scores [Q, k], ids [Q, k])`, best first, -inf / -1 in empty slots;
`exclude` [Q] is a database id each query must not retrieve (-1: none).
`ArrayDatabase` is that over an array (or np.memmap) with the evaluators'
backends (eval/knn.py).
"""
import time

import numpy as np
from absl import logging

from vitret_jax.errors import UserError
from vitret_jax.eval import knn as knn_lib
from vitret_jax.eval import rerank_spec


class ArrayDatabase:
  """The database interface over `vectors` [N, E] (an array, np.memmap or
  anything sliced and gathered like one) with an eval/knn.py backend.

  exact: each query block against `block_rows` database rows at a time
  (knn.exact_knn), top-k lists merged on the host: memory is bounded by the
  block, whatever N. scann: one searcher over the whole array (`searcher`,
  or built at the first search for `build_k` neighbours).
  """

  def __init__(self, vectors, backend="exact", scann_options=None,
               searcher=None, block_rows=65_536, build_k=100):
    if backend not in knn_lib.BACKENDS:
      raise UserError(f"knn={backend!r}; valid: {knn_lib.BACKENDS}.")
    self.vectors, self.backend = vectors, backend
    self.scann_options = dict(scann_options or {})
    self.searcher, self.block_rows, self.build_k = (searcher, block_rows,
                                                    build_k)

  @property
  def shape(self):
    return tuple(self.vectors.shape)

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, ids):
    return np.asarray(self.vectors[np.asarray(ids)], np.float32)

  def derived(self, vectors):
    """A database of other vectors with this one's backend and options."""
    return ArrayDatabase(vectors, self.backend, self.scann_options,
                         block_rows=self.block_rows, build_k=self.build_k)

  def search(self, queries, k, exclude=None):
    """Top-k by inner product.

    Args:
      queries: [Q, E].
      k: neighbours per query.
      exclude: [Q] database ids, query i never retrieves exclude[i] (-1:
        none); None: no exclusion.
    Returns:
      (scores [Q, k] float32, ids [Q, k] int64), best first; -inf / -1
      where the database holds fewer than k items to return.
    """
    queries = np.asarray(queries, np.float32)
    extra = 0 if exclude is None else 1
    if self.backend == "scann":
      if self.searcher is None:
        self.searcher = knn_lib.build_scann(
            self.vectors, max(self.build_k, k + extra), **self.scann_options)
      k_all = min(k + extra, len(self))
      reorder = self.scann_options.get("reorder") or 100 * k_all
      scores, ids = knn_lib.scann_search(_Reordering(self.searcher, reorder),
                                         queries, k_all)
      return _top(scores, ids, k, exclude)
    scores = np.full((len(queries), 0), -np.inf, np.float32)
    ids = np.full((len(queries), 0), -1, np.int64)
    for start in range(0, len(self), self.block_rows):
      block = self.vectors[start:start + self.block_rows]
      s, i = knn_lib.exact_knn(queries, block, min(k + extra, len(block)))
      scores = np.concatenate([scores, s], 1)
      ids = np.concatenate([ids, np.where(i >= 0, i + start, -1)], 1)
      scores, ids = _top(scores, ids, k, exclude)
    return scores, ids


class _Reordering:
  """A ScaNN searcher that re-scores `reorder` candidates exactly, whatever
  k it was built for (build_scann's default: 100 x the k of the search),
  on every core: one index serves a ranking 10,000 deep and αDBA's
  searches of 11 without re-scoring a million candidates each time."""

  def __init__(self, searcher, reorder):
    self.searcher, self.reorder = searcher, reorder

  def search_batched(self, queries, final_num_neighbors):
    return self.searcher.search_batched_parallel(
        queries, final_num_neighbors=final_num_neighbors,
        pre_reorder_num_neighbors=self.reorder)


def _top(scores, ids, k, exclude=None):
  """The k best of each row without its `exclude` id, -inf / -1 padded."""
  ids = np.asarray(ids, np.int64)
  scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
  if exclude is not None:
    scores = np.where(ids == np.asarray(exclude)[:, None], -np.inf, scores)
  # Stable: equal scores keep their order (lower blocks first).
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  scores = np.take_along_axis(scores, order, 1)
  ids = np.where(np.isfinite(scores), np.take_along_axis(ids, order, 1), -1)
  pad = k - scores.shape[1]
  if pad > 0:
    scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
  return scores, ids


def _power(s, alpha):
  """s^alpha, and 0 where a fractional alpha meets a negative s."""
  if float(alpha).is_integer():
    return s ** alpha
  return np.where(s > 0, np.abs(s) ** alpha, 0.0)


def expand(x, database, exp, exclude=None):
  """L2norm(x + Σ_i w_i d_i) of each row of x [B, E] over its exp.others
  nearest database items (never `exclude`), w_i = (x·d_i)^alpha; the item
  itself weighs 1 (for a unit vector, (x·x)^alpha). Returns [B, E]."""
  x = np.asarray(x, np.float64)
  if exp.others < 1:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  scores, ids = database.search(x, exp.others, exclude)
  ok = ids >= 0
  w = np.where(ok, _power(np.where(ok, scores, 0.0).astype(np.float64),
                          exp.alpha), 0.0)
  y = x + np.matmul(w[:, None, :], database[np.maximum(ids, 0)])[:, 0]
  norm = np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
  return (y / norm).astype(np.float32)


def query_expansion(queries, database, exp, exclude=None, block=1024):
  """αQE of queries [Q, E] (see `expand`), `block` queries at a time."""
  queries = np.asarray(queries, np.float32)
  ex = None if exclude is None else np.asarray(exclude)
  return np.concatenate([expand(
      queries[s:s + block], database, exp,
      None if ex is None else ex[s:s + block])
                         for s in range(0, len(queries), block)] or
                        [queries[:0]])


def augment_database(database, exp, out, block=0, start=0, stop=None):
  """αDBA: writes into `out` [stop - start, E] (an array or np.memmap the
  caller gives) database items start..stop-1 (default all) expanded with
  their own neighbours in the whole database (itself excluded from the
  search); several processes can each take a range. `block` rows at a time
  (0: about 64 MB of gathered neighbours), so only a block's neighbour
  lists are ever held."""
  n, dim = database.shape
  stop = n if stop is None else stop
  block = block or max(1, (64 << 20) // (4 * dim * max(1, exp.others)))
  t0, said = time.time(), 0.0
  for first in range(start, stop, block):
    rows = np.arange(first, min(stop, first + block))
    out[first - start:rows[-1] + 1 - start] = expand(database[rows], database,
                                                     exp, rows)
    done = (rows[-1] + 1 - start) / max(1, stop - start)
    if done - said >= 0.1 and done < 1:
      said = done
      logging.info("dba(%d,%g): %d of %d database items (%.0f s)", exp.n,
                   exp.alpha, rows[-1] + 1 - start, stop - start,
                   time.time() - t0)
  return out


def superglobal(queries, database, scores, ids, sg, block=16):
  """SuperGlobal's re-ranking of the first sg.m entries of each ranking
  (scores, ids [Q, K]); the rest keeps its order. As the authors' code
  (ShihaoShao-GH/SuperGlobal, modules/reranking/MDescAug.py and
  RerankwMDA.py) computes it:
  - a candidate's neighbours are the K most similar of the other top-M
    candidates (never the rest of the database);
  - it is refined as the weighted mean (weights normalised to sum 1, no L2
    normalisation after) of itself, weight 1, and those neighbours, weight
    beta x similarity;
  - s1 = query · refined candidate;
  - the expanded query is the element-wise max of the K + 1 refined
    candidates of highest s1 (the code's `self.K = K + 1`), without the
    query itself and without normalisation; s2 = expanded · refined;
  - the candidates are ordered by (s1 + s2) / 2, their new score.
  In float32, as the authors' code. Returns (scores, ids) [Q, K]."""
  queries = np.asarray(queries, np.float32)
  m = min(sg.m, ids.shape[1])
  scores, ids = scores.copy(), ids.copy()
  for s in range(0, len(ids), block):
    cand = ids[s:s + block, :m]
    x = database[np.maximum(cand, 0)]  # [b, m, E]
    new_s, order = _superglobal_block(queries[s:s + block], x, cand >= 0, sg)
    scores[s:s + block, :m] = new_s
    ids[s:s + block, :m] = np.take_along_axis(cand, order, 1)
  return scores, ids


def _superglobal_block(q, x, valid, sg):
  """(sorted new scores [b, m], order [b, m]) of candidates x [b, m, E]."""
  b, m = valid.shape
  sim = np.matmul(x, x.transpose(0, 2, 1))
  # Neighbours among the other valid candidates.
  usable = valid[:, None, :] & ~np.eye(m, dtype=bool)[None]
  k = min(sg.k, m - 1)
  # The k best of each row, in any order (a weighted sum follows).
  near = np.argpartition(-np.where(usable, sim, -np.inf), k - 1,
                         axis=2)[:, :, :k]
  w = sg.beta * np.take_along_axis(sim, near, 2)
  w = np.where(np.take_along_axis(usable, near, 2), w, np.float32(0))
  # The weights as an [m, m] matrix per query: one product, no [m, K, E]
  # gather of neighbours.
  weights = np.zeros_like(sim)
  np.put_along_axis(weights, near, w, 2)
  refined = (x + np.matmul(weights, x)) / (1.0 + w.sum(2))[..., None]
  s1 = np.where(valid, np.matmul(refined, q[..., None])[..., 0], -np.inf)
  top = np.argsort(-s1, axis=1, kind="stable")[:, :sg.k + 1]
  pool_ok = np.take_along_axis(valid, top, 1)
  pool = np.where(pool_ok[..., None],
                  np.take_along_axis(refined, top[..., None], 1), -np.inf)
  expanded = pool.max(1)
  expanded = np.where(np.isfinite(expanded), expanded, np.float32(0))
  s2 = np.matmul(refined, expanded[..., None])[..., 0]
  final = np.where(valid, (s1 + s2) / 2, -np.inf)
  order = np.argsort(-final, axis=1, kind="stable")
  return np.take_along_axis(final, order, 1), order


class Reranker:
  """Plans over one database; each αDBA database is computed once and
  kept for the plans that share it.

  Args:
    database: the database interface (see the module doc).
    make_database: array -> database of the augmented vectors (default:
      database.derived, ArrayDatabase's).
    allocate: (N, E) -> the array an αDBA writes into (default: in memory;
      at scale an np.memmap).
    augmented: {Expansion: database} computed ahead (e.g. by an index).
  """

  def __init__(self, database, make_database=None, allocate=None,
               augmented=None):
    self.database = database
    self.make_database = make_database or database.derived
    self.allocate = allocate or (lambda shape: np.empty(shape, np.float32))
    self.augmented = dict(augmented or {})

  def augment(self, exp):
    if exp not in self.augmented:
      t0 = time.time()
      out = augment_database(self.database, exp,
                             self.allocate(tuple(self.database.shape)))
      self.augmented[exp] = self.make_database(out)
      logging.info("dba(%d,%g%s) of %d items in %.1f s", exp.n, exp.alpha,
                   ",self" if exp.with_self else "", len(self.database),
                   time.time() - t0)
    return self.augmented[exp]

  def rank(self, plan, queries, depth, exclude=None):
    """(scores, ids) [Q, depth] of the queries under `plan`."""
    db = self.database if plan.dba is None else self.augment(plan.dba)
    if plan.aqe is not None:
      queries = query_expansion(queries, db, plan.aqe, exclude)
    sg = plan.superglobal
    scores, ids = db.search(queries, max(depth, sg.m) if sg else depth,
                            exclude)
    if sg:
      scores, ids = superglobal(queries, db, scores, ids, sg)
    return scores[:, :depth], ids[:, :depth]


def reranked_metrics(plans, queries, database, depth, score, exclude=None):
  """{"<metric>+<plan>": value} of each plan: score(ids [Q, depth]) gives
  the metrics of a ranking (the same function as the plain ranking's)."""
  reranker, out = Reranker(database), {}
  for plan in plans:
    t0 = time.time()
    _, ids = reranker.rank(plan, queries, depth, exclude)
    out.update({f"{k}+{plan.name}": v for k, v in score(ids).items()})
    logging.info("rerank %s: %.1f s", plan.name, time.time() - t0)
  return out


def rerank_hits(database, queries, k, spec, exclude=None, reranker=None):
  """[(id, score)] per query, best first, under the re-ranking `spec` (for
  search and serve): never the id `exclude[i]` (-1: none) of query i,
  never an empty slot. `reranker`: a Reranker kept between calls (its αDBA
  databases are computed once)."""
  if k < 1:
    raise UserError(f"top_k={k}: ask for at least one result.")
  plan = rerank_spec.parse(spec)
  reranker = reranker or Reranker(database)
  ex = None if exclude is None or not len(exclude) else np.asarray(exclude)
  scores, ids = reranker.rank(plan, np.asarray(queries, np.float32), k, ex)
  return [[(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0]
          for row_s, row_i in zip(scores, ids)]
