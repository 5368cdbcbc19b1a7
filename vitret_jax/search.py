"""Search a folder of one's own images: query an index built by
--mode=index (vitret_jax/indexing.py).

An index folder is a descriptor store (vitret_jax/store): the descriptors
in memory-mapped shards, the files' paths relative to the indexed root,
and the manifest `store.json`, whose `extra` names the root, the embedder
and the searcher (exact search streamed over the shards, or
`scann-<generation>/`), and the database augmented by αDBA when the index
was built with --dba (index_dba.py). `Index` opens it memory-mapped and can
reload it when it grows. Indexes of vitret_jax 0.1 (`embeddings.npy`,
`files.json`, `scann/`) are still read.

The manifest's identity (embedder_identity) records what made the
descriptors: parameter, whitening and model digests, preprocessing,
scales, how the host ran it, whether photos were turned upright (EXIF
orientation), the index format. An Index opened with an embedder refuses,
at opening and every reload, an index made by another one (descriptors of
two embedders are not comparable; a photo indexed sideways is not found by
its upright query), and one not recording whether its photos were turned
upright (0.1, INDEX_FORMAT 1) unless `allow_mismatch` (said once); any
index is read without an embedder (browsing, ids).
"""
import collections.abc
import copy
import json
import os
import threading

import numpy as np
from absl import logging

from vitret_jax import image_files
from vitret_jax import index_dba
from vitret_jax.data import folder as folder_data
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError
from vitret_jax.errors import first_line
from vitret_jax.eval import knn
from vitret_jax.eval import rerank as rerank_lib
from vitret_jax.eval import rerank_spec
from vitret_jax.store import scann_search
from vitret_jax.store import view as view_lib
from vitret_jax.store import writer

IMAGE_EXTENSIONS = folder_data.IMAGE_EXTENSIONS
# The index format the identity records; indexes of format 1 (vitret_jax
# 0.2.0 development builds) do not record whether photos were turned
# upright, those of 0.1 record no identity at all.
INDEX_FORMAT = 2


def list_images(folder):
  """Every image file under `folder` (recursively, no hidden ones), sorted."""
  if not os.path.isdir(folder):
    raise DataError(f"--images={folder!r} is not a folder.")
  return folder_data.list_images(folder)


def is_index(index_dir):
  """True when `index_dir` holds an index (of this version or 0.1)."""
  return (os.path.isfile(os.path.join(index_dir, writer.MANIFEST))
          or os.path.isfile(os.path.join(index_dir, "files.json")))


def embedder_identity(embedder):
  """What makes an embedder's index descriptors: image_files.identity,
  whether files are turned upright (its `exif_transpose`; embedders
  without one turn them upright, as image_files reads them) and
  INDEX_FORMAT."""
  out = image_files.identity(embedder)
  out["exif_transpose"] = bool(getattr(embedder, "exif_transpose", True))
  out["index_format"] = INDEX_FORMAT
  return out


def _embedder_dim(embedder):
  """The descriptor size an embedder declares (an artifact's model.json), or
  0 (then checked at the first query)."""
  meta = getattr(embedder, "meta", None)
  return int(meta.get("embedding_dim") or 0) if isinstance(meta, dict) else 0


