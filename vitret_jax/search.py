"""Search a folder of one's own images: query an index built by
--mode=index (vitret_jax/indexing.py).

An index folder is a descriptor store (vitret_jax/store): the descriptors
in memory-mapped shards, the files' paths relative to the indexed root,
and the manifest `store.json`, whose `extra` names the root, the embedder
and the searcher (exact search streamed over the shards, or
`scann-<generation>/`). `Index` opens it memory-mapped and can reload it
when it grows. Indexes of vitret_jax 0.1 (`embeddings.npy`, `files.json`,
`scann/`) are still read.
"""
import collections.abc
import copy
import json
import os

import numpy as np
from absl import logging

from vitret_jax.data import folder as folder_data
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError
from vitret_jax.eval import knn
from vitret_jax.eval import rerank as rerank_lib
from vitret_jax.eval import rerank_spec
from vitret_jax.store import scann_search
from vitret_jax.store import view as view_lib
from vitret_jax.store import writer

IMAGE_EXTENSIONS = folder_data.IMAGE_EXTENSIONS


def list_images(folder):
  """Every image file under `folder` (recursively, hidden entries left
  out), sorted."""
  if not os.path.isdir(folder):
    raise DataError(f"--images={folder!r} is not a folder.")
  return folder_data.list_images(folder)


def is_index(index_dir):
  """True when `index_dir` holds an index (of this version or 0.1)."""
  return (os.path.isfile(os.path.join(index_dir, writer.MANIFEST))
          or os.path.isfile(os.path.join(index_dir, "files.json")))


def build_index(embedder, folder, index_dir, **options):
  """(images indexed, skipped [(path, reason)]): indexing.build_index with
  `options`, returning what it returned in vitret_jax 0.1."""
  # indexing imports this module for list_images and is_index.
  from vitret_jax import indexing  # pylint: disable=g-import-not-at-top
  summary = indexing.build_index(embedder, folder, index_dir, **options)
  return summary["indexed"], summary["skipped"]


class _Paths(collections.abc.Sequence):
  """The absolute paths of an index's rows, decoded on demand."""

  def __init__(self, view, root):
    self._view, self._root = view, root

  def __len__(self):
    return len(self._view)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(i)
    return os.path.join(self._root, self._view.path(int(i) % len(self)))

  def position(self, path):
    rel = os.path.relpath(os.path.abspath(path), self._root)
    return self._view.position(rel)


class _Legacy:
  """An index of vitret_jax 0.1: files.json, embeddings.npy, scann/."""

  def __init__(self, index_dir):
    with open(os.path.join(index_dir, "files.json")) as f:
      files = json.load(f)
    self.paths = [os.path.join(files["root"], p) for p in files["files"]]
    self.database = view_lib.ArrayView(
        np.load(os.path.join(index_dir, "embeddings.npy"), mmap_mode="r"))
    self._scann = knn.load_scann(os.path.join(index_dir, "scann"))
    self._pos = {os.path.abspath(p): i for i, p in enumerate(self.paths)}
    self.database.searcher = self
    if len(self.database) != len(self.paths):
      raise ValueError(f"{len(self.database)} descriptors for "
                       f"{len(self.paths)} files")

  def position(self, path):
    return self._pos.get(os.path.abspath(path), -1)

  def search(self, queries, k, exclude=None):
    # One more than asked, in case the query itself is found, but never
    # more than the index holds (ScaNN would pad the rest).
    scores, idx = knn.scann_search(self._scann, queries,
                                   min(k + 1, len(self.paths)))
    if exclude is not None:
      mine = idx == np.asarray(exclude)[:, None]
      scores, idx = np.where(mine, -np.inf, scores), np.where(mine, -1, idx)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(scores, order, 1),
            np.take_along_axis(idx, order, 1))


class _State:
  """One opening of an index (Index swaps it whole on reload)."""

  def __init__(self, index_dir):
    self.stamp = _stamp(index_dir)
    if os.path.isfile(os.path.join(index_dir, "files.json")):
      legacy = _Legacy(index_dir)
      self.database, self.paths = legacy.database, legacy.paths
      self.position, self.generation = legacy.position, 0
      return
    manifest = writer.read_manifest(index_dir)
    segments = writer.committed_segments(index_dir, manifest)
    self.database = view_lib.View(segments, manifest["dim"])
    extra = manifest["extra"]
    self.paths = _Paths(self.database, extra["root"])
    self.position = self.paths.position
    self.generation = manifest["generation"]
    info = extra.get("searcher", {})
    if info.get("kind") == "scann":
      self.database.searcher = scann_search.load(
          os.path.join(index_dir, info["folder"]), self.database)


