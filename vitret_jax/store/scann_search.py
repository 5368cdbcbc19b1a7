"""ScaNN over a database that does not fit in memory (store/view.py).

The partitioning tree and the anisotropic-hashing codebooks are learned
from a sample of rows; every row is then fed to the searcher block by block
(ScaNN 1.4's `upsert`), so the database is never concatenated. The searcher
holds the partitions and the hashed codes only (no exact re-ordering in
ScaNN, which would keep a float32 copy of every row): its candidates are
re-scored exactly from the database's own rows (memory-mapped shards) and
the best k returned.
"""
import json
import os
import shutil

import numpy as np
from absl import logging

# Rows in one upsert call.
_FEED = 8192
# Bytes of candidate rows gathered at a time when re-scoring.
_RESCORE_BYTES = 64 << 20
# Queries a thread of ScaNN's parallel search takes at once; a batch of
# more than this is searched in parallel (search_batched_parallel).
_PER_THREAD = 256
# Queries given to ScaNN in one call: their results and ids are held at
# once, so a caller's huge batch (αDBA searches every row) is split; at
# least 16 threads' worth, and one per core.
_QUERIES = _PER_THREAD * max(16, os.cpu_count() or 1)


def _pybind():
  # scann loads a large native library: imported when a searcher is built
  # or loaded, not by every user of exact search.
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  return scann_ops_pybind


