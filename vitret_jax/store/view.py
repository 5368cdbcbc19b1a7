"""Reading descriptors without holding them: the database interface that
search, serving and re-ranking code against.

Every database here (a store's shards, an in-memory array, several of
them one after the other) offers:
  .shape (N, E), len(), .dtype float32
  db[ids]            rows of an int array of ids (any shape) -> float32
                     [..., E], gathered from the memory-mapped shards
  db.blocks()        (first id, float32 [r, E]) in id order, one shard at
                     a time
  db.search(queries [Q, E], k, exclude=None)
                     (scores [Q, k], ids [Q, k]) by inner product, best
                     first, -inf / -1 for empty slots; exclude[i] is an id
                     query i never retrieves (-1: none). Exact and streamed
                     block by block (eval/knn.py), unless a searcher is
                     attached (`db.searcher`: anything with that search
                     method, e.g. store/scann_search.py or
                     eval/searchers.py's; db.exact_search ignores it).
"""
import os

import numpy as np

from vitret_jax.errors import UserError
from vitret_jax.eval import knn


# What a damaged store's error says to do (indexes: --mode=index --update
# embeds a damaged shard's files again).
_REPAIR = ("run the command that wrote it again (an index: --mode=index "
           "--update).")


class _Rows:
  """What every database shares: the search over its blocks."""

  searcher = None  # an attached approximate searcher (scann_search)
  block_rows = 0  # rows of the longest block (0: unknown)

  @property
  def shape(self):
    return (self._n, self._dim)

  @property
  def dtype(self):
    return np.dtype(np.float32)

  def __len__(self):
    return self._n

  def search(self, queries, k, exclude=None):
    """(scores [Q, k], ids [Q, k]) best first; see the module doc."""
    if k < 1:
      raise UserError(f"k={k}: ask for at least one neighbour.")
    if self.searcher is not None:
      return self.searcher.search(np.asarray(queries, np.float32), k,
                                  exclude)
    return self.exact_search(queries, k, exclude)

  def exact_search(self, queries, k, exclude=None):
    """search() exact, streamed block by block, even with a searcher
    attached (the reference an approximate searcher's recall is measured
    against)."""
    queries = np.asarray(queries, np.float32)
    if not self._n:
      return (np.full((len(queries), k), -np.inf, np.float32),
              np.full((len(queries), k), -1, np.int32))
    scores, ids = knn.exact_knn_blocks(queries, self.blocks(), self._n, k,
                                       exclude, block_rows=self.block_rows)
    return _pad_to(scores, ids, k)

  def _ids(self, ids):
    if isinstance(ids, slice):
      ids = np.arange(self._n)[ids]
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
      raise TypeError(f"database ids must be integers, not {ids.dtype}")
    flat = ids.reshape(-1).astype(np.int64)
    flat = np.where(flat < 0, flat + self._n, flat)
    if len(flat) and (flat.min() < 0 or flat.max() >= self._n):
      raise IndexError(f"ids outside 0..{self._n - 1}")
    return ids.shape, flat


def _pad_to(scores, ids, k):
  """k columns, empty slots added when fewer references exist."""
  if scores.shape[1] >= k:
    return scores, ids
  extra = k - scores.shape[1]
  return (np.pad(scores, ((0, 0), (0, extra)), constant_values=-np.inf),
          np.pad(ids, ((0, 0), (0, extra)), constant_values=-1))


def _gather(flat, starts, fetch, out):
  """out[i] = row flat[i], for ids grouped by the block (from `starts`)
  holding them: fetch(block, local rows) -> [n, E]."""
  block = np.searchsorted(starts, flat, "right") - 1
  order = np.argsort(block, kind="stable")
  cuts = np.searchsorted(block[order], np.arange(len(starts) + 1))
  for b in range(len(starts)):
    sel = order[cuts[b]:cuts[b + 1]]
    if len(sel):
      out[sel] = fetch(b, flat[sel] - starts[b])
  return out


