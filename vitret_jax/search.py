"""Search a folder of one's own images: index it once, then query it.

An index folder holds `scann/` (the ScaNN searcher), `embeddings.npy`
[N, E], `files.json` (the N image paths, relative to the indexed root, and
that root) and `index.json` (where the embedder came from). Any embedder with
`preprocess` (a pp spec) and `__call__(images) -> [B, E]` works: an exported
artifact (export.Embedder) or a training run (experiment.RunEmbedder).
"""
import json
import os
import shutil

import numpy as np

from vitret_jax import image_files
from vitret_jax.data import folder as folder_data
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError
from vitret_jax.eval import knn

IMAGE_EXTENSIONS = folder_data.IMAGE_EXTENSIONS


def list_images(folder):
  """Every image file under `folder` (recursively, hidden entries left
  out), sorted."""
  if not os.path.isdir(folder):
    raise DataError(f"--images={folder!r} is not a folder.")
  return folder_data.list_images(folder)


def build_index(embedder, folder, index_dir, *, overwrite=False, source="",
                batch_size=64, scann_options=None):
  """Embeds every image under `folder` and saves a searchable index.

  Returns (number indexed, skipped [(path, reason)]).
  """
  if os.path.exists(index_dir) and not overwrite:
    raise UserError(f"{index_dir} exists: pass --overwrite to replace the "
                    f"index, or choose another --index_dir.")
  paths = list_images(folder)
  if not paths:
    raise DataError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under "
                    f"{folder}.")
  emb, kept, skipped = image_files.embed_files(embedder, paths, batch_size,
                                                 "index")
  if not kept:
    raise DataError(f"None of the {len(paths)} images under {folder} could "
                    f"be read.")
  searcher = knn.build_scann(emb, 10, **(scann_options or {}))
  tmp = index_dir.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "scann"))
  # Relative asset paths, so the index survives the rename and being moved.
  searcher.serialize(os.path.join(tmp, "scann"), relative_path=True)
  np.save(os.path.join(tmp, "embeddings.npy"), emb)
  root = os.path.abspath(folder)
  with open(os.path.join(tmp, "files.json"), "w") as f:
    json.dump({"root": root,
               "files": [os.path.relpath(p, root) for p in kept]}, f)
  with open(os.path.join(tmp, "index.json"), "w") as f:
    json.dump({"embedder": source, "count": len(kept),
               "dim": int(emb.shape[1]), "skipped": len(skipped)}, f)
  if os.path.exists(index_dir):
    shutil.rmtree(index_dir)
  os.rename(tmp, index_dir)
  return len(kept), skipped


class Index:
  """A saved index: its image `paths`, descriptors `embeddings` [N, E] and
  ScaNN searcher; a missing or damaged one is a one-line UserError."""

  def __init__(self, index_dir):
    if not os.path.isfile(os.path.join(index_dir, "files.json")):
      raise UserError(f"{index_dir} is not an index: build one with "
                      f"--mode=index --images=FOLDER.")
    try:
      with open(os.path.join(index_dir, "files.json")) as f:
        files = json.load(f)
      self.paths = [os.path.join(files["root"], p) for p in files["files"]]
      self.embeddings = np.load(os.path.join(index_dir, "embeddings.npy"),
                                mmap_mode="r")
      self.searcher = knn.load_scann(os.path.join(index_dir, "scann"))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
      raise UserError(f"{index_dir}: the index is damaged "
                      f"({str(e).splitlines()[0][:120]}); build it again "
                      f"with --mode=index --overwrite.") from e
    if len(self.embeddings) != len(self.paths):
      raise UserError(f"{index_dir}: the index is damaged ("
                      f"{len(self.embeddings)} descriptors for "
                      f"{len(self.paths)} files); build it again with "
                      f"--mode=index --overwrite.")
    self._pos = {os.path.abspath(p): i for i, p in enumerate(self.paths)}

  def __len__(self):
    return len(self.paths)

  def position(self, path):
    """The index id of a file, or -1 when it is not indexed."""
    return self._pos.get(os.path.abspath(path), -1)

  def search_ids(self, queries, k, exclude=()):
    """Top-k [(id, score)] per query, best first, without the id
    `exclude[i]` (-1: none) of query i. A query gets at most as many
    results as the index holds other images: never a padded row."""
    if k < 1:
      raise UserError(f"top_k={k}: ask for at least one result.")
    # One more than asked, in case the query itself is found, but never
    # more than the index holds (ScaNN would pad the rest).
    scores, idx = knn.scann_search(self.searcher, queries,
                                   min(k + 1, len(self.paths)))
    out = []
    for q, (s_row, i_row) in enumerate(zip(scores, idx)):
      me = exclude[q] if len(exclude) else -1
      hits = [(int(i), float(s)) for s, i in zip(s_row, i_row)
              if i != me and 0 <= i < len(self.paths)]
      out.append(hits[:k])
    return out

  def search(self, queries, query_paths, k):
    """Top-k [(path, score)] per query, best first; a query file that is
    itself in the index is left out of its own results."""
    exclude = [self.position(p) for p in query_paths]
    return [[(self.paths[i], s) for i, s in hits]
            for hits in self.search_ids(queries, k, exclude)]


def query_paths(query):
  """A single image, or every image under a folder."""
  if os.path.isdir(query):
    return list_images(query)
  if not os.path.isfile(query):
    raise DataError(f"--query={query!r}: no such file or folder.")
  return [query]
