"""Search a folder of one's own images: index it once, then query it.

An index folder holds `scann/` (the ScaNN searcher), `embeddings.npy`
[N, E], `files.json` (the N image paths, relative to the indexed root, and
that root) and `index.json` (where the embedder came from). Any embedder with
`preprocess` (a pp spec) and `__call__(images) -> [B, E]` works: an exported
artifact (export.Embedder) or a training run (RunEmbedder).
"""
import json
import os
import shutil

import jax
import numpy as np
import tqdm

from vitret_jax import descriptor
from vitret_jax import image_files
from vitret_jax.data import folder as folder_data
from vitret_jax.data import preprocess
from vitret_jax.errors import DataError
from vitret_jax.errors import UserError
from vitret_jax.eval import knn

IMAGE_EXTENSIONS = folder_data.IMAGE_EXTENSIONS


class RunEmbedder:
  """The descriptors of a training run's latest checkpoint, as its
  evaluator computes them: that evaluator's preprocessing, scales and
  learned whitening (experiment.run_whitening), around the model.

  Args:
    config: the run's config.
    workdir: the run folder.
    eval_name: the evaluator to follow (default: the config's first).
  """

  def __init__(self, config, workdir, eval_name=""):
    from vitret_jax import checkpoint  # pylint: disable=g-import-not-at-top
    from vitret_jax import experiment  # pylint: disable=g-import-not-at-top
    from vitret_jax import models  # pylint: disable=g-import-not-at-top
    from vitret_jax import sharding  # pylint: disable=g-import-not-at-top
    if not config.evals:
      raise UserError("the config has no evals section to take the "
                      "evaluation preprocessing from.")
    self.eval_name = eval_name or next(iter(config.evals))
    if self.eval_name not in config.evals:
      raise UserError(f"--export_eval={self.eval_name!r}: the run's "
                      f"evaluators are {sorted(config.evals)}.")
    ev = config.evals[self.eval_name]
    self.model = models.build_model(config.model)
    self.params, self.step = checkpoint.load_run_params(workdir,
                                                        with_step=True)
    self.preprocess = ev.pp
    spec = preprocess.PPSpec(self.preprocess)
    self.image_size = spec.size if spec.fixed_size else config.model.image_size
    self.fixed_size = spec.fixed_size
    self.scales = tuple(float(s) for s in ev.get("scales", (1.0,)))
    self.multiple = models.input_stride(self.model)
    self.whitening = experiment.run_whitening(
        config, workdir, self.eval_name, self.params, self.step, self.model,
        sharding.make_mesh())
    apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                                  train=False))
    self._describe = descriptor.MultiScale(
        lambda x: apply(self.params, x), self.scales, self.multiple,
        self.whitening)

  def __call__(self, images):
    return self._describe(images)

  def embed_files(self, paths, batch_size=64):
    """Descriptors [N, E] of image files, in order (as
    export.Embedder.embed_files)."""
    return image_files.embed_all(self, paths, batch_size)


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
  """A saved index: `search(embeddings, k, exclude=None)`."""

  def __init__(self, index_dir):
    if not os.path.isfile(os.path.join(index_dir, "files.json")):
      raise UserError(f"{index_dir} is not an index: build one with "
                      f"--mode=index --images=FOLDER.")
    with open(os.path.join(index_dir, "files.json")) as f:
      files = json.load(f)
    self.paths = [os.path.join(files["root"], p) for p in files["files"]]
    self._pos = {os.path.abspath(p): i for i, p in enumerate(self.paths)}
    self.searcher = knn.load_scann(os.path.join(index_dir, "scann"))

  def __len__(self):
    return len(self.paths)

  def search(self, queries, query_paths, k):
    """Top-k [(path, score)] per query, best first; a query file that is
    itself in the index is left out of its own results. A query gets at
    most as many results as the index holds other images: never a padded
    row."""
    if k < 1:
      raise UserError(f"top_k={k}: ask for at least one result.")
    # One more than asked, in case the query itself is found, but never
    # more than the index holds (ScaNN would pad the rest).
    scores, idx = knn.scann_search(self.searcher, queries,
                                   min(k + 1, len(self.paths)))
    out = []
    for qp, s_row, i_row in zip(query_paths, scores, idx):
      me = self._pos.get(os.path.abspath(qp), -1)
      hits = [(self.paths[i], float(s)) for s, i in zip(s_row, i_row)
              if i != me and 0 <= i < len(self.paths)]
      out.append(hits[:k])
    return out


def query_paths(query):
  """A single image, or every image under a folder."""
  if os.path.isdir(query):
    return list_images(query)
  if not os.path.isfile(query):
    raise DataError(f"--query={query!r}: no such file or folder.")
  return [query]
