"""Retrieval metrics as pure numpy functions of neighbour label tables.

Metrics never search: they see `query_labels` [Q] and `knn_labels` [Q, K]
(the labels of each query's K nearest references, best first).
"""
import numpy as np


def recall_at_k(query_labels, knn_labels, ks, num_relevant=None):
  """Recall@K: fraction of queries with a same-class item in their top K.

  Args:
    query_labels: [Q] labels.
    knn_labels: [Q, K_max] labels of the ranked neighbours (query itself
      already excluded under leave-one-out).
    ks: the K values; each must be <= K_max.
    num_relevant: optional [Q] relevant references per query; queries with
      none are left out (they have nothing to find, so they can be neither
      a hit nor a miss).
  Returns:
    dict {"recall@K": float} (0.0 when no query is left).
  """
  query_labels = np.asarray(query_labels)
  knn_labels = np.asarray(knn_labels)
  if num_relevant is not None:
    keep = np.asarray(num_relevant) > 0
    query_labels, knn_labels = query_labels[keep], knn_labels[keep]
  hits = knn_labels == query_labels[:, None]
  first_hit = np.where(hits.any(1), hits.argmax(1), np.iinfo(np.int64).max)
  out = {}
  for k in ks:
    if k > knn_labels.shape[1]:
      raise ValueError(f"recall@{k} needs {k} neighbours, the table has "
                       f"{knn_labels.shape[1]}.")
    out[f"recall@{k}"] = (float(np.mean(first_hit < k)) if len(first_hit)
                          else 0.0)
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


def revisited_ap(pos_ranks, num_positives):
  """revisitop's average precision: trapezoids in the precision-recall plot.

  Args:
    pos_ranks: sorted 0-based ranks of the retrieved positives, junk already
      removed from the ranking (a positive's rank counts only non-junk items
      before it).
    num_positives: all positives of the query (retrieved or not).
  Returns:
    float: sum over positives j at rank r of (p0 + p1) / 2 / num_positives,
    p0 = j / r (1 when r = 0), p1 = (j + 1) / (r + 1).
  """
  r = np.asarray(pos_ranks, np.float64)
  j = np.arange(len(r), dtype=np.float64)
  p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
  p1 = (j + 1) / (r + 1)
  return float(np.sum((p0 + p1) / 2.0) / num_positives)


def map_and_precision(ranks, positives, junk, kappas=(1, 5, 10)):
  """mAP and mP@k over queries, as revisitop's compute_map.

  Args:
    ranks: [Q, K] database indices, best first (a full ranking reproduces
      revisitop exactly; a truncated one counts unretrieved positives as
      missed).
    positives, junk: per query, sequences of database indices.
    kappas: k of mP@k. revisitop's mP@k is the precision at
      min(k, rank of the last retrieved positive).
  Returns:
    (mAP, {k: mP@k}, APs [Q] with NaN for queries without positives, which
    are left out of the means).
  """
  ranks = np.asarray(ranks)
  aps = np.full(len(ranks), np.nan)
  prs = np.zeros((len(ranks), len(kappas)))
  for i, row in enumerate(ranks):
    ok = np.asarray(positives[i], np.int64)
    if ok.size == 0:
      continue
    pos = np.flatnonzero(np.isin(row, ok))
    bad = np.flatnonzero(np.isin(row, np.asarray(junk[i], np.int64)))
    # Each positive moves up by the number of junk items ranked above it.
    pos = pos - np.searchsorted(bad, pos)
    aps[i] = revisited_ap(pos, ok.size)
    if pos.size:
      one_based = pos + 1
      for j, k in enumerate(kappas):
        kq = min(one_based.max(), k)
        prs[i, j] = np.sum(one_based <= kq) / kq
  valid = ~np.isnan(aps)
  m_ap = float(np.mean(aps[valid])) if valid.any() else 0.0
  m_pr = {k: float(np.mean(prs[valid, j])) if valid.any() else 0.0
          for j, k in enumerate(kappas)}
  return m_ap, m_pr, aps


def revisited_settings(gnd):
  """Easy / Medium / Hard (positives, junk) lists from a revisited `gnd`
  (list of dicts with "easy", "hard", "junk" index lists):
  Easy: easy vs junk + hard; Medium: easy + hard vs junk; Hard: hard vs
  junk + easy."""
  cat = lambda *keys: [np.concatenate([np.asarray(g[k], np.int64)
                                       for k in keys]) for g in gnd]
  return {"easy": (cat("easy"), cat("junk", "hard")),
          "medium": (cat("easy", "hard"), cat("junk")),
          "hard": (cat("hard"), cat("junk", "easy"))}


def revisited_metrics(ranks, gnd, kappas=(1, 5, 10)):
  """{"easy/map", "easy/mp@1", ..., "hard/mp@10"} for Revisited Oxford /
  Paris rankings [Q, K] against their ground truth `gnd`."""
  out = {}
  for name, (pos, junk) in revisited_settings(gnd).items():
    m_ap, m_pr, _ = map_and_precision(ranks, pos, junk, kappas)
    out[f"{name}/map"] = m_ap
    out.update({f"{name}/mp@{k}": v for k, v in m_pr.items()})
  return out