class Searcher:
  """search(queries, k, exclude) over `database` (see view.py): ScaNN's
  candidates (`reorder` per query, at least k) re-scored exactly.

  Attributes:
    scann: the ScaNN searcher; order: [N] int64, database id of ScaNN's
      row i; database: what the ids index; reorder: candidates per query.
  """

  def __init__(self, scann, order, database, reorder):
    self.scann, self.order = scann, np.asarray(order, np.int64)
    self.database, self.reorder = database, int(reorder)
    if len(self.order) != len(database):
      raise ValueError(f"searcher of {len(self.order)} rows, database of "
                       f"{len(database)}")

  def search(self, queries, k, exclude=None):
    queries = np.asarray(queries, np.float32)
    if not len(queries):
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    if len(queries) > _QUERIES:
      ex = None if exclude is None else np.asarray(exclude)
      parts = [self.search(queries[lo:lo + _QUERIES], k,
                           None if ex is None else ex[lo:lo + _QUERIES])
               for lo in range(0, len(queries), _QUERIES)]
      return (np.concatenate([s for s, _ in parts]),
              np.concatenate([i for _, i in parts]))
    n = len(self.order)
    want = min(n, max(self.reorder, k + 1))
    # A large batch (αDBA's) is searched on ScaNN's threads (one per
    # core); each query's result is the same either way.
    if len(queries) > _PER_THREAD:
      idx, scores = self.scann.search_batched_parallel(
          queries, final_num_neighbors=want, batch_size=_PER_THREAD)
    else:
      idx, scores = self.scann.search_batched(queries,
                                              final_num_neighbors=want)
    idx = np.asarray(idx, np.int64).reshape(len(queries), -1)
    scores = np.asarray(scores, np.float32).reshape(len(queries), -1)
    # ScaNN pads a short result with row 0 and a NaN score (knn.scann_search).
    cand = np.where(np.isfinite(scores), self.order[idx], -1)
    if exclude is not None:
      cand = np.where(cand == np.asarray(exclude)[:, None], -1, cand)
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int32)
    dim = self.database.shape[1]
    step = max(1, _RESCORE_BYTES // max(1, want * dim * 4))
    for lo in range(0, len(queries), step):
      c = cand[lo:lo + step]
      rows = self.database[np.maximum(c, 0)]  # [q, want, E]
      s = np.einsum("qe,qke->qk", queries[lo:lo + step], rows)
      s = np.where(c >= 0, s, -np.inf)
      # Best first; equal scores by id, as exact search orders them; the
      # empty slots (-inf) last, left as -inf / -1.
      best = np.lexsort((c, -s), axis=1)[:, :k]
      top_s = np.take_along_axis(s, best, 1)
      keep = np.isfinite(top_s)
      out_s[lo:lo + len(c), :best.shape[1]] = np.where(keep, top_s, -np.inf)
      out_i[lo:lo + len(c), :best.shape[1]] = np.where(
          keep, np.take_along_axis(c, best, 1), -1)
    return out_s, out_i

  def save(self, folder):
    """Writes the searcher to `folder` (created): ScaNN's assets with
    relative paths, the id order and the settings."""
    os.makedirs(folder)
    self.scann.serialize(folder, relative_path=True)
    np.save(os.path.join(folder, "order.npy"), self.order)
    with open(os.path.join(folder, "searcher.json"), "w") as f:
      json.dump({"reorder": self.reorder, "rows": len(self.order)}, f)
    _fsync_files(folder)


  def save_atomic(self, folder, tmp):
    """save() into the temporary folder `tmp`, then renamed to `folder`
    (what was there replaced): a reader finds the whole searcher or none."""
    shutil.rmtree(tmp, ignore_errors=True)
    self.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return self


def _fsync_files(folder):
  """Syncs every file under `folder`, and its folders' entries, to disk:
  a manifest committed after the save never names a searcher whose files
  a power loss left empty."""
  for path, dirs, files in os.walk(folder, topdown=False):
    for name in files:
      with open(os.path.join(path, name), "rb") as f:
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def load(folder, database):
  """The Searcher saved in `folder`, over `database`."""
  with open(os.path.join(folder, "searcher.json")) as f:
    meta = json.load(f)
  order = np.load(os.path.join(folder, "order.npy"))
  return Searcher(_pybind().load_searcher(folder), order, database,
                  meta["reorder"])


def build(database, *, sample_size=100_000, num_leaves=0,
          num_leaves_to_search=0, dims_per_block=2,
          quantization_threshold=0.2, reorder=0, seed=0, **unused):
  """A Searcher over `database` (len >= 2): a spherical k-means tree of
  num_leaves (default ~sqrt(N)) partitions, num_leaves_to_search of them
  searched (default ~num_leaves / 20), anisotropic hashing (dims_per_block,
  quantization_threshold), both learned from `sample_size` rows drawn with
  `seed`; `reorder` candidates re-scored exactly (default 100 per query,
  raised to k + 1 when more are asked for)."""
  del unused  # build_scann's brute_force_below: the caller chose ScaNN
  n = len(database)
  rng = np.random.default_rng(seed)
  sample = np.sort(rng.choice(n, min(n, sample_size), replace=False))
  leaves = int(num_leaves or max(1, np.sqrt(n)))
  leaves = min(leaves, len(sample))
  to_search = int(num_leaves_to_search or max(1, leaves // 20))
  builder = _pybind().builder(database[sample], 10, "dot_product").tree(
      num_leaves=leaves, num_leaves_to_search=min(to_search, leaves),
      training_sample_size=len(sample), spherical=True).score_ah(
          dims_per_block,
          anisotropic_quantization_threshold=quantization_threshold)
  scann = builder.build()
  in_sample = np.zeros(n, bool)
  in_sample[sample] = True
  fed = [sample]
  for start, block in database.blocks():
    rest = np.flatnonzero(~in_sample[start:start + len(block)])
    for lo in range(0, len(rest), _FEED):
      rows = rest[lo:lo + _FEED]
      scann.searcher.upsert([None] * len(rows),
                            np.ascontiguousarray(block[rows], np.float32),
                            256)
      fed.append(start + rows)
  logging.info("ScaNN: %d leaves learned from %d of %d rows; %d fed.",
               leaves, len(sample), n, n - len(sample))
  return Searcher(scann, np.concatenate(fed), database, reorder or 100)