class View(_Rows):
  """The live rows of a store's segments, memory-mapped (np.load
  mmap_mode="r"): ids count rows in order of segments, shards and items.

  Args:
    segments: segment.Segment list (committed, or about to be).
    dim: the descriptor size (0 for an empty store).
  """

  def __init__(self, segments, dim):
    self.segments, self._dim = segments, int(dim)
    self._arrays, self._rows, starts = [], [], [0]
    self._seg_base, seg_pos, self._block_seg = [], [], []
    for si, seg in enumerate(segments):
      self._seg_base.append(starts[-1])
      positions = []
      for s in range(seg.num_shards):
        if seg.all_dropped(s):
          continue
        if seg.record(s) is None:
          raise UserError(f"{seg.record_path(s)} is missing or unreadable: "
                          f"the store is damaged; {_REPAIR}")
        pos, live = seg.live_positions(s)
        if not live.any():
          continue
        arr = _open_shard(seg, s, len(pos), self._dim)
        self._arrays.append(arr)
        self._rows.append(None if live.all() else np.flatnonzero(live))
        self._block_seg.append(si)
        positions.append(pos[live])
        starts.append(starts[-1] + int(live.sum()))
      seg_pos.append(np.concatenate(positions) if positions
                     else np.zeros(0, np.int64))
    self._seg_pos = seg_pos
    self._starts = np.asarray(starts[:-1], np.int64)
    self._n = starts[-1]
    self.block_rows = int(np.diff(starts).max()) if self._arrays else 0

  def __getitem__(self, ids):
    shape, flat = self._ids(ids)
    out = np.empty((len(flat), self._dim), np.float32)

    def fetch(b, local):
      rows = local if self._rows[b] is None else self._rows[b][local]
      order = np.argsort(rows)  # ascending reads of the mapped file
      got = np.empty((len(rows), self._dim), np.float32)
      got[order] = self._arrays[b][rows[order]]
      return got
    return _gather(flat, self._starts, fetch, out).reshape(
        shape + (self._dim,))

  def blocks(self):
    for b, arr in enumerate(self._arrays):
      rows = self._rows[b]
      yield int(self._starts[b]), (arr if rows is None else arr[rows])

  def item_positions(self, segment=0):
    """Item positions [rows of the segment] of a segment's rows, in id
    order (ids from the segment's first)."""
    return self._seg_pos[segment]

  def item(self, i):
    """(segment index, item position) of row i."""
    si = int(np.searchsorted(self._seg_base, i, "right") - 1)
    return si, int(self._seg_pos[si][i - self._seg_base[si]])

  def path(self, i) -> str:
    """The path (as listed) of the item of row i."""
    si, pos = self.item(i)
    return self.segments[si].items[pos]

  def position(self, path) -> int:
    """The row of the item listed as `path`, or -1 when none."""
    for si, seg in enumerate(self.segments):
      pos = seg.items.position(path)
      if pos < 0:
        continue
      j = int(np.searchsorted(self._seg_pos[si], pos))
      if j < len(self._seg_pos[si]) and self._seg_pos[si][j] == pos:
        return self._seg_base[si] + j
    return -1


def _open_shard(seg, s, rows, dim):
  """Shard s memory-mapped, its size first checked against its record (a
  truncated or extended file is refused, not read)."""
  path = seg.npy(s)
  size = (seg.record(s).get("npy") or [None])[0]
  if os.path.exists(path) and os.path.getsize(path) != size:
    raise UserError(f"{path} has {os.path.getsize(path)} bytes, its record "
                    f"says {size}: the store is damaged; {_REPAIR}")
  try:
    arr = np.load(path, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable ({e}); the store is damaged; "
                    f"{_REPAIR}") from e
  if arr.shape != (rows, dim) or arr.dtype != np.float32:
    raise UserError(f"{path} holds {arr.shape} {arr.dtype}, its record "
                    f"says ({rows}, {dim}) float32: the store is damaged; "
                    f"{_REPAIR}")
  return arr


class ArrayView(_Rows):
  """An array [N, E] (in memory, or np.memmap) as a database."""

  BLOCK = 65536

  def __init__(self, array):
    self.array = array
    self._n, self._dim = (int(array.shape[0]),
                          int(array.shape[1]) if array.ndim == 2 else 0)
    self.block_rows = min(self._n, self.BLOCK)

  def __getitem__(self, ids):
    shape, flat = self._ids(ids)
    return np.asarray(self.array[flat], np.float32).reshape(
        shape + (self._dim,))

  def blocks(self, rows=0):
    """(first id, rows [r, E]) in blocks of `rows` (default BLOCK)."""
    rows = rows or self.BLOCK
    for s in range(0, self._n, rows):
      yield s, np.asarray(self.array[s:s + rows], np.float32)


class Stacked(_Rows):
  """Databases one after the other (e.g. a data set's database, then a
  store of distractors): ids of part j start after those of part j-1."""

  def __init__(self, parts):
    parts = [p if isinstance(p, _Rows) else ArrayView(p) for p in parts]
    dims = {p.shape[1] for p in parts if len(p)}
    if len(dims) > 1:
      raise UserError(f"databases of different descriptor sizes {dims} "
                      f"cannot be searched together.")
    self.parts = parts
    self._starts = np.cumsum([0] + [len(p) for p in parts])[:-1]
    self._n = int(sum(len(p) for p in parts))
    self._dim = dims.pop() if dims else 0
    # The stores' shard size when there are stores: arrays are cut to it,
    # so no block is padded much (exact_knn_blocks pads to one size).
    stored = [p.block_rows for p in parts if not isinstance(p, ArrayView)]
    self.block_rows = max(stored or [p.block_rows for p in parts] or [0])

  def __getitem__(self, ids):
    shape, flat = self._ids(ids)
    out = np.empty((len(flat), self._dim), np.float32)
    return _gather(flat, self._starts, lambda b, local: self.parts[b][local],
                   out).reshape(shape + (self._dim,))

  def blocks(self):
    for start, part in zip(self._starts, self.parts):
      blocks = (part.blocks(self.block_rows) if isinstance(part, ArrayView)
                else part.blocks())
      for s, block in blocks:
        yield int(start) + s, block