def build_index(embedder, folder, index_dir, **options):
  """indexing.build_index's (indexed, skipped [(path, reason)]), as 0.1's."""
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
    self.root = files["root"]
    self.paths = [os.path.join(self.root, p) for p in files["files"]]
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
  """One opening of an index (Index swaps it whole on reload): its rows,
  what made them (`identity`: None for vitret_jax 0.1; `source`: the
  artifact or run named at build; `root`: the indexed folder), `dba`:
  the Expansion of its augmented database `augmented` (None: none) and
  `dba_error`: why that did not open (rows searchable, dba refused)."""

  def __init__(self, index_dir):
    self.stamp = _stamp(index_dir)
    if os.path.isfile(os.path.join(index_dir, "files.json")):
      legacy = _Legacy(index_dir)
      self.database, self.paths = legacy.database, legacy.paths
      self.position, self.generation = legacy.position, 0
      self.identity, self.source, self.root = None, "", legacy.root
      self.dba = self.augmented = self.dba_error = None
      return
    manifest = writer.read_manifest(index_dir)
    segments = writer.committed_segments(index_dir, manifest)
    self.database = view_lib.View(segments, manifest["dim"])
    extra = manifest["extra"]
    self.identity, self.root = manifest["identity"], extra["root"]
    self.source = extra.get("embedder", "")
    self.paths = _Paths(self.database, extra["root"])
    self.position = self.paths.position
    self.generation = manifest["generation"]
    info = extra.get("searcher", {})
    if info.get("kind") == "scann":
      self.database.searcher = scann_search.load(
          os.path.join(index_dir, info["folder"]), self.database)
    self.dba, self.augmented, self.dba_error = index_dba.open_held(
        index_dir, extra, *self.database.shape)


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


def _shown(value):
  text = json.dumps(value, default=str)
  return text if len(text) <= 60 else text[:57] + "..."


def _fix(state):
  """How to make an index and a query embedder agree."""
  rebuild = (f"rebuild the index with this embedder (--mode=index "
             f"--overwrite --images={state.root})")
  if not state.source:
    return rebuild
  flag = ("--pretrained" if os.path.isfile(os.path.join(
      state.source, "model.json")) else "--workdir")
  return f"{rebuild}, or query it with {flag}={state.source} (its own)"


def mismatch(index_dir, state, want, want_dim=0):
  """(why the embedder of identity `want` (embedder_identity) may not
  query the index opened as `state`, whether --allow_index_mismatch may
  overrule it), or None when it may."""
  have, dim = state.identity, state.database.shape[1]
  if want_dim and dim and want_dim != dim:
    return (f"{index_dir} holds {dim}-d descriptors, this embedder makes "
            f"{want_dim}-d ones: {_fix(state)}.", False)
  known = have is not None and "index_format" in have
  if have is not None:
    keys = sorted((set(have) | set(want)) - {"index_format"} - (
        set() if known else {"exif_transpose"}))
    diff = [f"{k} {_shown(have.get(k))} (this embedder: "
            f"{_shown(want.get(k))})" for k in keys
            if have.get(k) != want.get(k)]
    if diff:
      return (f"{index_dir} was built by another embedder than this one: "
              f"{'; '.join(diff[:3])}: {_fix(state)}.", True)
  if not known and want["exif_transpose"]:
    made = ("vitret_jax 0.1" if have is None
            else f"index format {have.get('index_format', 1)}")
    return (f"{index_dir} ({made}) does not record whether its photos were "
            f"turned upright (EXIF orientation), and this embedder turns "
            f"queries upright: photos taken sideways may not be found; "
            f"rebuild it (--mode=index --overwrite --images={state.root}),"
            f" or pass --allow_index_mismatch to search it as it is.", True)
  return None