def _stamp(index_dir):
  """What changes when an index is rebuilt, updated or replaced."""
  out = []
  for name in (writer.MANIFEST, "files.json"):
    try:
      st = os.stat(os.path.join(index_dir, name))
      out.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
    except OSError:
      pass
  return tuple(out)


class Index:
  """A saved index: its image `paths`, descriptors `embeddings` (the
  memory-mapped database, store/view.py) and searcher; a missing or
  damaged one is a one-line UserError.

  `changed()` says cheaply (one stat) whether the index on disk is another
  than the one open (grown by --update, rebuilt); `reload()` opens the new
  one and swaps it in whole, so a search running meanwhile finishes on the
  old one (whose memory-mapped files stay readable); `snapshot()` pins the
  current one for a request that makes several lookups.
  """

  def __init__(self, index_dir):
    self.index_dir = index_dir
    if not is_index(index_dir):
      raise UserError(f"{index_dir} is not an index: build one with "
                      f"--mode=index --images=FOLDER.")
    self._state = self._open()

  def _open(self):
    try:
      return _State(self.index_dir)
    except UserError:
      raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
      raise UserError(f"{self.index_dir}: the index is damaged "
                      f"({str(e).splitlines()[0][:120]}); build it again "
                      f"with --mode=index --overwrite.") from e

  def changed(self) -> bool:
    return _stamp(self.index_dir) != self._state.stamp

  def snapshot(self):
    """This index as it is now, unaffected by a later reload(): what one
    request should use for all its lookups (ids, paths, descriptors)."""
    return copy.copy(self)

  def reload(self) -> bool:
    """Opens the index again if it changed on disk; True when it did."""
    if not self.changed():
      return False
    self._state = self._open()
    logging.info("Reloaded %s: %d images (generation %d).", self.index_dir,
                 len(self), self._state.generation)
    return True

  @property
  def paths(self):
    return self._state.paths

  @property
  def embeddings(self):
    return self._state.database

  @property
  def database(self):
    return self._state.database

  def __len__(self):
    return len(self._state.paths)

  def position(self, path):
    """The index id of a file, or -1 when it is not indexed."""
    return self._state.position(path)

  def search_ids(self, queries, k, exclude=(), rerank=None):
    """Top-k [(id, score)] per query, best first, without the id
    `exclude[i]` (-1: none) of query i. A query gets at most as many
    results as the index holds other images: never a padded row.
    `rerank`: a re-ranking spec or Plan (rerank_spec.for_index: aqe,
    superglobal), through the index's own searcher."""
    if k < 1:
      raise UserError(f"top_k={k}: ask for at least one result.")
    state = self._state
    queries = np.asarray(queries, np.float32)
    excl = (np.asarray(exclude, np.int64) if len(exclude)
            else np.full(len(queries), -1, np.int64))
    if rerank is not None:
      plan = (rerank if isinstance(rerank, rerank_spec.Plan)
              else rerank_spec.for_index(rerank))
      return rerank_lib.rerank_hits(state.database, queries, k, plan, excl)
    scores, idx = state.database.search(queries, k, excl)
    return [[(int(i), float(s)) for s, i in zip(s_row, i_row) if i >= 0][:k]
            for s_row, i_row in zip(scores, idx)]

  def search(self, queries, query_paths, k, rerank=None):
    """Top-k [(path, score)] per query, best first; a query file that is
    itself in the index is left out of its own results; `rerank` as
    search_ids'."""
    pinned = self.snapshot()  # one opening for the ids and their paths
    exclude = [pinned.position(p) for p in query_paths]
    return [[(pinned.paths[i], s) for i, s in hits]
            for hits in pinned.search_ids(queries, k, exclude, rerank)]


def query_paths(query):
  """A single image, or every image under a folder."""
  if os.path.isdir(query):
    return list_images(query)
  if not os.path.isfile(query):
    raise DataError(f"--query={query!r}: no such file or folder.")
  return [query]
