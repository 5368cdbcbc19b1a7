"""The evaluators' search backends (knn "exact" | "scann") on the store's
views (store/view.py): every search of an evaluation, the plain ranking
and each re-ranking's, goes through one view and its one searcher.

exact: the view's own search, streamed block by block (memory flat in the
  number of rows; each block read once per search, whatever the number of
  queries).
scann: a searcher attached to the view (`view.searcher`), built once per
  database (or loaded from the evaluator's cache) and shared by every
  search of it:
  - an array held in memory, or any database under
    scann.brute_force_below rows (default 20,000; ScaNN then scores every
    row): knn.build_scann over the array, held in memory;
  - otherwise (memory-mapped shards or arrays, +R1M, an αDBA's database):
    store/scann_search.py, learned from a sample and fed the blocks, never
    concatenating the database.
Saved indexes are keyed on the vectors they index, k and the ScaNN
options. `reranker` gives the evaluators' re-rankings this backend, and
writes an αDBA's database to a memory-mapped file.
  Its recall against exact search (`recall`) is measured on at most
  RECALL_QUERIES queries (a fixed sample, seed 0), the exact top 10 alone.
"""
import hashlib
import os
import tempfile

import numpy as np

from vitret_jax import workdir as workdir_lib
from vitret_jax.eval import knn
from vitret_jax.eval import rerank
from vitret_jax.store import scann_search
from vitret_jax.store import view as view_lib

# Queries whose exact top 10 the ScaNN recall is measured on.
RECALL_QUERIES = 1000


class ArrayScann:
  """search(queries, k, exclude) of a knn.build_scann searcher over `n`
  rows held in memory: re-scores `reorder` candidates exactly (default
  100 x the k searched, at most n), so one index serves a ranking
  10,000 deep and αDBA's searches of 11 alike."""

  def __init__(self, scann, n, reorder=0):
    self.scann, self.n, self.reorder = scann, int(n), int(reorder)

  def search_batched(self, queries, final_num_neighbors):
    reorder = self.reorder or min(self.n, 100 * final_num_neighbors)
    return self.scann.search_batched_parallel(
        queries, final_num_neighbors=final_num_neighbors,
        pre_reorder_num_neighbors=max(reorder, final_num_neighbors))

  def search(self, queries, k, exclude=None):
    k_all = min(k + int(exclude is not None), self.n)
    scores, ids = knn.scann_search(self, queries, k_all)
    return top(scores, ids, k, exclude)


def top(scores, ids, k, exclude=None):
  """The k best of each row without its `exclude` id, -inf / -1 padded."""
  ids = np.asarray(ids, np.int64)
  scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
  if exclude is not None:
    scores = np.where(ids == np.asarray(exclude)[:, None], -np.inf, scores)
  # Stable: equal scores keep their order.
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  scores = np.take_along_axis(scores, order, 1)
  ids = np.where(np.isfinite(scores), np.take_along_axis(ids, order, 1), -1)
  pad = k - scores.shape[1]
  if pad > 0:
    scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
  return scores, ids


def as_view(reference):
  """A view of `reference` (a view already, or an [N, E] array)."""
  return (reference if hasattr(reference, "blocks")
          else view_lib.ArrayView(reference))


def with_backend(reference, backend, scann_options=None, k=100, cache="",
                 alone=False):
  """`reference` as a view searched by `backend`.

  Args:
    reference: an [N, E] array (or np.memmap) or a view.
    backend: "exact" or "scann".
    scann_options: evals.*.scann (knn.build_scann / scann_search.build
      keyword arguments).
    k: the deepest search expected (an in-memory ScaNN index is built for
      it; shallower searches re-score fewer candidates).
    cache: a file prefix: the ScaNN index is saved there, keyed on the
      vectors it indexes and its options, and loaded next time.
    alone: this process alone searches (process 0 with +R1M): no
      collective between processes; else every process calls this.
  """
  view = as_view(reference)
  if backend == "exact" or not len(view):
    return view
  opts = dict(scann_options or {})
  small = len(view) < opts.get("brute_force_below", 20_000)
  held = (isinstance(view, view_lib.ArrayView)
          and not isinstance(view.array, np.memmap))
  if small or held:
    array = view.array if held else view[np.arange(len(view))]
    view.searcher = _array_searcher(array, min(k, len(view)), opts, cache,
                                    alone)
  else:
    view.searcher = _store_searcher(view, k, opts, cache)
  return view


