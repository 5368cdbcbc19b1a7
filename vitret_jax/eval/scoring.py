"""Scores of descriptors: Recall@K and MAP@R of queries against a gallery
(the k-NN search, then the metrics of eval/metrics.py), and the Revisited
ground truth without unreadable images (data/split.py's renumbering)."""
import numpy as np
from absl import logging

from vitret_jax.errors import DataError
from vitret_jax.eval import knn as knn_lib
from vitret_jax.eval import metrics


def relevant_counts(q_lab, g_lab, loo) -> np.ndarray:
  """[Q] relevant references per query: the gallery's images of its class,
  less itself when `loo` (leave one out: the queries are the gallery). A
  query with none is "lone": left out of Recall@K and MAP@R."""
  classes, counts = np.unique(np.asarray(g_lab), return_counts=True)
  per_class = dict(zip(classes.tolist(), counts.tolist()))
  return np.asarray([per_class.get(int(y), 0) - int(loo)
                     for y in np.asarray(q_lab)], np.int64)


def score_retrieval(q_emb, q_lab, g_emb=None, g_lab=None, ks=(1,),
                    with_map_at_r=True, search=None):
  """Recall@K (and MAP@R) of queries against a gallery.

  Args:
    q_emb: [Q, E] query descriptors; q_lab: [Q] labels.
    g_emb, g_lab: [G, E] and [G] gallery; None = leave one out (the queries
      are the gallery and a query never retrieves itself).
    ks: the K of Recall@K; a K beyond the gallery is left out.
    with_map_at_r: also MAP@R (needs R neighbours for the largest class).
    search: fn(query, reference, k, exclude_self) -> (indices, extra
      metrics); default exact search.
  Returns:
    (dict of metrics, neighbour indices [Q, K]). A query with no relevant
    reference is left out of every metric and counted in
    "queries_without_positive"; a gallery of one class, or queries none of
    which has a relevant reference, is a DataError (the metrics would be
    1.0, or empty, whatever the model).
  """
  if search is None:
    search = lambda q, r, k, ex: (knn_lib.exact_knn(q, r, k, ex)[1], {})
  loo = g_emb is None
  if loo:
    g_emb, g_lab = q_emb, q_lab
  q_lab, g_lab = np.asarray(q_lab), np.asarray(g_lab)
  classes = np.unique(g_lab)
  if len(classes) < 2:
    raise DataError(
        f"The gallery holds {len(classes)} class(es): every neighbour would "
        f"be correct, so Recall@K would be 1.0 whatever the model. Evaluate "
        f"on 2 classes or more.")
  num_rel = relevant_counts(q_lab, g_lab, loo)
  if not (num_rel > 0).any():
    raise DataError(f"None of the {len(q_lab)} queries has another image of "
                    f"its class in the gallery: there is nothing to find.")
  k = max(ks)
  if with_map_at_r:
    k = max(k, int(num_rel.max(initial=1)))
  idx, extra = search(q_emb, g_emb, k, loo)
  # An empty slot (-1) gets a label no query has: it is never a hit.
  empty = min(int(q_lab.min(initial=0)), int(g_lab.min(initial=0))) - 1
  knn_labels = np.where(idx >= 0, g_lab[np.maximum(idx, 0)], empty)
  out = metrics.recall_at_k(q_lab, knn_labels,
                            [x for x in ks if x <= knn_labels.shape[1]],
                            num_rel)
  if with_map_at_r:
    out["map@r"] = metrics.map_at_r(q_lab, knn_labels, num_rel)
  alone = int((num_rel <= 0).sum())
  if alone:
    # Left out of every metric (nothing to find), and said.
    out["queries_without_positive"] = alone
    logging.warning("%d of %d queries have no other image of their class in "
                    "the gallery: left out of Recall@K and MAP@R.", alone,
                    len(q_lab))
  out.update(extra)
  return out, idx


def top_scores(q, g, idx, k):
  """Inner products of each query with its first k neighbours [Q, k]
  (NaN for an empty slot); `g` any array or store view indexed by ids."""
  idx = np.asarray(idx)[:, :k]
  safe = np.maximum(idx, 0)
  s = np.einsum("qe,qke->qk", np.asarray(q, np.float32),
                np.asarray(g[safe], np.float32))
  return np.where(idx >= 0, s, np.nan)
