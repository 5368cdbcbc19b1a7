"""Retrieval metrics as pure numpy functions of neighbour label tables.

Metrics never search: they see `query_labels` [Q] and `knn_labels` [Q, K]
(the labels of each query's K nearest references, best first).
"""
import numpy as np


def recall_at_k(query_labels, knn_labels, ks):
  """Recall@K: fraction of queries with a same-class item in their top K.

  Args:
    query_labels: [Q] labels.
    knn_labels: [Q, K_max] labels of the ranked neighbours (query itself
      already excluded under leave-one-out).
    ks: the K values; each must be <= K_max.
  Returns:
    dict {"recall@K": float}.
  """
  query_labels = np.asarray(query_labels)
  knn_labels = np.asarray(knn_labels)
  hits = knn_labels == query_labels[:, None]
  first_hit = np.where(hits.any(1), hits.argmax(1), np.iinfo(np.int64).max)
  out = {}
  for k in ks:
    if k > knn_labels.shape[1]:
      raise ValueError(f"recall@{k} needs {k} neighbours, the table has "
                       f"{knn_labels.shape[1]}.")
    out[f"recall@{k}"] = float(np.mean(first_hit < k))
  return out


def map_at_r(query_labels, knn_labels, num_relevant):
  """MAP@R (Musgrave et al. 2020): precision at each hit within the first R
  neighbours, R = the query's number of relevant references, averaged over R.

  Args:
    query_labels: [Q]; knn_labels: [Q, K] with K >= max(num_relevant);
    num_relevant: [Q] relevant references per query (queries with 0 skipped).
  Returns:
    float.
  """
  query_labels = np.asarray(query_labels)
  knn_labels = np.asarray(knn_labels)
  r = np.asarray(num_relevant)
  if r.max(initial=0) > knn_labels.shape[1]:
    raise ValueError("knn_labels is shorter than the largest R.")
  keep = r > 0
  hits = (knn_labels == query_labels[:, None])[keep]
  r = r[keep]
  ranks = np.arange(1, hits.shape[1] + 1)
  within = ranks[None, :] <= r[:, None]
  prec = np.cumsum(hits, 1) / ranks[None, :]
  ap = np.sum(prec * hits * within, 1) / r
  return float(np.mean(ap)) if len(ap) else 0.0