def _array_searcher(array, k, opts, cache, alone):
  folder = ""
  if cache:  # keyed on the very vectors it indexes and the options
    h = hashlib.sha256(repr(sorted(opts.items())).encode())
    h.update(np.ascontiguousarray(array, np.float32))
    folder = f"{cache}-scann-k{k}-{h.hexdigest()[:12]}"
  saved = bool(folder) and os.path.isdir(folder)
  if saved if alone else workdir_lib.all_agree(saved):
    scann = knn.load_scann(folder)
  else:
    scann = knn.build_scann(array, k, **opts)
    if folder and alone:
      tmp = f"{folder}.tmp-{os.getpid()}"
      _serialize(scann, tmp)
      os.replace(tmp, folder)
    elif folder:
      workdir_lib.write_once(folder, lambda tmp: _serialize(scann, tmp))
  return ArrayScann(scann, len(array), opts.get("reorder", 0))


def _serialize(scann, folder):
  os.makedirs(folder)
  scann.serialize(folder, relative_path=True)


def _store_searcher(view, k, opts, cache):
  """scann_search's Searcher of `view` (searched by one process: the
  caller's, process 0 of a multi-process evaluation)."""
  folder = ""
  if cache:
    h = hashlib.sha256(repr((sorted(opts.items()), k, len(view))).encode())
    for part in getattr(view, "parts", [view]):
      h.update(part.segments[0].key.encode() if hasattr(part, "segments")
               else np.ascontiguousarray(part.array).tobytes())
    folder = f"{cache}-scann-store-{h.hexdigest()[:12]}"
  if folder and os.path.isdir(folder):
    return scann_search.load(folder, view)
  searcher = scann_search.build(view, **opts)
  if folder:
    searcher.save_atomic(folder, f"{folder}.tmp-{os.getpid()}")
  return searcher


def reranker(database, backend, scann_options, depth, folder="",
             alone=False):
  """An eval/rerank.py Reranker of `database` (a view with its searcher)
  for rankings `depth` deep: an αDBA's database is written to a
  memory-mapped file in `folder` (default: the system's temporary folder),
  removed at once (its pages live while the Reranker holds it), and
  searched by `backend` (with_backend: memory-mapped, so through the
  store's searcher at scale); `alone`: as with_backend's, no collective
  (process 0 alone re-ranks +R1M)."""
  def allocate(shape):
    fd, path = tempfile.mkstemp(".npy", "dba-", folder or None)
    os.close(fd)
    try:
      return np.lib.format.open_memmap(path, "w+", np.float32, shape)
    finally:
      os.remove(path)
  return rerank.Reranker(
      database, lambda array: with_backend(array, backend, scann_options,
                                           depth, "", alone), allocate)


def recall(view, queries, ids, exclude=None, k=10):
  """{"scann_recall@k": mean share of the exact top k that `ids` [Q, >=k]
  (view's searcher's) found}, on at most RECALL_QUERIES queries; {} for an
  exact view."""
  if view.searcher is None:
    return {}
  ids = np.asarray(ids)
  kk = min(k, ids.shape[1])
  rows = np.arange(len(ids))
  if len(rows) > RECALL_QUERIES:
    rows = np.sort(np.random.default_rng(0).choice(len(rows),
                                                   RECALL_QUERIES, False))
  _, exact = view.exact_search(
      np.asarray(queries)[rows], kk,
      None if exclude is None else np.asarray(exclude)[rows])
  return {f"scann_recall@{kk}": knn.neighbour_recall(ids[rows, :kk], exact)}
