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

Everything works from k-NN searches of a database, never an N x N matrix:
the store's views (store/view.py: ArrayView over an array or np.memmap,
Stacked for a database and its distractors, View for a store), searched
exactly block by block or by the searcher attached to them
(eval/searchers.py: the evaluators' backends). Only `.shape`, `len()`,
`db[ids]` and `db.search(queries, k, exclude)` are used.
"""
import time

import numpy as np
from absl import logging

from vitret_jax.errors import UserError
from vitret_jax.eval import rerank_spec
from vitret_jax.store import view as view_lib


def _power(s, alpha):
  """s^alpha, and 0 where a fractional alpha meets a negative s."""
  if float(alpha).is_integer():
    return s ** alpha
  return np.where(s > 0, np.abs(s) ** alpha, 0.0)


def expand(x, database, exp, exclude=None):
  """L2norm(x + Σ_i w_i d_i) of each row of x [B, E] over its exp.others
  nearest database items (never `exclude`), w_i = (x·d_i)^alpha; the item
  itself weighs 1 (for a unit vector, (x·x)^alpha). Returns [B, E]."""
  if exp.others < 1:
    return _combine(x, None, None, database, exp)
  scores, ids = database.search(x, exp.others, exclude)
  return _combine(x, scores, ids, database, exp)


def _combine(x, scores, ids, database, exp):
  """expand()'s sum over neighbours already searched (scores, ids)."""
  x = np.asarray(x, np.float64)
  if ids is None:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
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


# Bytes of database rows searched as queries at once by αDBA: each search
# reads (exact: sends to the device) the whole database once, so an αDBA
# reads it ceil(N·E·4 / SEARCH_BYTES) times, plus once as queries.
SEARCH_BYTES = 2 << 30
# The same with a searcher attached (ScaNN): it reads only each query's
# candidates, so a small batch costs no extra pass and bounds the query
# rows and the searcher's results held at once.
SEARCHER_BYTES = 64 << 20
# Bytes of gathered neighbours [rows, n, E] combined at a time.
GATHER_BYTES = 64 << 20


def augment_database(database, exp, out, start=0, stop=None,
                     search_bytes=SEARCH_BYTES):
  """αDBA: writes into `out` [stop - start, E] (an array or np.memmap the
  caller gives) database items start..stop-1 (default all) expanded with
  their own neighbours in the whole database (itself excluded from the
  search); several processes can each take a range. The items are
  searched `search_bytes` of rows at a time (one pass over the database
  each; SEARCHER_BYTES at most with a searcher attached), their neighbours
  combined GATHER_BYTES at a time."""
  n, dim = database.shape
  stop = n if stop is None else stop
  if getattr(database, "searcher", None) is not None:
    search_bytes = min(search_bytes, SEARCHER_BYTES)
  step = max(1, search_bytes // (4 * max(1, dim)))
  gather = max(1, GATHER_BYTES // (4 * dim * max(1, exp.others)))
  t0 = time.time()
  for first in range(start, stop, step):
    rows = np.arange(first, min(stop, first + step))
    x = database[rows]
    scores = ids = None
    if exp.others >= 1:
      scores, ids = database.search(x, exp.others, rows)
    for lo in range(0, len(rows), gather):
      part = slice(lo, lo + gather)
      out[first - start + lo:first - start + lo + len(rows[part])] = (
          _combine(x[part], None if ids is None else scores[part],
                   None if ids is None else ids[part], database, exp))
    if rows[-1] + 1 < stop:
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
  - the candidates are ordered by (s1 + s2) / 2, their new score; the
    scores past M are capped at the M-th new score (same order).
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
  # Ranks past M keep their order; their scores (plain inner products) are
  # capped at the M-th new score, so that a list of hits stays
  # non-increasing.
  if ids.shape[1] > m:
    scores[:, m:] = np.minimum(scores[:, m:], scores[:, m - 1:m])
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
    database: a view (store/view.py; an array is taken as an ArrayView),
      with the searcher of the evaluator's backend attached, if any.
    make_database: array -> the view of an αDBA's vectors, searched by the
      same backend (default: an exact ArrayView).
    allocate: (N, E) -> the array an αDBA writes into (default: in memory;
      at scale an np.memmap).
  """

  def __init__(self, database, make_database=None, allocate=None):
    self.database = (database if hasattr(database, "blocks")
                     else view_lib.ArrayView(database))
    self.make_database = make_database or view_lib.ArrayView
    self.allocate = allocate or (lambda shape: np.empty(shape, np.float32))
    self.augmented = {}

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
    """(scores, ids) [Q, depth] of the queries under `plan`: the database
    augmented (dba), the queries expanded against it (aqe), searched, the
    top M re-ranked (superglobal)."""
    db = self.database if plan.dba is None else self.augment(plan.dba)
    if plan.aqe is not None:
      queries = query_expansion(queries, db, plan.aqe, exclude)
    sg = plan.superglobal
    scores, ids = db.search(queries, max(depth, sg.m) if sg else depth,
                            exclude)
    if sg:
      scores, ids = superglobal(queries, db, scores, ids, sg)
    return scores[:, :depth], ids[:, :depth]


def reranked_metrics(plans, queries, database, depth, score, exclude=None,
                     reranker=None):
  """{"<metric>+<plan>": value} of each plan: score(ids [Q, depth]) gives
  the metrics of a ranking (the same function as the plain ranking's).
  `reranker` (default: a Reranker of `database`) carries the backend."""
  reranker, out = reranker or Reranker(database), {}
  for plan in plans:
    t0 = time.time()
    _, ids = reranker.rank(plan, queries, depth, exclude)
    out.update({f"{k}+{plan.name}": v for k, v in score(ids).items()})
    logging.info("rerank %s: %.1f s", plan.name, time.time() - t0)
  return out


def rerank_hits(database, queries, k, spec, exclude=None, reranker=None):
  """[(id, score)] per query, best first, under the re-ranking `spec` (a
  string or a parsed Plan; for search and serve): never the id
  `exclude[i]` (-1: none) of query i, never an empty slot.

  Args:
    database: the view searched (its searcher, if any, is used), or None
      when `reranker` is given.
    reranker: a Reranker kept between calls (its αDBA databases are
      computed once); it must be over `database` when both are given.
  """
  if k < 1:
    raise UserError(f"top_k={k}: ask for at least one result.")
  if reranker is not None and database is not None and (
      reranker.database is not database):
    raise ValueError("rerank_hits: the reranker searches another database "
                     "than `database`; pass one of them.")
  plan = spec if isinstance(spec, rerank_spec.Plan) else rerank_spec.parse(
      spec)
  reranker = reranker or Reranker(database)
  ex = None if exclude is None or not len(exclude) else np.asarray(exclude)
  scores, ids = reranker.rank(plan, np.asarray(queries, np.float32), k, ex)
  return [[(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0]
          for row_s, row_i in zip(scores, ids)]
