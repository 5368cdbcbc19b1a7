"""Candidate duplicate pairs between two splits (or within one), found by
the k-NN search of eval/knn.py (exact and chunked on the device, or ScaNN),
so that an audit of SOP-size splits never forms all N x M scores at once.

Every search is limited to each query's `k` nearest references; a query
whose k-th neighbour still passes the threshold may have more duplicates
than are listed, and is counted as saturated.
"""
import numpy as np

from vitret_jax.audit import signals
from vitret_jax.eval import knn as knn_lib


def _owner_pairs(query_rows, owners, scores, idx, threshold, same):
  """{(query row, reference owner): best score} of the hits >= threshold
  (an image and its own windows left out when `same`)."""
  out = {}
  for r, row_s, row_i in zip(query_rows, scores, idx):
    for s, j in zip(row_s, row_i):
      if j < 0 or not s >= threshold:
        continue
      key = (int(r), int(owners[j]))
      if not (same and key[0] == key[1]):
        out[key] = max(out.get(key, -1.0), float(s))
  return out


def perceptual_pairs(desc_a, ok_a, desc_b, ok_b, same, k, threshold,
                     backend="exact"):
  """({(i, j): score} and the number of saturated queries) of the images
  of split A (rows i) whose whole view matches a window of an image of
  split B (rows j) with cosine >= threshold, and (B != A) the same the
  other way round, with the pairs keyed (i, j) either way.

  Args:
    desc_a, desc_b: [N, len(signals.WINDOWS), DIM] perceptual descriptors.
    ok_a, ok_b: [N] readable masks.
    same: A and B are the same split (an image is not its own duplicate).
    k: neighbours per query (4k windows are searched).
    threshold: the cosine a pair must reach.
    backend: "exact" or "scann" (eval/knn.py).
  """
  found, saturated = {}, 0
  directions = [(desc_a, ok_a, desc_b, ok_b, False)]
  if not same:
    directions.append((desc_b, ok_b, desc_a, ok_a, True))
  n_win = len(signals.WINDOWS)
  for q_desc, q_ok, r_desc, r_ok, flip in directions:
    q_rows, r_rows = np.flatnonzero(q_ok), np.flatnonzero(r_ok)
    if not len(q_rows) or not len(r_rows):
      continue
    ref = r_desc[r_rows].reshape(-1, signals.DIM)
    owners = np.repeat(r_rows, n_win)
    # An owner may fill several slots with its windows: 4 slots per image
    # wanted, and an image's own windows (first when A is B) on top.
    depth = min(len(ref), k * 4 + (n_win if same else 0))
    scores, idx = knn_lib.search(q_desc[q_rows, 0], ref, depth,
                                 backend=backend)
    hits = _owner_pairs(q_rows, owners, scores, idx, threshold, same)
    saturated += int(np.sum(scores[:, -1] >= threshold))
    for (i, j), s in hits.items():
      key = (j, i) if flip else (i, j)
      if same:
        key = (min(key), max(key))
      found[key] = max(found.get(key, -1.0), s)
  return found, saturated


def model_pairs(emb_a, ok_a, emb_b, ok_b, same, k, threshold,
                backend="exact"):
  """({(i, j): cosine} of A's images whose k nearest B images (by the
  model's descriptors) have cosine >= threshold, the number of saturated
  queries)."""
  q_rows, r_rows = np.flatnonzero(ok_a), np.flatnonzero(ok_b)
  if not len(q_rows) or len(r_rows) <= int(same):
    return {}, 0
  if same:  # one set: exclude_self applies to its own row numbers
    r_rows = q_rows
  scores, idx = knn_lib.search(emb_a[q_rows], emb_b[r_rows],
                               min(k, len(r_rows) - int(same)),
                               exclude_self=same, backend=backend)
  found = {}
  for i, row_s, row_j in zip(q_rows, scores, idx):
    for s, j in zip(row_s, row_j):
      if j >= 0 and s >= threshold:
        key = (int(i), int(r_rows[j]))
        if same:
          key = (min(key), max(key))
        found[key] = max(found.get(key, -1.0), float(s))
  return found, int(np.sum(scores[:, -1] >= threshold))


def perceptual_score(desc_a, desc_b):
  """The perceptual score of two images: the best match of either whole
  view with a window of the other."""
  return float(max(np.max(desc_b @ desc_a[0]), np.max(desc_a @ desc_b[0])))