class Index:
  """A saved index: its image `paths`, descriptors `embeddings` (the
  memory-mapped database, store/view.py) and searcher; a missing or
  damaged one is a one-line UserError. Opened with the `embedder` that
  will query it, an index made by another embedder is a UserError
  (`mismatch`), or with `allow_mismatch` a warning logged once (never a
  different descriptor size).

  `changed()` says cheaply (one stat) whether the index on disk is another
  than the one open (grown by --update, rebuilt); `reload()` opens the new
  one, checks it as at opening, and swaps it in whole, so a search running
  meanwhile finishes on the old one (whose memory-mapped files stay
  readable), and a failed reload leaves the old one in place;
  `snapshot()` pins the current one for a request that makes several
  lookups.
  """

  def __init__(self, index_dir, embedder=None, allow_mismatch=False):
    self.index_dir = index_dir
    self._want = None if embedder is None else embedder_identity(embedder)
    self._want_dim = _embedder_dim(embedder)
    self.allow_mismatch, self._warned = allow_mismatch, set()
    self._reloading = threading.Lock()
    if not is_index(index_dir):
      raise UserError(f"{index_dir} is not an index: build one with "
                      f"--mode=index --images=FOLDER.")
    self._state = self._open()

  def _open(self):
    if not is_index(self.index_dir):  # e.g. inside a rebuild's swap
      raise UserError(f"{self.index_dir} holds no index now (moved away, "
                      f"or a rebuild is putting the new one in place): "
                      f"reload once it is there, or build it with "
                      f"--mode=index.")
    state = self._open_state()
    if self._want is not None:
      why = mismatch(self.index_dir, state, self._want, self._want_dim)
      if why is not None and not (self.allow_mismatch and why[1]):
        raise UserError(why[0])
      if why is not None and why[0] not in self._warned:
        self._warned.add(why[0])
        logging.warning("--allow_index_mismatch: %s", why[0])
    return state

  def _open_state(self, tries=3):
    """_State of the index, opened again when it changed meanwhile (an
    update removes the generation it replaced right after its commit)."""
    for attempt in range(1, tries + 1):
      stamp = _stamp(self.index_dir)
      try:
        state = _State(self.index_dir)
      except UserError:
        raise
      except (OSError, ValueError, EOFError, KeyError, TypeError,
              RuntimeError) as e:
        if attempt < tries and _stamp(self.index_dir) != stamp:
          continue
        raise UserError(f"{self.index_dir}: the index is damaged ("
                        f"{first_line(e, 120)}); build it again with "
                        f"--mode=index --overwrite.") from e
      if state.dba_error is None or _stamp(self.index_dir) == stamp or (
          attempt == tries):
        return state

  def changed(self) -> bool:
    return _stamp(self.index_dir) != self._state.stamp

  def snapshot(self):
    """This index as it is now, unaffected by a later reload(): what one
    request should use for all its lookups (ids, paths, descriptors)."""
    return copy.copy(self)

  def reload(self) -> bool:
    """Opens the index again if it changed on disk (True); a UserError
    (damaged, half-written, another embedder's) keeps the open one."""
    with self._reloading:
      if not self.changed():
        return False
      self._state = self._open()
    logging.info("Reloaded %s: %d images (generation %d).", self.index_dir,
                 len(self), self._state.generation)
    return True

  @property
  def generation(self) -> int:
    """The index's generation (each build or update adds one; 0: 0.1)."""
    return self._state.generation

  @property
  def paths(self):
    return self._state.paths

  @property
  def dba(self):
    """The Expansion of the index's augmented database (--dba), or None."""
    return self._state.dba

  def check_rerank(self, plan, where="--rerank"):
    """A one-line UserError when the Plan `plan` needs an augmented
    database this index does not hold (another dba, or none)."""
    index_dba.check(plan, self._state.dba, self.index_dir, self._state.root,
                    where, self._state.dba_error)

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
    superglobal, and dba when the index holds that augmented database),
    through the index's own searchers, as the evaluator's Reranker ranks.
    """
    if k < 1:
      raise UserError(f"top_k={k}: ask for at least one result.")
    state = self._state
    queries = np.asarray(queries, np.float32)
    dim = state.database.shape[1]
    if len(state.database) and queries.shape[-1] != dim:
      raise UserError(f"Queries of {queries.shape[-1]} dimensions for an "
                      f"index of {dim}: {_fix(state)}.")
    excl = (np.asarray(exclude, np.int64) if len(exclude)
            else np.full(len(queries), -1, np.int64))
    if rerank is not None:
      plan = (rerank if isinstance(rerank, rerank_spec.Plan)
              else rerank_spec.for_index(rerank))
      index_dba.check(plan, state.dba, self.index_dir, state.root,
                      error=state.dba_error)
      reranker = rerank_lib.Reranker(state.database)
      if state.augmented is not None:  # computed at --mode=index
        reranker.augmented[state.dba] = state.augmented
      return rerank_lib.rerank_hits(None, queries, k, plan, excl, reranker)
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
